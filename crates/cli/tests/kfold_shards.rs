//! `kfold --fold I` as separate processes, `kfold merge`, and the scheduler
//! files in deploy/: the contract of issue "k-fold as scheduler jobs".

mod common;

use common::{assert_exit, fracture, s, text};

use std::path::{Path, PathBuf};
use std::process::Command;

fn synth_mura(dir: &Path, patients: usize) {
    let out = fracture(&[
        "synth",
        "-o",
        s(dir),
        "--layout",
        "mura",
        "--count",
        &patients.to_string(),
        "--size",
        "40",
    ]);
    assert_exit(&out, 0);
}

/// The k-fold command line shared by the whole run and its shards: a tiny
/// DenseNet, so that the threaded dense-block kernels take part.
fn kfold_args(data: &Path, seed: &str) -> Vec<String> {
    [
        "kfold",
        "-i",
        s(data),
        "--model",
        "densenet-tiny",
        "--size",
        "40",
        "--folds",
        "3",
        "--epochs",
        "2",
    ]
    .into_iter()
    .chain(["--batch", "8", "--seed", seed, "--quiet"])
    .map(String::from)
    .collect()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// Every number within 1e-9 and everything else equal, wall-clock seconds aside
/// (the shards ran apart and at once).
fn assert_same_report(whole: &serde_json::Value, merged: &serde_json::Value, at: &str) {
    use serde_json::Value;
    match (whole, merged) {
        (Value::Object(a), Value::Object(b)) => {
            let keys = |o: &serde_json::Map<String, Value>| o.keys().cloned().collect::<Vec<_>>();
            assert_eq!(keys(a), keys(b), "{at}: different fields");
            for (key, value) in a {
                if key != "seconds" {
                    assert_same_report(value, &b[key], &format!("{at}.{key}"));
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{at}: different lengths");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_same_report(x, y, &format!("{at}[{i}]"));
            }
        }
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((a - b).abs() <= 1e-9, "{at}: {a} against {b}");
        }
        (a, b) => assert_eq!(a, b, "{at}"),
    }
}

#[test]
fn three_fold_shards_run_at_once_merge_into_the_unsharded_report() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mura");
    synth_mura(&data, 12);
    let args = kfold_args(&data, "42");
    let str_args: Vec<&str> = args.iter().map(String::as_str).collect();

    let whole = dir.path().join("whole.json");
    let out = fracture(&[str_args.as_slice(), &["--report", s(&whole)]].concat());
    assert_exit(&out, 0);

    let shard = |i: usize| dir.path().join(format!("shard{i}.json"));
    // Spawned before any is waited for, so that the three really overlap.
    let children: Vec<_> = (1..=3)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_fracture"))
                .args(&args)
                .args(["--fold", &i.to_string(), "--report", shard(i).to_str().unwrap()])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("the fracture binary starts")
        })
        .collect();
    for child in children {
        assert_exit(&child.wait_with_output().unwrap(), 0);
    }
    let parsed = read_json(&shard(2));
    assert_eq!(parsed["format"], "fracture-kfold-shard/1");
    assert_eq!(parsed["shard"]["result"]["fold"], 2);
    assert_eq!(parsed["run"]["folds"], 3);
    assert_eq!(parsed["run"]["seed"], 42);
    assert!(parsed["run"]["data_fingerprint"].as_str().unwrap().len() == 64);

    // Shards in any order.
    let merged = dir.path().join("merged.json");
    let out = fracture(&[
        "kfold",
        "merge",
        shard(3).to_str().unwrap(),
        shard(1).to_str().unwrap(),
        shard(2).to_str().unwrap(),
        "--report",
        s(&merged),
    ]);
    assert_exit(&out, 0);
    assert!(text(&out.stdout).contains("Pooled ROC AUC"), "{}", text(&out.stdout));
    let (whole, merged_report) = (read_json(&whole), read_json(&merged));
    assert_eq!(
        whole["predictions"], merged_report["predictions"],
        "out-of-fold predictions differ"
    );
    assert_same_report(&whole, &merged_report, "report");
    assert!(dir.path().join("merged.roc.svg").is_file() && dir.path().join("merged.reliability.svg").is_file());

    check_bad_shard_sets(dir.path(), &data, &shard);
}

/// Each bad set of shards exits 1 and names what is wrong with it.
fn check_bad_shard_sets(dir: &Path, data: &Path, shard: &dyn Fn(usize) -> PathBuf) {
    let merge = |shards: &[&Path]| {
        let out_path = dir.join("bad.json");
        let mut args = vec!["kfold", "merge"];
        args.extend(shards.iter().map(|p| s(p)));
        args.extend(["--report", s(&out_path)]);
        let out = fracture(&args);
        assert_exit(&out, 1);
        assert!(!out_path.exists(), "a failed merge wrote a report");
        text(&out.stderr)
    };
    let (one, two, three) = (shard(1), shard(2), shard(3));

    let missing = merge(&[&one, &three]);
    assert!(missing.contains("no shard for fold 2 of 3"), "{missing}");

    let twice = merge(&[&one, &two, &two, &three]);
    assert!(
        twice.contains("fold 2 is given twice") && twice.contains("shard2.json"),
        "{twice}"
    );

    // Fold 3 of the same data with another seed: the odd one out is named.
    let args = kfold_args(data, "7");
    let other_seed = dir.join("seed7-fold3.json");
    let mut command: Vec<&str> = args.iter().map(String::as_str).collect();
    command.extend(["--fold", "3", "--report", s(&other_seed)]);
    assert_exit(&fracture(&command), 0);
    let foreign = merge(&[&one, &two, &other_seed]);
    assert!(
        foreign.contains("seed7-fold3.json: belongs to another run") && foreign.contains("seed 42 against 7"),
        "{foreign}"
    );

    // The same command on another data set.
    let other_data = dir.join("other");
    synth_mura(&other_data, 13);
    let args = kfold_args(&other_data, "42");
    let other_set = dir.join("other-fold1.json");
    let mut command: Vec<&str> = args.iter().map(String::as_str).collect();
    command.extend(["--fold", "1", "--report", s(&other_set)]);
    assert_exit(&fracture(&command), 0);
    let foreign = merge(&[&other_set, &two, &three]);
    assert!(
        foreign.contains("other-fold1.json: belongs to another run") && foreign.contains("data set"),
        "{foreign}"
    );

    // A whole-run report is not a shard; neither is an SVG.
    let whole = dir.join("whole.json");
    let not_a_shard = merge(&[&one, &two, &whole]);
    assert!(
        not_a_shard.contains("whole.json: not a kfold shard report"),
        "{not_a_shard}"
    );
    let svg = dir.join("merged.roc.svg");
    let not_json = merge(&[&one, &two, &svg]);
    assert!(
        not_json.contains("merged.roc.svg: not a kfold shard report"),
        "{not_json}"
    );
}

#[test]
fn fold_outside_the_folds_and_fold_without_a_report_are_refused() {
    let out = fracture(&["kfold", "-i", ".", "--folds", "3", "--fold", "4", "--report", "x.json"]);
    assert_exit(&out, 1);
    assert!(
        text(&out.stderr).contains("--fold 4 must be between 1 and --folds 3"),
        "{}",
        text(&out.stderr)
    );
    // A shard that is not written anywhere would be lost work.
    assert_exit(&fracture(&["kfold", "-i", ".", "--fold", "1"]), 2);
    assert_exit(&fracture(&["kfold", "merge", "--report", "x.json"]), 2);
}

#[test]
fn threads_come_from_the_flag_or_the_schedulers_allocation() {
    let bench = |threads: Option<&str>, slurm: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fracture"));
        command.args([
            "bench", "--model", "cnn", "--batch", "2", "--size", "32", "--reps", "1", "--warmup", "0",
        ]);
        if let Some(n) = threads {
            command.args(["--threads", n]);
        }
        match slurm {
            Some(n) => command.env("SLURM_CPUS_PER_TASK", n),
            None => command.env_remove("SLURM_CPUS_PER_TASK"),
        };
        let out = command.env_remove("RAYON_NUM_THREADS").output().unwrap();
        assert_exit(&out, 0);
        text(&out.stdout) + &text(&out.stderr)
    };
    assert!(bench(Some("3"), None).contains(", 3 threads)"));
    assert!(bench(None, Some("5")).contains(", 5 threads)"));
    // The flag wins over the allocation.
    assert!(bench(Some("2"), Some("5")).contains(", 2 threads)"));
    assert_exit(&fracture(&["bench", "--threads", "0"]), 1);

    // A CPU mask narrower than the machine (as a container's limit) is an allocation too.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores > 1 && Command::new("taskset").arg("--version").output().is_ok() {
        let out = Command::new("taskset")
            .args(["-c", "0", env!("CARGO_BIN_EXE_fracture")])
            .args([
                "bench", "--model", "cnn", "--batch", "2", "--size", "32", "--reps", "1", "--warmup", "0",
            ])
            .env_remove("SLURM_CPUS_PER_TASK")
            .env_remove("RAYON_NUM_THREADS")
            .output()
            .unwrap();
        assert_exit(&out, 0);
        assert!(text(&out.stdout).contains(", 1 threads)"), "{}", text(&out.stdout));
    }
}

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn slurm_scripts_are_valid_bash_and_pass_the_array_index_as_the_fold() {
    for script in ["slurm/kfold.sbatch", "slurm/merge.sbatch", "slurm/submit.sh"] {
        let out = Command::new("bash")
            .arg("-n")
            .arg(deploy(script))
            .output()
            .expect("bash runs");
        assert_exit(&out, 0);
    }
    let array = read(&deploy("slurm/kfold.sbatch"));
    assert!(
        array.contains("#SBATCH --array=1-10") && array.contains("--folds \"$FOLDS\"") && array.contains("FOLDS=10")
    );
    assert!(
        array.contains("--fold \"$SLURM_ARRAY_TASK_ID\""),
        "the array index must reach --fold"
    );
    assert!(read(&deploy("slurm/merge.sbatch")).contains("fracture kfold merge shards/fold*.json"));
    assert!(read(&deploy("slurm/submit.sh")).contains("--dependency=\"afterok:${array}\""));
}

#[test]
fn kubernetes_manifests_parse_as_an_indexed_job_and_its_merge() {
    use yaml_rust2::{Yaml, YamlLoader};
    let load = |name: &str| {
        let docs = YamlLoader::load_from_str(&read(&deploy(name))).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(docs.len(), 1, "{name}: one document");
        docs.into_iter().next().unwrap()
    };
    let job = load("kubernetes/kfold-job.yaml");
    assert_eq!(job["kind"].as_str(), Some("Job"));
    assert_eq!(job["spec"]["completionMode"].as_str(), Some("Indexed"));
    assert_eq!(job["spec"]["completions"].as_i64(), Some(10));
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    let command = container["args"][0].as_str().expect("a shell command line");
    assert!(
        command.contains("--folds 10") && command.contains("--fold $((JOB_COMPLETION_INDEX + 1))"),
        "{command}"
    );
    assert_eq!(container["resources"]["limits"]["cpu"].as_str(), Some("8"));

    let merge = load("kubernetes/kfold-merge-job.yaml");
    assert_eq!(merge["kind"].as_str(), Some("Job"));
    let command = merge["spec"]["template"]["spec"]["containers"][0]["args"][0]
        .as_str()
        .unwrap_or_default();
    assert!(
        command.contains("fracture kfold merge /work/shards/fold*.json"),
        "{command}"
    );
    assert!(!matches!(merge["spec"]["template"]["spec"]["volumes"], Yaml::BadValue));

    let containerfile = read(&deploy("Containerfile"));
    assert_eq!(
        containerfile.matches("\nFROM ").count() + containerfile.starts_with("FROM ") as usize,
        2,
        "two stages"
    );
    assert!(containerfile.contains("COPY --from=build /src/target/release/fracture"));
}

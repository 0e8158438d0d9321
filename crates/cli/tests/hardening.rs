//! The command line against hostile or unlucky input: blocking files, output
//! paths that cannot work, names that break formats, runs that diverge.
//! Each test here failed before its fix.

mod common;

use common::{assert_exit, fracture, fracture_line, s, text};

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `fracture detect --weights MODEL ARGS...`
fn detect(model: &Path, args: &[&str]) -> Output {
    let mut all = vec!["detect", "--weights", s(model)];
    all.extend_from_slice(args);
    fracture(&all)
}

/// Runs fracture and kills it if it has not finished within `limit`: a hang
/// must fail the test, not stall the suite.
fn fracture_within(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fracture"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the fracture binary starts");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            panic!("fracture {args:?} still ran after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn synth(dir: &Path, layout: &str, count: usize) {
    assert_exit(
        &fracture(&[
            "synth",
            "-o",
            s(dir),
            "--layout",
            layout,
            "--count",
            &count.to_string(),
            "--size",
            "40",
        ]),
        0,
    );
}

/// A small DenseNet (heat maps need one), trained for one epoch.
fn tiny_model(dir: &Path) -> PathBuf {
    let data = dir.join("train-data");
    synth(&data, "classes", 8);
    let model = dir.join("tiny.safetensors");
    let out = fracture(&[
        "train",
        "-i",
        s(&data),
        "--model",
        "densenet-tiny",
        "--recipe",
        "scratch",
        "--size",
        "40",
        "--epochs",
        "1",
        "-o",
        s(&model),
        "--quiet",
    ]);
    assert_exit(&out, 0);
    model
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    let c_path = std::ffi::CString::new(s(path)).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
}

#[cfg(unix)]
#[test]
fn fifos_and_devices_are_refused_without_hanging_and_the_rest_of_the_batch_runs() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let image = dir.path().join("train-data/Fracture/fracture_00000.png");
    assert!(image.is_file());
    let fifo = dir.path().join("scan.png");
    mkfifo(&fifo);

    let out = fracture_within(
        &["detect", "--weights", s(&model), "-i", s(&fifo), "-i", s(&image)],
        Duration::from_secs(60),
    );
    // The named FIFO is an error (exit 1); the valid image still gets its row.
    assert_exit(&out, 1);
    assert!(
        text(&out.stdout).contains("fracture_00000.png"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("not a regular file (it is a FIFO)"),
        "{}",
        text(&out.stderr)
    );

    let out = fracture_within(
        &["detect", "--weights", s(&model), "-i", "/dev/zero"],
        Duration::from_secs(60),
    );
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("it is a device"), "{}", text(&out.stderr));

    let out = fracture_within(
        &["detect", "--weights", s(&fifo), "-i", s(&image)],
        Duration::from_secs(60),
    );
    assert_exit(&out, 1);
    assert!(
        text(&out.stderr).contains("--weights") && text(&out.stderr).contains("FIFO"),
        "{}",
        text(&out.stderr)
    );
}

#[cfg(unix)]
#[test]
fn symlinked_images_count_and_an_unlistable_folder_is_skipped_by_name() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let scans = dir.path().join("scans");
    std::fs::create_dir_all(scans.join("locked")).unwrap();
    std::fs::copy(
        dir.path().join("train-data/Fracture/fracture_00000.png"),
        scans.join("a.png"),
    )
    .unwrap();
    std::fs::copy(
        dir.path().join("train-data/Normal/normal_00000.png"),
        scans.join("locked/b.png"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        dir.path().join("train-data/Normal/normal_00001.png"),
        scans.join("linked.png"),
    )
    .unwrap();

    let out = detect(&model, &["-i", s(&scans), "--format", "csv"]);
    assert_exit(&out, 0);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("linked.png"),
        "the symlinked image is missing:\n{stdout}"
    );

    std::fs::set_permissions(scans.join("locked"), std::fs::Permissions::from_mode(0o000)).unwrap();
    // root reads any folder: there the lock cannot be tested.
    let locked_for_us = std::fs::read_dir(scans.join("locked")).is_err();
    let out = detect(&model, &["-i", s(&scans), "--format", "csv"]);
    std::fs::set_permissions(scans.join("locked"), std::fs::Permissions::from_mode(0o755)).unwrap();
    if locked_for_us {
        assert_exit(&out, 0);
        let stdout = text(&out.stdout);
        assert!(stdout.contains("a.png") && stdout.contains("linked.png"), "{stdout}");
        assert!(
            text(&out.stderr).contains("locked: cannot be listed"),
            "{}",
            text(&out.stderr)
        );
    } else {
        eprintln!("running as root: the unlistable-folder half of this test cannot apply");
    }
}

#[test]
fn heat_maps_mirror_the_input_folders_so_mura_names_do_not_collide() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let mura = dir.path().join("mura");
    synth(&mura, "mura", 4);
    let inputs: Vec<PathBuf> = walk(&mura)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    let same_name = inputs.iter().filter(|p| p.file_name().unwrap() == "image1.png").count();
    assert!(same_name > 1, "the synthetic set needs several image1.png");
    let maps = dir.path().join("maps");
    let out = detect(&model, &["-i", s(&mura), "--heatmap", s(&maps)]);
    assert_exit(&out, 0);
    let written = walk(&maps);
    assert_eq!(written.len(), inputs.len(), "one heat map per image: {written:?}");
    for input in &inputs {
        let relative = input.strip_prefix(&mura).unwrap();
        let expected = maps.join(relative.with_file_name(format!(
            "{}.heatmap.png",
            relative.file_stem().unwrap().to_string_lossy()
        )));
        assert!(
            expected.is_file(),
            "{} has no heat map at {}",
            input.display(),
            expected.display()
        );
    }

    // Two named files with one name get two maps.
    let a = inputs.iter().find(|p| p.file_name().unwrap() == "image1.png").unwrap();
    let b = inputs
        .iter()
        .filter(|p| p.file_name().unwrap() == "image1.png")
        .nth(1)
        .unwrap();
    let named = dir.path().join("named");
    assert_exit(&detect(&model, &["-i", s(a), "-i", s(b), "--heatmap", s(&named)]), 0);
    assert!(named.join("image1.heatmap.png").is_file() && named.join("image1-2.heatmap.png").is_file());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

#[cfg(unix)]
#[test]
fn odd_file_names_stay_in_their_column_and_map_back() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let source = dir.path().join("train-data/Fracture/fracture_00000.png");
    let scans = dir.path().join("odd");
    std::fs::create_dir_all(&scans).unwrap();
    for name in [&b"carriage\rreturn.png"[..], b"tab\there.png", b"latin1-\xe9.png"] {
        std::fs::copy(&source, scans.join(std::ffi::OsStr::from_bytes(name))).unwrap();
    }
    let out = detect(&model, &["-i", s(&scans), "--format", "csv"]);
    assert_exit(&out, 0);
    let csv = text(&out.stdout);
    // Every row is one line with three fields: header + 3.
    assert_eq!(csv.lines().count(), 4, "{csv:?}");
    assert!(
        csv.contains("carriage\\rreturn.png") && csv.contains("latin1-\\xe9.png"),
        "{csv:?}"
    );

    let out = detect(&model, &["-i", s(&scans), "--format", "text"]);
    assert_exit(&out, 0);
    for line in text(&out.stdout).lines() {
        assert_eq!(line.split('\t').count(), 3, "a name broke the columns: {line:?}");
    }
    assert!(text(&out.stdout).contains("tab\\there.png"));
}

#[test]
fn output_paths_are_checked_before_any_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synth(&data, "classes", 6);
    let train = |output: &Path| {
        fracture(&[
            "train",
            "-i",
            s(&data),
            "--model",
            "cnn",
            "--size",
            "40",
            "--epochs",
            "1",
            "-o",
            s(output),
        ])
    };
    let out = train(&dir.path().join("missing/model.safetensors"));
    assert_exit(&out, 1);
    assert!(
        text(&out.stderr).contains("missing does not exist"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !text(&out.stderr).contains("epoch"),
        "it trained first:\n{}",
        text(&out.stderr)
    );
    let out = train(dir.path());
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("is a directory"), "{}", text(&out.stderr));

    // kfold --report no longer creates folders that train would not.
    let report = dir.path().join("reports/kfold.json");
    let out = fracture_line(&format!(
        "kfold -i {} --model cnn --size 40 --folds 2 --epochs 1 --report {}",
        s(&data),
        s(&report)
    ));
    assert_exit(&out, 1);
    assert!(!dir.path().join("reports").exists(), "a folder was created");
}

#[test]
fn a_diverging_run_stops_with_an_error_and_writes_no_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synth(&data, "classes", 10);
    let model = dir.path().join("model.safetensors");
    let out = fracture_line(&format!(
        "train -i {} --model cnn --size 40 --epochs 3 --lr 1e30 -o {} --quiet",
        s(&data),
        s(&model)
    ));
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("training diverged"), "{}", text(&out.stderr));
    assert!(!model.exists(), "a diverged run wrote a model");
}

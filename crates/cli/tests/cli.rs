//! End-to-end tests of the `fracture` binary on synthetic data made here:
//! every command, its exit codes, its outputs, and its errors on bad input.

mod common;

use common::{assert_exit, fracture, fracture_line, s, text};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn synth(dir: &Path, layout: &str, count: usize, size: u32) {
    let out = fracture_line(&format!(
        "synth -o {} --layout {} --count {} --size {}",
        s(dir),
        layout,
        count,
        size
    ));
    assert_exit(&out, 0);
}

/// A small cnn trained once and shared by the detect tests.
fn trained_model(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    synth(&data, "classes", 30, 48);
    let model = dir.join("cnn.safetensors");
    let out = fracture_line(&format!(
        "train -i {} --model cnn -o {} --epochs 2 --size 48 --batch 8 --augment strong --quiet",
        s(&data),
        s(&model)
    ));
    assert_exit(&out, 0);
    model
}

#[test]
fn train_writes_model_card_history_and_curves_then_detect_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = trained_model(dir.path());
    assert!(dir.path().join("cnn.history.json").is_file());
    let svg = std::fs::read_to_string(dir.path().join("cnn.curves.svg")).unwrap();
    assert!(svg.contains("<svg"));
    assert!(
        !dir.path().join("cnn.safetensors.checkpoint").exists(),
        "checkpoint is removed after success"
    );
    let out = fracture(&["card", s(&model)]);
    assert_exit(&out, 0);
    let card: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let augmentation = &card["training"]["schedule"]["augmentation"];
    assert_eq!(
        (augmentation["translation"].as_f64(), augmentation["contrast"].as_f64()),
        (Some(0.1f32 as f64), Some(0.3f32 as f64)),
        "{augmentation}"
    );

    // CSV: header and one row per image, probability in [0, 1], label from the class folders.
    let data = dir.path().join("data");
    let out = fracture(&["detect", "--weights", s(&model), "-i", s(&data), "--format", "csv"]);
    assert_exit(&out, 0);
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("path,probability,label"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 60);
    for row in &rows {
        assert_eq!(row.len(), 3, "{row:?}");
        let p: f64 = row[1].parse().unwrap();
        assert!((0.0..=1.0).contains(&p));
        assert!(row[2] == "Fracture" || row[2] == "Normal", "{row:?}");
    }

    // JSON and text agree with CSV on the same file.
    let one = rows[0][0];
    let json = fracture(&["detect", "--weights", s(&model), "-i", one, "--format", "json"]);
    assert_exit(&json, 0);
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let p_json = parsed[0]["probability"].as_f64().unwrap();
    assert!((p_json - rows[0][1].parse::<f64>().unwrap()).abs() < 1e-6);
    let plain = fracture(&["detect", "--weights", s(&model), "-i", one]);
    assert_exit(&plain, 0);
    assert!(text(&plain.stdout).contains('%'));
}

#[test]
fn detect_skips_a_bad_file_in_a_directory_and_fails_on_a_named_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = trained_model(dir.path());
    let mixed = dir.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(
        dir.path()
            .join("data/Fracture")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
        mixed.join("good.png"),
    )
    .unwrap();
    std::fs::write(mixed.join("broken.png"), b"\x89PNG but not really").unwrap();

    let out = fracture(&["detect", "--weights", s(&model), "-i", s(&mixed), "--format", "csv"]);
    assert_exit(&out, 0);
    assert!(text(&out.stderr).contains("broken.png"), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 2, "header and the good image");

    let named = mixed.join("broken.png");
    let out = fracture(&["detect", "--weights", s(&model), "-i", s(&named)]);
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("broken.png"));
}

#[test]
fn wrong_weights_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("x.png");
    synth(&dir.path().join("d"), "classes", 1, 40);
    std::fs::copy(
        dir.path()
            .join("d/Normal")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
        &image,
    )
    .unwrap();

    let not_model = dir.path().join("notes.safetensors");
    std::fs::write(&not_model, b"this is text").unwrap();
    let out = fracture(&["detect", "--weights", s(&not_model), "-i", s(&image)]);
    assert_exit(&out, 1);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("notes.safetensors") && stderr.contains("not a safetensors file"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));

    let missing = dir.path().join("nope.safetensors");
    let out = fracture(&["detect", "--weights", s(&missing), "-i", s(&image)]);
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("nope.safetensors"));
}

#[test]
fn dataset_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let out_model = dir.path().join("m.safetensors");
    let train = |input: &Path| {
        fracture_line(&format!(
            "train -i {} -o {} --epochs 1 --size 40 --quiet",
            s(input),
            s(&out_model)
        ))
    };

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = train(&empty);
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("no images found"), "{}", text(&out.stderr));

    let single = dir.path().join("single");
    synth(&single, "classes", 3, 40);
    std::fs::remove_dir_all(single.join("Normal")).unwrap();
    let out = train(&single);
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("only one class"), "{}", text(&out.stderr));

    // A corrupt image inside the dataset is skipped by name; training goes on.
    let corrupt = dir.path().join("corrupt");
    synth(&corrupt, "classes", 6, 40);
    std::fs::write(corrupt.join("Fracture/corrupt.png"), b"garbage").unwrap();
    std::fs::write(corrupt.join("Normal/readme.txt"), b"notes").unwrap();
    let out = train(&corrupt);
    assert_exit(&out, 0);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("corrupt.png") && stderr.contains("readme.txt"),
        "{stderr}"
    );
    assert!(stderr.contains("skipped         2"), "{stderr}");

    let out = train(&dir.path().join("does-not-exist"));
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("does-not-exist"));
}

#[test]
fn bad_command_lines_exit_2() {
    assert_exit(&fracture(&[]), 2);
    assert_exit(&fracture(&["train", "--model", "resnet", "-i", ".", "-o", "x"]), 2);
    assert_exit(&fracture(&["detect", "--weights", "m.safetensors"]), 2);
    assert_exit(&fracture(&["kfold", "-i", ".", "--folds", "ten"]), 2);
    assert_exit(&fracture(&["--help"]), 0);
}

/// The all-data model has no development split: its temperature and
/// operating points come from the out-of-fold predictions of a k-fold run of
/// its own recipe on its own images, and from nothing else.
#[test]
fn calibrate_on_out_of_fold_predictions_of_the_same_recipe_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mura");
    synth(&data, "mura", 24, 48);
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    // The recipe both the folds and the weights are trained with, but for the size and epochs.
    let run = |command: &str, size: &str, epochs: &str, extra: &[&str]| {
        let data = s(&data);
        let mut args = vec![
            command,
            "-i",
            data,
            "--model",
            "densenet-tiny",
            "--size",
            size,
            "--lr",
            "3e-3",
        ];
        args.extend_from_slice(&["--epochs", epochs, "--quiet"]);
        args.extend_from_slice(extra);
        fracture(&args)
    };
    let report = path("kfold.json");
    assert_exit(&run("kfold", "48", "2", &["--folds", "3", "--report", &report]), 0);
    let all = path("all.safetensors");
    assert_exit(&run("train", "48", "2", &["--val-split", "0", "-o", &all]), 0);
    let calibrated = path("calibrated.safetensors");
    let calibrate = |weights: &str, extra: &[&str]| {
        let mut args = vec!["calibrate", "--weights", weights, "-o", calibrated.as_str(), "--quiet"];
        args.extend_from_slice(extra);
        fracture(&args)
    };

    let out = calibrate(&all, &["--out-of-fold", &report]);
    assert_exit(&out, 0);
    assert!(text(&out.stdout).contains("out-of-fold"), "{}", text(&out.stdout));
    let card: serde_json::Value = serde_json::from_slice(&fracture(&["card", &calibrated]).stdout).unwrap();
    let folds: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let predictions = folds["predictions"].as_array().unwrap();
    assert_eq!(card["tta"], serde_json::json!(["identity"]));
    let chosen = &card["metrics"]["out_of_fold"];
    assert_eq!(chosen["images"]["n"].as_u64().unwrap() as usize, predictions.len());
    let log_loss = |key: &str| chosen[key].as_f64().unwrap_or_else(|| panic!("{key} in {chosen}"));
    assert!(
        log_loss("log_loss") <= log_loss("log_loss_before_temperature"),
        "{chosen}"
    );
    assert_eq!(card["threshold"], card["operating_points"]["balanced"]);
    // Each threshold is one of the out-of-fold probabilities under the card's temperature.
    let temperature = card["temperature"].as_f64().unwrap();
    let tempered: Vec<f64> = predictions
        .iter()
        .map(|p| {
            let p = p["probability"].as_f64().unwrap().clamp(1e-12, 1.0 - 1e-12);
            1.0 / (1.0 + (-(p / (1.0 - p)).ln() / temperature).exp())
        })
        .collect();
    for point in ["balanced", "sensitive", "specific"] {
        let threshold = card["operating_points"][point].as_f64().unwrap();
        assert!(
            threshold == 1.0 || tempered.iter().any(|t| (t - threshold).abs() < 1e-9),
            "{point} {threshold} is none of the tempered out-of-fold probabilities"
        );
    }

    // Weights of another schedule: the folds' predictions say nothing about them.
    let other = path("other.safetensors");
    assert_exit(&run("train", "48", "3", &["--val-split", "0", "-o", &other]), 0);
    let out = calibrate(&other, &["--out-of-fold", &report]);
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("schedule"), "{}", text(&out.stderr));
    // The same schedule on fewer images (a fifth held out to validate) is not the recipe the folds ran.
    let partial = path("partial.safetensors");
    assert_exit(&run("train", "48", "2", &["-o", &partial]), 0);
    let card: serde_json::Value = serde_json::from_slice(&fracture(&["card", &partial]).stdout).unwrap();
    let training = &card["training"];
    assert_eq!(
        training["images"].as_u64().unwrap() + training["validation_images"].as_u64().unwrap(),
        predictions.len() as u64,
        "the card counts the images trained on and those held out"
    );
    let out = calibrate(&partial, &["--out-of-fold", &report]);
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("images"), "{}", text(&out.stderr));
    // Another input size is another model, whatever the schedule.
    let smaller = path("smaller.safetensors");
    assert_exit(&run("train", "40", "2", &["--val-split", "0", "-o", &smaller]), 0);
    let out = calibrate(&smaller, &["--out-of-fold", &report]);
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("40 px"), "{}", text(&out.stderr));
    // The folds predicted without the mirror.
    let out = calibrate(&all, &["--out-of-fold", &report, "--tta", "flip"]);
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("--tta none"), "{}", text(&out.stderr));
    // One source of held-out predictions, and at least one.
    assert_exit(&calibrate(&all, &["--out-of-fold", &report, "-i", s(&data)]), 2);
    assert_exit(&calibrate(&all, &[]), 2);
}

/// Calibration on a development split puts TTA, a temperature and three
/// operating points in the card; detect labels by each and groups studies.
#[test]
fn calibrate_then_detect_by_operating_point_and_by_study() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mura");
    synth(&data, "mura", 30, 64);
    let dev = dir.path().join("dev.txt");
    assert_exit(
        &fracture(&["split", "-i", s(&data), "--images", "24", "--seed", "3", "-o", s(&dev)]),
        0,
    );
    let (model, calibrated) = (
        dir.path().join("tiny.safetensors"),
        dir.path().join("calibrated.safetensors"),
    );
    let out = fracture_line(&format!(
        "train -i {} --model densenet-tiny --val-patients {} --size 48 --epochs 3 --lr 3e-3 -o {} --quiet",
        s(&data),
        s(&dev),
        s(&model)
    ));
    assert_exit(&out, 0);
    let detect = |weights: &Path, extra: &[&str]| {
        let mut args = vec!["detect", "--weights", s(weights), "-i", s(&data), "--format", "csv"];
        args.extend_from_slice(extra);
        fracture(&args)
    };
    // An uncalibrated card has only its one threshold.
    let out = detect(&model, &["--operating-point", "sensitive"]);
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("calibrate"), "{}", text(&out.stderr));

    let out = fracture_line(&format!(
        "calibrate --weights {} -i {} --patients {} -o {} --quiet",
        s(&model),
        s(&data),
        s(&dev),
        s(&calibrated)
    ));
    assert_exit(&out, 0);
    assert!(
        text(&out.stdout).contains("temperature") && text(&out.stdout).contains("sensitive"),
        "{}",
        text(&out.stdout)
    );
    assert!(dir.path().join("calibrated.reliability.svg").is_file());
    let card: serde_json::Value = serde_json::from_slice(&fracture(&["card", s(&calibrated)]).stdout).unwrap();
    assert_eq!(card["tta"], serde_json::json!(["identity", "horizontal_flip"]));
    let points = &card["operating_points"];
    assert_eq!(card["threshold"], points["balanced"]);
    assert!(card["temperature"].as_f64().unwrap() > 0.0);
    assert!(card["metrics"]["development"]["studies"]["n"].as_u64().unwrap() > 0);

    // Each point labels by its own threshold, so a lower threshold never labels fewer images abnormal.
    let mut abnormal = Vec::new();
    for point in ["sensitive", "balanced", "specific"] {
        let out = detect(&calibrated, &["--operating-point", point]);
        assert_exit(&out, 0);
        let threshold = points[point].as_f64().unwrap();
        let rows = text(&out.stdout);
        let mut count = 0;
        for row in rows.lines().skip(1) {
            let fields: Vec<&str> = row.split(',').collect();
            let probability: f64 = fields[1].parse().unwrap();
            // Thresholds are development scores, so an image may sit on one: CSV rounds to 1e-6.
            if (probability - threshold).abs() > 1e-6 {
                assert_eq!(
                    fields[2] == "abnormal",
                    probability >= threshold,
                    "{point} at {threshold}: {row}"
                );
            }
            count += usize::from(fields[2] == "abnormal");
        }
        abnormal.push((threshold, count));
    }
    abnormal.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(abnormal.windows(2).all(|w| w[0].1 >= w[1].1), "{abnormal:?}");

    // By study: one row per MURA study folder, its probability the mean of its images'.
    let images = text(&detect(&calibrated, &[]).stdout);
    let out = detect(&calibrated, &["--by-study"]);
    assert_exit(&out, 0);
    let studies = text(&out.stdout);
    assert_eq!(studies.lines().next(), Some("study,images,probability,label"));
    let mut expected: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for row in images.lines().skip(1) {
        let fields: Vec<&str> = row.split(',').collect();
        let path = Path::new(fields[0]);
        let study = path.parent().unwrap();
        let key = format!(
            "{}/{}",
            study.parent().unwrap().file_name().unwrap().to_str().unwrap(),
            study.file_name().unwrap().to_str().unwrap()
        );
        expected.entry(key).or_default().push(fields[1].parse().unwrap());
    }
    assert_eq!(studies.lines().count() - 1, expected.len());
    let balanced = points["balanced"].as_f64().unwrap();
    for row in studies.lines().skip(1) {
        let fields: Vec<&str> = row.split(',').collect();
        let members = &expected[fields[0]];
        let mean = members.iter().sum::<f64>() / members.len() as f64;
        assert_eq!(fields[1].parse::<usize>().unwrap(), members.len(), "{row}");
        assert!(
            (fields[2].parse::<f64>().unwrap() - mean).abs() < 2e-6,
            "{row} vs mean {mean}"
        );
        let probability: f64 = fields[2].parse().unwrap();
        if (probability - balanced).abs() > 1e-6 {
            assert_eq!(fields[3] == "abnormal", probability >= balanced, "{row}");
        }
    }
    assert!(
        expected.values().any(|m| m.len() > 1),
        "the synthetic set should have multi-image studies"
    );
    compare_scores_both_models_as_calibrate_did(dir.path(), &data, &dev, &model, &calibrated, &card);
}

/// `compare` on the development patients: B's figures are the ones `calibrate`
/// recorded for it, the differences are B minus A, and a model against itself
/// differs by nothing.
fn compare_scores_both_models_as_calibrate_did(
    dir: &Path,
    data: &Path,
    dev: &Path,
    model: &Path,
    calibrated: &Path,
    card: &serde_json::Value,
) {
    let compare = |a: &Path, b: &Path, extra: &[&str]| {
        let mut args = vec!["compare", s(a), s(b), "-i", s(data), "--patients", s(dev), "--quiet"];
        args.extend_from_slice(extra);
        fracture(&args)
    };
    let plot = dir.join("compare.svg");
    let out = compare(model, calibrated, &["--format", "json", "--plot", s(&plot)]);
    assert_exit(&out, 0);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let comparison = &json["comparison"];
    let recorded = &card["metrics"]["development"];
    for level in ["images", "studies"] {
        let b = &comparison["b"][level];
        assert_eq!(b["auc"], recorded[level]["auc"], "{level}");
        assert_eq!(b["auc_ci"], recorded[level]["auc_ci"], "{level}");
        let gain = b["auc"].as_f64().unwrap() - comparison["a"][level]["auc"].as_f64().unwrap();
        let difference = comparison[level]["difference"].as_f64().unwrap();
        assert!((difference - gain).abs() < 1e-12, "{level}: {difference} vs {gain}");
    }
    let described = json["b"]["description"].as_str().unwrap();
    assert!(described.contains("views identity + horizontal_flip"), "{described}");
    assert_eq!(json["b"]["threshold"], card["operating_points"]["balanced"]);
    assert!(std::fs::read_to_string(&plot).unwrap().contains("<svg"));

    let out = compare(model, model, &["--resamples", "200"]);
    assert_exit(&out, 0);
    let printed = text(&out.stdout);
    assert!(printed.contains("resamples of the"), "{printed}");
    let gains: Vec<&str> = printed.lines().filter(|l| l.contains(" AUC ")).collect();
    assert_eq!(gains.len(), 2, "{printed}");
    for line in gains {
        assert!(line.contains("+0.000 (+0.000 to +0.000; B above A in 0%"), "{line}");
    }

    assert_exit(&fracture(&["compare", s(model), "-i", s(data)]), 2);
    let out = fracture(&["compare", s(model), s(model)]);
    assert_exit(&out, 1);
    assert!(
        text(&out.stderr).contains("needs the labelled images"),
        "{}",
        text(&out.stderr)
    );
    let missing = dir.join("missing.safetensors");
    let out = compare(model, &missing, &[]);
    assert_exit(&out, 1);
    assert!(
        text(&out.stderr).contains("missing.safetensors"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn kfold_on_a_mura_layout_prints_the_studys_lines_and_writes_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mura");
    synth(&data, "mura", 12, 40);
    let report = dir.path().join("report.json");
    // `eval-w-kfold` is the study's name for the command.
    let out = fracture_line(&format!(
        "eval-w-kfold -i {} --model cnn --folds 3 --epochs 1 --size 40 --report {} --quiet",
        s(&data),
        s(&report)
    ));
    assert_exit(&out, 0);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("Average Loss: ") && stdout.contains("(+/- "),
        "{stdout}"
    );
    assert!(
        stdout.contains("Average Accuracy: ") && stdout.contains("%)"),
        "{stdout}"
    );
    assert!(stdout.contains("Pooled ROC AUC"), "{stdout}");
    assert!(
        stdout.contains("Study level (") && stdout.contains("Expected calibration error: "),
        "{stdout}"
    );
    let parsed: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(parsed["per_fold"].as_array().unwrap().len(), 3);
    assert!(parsed["grouped_by_patient"].as_bool().unwrap());
    // Synthetic MURA studies hold one or two images: fewer studies than images.
    let (images, studies) = (
        parsed["pooled"]["n"].as_u64().unwrap(),
        parsed["study_level"]["n"].as_u64().unwrap(),
    );
    assert!(studies > 0 && studies < images, "{studies} studies of {images} images");
    assert_eq!(parsed["calibration"]["bins"].as_array().unwrap().len(), 10);
    assert!(dir.path().join("report.roc.svg").is_file());
    assert!(std::fs::read_to_string(dir.path().join("report.reliability.svg"))
        .unwrap()
        .contains("ECE"));
    // Finished folds are not left behind once the report is written.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty());

    // `roc` overlays reports, each named in the legend.
    let svg = dir.path().join("both.svg");
    let named = format!("first run={}", report.display());
    let out = fracture(&["roc", &named, s(&report), "-o", s(&svg)]);
    assert_exit(&out, 0);
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(
        drawn.contains("first run (AUC") && drawn.contains("report (AUC"),
        "legend lacks a curve"
    );
    let not_a_report = dir.path().join("report.roc.svg");
    let out = fracture(&["roc", s(&not_a_report), "-o", s(&svg)]);
    assert_exit(&out, 1);
    assert!(
        text(&out.stderr).contains("report.roc.svg is not a kfold report"),
        "{}",
        text(&out.stderr)
    );
    compare_pairs_kfold_runs_by_image(dir.path(), &report, &parsed);
}

/// `compare` on two kfold reports pairs their out-of-fold predictions by
/// image path, whatever their order, and refuses runs over other images.
fn compare_pairs_kfold_runs_by_image(dir: &Path, report: &Path, parsed: &serde_json::Value) {
    let variant = |name: &str, edit: &dyn Fn(&mut Vec<serde_json::Value>)| {
        let mut copy = parsed.clone();
        edit(copy["predictions"].as_array_mut().unwrap());
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_vec(&copy).unwrap()).unwrap();
        path
    };
    let compare_json = |b: &Path| {
        let out = fracture(&["compare", s(report), s(b), "--format", "json", "--resamples", "300"]);
        assert_exit(&out, 0);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["comparison"].clone()
    };

    let reversed = variant("reversed.json", &|predictions| predictions.reverse());
    let same = compare_json(&reversed);
    assert_eq!(same["a"]["images"]["auc"], parsed["pooled"]["auc"]);
    assert_eq!(same["a"]["studies"]["auc"], parsed["study_level"]["auc"]);
    for level in ["images", "studies"] {
        assert_eq!(same[level]["difference"], 0.0, "{level}");
        assert_eq!(same[level]["ci"], serde_json::json!([0.0, 0.0]), "{level}");
    }

    let perfect = variant("perfect.json", &|predictions| {
        for p in predictions.iter_mut() {
            p["probability"] = if p["positive"].as_bool().unwrap() { 0.9 } else { 0.1 }.into();
        }
    });
    let better = compare_json(&perfect);
    let gain = 1.0 - parsed["pooled"]["auc"].as_f64().unwrap();
    assert_eq!(better["b"]["images"]["auc"], 1.0);
    assert!((better["images"]["difference"].as_f64().unwrap() - gain).abs() < 1e-12);
    assert!(better["images"]["ci"][0].as_f64().unwrap() >= 0.0);

    let refused = |b: &Path, extra: &[&str], expected: &str| {
        let mut args = vec!["compare", s(report), s(b)];
        args.extend_from_slice(extra);
        let out = fracture(&args);
        assert_exit(&out, 1);
        assert!(text(&out.stderr).contains(expected), "{}", text(&out.stderr));
    };
    let fewer = variant("fewer.json", &|predictions| {
        predictions.pop();
    });
    refused(&fewer, &[], "predicted different images (1 only in A, 0 only in B");
    let relabelled = variant("relabelled.json", &|predictions| {
        let positive = predictions[0]["positive"].as_bool().unwrap();
        predictions[0]["positive"] = (!positive).into();
    });
    refused(
        &relabelled,
        &[],
        "is abnormal in one k-fold run and normal in the other",
    );
    refused(&reversed, &["-i", s(dir)], "-i is for model files");
    let svg = dir.join("report.roc.svg");
    refused(&svg, &[], "not one of each");
}

#[test]
fn bench_prints_throughput_and_memory() {
    let out = fracture_line("bench --model densenet-tiny --mode train --batch 2 --size 48 --reps 2 --json");
    assert_exit(&out, 0);
    let parsed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(parsed["images_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(parsed["repetitions"], 2);
    assert!(parsed["peak_memory_bytes"].as_u64().unwrap() > 0);

    // Every architecture has a base to freeze: the CNN's head step trains its logit over frozen convolutions.
    let out = fracture(&[
        "bench", "--model", "cnn", "--mode", "frozen", "--size", "48", "--reps", "2", "--json",
    ]);
    assert_exit(&out, 0);
    let parsed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(parsed["images_per_second"].as_f64().unwrap() > 0.0);

    // Inference, what detect and the page run.
    let out = fracture_line("bench --model densenet-tiny --mode infer --batch 2 --size 48 --reps 2 --json");
    assert_exit(&out, 0);
    let parsed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (parsed["mode"].as_str(), parsed["batch"].as_u64()),
        (Some("infer"), Some(2)),
        "{parsed}"
    );
    assert!(parsed["images_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn detect_writes_heat_map_overlays_for_densenet_and_refuses_them_for_cnn() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synth(&data, "classes", 4, 48);
    let model = dir.path().join("tiny.safetensors");
    let out = fracture_line(&format!(
        "train -i {} --model densenet-tiny -o {} --epochs 1 --size 48 --quiet",
        s(&data),
        s(&model)
    ));
    assert_exit(&out, 0);
    let heat = dir.path().join("heat");
    let fractures = data.join("Fracture");
    let out = fracture_line(&format!(
        "detect --weights {} -i {} --heatmap {}",
        s(&model),
        s(&fractures),
        s(&heat)
    ));
    assert_exit(&out, 0);
    let written: Vec<_> = std::fs::read_dir(&heat)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(written.len(), 4, "{written:?}");
    assert!(written.iter().all(|n| n.ends_with(".heatmap.png")));
    let overlay = image::open(heat.join(&written[0])).unwrap();
    assert_eq!((overlay.width(), overlay.height()), (48, 48));
    // The heat map's single-image pass must give the batched pass's probabilities.
    let csv = |extra: &[&str]| {
        let mut args = vec!["detect", "--weights", s(&model), "-i", s(&fractures), "--format", "csv"];
        args.extend_from_slice(extra);
        let out = fracture(&args);
        assert_exit(&out, 0);
        text(&out.stdout)
            .lines()
            .skip(1)
            .map(|row| {
                let fields: Vec<&str> = row.split(',').collect();
                (fields[0].to_string(), fields[1].parse::<f64>().unwrap())
            })
            .collect::<Vec<_>>()
    };
    let (batched, single) = (csv(&[]), csv(&["--heatmap", s(&heat)]));
    assert_eq!(batched.len(), 4);
    for ((path_b, p_b), (path_s, p_s)) in batched.iter().zip(&single) {
        assert_eq!(path_b, path_s);
        assert!(
            (p_b - p_s).abs() < 1e-5,
            "{path_b}: {p_b} batched, {p_s} with --heatmap"
        );
    }

    let cnn = trained_model(dir.path());
    let out = fracture_line(&format!(
        "detect --weights {} -i {} --heatmap {}",
        s(&cnn),
        s(&fractures),
        s(&heat)
    ));
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("DenseNet"));
}

// DICOM end to end through the `fracture` binary: `synth --format dcm`
// writes a dataset, `train` learns from it and `detect` reads `.dcm` files,
// all through the one shared decode path; a transfer syntax without a
// decoder is reported by name and skipped.
mod dicom {
    use super::*;
    use dicom_core::value::PixelFragmentSequence;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::{tags, uids};
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

    const JPEG_2000: &str = "unsupported DICOM transfer syntax JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91)";

    fn path(p: &Path) -> &str {
        p.to_str().expect("temporary paths are UTF-8")
    }

    /// A well-formed DICOM file whose pixel data is JPEG 2000 (a placeholder
    /// code stream: the transfer syntax is refused before any decoding).
    fn write_jpeg2000_dicom(to: &Path) {
        let us = |value: u16| PrimitiveValue::from(value);
        let object = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from(uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION),
            ),
            DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from("2.25.7")),
            DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, us(1)),
            DataElement::new(
                tags::PHOTOMETRIC_INTERPRETATION,
                VR::CS,
                PrimitiveValue::from("MONOCHROME2"),
            ),
            DataElement::new(tags::ROWS, VR::US, us(48)),
            DataElement::new(tags::COLUMNS, VR::US, us(48)),
            DataElement::new(tags::BITS_ALLOCATED, VR::US, us(16)),
            DataElement::new(tags::BITS_STORED, VR::US, us(12)),
            DataElement::new(tags::HIGH_BIT, VR::US, us(11)),
            DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, us(0)),
            DataElement::new(
                tags::PIXEL_DATA,
                VR::OB,
                PixelFragmentSequence::new_fragments(vec![vec![0u8; 32]]),
            ),
        ]);
        let file = object
            .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::JPEG2000))
            .expect("meta group");
        let mut bytes = Vec::new();
        file.write_all(&mut bytes).expect("serialise");
        std::fs::write(to, bytes).expect("write the JPEG 2000 file");
    }

    /// CSV rows of `detect`, checked: `.dcm` paths and probabilities in [0, 1].
    fn csv_rows(output: &Output) -> Vec<(String, f64)> {
        let stdout = text(&output.stdout);
        let mut lines = stdout.lines();
        assert_eq!(lines.next(), Some("path,probability,label"), "{stdout}");
        lines
            .map(|line| {
                let fields: Vec<&str> = line.split(',').collect();
                assert_eq!(fields.len(), 3, "{line}");
                assert!(fields[0].ends_with(".dcm"), "{line}");
                let probability: f64 = fields[1].parse().unwrap_or_else(|_| panic!("probability in {line}"));
                assert!((0.0..=1.0).contains(&probability), "{line}");
                assert!(!fields[2].is_empty(), "{line}");
                (fields[0].to_string(), probability)
            })
            .collect()
    }

    #[test]
    fn a_dicom_dataset_trains_and_detects_and_unsupported_syntaxes_are_named() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let data = dir.path().join("data");
        let out = fracture_line(&format!("synth -o {} --count 6 --size 48 --format dcm", path(&data)));
        assert_exit(&out, 0);
        for class in ["Fracture", "Normal"] {
            let names: Vec<String> = std::fs::read_dir(data.join(class))
                .expect("class folder")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names.len(), 6, "{names:?}");
            assert!(names.iter().all(|n| n.ends_with(".dcm")), "{names:?}");
        }

        // A file the decoder cannot read is skipped by training, with the reason.
        write_jpeg2000_dicom(&data.join("Normal").join("jpeg2000.dcm"));
        let model = dir.path().join("cnn.safetensors");
        let out = fracture_line(&format!(
            "train -i {} --model cnn -o {} --epochs 1 --size 48 --quiet",
            path(&data),
            path(&model)
        ));
        assert_exit(&out, 0);
        let report = text(&out.stdout) + &text(&out.stderr);
        assert!(
            report.contains("jpeg2000.dcm") && report.contains(JPEG_2000),
            "{report}"
        );
        assert!(model.is_file());

        // A named file and a directory of .dcm files: one row per readable file.
        let fracture_file = data.join("Fracture").join("fracture_00000.dcm");
        let out = fracture(&[
            "detect",
            "--weights",
            path(&model),
            "-i",
            path(&fracture_file),
            path(&data.join("Normal")),
            "--format",
            "csv",
        ]);
        assert_exit(&out, 0);
        let rows = csv_rows(&out);
        assert_eq!(rows.len(), 7, "{rows:?}");
        assert!(rows.iter().all(|(p, _)| !p.ends_with("jpeg2000.dcm")));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("skipped") && stderr.contains("jpeg2000.dcm") && stderr.contains(JPEG_2000),
            "{stderr}"
        );

        // Named on the command line, the unreadable file fails the run (exit 1),
        // still by name.
        let out = fracture(&[
            "detect",
            "--weights",
            path(&model),
            "-i",
            path(&data.join("Normal").join("jpeg2000.dcm")),
            "--format",
            "csv",
        ]);
        assert_exit(&out, 1);
        assert!(text(&out.stderr).contains(JPEG_2000), "{}", text(&out.stderr));
    }
}

/// The held-out set `split` writes is patient-disjoint from what `--exclude-patients`
/// leaves, and together they are the whole dataset; a listed patient that is not in
/// the data is an error naming the list and the patient.
#[test]
fn split_writes_patients_that_the_data_filters_keep_or_drop() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mura");
    synth(&data, "mura", 30, 32);
    let data = s(&data);
    let list = dir.path().join("held-out.txt");
    let out = fracture(&["split", "-i", data, "--images", "10", "--seed", "3", "-o", s(&list)]);
    assert_exit(&out, 0);
    let listed: Vec<String> = std::fs::read_to_string(&list)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(!listed.is_empty());
    // "held out N patients, M images (...)"
    let held_out_images: usize = text(&out.stderr)
        .split("held out ")
        .nth(1)
        .unwrap()
        .split(", ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();

    let images_in = |filter: &[&str]| {
        let other = dir.path().join("x.txt");
        let mut args = vec!["split", "-i", data, "--images", "1", "-o", s(&other)];
        args.extend_from_slice(filter);
        let out = fracture(&args);
        assert_exit(&out, 0);
        let stderr = text(&out.stderr);
        // The dataset summary: "abnormal N images" and "normal M images".
        stderr
            .lines()
            .filter(|l| l.trim_end().ends_with("images"))
            .map(|l| l.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap())
            .sum::<usize>()
    };
    let list_arg = s(&list);
    let (kept, left) = (
        images_in(&["--patients", list_arg]),
        images_in(&["--exclude-patients", list_arg]),
    );
    let all = images_in(&[]);
    assert_eq!(kept, held_out_images);
    assert_eq!(kept + left, all, "kept {kept} + left {left}");
    assert!(kept > 0 && left > 0);

    let bad = dir.path().join("typo.txt");
    std::fs::write(&bad, "# a comment\npatient99999\n").unwrap();
    let out = fracture(&[
        "train",
        "-i",
        data,
        "--patients",
        s(&bad),
        "-o",
        dir.path().join("m.safetensors").to_str().unwrap(),
    ]);
    assert_exit(&out, 1);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("typo.txt") && stderr.contains("patient99999"),
        "{stderr}"
    );

    let out = fracture(&["split", "-i", data, "--images", &all.to_string(), "-o", s(&list)]);
    assert_exit(&out, 1);
}

/// `card` prints a model's card and records data terms and notes without touching
/// the weights; a file that is not a model is an error naming it.
#[test]
fn card_prints_and_updates_what_a_model_says_about_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let model = trained_model(dir.path());
    let model_arg = s(&model);
    let detect = || {
        text(
            &fracture(&[
                "detect",
                "--weights",
                model_arg,
                "-i",
                dir.path().join("data").to_str().unwrap(),
                "--format",
                "csv",
            ])
            .stdout,
        )
    };
    let before = detect();

    let out = fracture(&[
        "card",
        model_arg,
        "--data-terms",
        "research use only",
        "--note",
        "a test note",
    ]);
    assert_exit(&out, 0);
    let out = fracture(&["card", model_arg]);
    assert_exit(&out, 0);
    let card: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(card["training"]["terms"], "research use only");
    assert!(card["notes"].as_array().unwrap().iter().any(|n| n == "a test note"));
    assert_eq!(detect(), before, "the weights changed");

    // --f16 halves the file and keeps the card; predictions move by f16 rounding only.
    let f32_size = std::fs::metadata(&model).unwrap().len();
    assert_exit(&fracture(&["card", model_arg, "--f16"]), 0);
    let f16_size = std::fs::metadata(&model).unwrap().len();
    assert!(
        f16_size < f32_size * 6 / 10,
        "{f16_size} bytes in f16 vs {f32_size} in f32"
    );
    let card: serde_json::Value = serde_json::from_slice(&fracture(&["card", model_arg]).stdout).unwrap();
    assert_eq!(card["training"]["terms"], "research use only");
    let probabilities = |csv: String| {
        csv.lines()
            .skip(1)
            .map(|row| row.rsplit(',').nth(1).unwrap().parse::<f64>().unwrap())
            .collect::<Vec<_>>()
    };
    let (f32_p, f16_p) = (probabilities(before.clone()), probabilities(detect()));
    assert_eq!(f32_p.len(), f16_p.len());
    assert!(
        f32_p.iter().zip(&f16_p).all(|(a, b)| (a - b).abs() < 1e-2),
        "f16 moved a prediction by more than 1e-2"
    );
    assert!(
        f32_p.iter().zip(&f16_p).any(|(a, b)| a != b),
        "the weights were not rounded to f16"
    );

    let not_a_model = dir.path().join("notes.safetensors");
    std::fs::write(&not_a_model, "hello").unwrap();
    let out = fracture(&["card", s(&not_a_model)]);
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains("notes.safetensors"));

    // A reader that stops early (`fracture card M | head -1`) ends it quietly, without a panic.
    let mut child = Command::new(env!("CARGO_BIN_EXE_fracture"))
        .args(["card", model_arg])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(!text(&out.stderr).contains("panicked"), "{}", text(&out.stderr));
}

#[test]
fn a_rotation_pretext_trains_a_start_for_train_init() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mura");
    synth(&data, "mura", 12, 48);
    let (pretext, tuned) = (
        dir.path().join("pretext.safetensors"),
        dir.path().join("tuned.safetensors"),
    );
    let out = fracture_line(&format!(
        "train -i {} --model densenet-tiny --pretext rotation --size 32 --epochs 1 -o {} --quiet",
        s(&data),
        s(&pretext)
    ));
    assert_exit(&out, 0);
    assert!(
        text(&out.stderr).contains("each upright and turned"),
        "{}",
        text(&out.stderr)
    );
    let card: serde_json::Value =
        serde_json::from_slice(&fracture(&["card", s(&pretext)]).stdout).expect("the card as JSON");
    assert_eq!(card["classes"]["positive"], "turned");
    assert_eq!(card["classes"]["negative"], "upright");
    // Twice the images: each upright and turned, 20% of the patients held out.
    let training = &card["training"];
    let images = training["images"].as_u64().unwrap() + training["validation_images"].as_u64().unwrap();
    assert_eq!(images % 2, 0, "{training}");
    assert_eq!(training["positives"], training["negatives"], "{training}");
    assert!(card["notes"].to_string().contains("--init"), "{}", card["notes"]);

    let out = fracture_line(&format!(
        "train -i {} --model densenet-tiny --init {} --recipe scratch --size 32 --epochs 1 -o {} --quiet",
        s(&data),
        s(&pretext),
        s(&tuned)
    ));
    assert_exit(&out, 0);
    let card: serde_json::Value = serde_json::from_slice(&fracture(&["card", s(&tuned)]).stdout).unwrap();
    assert_eq!(card["classes"]["positive"], "abnormal", "the real labels again");
    assert!(
        card["init"]["file"].as_str().unwrap().ends_with("pretext.safetensors"),
        "{}",
        card["init"]
    );
}

//! `fracture compare`: two models on the same labelled images, as each card
//! says to predict (its preprocessing, test-time views and temperature), or
//! two k-fold runs on their out-of-fold predictions, paired by image.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::Serialize;

use fracture_core::weights::ModelFile;
use fracture_core::{ModelCard, OperatingPoint};
use fracture_train::compare::{self, Cases, Comparison, PairedOutOfFold, Scored};
use fracture_train::kfold::KfoldReport;
use fracture_train::metrics::{roc_curve, BinaryMetrics, PairedDifference};
use fracture_train::{files, report};

use super::args::{CompareArgs, CompareFormat, DataArgs};
use super::calibrate::development_predictions;

/// One side of the comparison: what the printout and the JSON say of it.
#[derive(Serialize)]
struct Side {
    file: String,
    /// How it predicted, in words.
    description: String,
    /// Its balanced threshold (a k-fold run's own threshold).
    threshold: f64,
    #[serde(skip)]
    probabilities: Vec<f64>,
}

/// Both sides' predictions of the same labelled images, in one order.
struct Paired {
    a: Side,
    b: Side,
    labels: Vec<bool>,
    patients: Option<Vec<usize>>,
    study_keys: Vec<String>,
    scored_on: String,
}

#[derive(Serialize)]
struct Output<'a> {
    a: &'a Side,
    b: &'a Side,
    images: usize,
    scored_on: &'a str,
    comparison: &'a Comparison,
}

pub(super) fn compare(args: CompareArgs) -> Result<()> {
    if let Some(plot) = &args.plot {
        files::check_output_path(plot)?;
    }
    let [path_a, path_b] = args.models.as_slice() else {
        bail!("compare takes two files, A then B");
    };
    let read = |path: &Path| files::read_regular_file(path, files::MAX_INPUT_BYTES).context(path.display().to_string());
    let (bytes_a, bytes_b) = (read(path_a)?, read(path_b)?);
    let paired = match (looks_like_json(&bytes_a), looks_like_json(&bytes_b), &args.data) {
        (true, true, None) => out_of_fold((path_a, &bytes_a), (path_b, &bytes_b))?,
        (true, true, Some(_)) => {
            bail!("-i is for model files: kfold reports carry their own out-of-fold predictions")
        }
        (false, false, Some(data)) => {
            let (a, held_out) = score_model(path_a, &bytes_a, data, args.quiet)?;
            let (b, held_out_b) = score_model(path_b, &bytes_b, data, args.quiet)?;
            // Both read the same folder with the same filters, so this only fails
            // if the folder changed between the two passes.
            if held_out_b.labels != held_out.labels || held_out_b.study_keys != held_out.study_keys {
                bail!(
                    "{} changed while the models were scored: the two passes read different images",
                    data.input.display()
                );
            }
            Paired {
                a,
                b,
                labels: held_out.labels,
                patients: held_out.groups,
                study_keys: held_out.study_keys,
                scored_on: held_out.chosen_on,
            }
        }
        (false, false, None) => bail!(
            "comparing model files needs the labelled images to score them on: -i DIR \
             (with --patients DEV.txt for a development split)"
        ),
        _ => bail!("compare takes two model files or two kfold reports, not one of each"),
    };

    let cases = Cases {
        labels: &paired.labels,
        patients: paired.patients.as_deref(),
        study_keys: &paired.study_keys,
    };
    let comparison = compare::compare(
        scored(&paired.a),
        scored(&paired.b),
        cases,
        args.resamples as usize,
        args.seed,
    )?;

    if let Some(plot) = &args.plot {
        let curve = |side: &Side, figures: &BinaryMetrics| {
            (
                short_name(&side.file),
                roc_curve(&side.probabilities, &paired.labels),
                figures.auc,
            )
        };
        let curves = [
            curve(&paired.a, &comparison.a.images),
            curve(&paired.b, &comparison.b.images),
        ];
        report::plot_roc(&curves, plot).with_context(|| format!("cannot write {}", plot.display()))?;
    }
    match args.format {
        CompareFormat::Json => {
            let output = Output {
                a: &paired.a,
                b: &paired.b,
                images: paired.labels.len(),
                scored_on: &paired.scored_on,
                comparison: &comparison,
            };
            println!("{}", serde_json::to_string_pretty(&output)?);
        }
        CompareFormat::Text => print_text(&paired, &comparison),
    }
    if let Some(plot) = &args.plot {
        eprintln!("wrote {}", plot.display());
    }
    Ok(())
}

fn scored(side: &Side) -> Scored<'_> {
    Scored {
        probabilities: &side.probabilities,
        threshold: side.threshold,
    }
}

/// A kfold report is JSON; a model file starts with its header's length.
fn looks_like_json(bytes: &[u8]) -> bool {
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// Runs one model over the images as its card says to predict.
fn score_model(
    path: &Path,
    bytes: &[u8],
    data: &DataArgs,
    quiet: bool,
) -> Result<(Side, fracture_train::calibration::HeldOut)> {
    let device = Device::Cpu;
    let file = ModelFile::from_bytes(bytes, &device).with_context(|| path.display().to_string())?;
    let model = file.build_model(&device).with_context(|| path.display().to_string())?;
    let card: &ModelCard = &file.card;
    let held_out = development_predictions(&model, card, data, &card.tta, quiet)?;
    let probabilities = held_out
        .view_logits
        .iter()
        .map(|logits| card.probability_from_view_logits(logits))
        .collect();
    let threshold = card.threshold_at(OperatingPoint::Balanced)?;
    let side = Side {
        file: path.display().to_string(),
        description: format!(
            "{}, {} px, views {}, temperature {:.3}, balanced threshold {threshold:.3}",
            card.architecture.display_name(),
            card.input_size(),
            views(card),
            card.temperature
        ),
        threshold,
        probabilities,
    };
    Ok((side, held_out))
}

/// Two k-fold runs' out-of-fold predictions, paired by image.
fn out_of_fold(a: (&Path, &[u8]), b: (&Path, &[u8])) -> Result<Paired> {
    let parse = |(path, bytes): (&Path, &[u8])| -> Result<KfoldReport> {
        serde_json::from_slice(bytes)
            .with_context(|| format!("{} is not a kfold report (fracture kfold --report)", path.display()))
    };
    let (report_a, report_b) = (parse(a)?, parse(b)?);
    let pairs = PairedOutOfFold::new(&report_a, &report_b)?;
    let side = |path: &Path, report: &KfoldReport, probabilities: Vec<f64>| Side {
        file: path.display().to_string(),
        description: format!(
            "{}-fold out-of-fold predictions of {}{}, seed {}, threshold {:.3}",
            report.folds,
            report.model,
            report
                .input_size
                .map(|size| format!(" at {size} px"))
                .unwrap_or_default(),
            report.seed,
            report.threshold
        ),
        threshold: report.threshold,
        probabilities,
    };
    let patients = report_a
        .dataset
        .patients
        .filter(|_| pairs.patients.is_some())
        .map(|n| format!(" ({n} patients)"))
        .unwrap_or_default();
    Ok(Paired {
        a: side(a.0, &report_a, pairs.a),
        b: side(b.0, &report_b, pairs.b),
        scored_on: format!(
            "the {} images{patients} both k-fold runs predicted out of fold",
            pairs.labels.len()
        ),
        labels: pairs.labels,
        patients: pairs.patients,
        study_keys: pairs.study_keys,
    })
}

/// The card's test-time views as its JSON names them.
fn views(card: &ModelCard) -> String {
    let names: Vec<String> = card
        .tta
        .iter()
        .map(|view| match serde_json::to_value(view) {
            Ok(serde_json::Value::String(name)) => name,
            _ => format!("{view:?}"),
        })
        .collect();
    names.join(" + ")
}

fn short_name(file: &str) -> String {
    Path::new(file)
        .file_stem()
        .map_or_else(|| file.to_string(), |stem| stem.to_string_lossy().into_owned())
}

fn print_text(paired: &Paired, comparison: &Comparison) {
    for (name, side) in [("A", &paired.a), ("B", &paired.b)] {
        println!("{name}: {} ({})", side.file, side.description);
    }
    let resampled = match comparison.patients {
        Some(patients) => format!("{patients} patients"),
        None => "images (no patient ids: too narrow if a patient has several)".into(),
    };
    println!(
        "scored on {}; {:.0}% intervals from {} resamples of the {resampled}, paired for B - A",
        paired.scored_on,
        comparison.level * 100.0,
        comparison.resamples
    );
    let gain = |difference: &Option<PairedDifference>| match difference {
        Some(d) => format!(
            "{:+.3} ({:+.3} to {:+.3}; B above A in {:.0}% of resamples)",
            d.difference,
            d.ci.0,
            d.ci.1,
            d.b_above_share * 100.0
        ),
        None => "undefined".into(),
    };
    println!("{:<24}{:<28}{:<28}B - A", "", "A", "B");
    for (level, fa, fb, difference) in [
        ("images", &comparison.a.images, &comparison.b.images, &comparison.images),
        (
            "studies",
            &comparison.a.studies,
            &comparison.b.studies,
            &comparison.studies,
        ),
    ] {
        println!(
            "{:<24}{:<28}{:<28}{}",
            format!("{level} ({}) AUC", fa.n),
            fa.auc_text(),
            fb.auc_text(),
            gain(difference)
        );
        println!(
            "{:<24}{:<28.3}{:.3}",
            format!("{level} kappa, balanced"),
            fa.kappa,
            fb.kappa
        );
    }
}

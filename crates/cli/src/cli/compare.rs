//! `fracture compare`: two models on the same labelled images, as each card
//! says to predict (its preprocessing, test-time views and temperature).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::Serialize;

use fracture_core::weights::ModelFile;
use fracture_core::{ModelCard, OperatingPoint};
use fracture_train::calibration::HeldOut;
use fracture_train::compare::{self, Cases, Comparison, ModelFigures, Scored};
use fracture_train::metrics::{roc_curve, BinaryMetrics, PairedDifference};
use fracture_train::{files, report};

use super::args::{CompareArgs, CompareFormat};
use super::calibrate::development_predictions;

/// One model as scored: what the printout and the JSON say of it.
#[derive(Serialize)]
struct ScoredModel {
    file: String,
    architecture: String,
    input_size: usize,
    tta: String,
    temperature: f64,
    balanced_threshold: f64,
    #[serde(skip)]
    probabilities: Vec<f64>,
}

#[derive(Serialize)]
struct Output<'a> {
    a: &'a ScoredModel,
    b: &'a ScoredModel,
    images: usize,
    scored_on: &'a str,
    comparison: &'a Comparison,
}

pub(super) fn compare(args: CompareArgs) -> Result<()> {
    if let Some(plot) = &args.plot {
        files::check_output_path(plot)?;
    }
    let [path_a, path_b] = args.models.as_slice() else {
        bail!("compare takes two model files, A then B");
    };
    let (a, held_out) = score(path_a, &args)?;
    let (b, held_out_b) = score(path_b, &args)?;
    // Both read the same folder with the same filters, so this only fails if
    // the folder changed between the two passes.
    if held_out_b.labels != held_out.labels || held_out_b.study_keys != held_out.study_keys {
        bail!(
            "{} changed while the models were scored: the two passes read different images",
            args.data.input.display()
        );
    }
    let cases = Cases {
        labels: &held_out.labels,
        patients: held_out.groups.as_deref(),
        study_keys: &held_out.study_keys,
    };
    let comparison = compare::compare(
        Scored {
            probabilities: &a.probabilities,
            threshold: a.balanced_threshold,
        },
        Scored {
            probabilities: &b.probabilities,
            threshold: b.balanced_threshold,
        },
        cases,
        args.resamples as usize,
        args.seed,
    )?;

    if let Some(plot) = &args.plot {
        let curve = |model: &ScoredModel, figures: &ModelFigures| {
            (
                short_name(&model.file),
                roc_curve(&model.probabilities, &held_out.labels),
                figures.images.auc,
            )
        };
        report::plot_roc(&[curve(&a, &comparison.a), curve(&b, &comparison.b)], plot)
            .with_context(|| format!("cannot write {}", plot.display()))?;
    }
    match args.format {
        CompareFormat::Json => {
            let output = Output {
                a: &a,
                b: &b,
                images: held_out.labels.len(),
                scored_on: &held_out.chosen_on,
                comparison: &comparison,
            };
            println!("{}", serde_json::to_string_pretty(&output)?);
        }
        CompareFormat::Text => print_text(&a, &b, &held_out, &comparison),
    }
    if let Some(plot) = &args.plot {
        eprintln!("wrote {}", plot.display());
    }
    Ok(())
}

/// Runs one model over the images as its card says to predict.
fn score(path: &Path, args: &CompareArgs) -> Result<(ScoredModel, HeldOut)> {
    let device = Device::Cpu;
    let bytes = files::read_regular_file(path, files::MAX_INPUT_BYTES).with_context(|| path.display().to_string())?;
    let file = ModelFile::from_bytes(&bytes, &device).with_context(|| path.display().to_string())?;
    let model = file.build_model(&device).with_context(|| path.display().to_string())?;
    let card: &ModelCard = &file.card;
    let held_out = development_predictions(&model, card, &args.data, &card.tta, args.quiet)?;
    let probabilities = held_out
        .view_logits
        .iter()
        .map(|logits| card.probability_from_view_logits(logits))
        .collect();
    let scored = ScoredModel {
        file: path.display().to_string(),
        architecture: card.architecture.display_name(),
        input_size: card.input_size(),
        tta: views(card),
        temperature: card.temperature,
        balanced_threshold: card.threshold_at(OperatingPoint::Balanced)?,
        probabilities,
    };
    Ok((scored, held_out))
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

fn print_text(a: &ScoredModel, b: &ScoredModel, held_out: &HeldOut, comparison: &Comparison) {
    for (name, model) in [("A", a), ("B", b)] {
        println!(
            "{name}: {} ({}, {} px, views {}, temperature {:.3}, balanced threshold {:.3})",
            model.file, model.architecture, model.input_size, model.tta, model.temperature, model.balanced_threshold
        );
    }
    let resampled = match comparison.patients {
        Some(patients) => format!("{patients} patients"),
        None => "images (no patient ids: too narrow if a patient has several)".into(),
    };
    println!(
        "scored on {}; {:.0}% intervals from {} resamples of the {resampled}, paired for B - A",
        held_out.chosen_on,
        comparison.level * 100.0,
        comparison.resamples
    );
    let auc = |m: &BinaryMetrics| match (m.auc, m.auc_ci) {
        (Some(auc), Some((lo, hi))) => format!("{auc:.3} ({lo:.3}-{hi:.3})"),
        (Some(auc), None) => format!("{auc:.3}"),
        _ => "undefined".into(),
    };
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
    println!("{:<24}{:<22}{:<22}B - A", "", "A", "B");
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
            "{:<24}{:<22}{:<22}{}",
            format!("{level} ({}) AUC", fa.n),
            auc(fa),
            auc(fb),
            gain(difference)
        );
        println!(
            "{:<24}{:<22}{:<22}",
            format!("{level} kappa, balanced"),
            format!("{:.3}", fa.kappa),
            format!("{:.3}", fb.kappa)
        );
    }
}

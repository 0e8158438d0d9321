//! `fracture calibrate`: temperature and operating points from held-out predictions.

use anyhow::{bail, Context, Result};
use candle_core::Device;

use fracture_core::weights::ModelFile;
use fracture_core::{ModelCard, OperatingPoint, TtaView};
use fracture_train::calibration::{self, HeldOut};
use fracture_train::files;
use fracture_train::kfold;
use fracture_train::report;

use super::args::{CalibrateArgs, DataArgs, TtaArg};
use super::{load_dataset, with_suffix, Bars};

pub(super) fn calibrate(args: CalibrateArgs) -> Result<()> {
    files::check_output_path(&args.output)?;
    let device = Device::Cpu;
    let bytes = files::read_regular_file(&args.weights, files::MAX_INPUT_BYTES).context("--weights")?;
    let file =
        ModelFile::from_bytes(&bytes, &device).with_context(|| format!("--weights {}", args.weights.display()))?;
    // Built even when the predictions come from a report: weights that do not
    // make their architecture are refused before a card is written for them.
    let model = file
        .build_model(&device)
        .with_context(|| format!("--weights {}", args.weights.display()))?;
    let mut card = file.card.clone();
    let (held_out, views, entry) = match (&args.out_of_fold, &args.data) {
        (Some(report_path), _) => {
            if args.tta == Some(TtaArg::Flip) {
                bail!(
                    "--tta flip needs the images: the folds predicted each image without its mirror, \
                     so out-of-fold predictions can only choose --tta none"
                );
            }
            let json = files::read_regular_file(report_path, files::MAX_INPUT_BYTES).context("--out-of-fold")?;
            let report: kfold::KfoldReport = serde_json::from_slice(&json).with_context(|| {
                format!(
                    "--out-of-fold {} is not a kfold report (fracture kfold --report)",
                    report_path.display()
                )
            })?;
            if let Some(difference) = report.recipe_difference(&card) {
                bail!(
                    "--out-of-fold {} does not belong to --weights {}: {difference}. Operating points chosen on \
                     another recipe's predictions would not be these weights'",
                    report_path.display(),
                    args.weights.display()
                );
            }
            let described_as = report_path.display().to_string();
            (report.held_out(&described_as), vec![TtaView::Identity], "out_of_fold")
        }
        (None, Some(data)) => {
            let views = match args.tta.unwrap_or(TtaArg::Flip) {
                TtaArg::Flip => vec![TtaView::Identity, TtaView::HorizontalFlip],
                TtaArg::None => vec![TtaView::Identity],
            };
            (
                development_predictions(&model, &card, data, &views, args.quiet)?,
                views,
                "development",
            )
        }
        // The argument group requires one of the two.
        (None, None) => bail!("calibrate needs -i DIR --patients DEV.txt or --out-of-fold REPORT.json"),
    };

    let calibrated = calibration::calibrate(&held_out, args.seed);
    calibrated.record(&held_out, views, entry, &mut card);
    card.validate()?;
    let out = ModelFile::to_bytes(&card, &file.tensors, file.storage)?;
    fracture_train::write_atomically(&args.output, &out)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    let reliability_path = with_suffix(&args.output, ".reliability.svg");
    let temperature = calibrated.temperature;
    let (before, after) = (&calibrated.before, &calibrated.after);
    report::plot_reliability(
        &[
            ("before temperature".into(), before.bins.clone(), before.ece),
            (format!("temperature {temperature:.2}"), after.bins.clone(), after.ece),
        ],
        &reliability_path,
    )
    .with_context(|| format!("cannot write {}", reliability_path.display()))?;
    let (image, study, points, scores, labels, chosen_on) = (
        &calibrated.images,
        &calibrated.studies,
        &calibrated.points,
        &calibrated.scores,
        &held_out.labels,
        &held_out.chosen_on,
    );

    println!("calibrated on {chosen_on}, TTA {:?}", card.tta);
    println!(
        "temperature {temperature:.3}: log loss {:.4} -> {:.4} (what the temperature minimises), \
         expected calibration error {:.3} -> {:.3} ({} bins)",
        before.log_loss,
        after.log_loss,
        before.ece,
        after.ece,
        after.bins.len()
    );
    println!(
        "images: ROC AUC {}  kappa {:.3} at the balanced point",
        image.auc_text(),
        image.kappa
    );
    println!(
        "studies ({}): ROC AUC {}  kappa {:.3}",
        study.n,
        study.auc_text(),
        study.kappa
    );
    for point in OperatingPoint::ALL {
        let threshold = points.threshold(point);
        let confusion = fracture_train::metrics::Confusion::at_threshold(scores, labels, threshold);
        println!(
            "  {:<9} threshold {threshold:.3}: sensitivity {:.1}%  specificity {:.1}%  kappa {:.3}",
            point.name(),
            confusion.sensitivity() * 100.0,
            confusion.specificity() * 100.0,
            confusion.cohen_kappa()
        );
    }
    eprintln!("wrote {} and {}", args.output.display(), reliability_path.display());
    Ok(())
}

/// The model's logits under each view for every image of a development split.
pub(super) fn development_predictions(
    model: &fracture_core::Model,
    card: &ModelCard,
    data: &DataArgs,
    views: &[TtaView],
    quiet: bool,
) -> Result<HeldOut> {
    let (dataset, images) = load_dataset(data, card, quiet)?;
    let source = data.patients.as_ref().map_or_else(
        || data.input.display().to_string(),
        |list| format!("the patients in {}", list.display()),
    );
    Ok(HeldOut::predict(
        model,
        card,
        &dataset,
        &images,
        views,
        &source,
        &Bars::new(quiet),
    )?)
}

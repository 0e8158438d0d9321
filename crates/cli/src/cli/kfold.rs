//! `fracture kfold` (and `kfold merge`), and `fracture roc` over their reports.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;

use fracture_train::files;
use fracture_train::fingerprint::RunFingerprint;
use fracture_train::kfold::{self, FoldResult, KfoldObserver, KfoldSpec, RunIdentity, ShardReport};
use fracture_train::merge;
use fracture_train::report::{self, EpochRecord};

use super::args::{KfoldAction, KfoldArgs, MergeArgs, RocArgs};
use super::train::{prepare, print_epoch, Prepared};
use super::{load_dataset, with_suffix, Bars};

pub(super) fn roc(args: RocArgs) -> Result<()> {
    files::check_output_path(&args.output)?;
    let mut curves = Vec::new();
    for entry in &args.reports {
        let (name, path) = match entry.split_once('=') {
            Some((name, path)) if !Path::new(entry).exists() => (name.to_string(), PathBuf::from(path)),
            _ => {
                let path = PathBuf::from(entry);
                let stem = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| entry.clone());
                (stem, path)
            }
        };
        let json = files::read_regular_file(&path, files::MAX_INPUT_BYTES)?;
        let report: kfold::KfoldReport = serde_json::from_slice(&json)
            .with_context(|| format!("{} is not a kfold report (fracture kfold --report)", path.display()))?;
        curves.push((name, out_of_fold_roc(&report), report.pooled.auc));
    }
    report::plot_roc(&curves, &args.output).with_context(|| format!("cannot write {}", args.output.display()))?;
    eprintln!("wrote {}", args.output.display());
    Ok(())
}

fn out_of_fold_roc(report: &kfold::KfoldReport) -> Vec<fracture_train::metrics::RocPoint> {
    let scores: Vec<f64> = report.predictions.iter().map(|p| p.probability).collect();
    let truth: Vec<bool> = report.predictions.iter().map(|p| p.positive).collect();
    fracture_train::metrics::roc_curve(&scores, &truth)
}

struct PrintFolds;

impl KfoldObserver for PrintFolds {
    fn fold_started(&mut self, fold: usize, folds: usize, resumed: bool) {
        let note = if resumed { " (finished earlier, loaded)" } else { "" };
        eprintln!("fold {fold}/{folds}{note}");
    }

    fn epoch(&mut self, fold: usize, record: &EpochRecord) {
        print_epoch(&format!("  fold {fold} "), record);
    }

    fn fold_finished(&mut self, result: &FoldResult) {
        eprintln!(
            "  fold {}: loss {:.4}  accuracy {:.2}%  AUC {}  ({} test images, {:.0} s)",
            result.fold,
            result.loss,
            result.accuracy * 100.0,
            result.metrics.auc.map_or("n/a".into(), |a| format!("{a:.3}")),
            result.test_images,
            result.seconds
        );
    }
}

pub(super) fn kfold(args: KfoldArgs) -> Result<()> {
    if let Some(KfoldAction::Merge(merge)) = &args.action {
        return kfold_merge(merge);
    }
    let device = Device::Cpu;
    if args.folds < 2 {
        bail!("--folds must be at least 2");
    }
    if let Some(fold) = args.fold.filter(|&f| f == 0 || f > args.folds) {
        bail!("--fold {fold} must be between 1 and --folds {}", args.folds);
    }
    if let Some(report) = &args.report {
        files::check_output_path(report)?;
    }
    if !(0.0..0.9).contains(&args.val_split) {
        bail!("--val-split {} must be in [0, 0.9)", args.val_split);
    }
    let Prepared { mut card, init, config } = prepare(&args.model, &device)?;
    let data = args.data.as_ref().context("kfold needs a data set: -i DIR")?;
    let (dataset, images) = load_dataset(data, &card, args.model.quiet)?;
    card.classes = dataset.classes.clone();

    // Finished folds are kept here until the report is written, so a rerun resumes.
    let run = RunFingerprint::kfold(&card, &config, args.folds, args.val_split, &dataset);
    let state_dir = kfold::state_dir(args.report.as_deref(), &run);
    if state_dir.exists() {
        eprintln!("resuming from {}", state_dir.display());
    }
    let spec = KfoldSpec {
        card: &card,
        init: init.as_ref(),
        config: &config,
        folds: args.folds,
        validation_fraction: args.val_split,
        device: &device,
        progress: &Bars::new(args.model.quiet),
        state_dir: &state_dir,
    };
    match (args.fold, &args.report) {
        (Some(fold), Some(path)) => {
            let shard = kfold::run_folds(&spec, &dataset, &images, Some(fold), &mut PrintFolds)?
                .pop()
                .context("the fold produced no result")?;
            let report = ShardReport {
                format: ShardReport::FORMAT.into(),
                run: RunIdentity::of(&spec, &dataset),
                shard,
            };
            let json = serde_json::to_vec_pretty(&report)?;
            fracture_train::write_atomically(path, &json)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!(
                "wrote {} (fold {fold} of {}; `fracture kfold merge` joins the shards)",
                path.display(),
                args.folds
            );
        }
        _ => {
            let report = kfold::run(&spec, &dataset, &images, &mut PrintFolds)?;
            print!("{}", report.summary());
            std::io::stdout().flush()?;
            if let Some(path) = &args.report {
                write_kfold_report(&report, path)?;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(())
}

fn kfold_merge(args: &MergeArgs) -> Result<()> {
    files::check_output_path(&args.report)?;
    let shards = args
        .shards
        .iter()
        .map(|path| Ok((path.clone(), merge::read_shard(path)?)))
        .collect::<std::result::Result<Vec<_>, merge::MergeError>>()?;
    let report = merge::merge(shards)?;
    print!("{}", report.summary());
    std::io::stdout().flush()?;
    write_kfold_report(&report, &args.report)
}

/// The report as JSON, with its ROC curve and reliability diagram beside it.
fn write_kfold_report(report: &kfold::KfoldReport, path: &Path) -> Result<()> {
    let json = serde_json::to_vec_pretty(report)?;
    fracture_train::write_atomically(path, &json).with_context(|| format!("cannot write {}", path.display()))?;
    let roc_path = with_suffix(path, ".roc.svg");
    report::plot_roc(
        &[(report.model.clone(), out_of_fold_roc(report), report.pooled.auc)],
        &roc_path,
    )
    .with_context(|| format!("cannot write {}", roc_path.display()))?;
    let reliability_path = with_suffix(path, ".reliability.svg");
    if let Some(calibration) = &report.calibration {
        report::plot_reliability(
            &[(report.model.clone(), calibration.bins.clone(), calibration.ece)],
            &reliability_path,
        )
        .with_context(|| format!("cannot write {}", reliability_path.display()))?;
    }
    eprintln!(
        "wrote {}, {} and {}",
        path.display(),
        roc_path.display(),
        reliability_path.display()
    );
    Ok(())
}

//! `fracture train`, and the card, initial weights and schedule it shares with `kfold`.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use fracture_core::card::SourceWeights;
use fracture_core::weights::{ModelFile, StorageDType};
use fracture_core::ModelCard;
use fracture_train::augment::Augmentation;
use fracture_train::dataset;
use fracture_train::files;
use fracture_train::fit::{self, Checkpoint, FitConfig, FitData, TrainSpec};
use fracture_train::report::{self, EpochRecord};
use fracture_train::schedule::{self, Overrides, Recipe};

use super::args::{AugmentStrength, ModelArgs, ModelName, PretextTask, TrainArgs};
use super::{load_dataset, sha256_hex, with_suffix, Bars};

pub(super) struct Prepared {
    pub(super) card: ModelCard,
    pub(super) init: Option<HashMap<String, Tensor>>,
    pub(super) config: FitConfig,
}

/// The card template, initial weights and schedule that `train` and `kfold` share.
pub(super) fn prepare(args: &ModelArgs, device: &Device) -> Result<Prepared> {
    let mut architecture = args.model.architecture(args.kernel as usize);
    if args.model != ModelName::Cnn && args.kernel != 1 {
        bail!("--kernel applies to --model cnn only");
    }
    let mut init_source = None;
    let init = match &args.init {
        Some(path) => {
            let bytes = files::read_regular_file(path, files::MAX_INPUT_BYTES).context("--init")?;
            let file = ModelFile::from_bytes(&bytes, device).with_context(|| format!("--init {}", path.display()))?;
            if std::mem::discriminant(&file.card.architecture) != std::mem::discriminant(&architecture) {
                bail!(
                    "--init {} holds a {} model, but --model is {}",
                    path.display(),
                    file.card.architecture.display_name(),
                    architecture.display_name()
                );
            }
            // The file knows its exact configuration (depth, kernel); it wins.
            architecture = file.card.architecture.clone();
            init_source = Some(SourceWeights {
                file: path.display().to_string(),
                sha256: sha256_hex(&bytes),
            });
            Some(file.tensors)
        }
        None => None,
    };
    let recipe = match args.recipe {
        Some(recipe) => recipe.into(),
        None => {
            let recipe = schedule::default_recipe(&architecture, init.is_some());
            if recipe == Recipe::Scratch {
                eprintln!(
                    "note: the study's DenseNet recipe freezes a pretrained base; without --init it would \
                     freeze random weights, so training from scratch uses --recipe scratch"
                );
            }
            recipe
        }
    };
    if args.progressive.is_some() && !architecture.pools_globally() {
        bail!("--progressive needs a model that pools globally (densenet); the cnn's head is sized for --size");
    }
    let overrides = Overrides {
        epochs: args.epochs,
        lr: args.lr,
        fine_tune_epochs: args.fine_tune_epochs,
        fine_tune_lr: args.fine_tune_lr,
        unfreeze: args.unfreeze.clone(),
        warmup_epochs: args.warmup_epochs,
        constant_lr: args.constant_lr,
        progressive: args.progressive,
        batch: args.batch,
        augmentation: match (args.no_augment, args.augment) {
            (true, _) | (_, Some(AugmentStrength::None)) => Some(Augmentation::NONE),
            (_, Some(AugmentStrength::Study)) => Some(Augmentation::STUDY),
            (_, Some(AugmentStrength::Mild)) => Some(Augmentation::MILD),
            (_, Some(AugmentStrength::Strong)) => Some(Augmentation::STRONG),
            (false, None) => None,
        },
        weight_decay: args.weight_decay,
        label_smoothing: args.label_smoothing,
        mixup: args.mixup,
        weight_average: args.weight_average,
    };
    let config = schedule::config(&architecture, recipe, &overrides, args.seed, args.feature_bank);
    config.validate()?;
    let mut card = ModelCard::new(architecture, args.size);
    card.validate().context("invalid --model/--size combination")?;
    card.seed = Some(args.seed);
    card.init = init_source;
    Ok(Prepared { card, init, config })
}

pub(super) fn print_epoch(prefix: &str, record: &EpochRecord) {
    let mut validation = match (record.val_loss, record.val_accuracy) {
        (Some(loss), Some(acc)) => format!("  val_loss {loss:.4}  val_acc {:.2}%", acc * 100.0),
        _ => String::new(),
    };
    if let Some(auc) = record.val_auc {
        validation.push_str(&format!("  val_auc {auc:.3}"));
    }
    if let Some(auc) = record.averaged_val_auc {
        validation.push_str(&format!("  averaged {auc:.3}"));
    }
    eprintln!(
        "{prefix}{} epoch {:>3}  lr {:.2e}  loss {:.4}  acc {:.2}%{validation}  ({:.1} s)",
        record.phase,
        record.epoch,
        record.lr,
        record.train_loss,
        record.train_accuracy * 100.0,
        record.seconds
    );
}

pub(super) fn train(args: TrainArgs) -> Result<()> {
    files::check_output_path(&args.output)?;
    let device = Device::Cpu;
    if !(0.0..0.9).contains(&args.val_split) {
        bail!("--val-split {} must be in [0, 0.9)", args.val_split);
    }
    let Prepared { mut card, init, config } = prepare(&args.model, &device)?;
    let (dataset, images) = load_dataset(&args.data, &card, args.model.quiet)?;
    let (dataset, images) = match args.pretext {
        Some(PretextTask::Rotation) => {
            let (task, images) = fracture_train::pretext::rotation(&dataset, &images, args.model.seed);
            eprintln!(
                "pretext: {} images, each upright and turned (labels: {} / {})",
                dataset.samples.len(),
                task.classes.negative,
                task.classes.positive
            );
            card.notes.push(
                "Self-supervised rotation pretext (upright or turned?), not a detector: its weights start `fracture train --init`."
                    .into(),
            );
            (task, images)
        }
        None => (dataset, images),
    };
    card.classes = dataset.classes.clone();
    let labels: Vec<bool> = dataset.samples.iter().map(|s| s.positive).collect();
    let groups: Vec<usize> = dataset.samples.iter().map(|s| s.group).collect();
    let (train_idx, val_idx) = if let Some(list) = &args.val_patients {
        let listed = dataset::read_patient_list(list)?;
        let validation = dataset.patient_indices(list, &listed)?;
        let training = (0..labels.len()).filter(|i| !validation.contains(i)).collect();
        (training, validation)
    } else if args.val_split > 0.0 {
        fracture_train::folds::grouped_split(&labels, &groups, args.val_split, args.model.seed)?
    } else {
        ((0..labels.len()).collect(), Vec::new())
    };
    eprintln!(
        "training {} on {} images, validating on {} ({} phase(s), batch {})",
        card.architecture.display_name(),
        train_idx.len(),
        val_idx.len(),
        config.phases.len(),
        config.batch_size
    );
    let data = FitData {
        images: &images,
        labels: &labels,
        train: train_idx,
        validation: val_idx,
    };
    let spec = TrainSpec {
        card: &card,
        init: init.as_ref(),
        config: &config,
        device: &device,
        progress: &Bars::new(args.model.quiet),
    };
    let checkpoint = Checkpoint::beside(&args.output);
    let checkpoint_path = checkpoint.path.clone();
    if checkpoint_path.exists() {
        eprintln!("resuming from {}", checkpoint.path.display());
    }
    let started = Instant::now();
    let trained = fit::train(&spec, &data, Some(checkpoint), &mut |r| print_epoch("", r))?;

    let schedule = serde_json::to_value(&config)?;
    card.training = Some(dataset.split_summary(&data.train, &data.validation, schedule));
    args.card.apply(&mut card)?;
    if !data.validation.is_empty() {
        let probabilities = fit::predict(
            &trained.model,
            &images,
            &data.validation,
            &card.preprocessing,
            32,
            &device,
        )?;
        let truth: Vec<bool> = data.validation.iter().map(|&i| labels[i]).collect();
        let val_groups: Vec<usize> = data.validation.iter().map(|&i| groups[i]).collect();
        let metrics = fracture_train::metrics::BinaryMetrics::compute(
            &probabilities,
            &truth,
            dataset.has_patients.then_some(val_groups.as_slice()),
            card.threshold,
            args.model.seed,
        );
        eprintln!(
            "validation: accuracy {:.2}%  AUC {}  sensitivity {:.1}%  specificity {:.1}%",
            metrics.accuracy * 100.0,
            metrics.auc.map_or("n/a".into(), |a| format!("{a:.3}")),
            metrics.sensitivity * 100.0,
            metrics.specificity * 100.0
        );
        if let serde_json::Value::Object(map) = serde_json::to_value(&metrics)? {
            card.metrics = map;
        }
    }
    card.metrics.insert(
        "train_seconds".into(),
        serde_json::json!(started.elapsed().as_secs_f64()),
    );
    let storage = if args.f16 { StorageDType::F16 } else { StorageDType::F32 };
    let bytes = ModelFile::to_bytes(&card, &trained.params.tensors(), storage)?;
    fracture_train::write_atomically(&args.output, &bytes)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    // Only once the model file is safely written.
    let _ = std::fs::remove_file(&checkpoint_path);

    let history_path = with_suffix(&args.output, ".history.json");
    trained
        .history
        .save_json(&history_path)
        .with_context(|| format!("cannot write {}", history_path.display()))?;
    let curves_path = with_suffix(&args.output, ".curves.svg");
    report::plot_history(&trained.history, &card.architecture.display_name(), &curves_path)
        .with_context(|| format!("cannot write {}", curves_path.display()))?;
    eprintln!(
        "wrote {} ({:.1} MB), {} and {}",
        args.output.display(),
        bytes.len() as f64 / 1e6,
        history_path.display(),
        curves_path.display()
    );
    Ok(())
}

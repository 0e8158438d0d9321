//! Training schedules: the study's, and ours for training from scratch.

use serde::{Deserialize, Serialize};

use crate::augment::Augmentation;
use crate::fit::{FitConfig, LrSchedule, Phase, Progressive, Scope};
use fracture_core::Architecture;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recipe {
    /// The study's: cnn 35 epochs; DenseNet 25 head-only epochs with the base
    /// frozen, then 10 fine-tuning epochs at 1e-5, BatchNorm in inference mode.
    Study,
    /// One phase training everything with batch statistics: for DenseNet
    /// from random weights, where a frozen random base learns nothing. AdamW at
    /// a peak of 3e-4 after a 2-epoch warm-up, cosine decay, label smoothing 0.1,
    /// batch 16 and the mild augmentation: the study's constant 1e-3 and its
    /// brightness ±0.4 leave a random DenseNet at chance.
    Scratch,
}

/// The recipe used when none is named: the study's, except for a DenseNet
/// without initial weights, whose frozen random base would learn nothing.
pub fn default_recipe(architecture: &Architecture, has_init: bool) -> Recipe {
    match architecture {
        Architecture::Densenet(_) if !has_init => Recipe::Scratch,
        _ => Recipe::Study,
    }
}

impl Recipe {
    pub fn default_batch(self) -> usize {
        match self {
            Recipe::Study => 6,
            Recipe::Scratch => 16,
        }
    }

    pub fn default_augmentation(self) -> Augmentation {
        match self {
            Recipe::Study => Augmentation::STUDY,
            Recipe::Scratch => Augmentation::MILD,
        }
    }

    /// AdamW weight decay per unit of learning rate.
    pub fn default_weight_decay(self) -> f64 {
        match self {
            Recipe::Study => 0.0,
            Recipe::Scratch => 0.05,
        }
    }

    pub fn default_label_smoothing(self) -> f64 {
        match self {
            Recipe::Study => 0.0,
            Recipe::Scratch => 0.1,
        }
    }
}

/// Overrides of the recipe's numbers, from the command line.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Epochs of the first phase.
    pub epochs: Option<usize>,
    pub lr: Option<f64>,
    /// Epochs and rate of the fine-tuning phase (two-phase recipes only).
    pub fine_tune_epochs: Option<usize>,
    pub fine_tune_lr: Option<f64>,
    /// Parameter-name prefixes to unfreeze when fine-tuning; all when empty.
    pub unfreeze: Vec<String>,
    /// Warm-up epochs before cosine decay of the first phase; `Some(_)` turns the
    /// schedule on for any recipe.
    pub warmup_epochs: Option<usize>,
    /// Keep the first phase's rate constant, whatever the recipe's default.
    pub constant_lr: bool,
    /// The first phase's first epochs at a smaller size.
    pub progressive: Option<Progressive>,
    pub batch: Option<usize>,
    pub augmentation: Option<Augmentation>,
    pub weight_decay: Option<f64>,
    pub label_smoothing: Option<f64>,
    pub mixup: Option<f64>,
    pub weight_average: Option<f64>,
}

/// The whole training configuration of a recipe, with the command line's overrides.
pub fn config(
    architecture: &Architecture,
    recipe: Recipe,
    overrides: &Overrides,
    seed: u64,
    feature_bank: usize,
) -> FitConfig {
    FitConfig {
        phases: phases(architecture, recipe, overrides),
        batch_size: overrides.batch.unwrap_or(recipe.default_batch()),
        augmentation: overrides.augmentation.unwrap_or(recipe.default_augmentation()),
        seed,
        feature_bank,
        weight_decay: overrides.weight_decay.unwrap_or(recipe.default_weight_decay()),
        label_smoothing: overrides.label_smoothing.unwrap_or(recipe.default_label_smoothing()),
        mixup: overrides.mixup.unwrap_or(0.0),
        weight_average: overrides.weight_average.unwrap_or(0.0),
    }
}

pub fn phases(architecture: &Architecture, recipe: Recipe, overrides: &Overrides) -> Vec<Phase> {
    let warmup = overrides.warmup_epochs.or(match (architecture, recipe) {
        (Architecture::Densenet(_), Recipe::Scratch) => Some(2),
        _ => None,
    });
    let lr_schedule = match warmup {
        Some(warmup_epochs) if !overrides.constant_lr => LrSchedule::WarmupCosine { warmup_epochs },
        _ => LrSchedule::Constant,
    };
    let first = |name: &str, epochs: usize, lr: f64, scope: Scope, batch_norm_stats: bool| Phase {
        lr_schedule,
        progressive: overrides.progressive,
        ..Phase::constant(
            name,
            overrides.epochs.unwrap_or(epochs),
            overrides.lr.unwrap_or(lr),
            scope,
            batch_norm_stats,
        )
    };
    match (architecture, recipe) {
        (Architecture::Cnn(_), _) => vec![first("train", 35, 1e-3, Scope::All, true)],
        (Architecture::Densenet(_), Recipe::Scratch) => vec![first("train", 35, 3e-4, Scope::All, true)],
        (Architecture::Densenet(_), Recipe::Study) => vec![
            first("head", 25, 1e-3, Scope::Head, false),
            Phase::constant(
                "fine-tune",
                overrides.fine_tune_epochs.unwrap_or(10),
                overrides.fine_tune_lr.unwrap_or(1e-5),
                if overrides.unfreeze.is_empty() {
                    Scope::All
                } else {
                    Scope::Prefixes(overrides.unfreeze.clone())
                },
                false,
            ),
        ],
    }
}

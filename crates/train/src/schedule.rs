//! Training schedules: the study's, and ours for training from scratch.

use serde::{Deserialize, Serialize};

use crate::fit::{Phase, Scope};
use fracture_core::Architecture;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Recipe {
    /// The study's: cnn 35 epochs; DenseNet 25 head-only epochs with the base
    /// frozen, then 10 fine-tuning epochs at 1e-5, BatchNorm in inference mode.
    Study,
    /// One phase training everything with batch statistics: for DenseNet
    /// from random weights, where a frozen random base learns nothing.
    Scratch,
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
}

pub fn phases(architecture: &Architecture, recipe: Recipe, overrides: &Overrides) -> Vec<Phase> {
    let lr = overrides.lr.unwrap_or(1e-3);
    let single = |epochs| Phase {
        name: "train".into(),
        epochs: overrides.epochs.unwrap_or(epochs),
        lr,
        scope: Scope::All,
        batch_norm_stats: true,
    };
    match (architecture, recipe) {
        (Architecture::Cnn(_), _) => vec![single(35)],
        (Architecture::Densenet(_), Recipe::Scratch) => vec![single(35)],
        (Architecture::Densenet(_), Recipe::Study) => vec![
            Phase {
                name: "head".into(),
                epochs: overrides.epochs.unwrap_or(25),
                lr,
                scope: Scope::Head,
                batch_norm_stats: false,
            },
            Phase {
                name: "fine-tune".into(),
                epochs: overrides.fine_tune_epochs.unwrap_or(10),
                lr: overrides.fine_tune_lr.unwrap_or(1e-5),
                scope: if overrides.unfreeze.is_empty() {
                    Scope::All
                } else {
                    Scope::Prefixes(overrides.unfreeze.clone())
                },
                batch_norm_stats: false,
            },
        ],
    }
}

//! The training loop: phases (e.g. head-only, then fine-tuning), Adam,
//! BCE with logits, seeded shuffling/augmentation/dropout, per-epoch
//! validation, and a checkpoint after every epoch so that an interrupted run
//! resumes where it stopped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use fracture_core::models::{Mode, Model};
use fracture_core::predict::probabilities_from_logits;
use fracture_core::weights::{ModelFile, StorageDType};
use fracture_core::{preprocess, ModelCard, Preprocessing};
use image::Rgb32FImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::augment::Augmentation;
use crate::average::WeightAverage;
use crate::fingerprint::RunFingerprint;
use crate::optim::Adam;
use crate::params::{derive_seed, Params};
use crate::progress::Progress;
use crate::report::{EpochRecord, History};

#[derive(Debug, thiserror::Error)]
pub enum FitError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Core(#[from] fracture_core::Error),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
    #[error(
        "training diverged in phase `{phase}`, epoch {epoch} ({what}); the checkpoint keeps the last good epoch. \
         Lower the learning rate (--lr) and rerun"
    )]
    Diverged { phase: String, epoch: usize, what: String },
}

/// A mean BCE this far above chance (0.69) only comes from logits in the
/// hundreds on the wrong side: the weights have blown up, even where the
/// loss is still a finite number.
const DIVERGED_LOSS: f64 = 1e3;

/// Which parameters a phase trains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    All,
    /// The classifier alone: the base is frozen and its output is detached.
    Head,
    /// Parameters whose names start with one of these (e.g. `features.denseblock4`), plus the head.
    Prefixes(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub epochs: usize,
    pub lr: f64,
    pub scope: Scope,
    /// BatchNorm normalises with batch statistics (and updates its running
    /// ones); false keeps it in inference mode, as the study's fine-tuning.
    pub batch_norm_stats: bool,
    /// How the learning rate moves within the phase; `lr` is its peak.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Progressive resizing: the phase's first epochs at a smaller input size.
    #[serde(default)]
    pub progressive: Option<Progressive>,
}

impl Phase {
    /// A phase at a constant rate and the model's input size.
    pub fn constant(name: &str, epochs: usize, lr: f64, scope: Scope, batch_norm_stats: bool) -> Self {
        Self {
            name: name.into(),
            epochs,
            lr,
            scope,
            batch_norm_stats,
            lr_schedule: LrSchedule::Constant,
            progressive: None,
        }
    }

    /// The learning rate of step `step` (of `steps`) in epoch `epoch`.
    pub fn lr_at(&self, epoch: usize, step: usize, steps: usize) -> f64 {
        match self.lr_schedule {
            LrSchedule::Constant => self.lr,
            LrSchedule::WarmupCosine { warmup_epochs } => {
                let steps = steps.max(1);
                let now = (epoch * steps + step) as f64;
                let warmup = (warmup_epochs.min(self.epochs) * steps) as f64;
                let total = (self.epochs * steps) as f64;
                if now < warmup {
                    self.lr * (now + 1.0) / warmup
                } else {
                    let progress = (now - warmup) / (total - warmup).max(1.0);
                    self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
                }
            }
        }
    }

    /// The input size of epoch `epoch` (0-based) for a model whose card says `full`.
    pub fn size_at(&self, epoch: usize, full: usize) -> usize {
        match &self.progressive {
            Some(p) if epoch < p.epochs => p.size,
            _ => full,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LrSchedule {
    #[default]
    Constant,
    /// Linear warm-up from 0 over the first epochs, then cosine decay to 0 at the
    /// phase's last step: a scratch model's early steps cannot take the peak rate.
    WarmupCosine { warmup_epochs: usize },
}

/// The first `epochs` epochs of a phase at `size` pixels, the rest at the model's
/// input size: most of the compute at a quarter of the pixels, the last epochs
/// where the fine detail is. Only for models that pool globally (DenseNet).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progressive {
    pub size: usize,
    pub epochs: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FitConfig {
    pub phases: Vec<Phase>,
    pub batch_size: usize,
    pub augmentation: Augmentation,
    pub seed: u64,
    /// Augmented views per training image whose backbone features are computed once
    /// and reused by head-only phases (base frozen, BatchNorm in inference mode);
    /// 0 runs the backbone at every step with a fresh augmentation.
    #[serde(default)]
    pub feature_bank: usize,
    /// Decoupled (AdamW) weight decay of convolution and linear weights, per unit of learning rate.
    #[serde(default)]
    pub weight_decay: f64,
    /// Targets move this far towards 0.5 (0 and 1 become ε/2 and 1 - ε/2).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Mixup's Beta(α, α) parameter: each batch is blended with a shuffled copy
    /// of itself, images and targets alike. 0 turns it off.
    #[serde(default)]
    pub mixup: f64,
    /// Decay of the weight average (Polyak/EMA) kept through training and
    /// written as the model; 0 writes the last weights.
    #[serde(default)]
    pub weight_average: f64,
}

impl FitConfig {
    pub fn validate(&self) -> Result<(), FitError> {
        if self.batch_size == 0 {
            return Err(FitError::Config("--batch must be at least 1".into()));
        }
        if self.phases.is_empty() || self.phases.iter().all(|p| p.epochs == 0) {
            return Err(FitError::Config("the schedule has no epochs".into()));
        }
        if let Some(p) = self.phases.iter().find(|p| !(p.lr > 0.0 && p.lr.is_finite())) {
            return Err(FitError::Config(format!(
                "phase `{}`: learning rate {} must be positive",
                p.name, p.lr
            )));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(FitError::Config(format!(
                "--weight-decay {} must be zero or positive",
                self.weight_decay
            )));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(FitError::Config(format!(
                "--label-smoothing {} must be in [0, 0.5)",
                self.label_smoothing
            )));
        }
        if !(0.0..1.0).contains(&self.weight_average) {
            return Err(FitError::Config(format!(
                "--weight-average {} must be in [0, 1)",
                self.weight_average
            )));
        }
        if !(self.mixup >= 0.0 && self.mixup.is_finite()) {
            return Err(FitError::Config(format!(
                "--mixup {} must be zero or positive",
                self.mixup
            )));
        }
        for phase in &self.phases {
            if let Some(p) = &phase.progressive {
                if p.size < 32 || p.epochs > phase.epochs {
                    return Err(FitError::Config(format!(
                        "phase `{}`: progressive resizing at {} px for {} of its {} epochs (needs at least 32 px, and no more epochs than the phase)",
                        phase.name, p.size, p.epochs, phase.epochs
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Images (already at the input size) with labels, and which of them train and validate.
pub struct FitData<'a> {
    pub images: &'a [Rgb32FImage],
    pub labels: &'a [bool],
    pub train: Vec<usize>,
    pub validation: Vec<usize>,
}

/// Numerically stable mean BCE on logits: max(x,0) - x·y + log(1 + e^-|x|).
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let softplus_tail = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    ((logits.relu()? - (logits * targets)?)? + softplus_tail)?.mean_all()
}

fn labels_tensor(labels: &[bool], indices: &[usize], smoothing: f64, device: &Device) -> candle_core::Result<Tensor> {
    let (low, high) = ((smoothing / 2.0) as f32, (1.0 - smoothing / 2.0) as f32);
    let values: Vec<f32> = indices.iter().map(|&i| if labels[i] { high } else { low }).collect();
    Tensor::from_vec(values, indices.len(), device)
}

/// P(positive) for each listed image, in eval mode, in batches.
pub fn predict(
    model: &Model,
    images: &[Rgb32FImage],
    indices: &[usize],
    preprocessing: &Preprocessing,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<f64>, FitError> {
    let batch: Vec<&Rgb32FImage> = indices.iter().map(|&i| &images[i]).collect();
    Ok(model.probabilities(&batch, preprocessing, batch_size, device)?)
}

/// Mean BCE and accuracy at 0.5 of probabilities against labels.
fn loss_and_accuracy(probabilities: &[f64], labels: &[bool], indices: &[usize]) -> (f64, f64) {
    let targets: Vec<bool> = indices.iter().map(|&i| labels[i]).collect();
    let loss = crate::metrics::bce_loss(probabilities, &targets);
    let correct = probabilities
        .iter()
        .zip(&targets)
        .filter(|(p, t)| (**p >= 0.5) == **t)
        .count();
    (loss, correct as f64 / targets.len().max(1) as f64)
}

/// Where the run stands, saved beside the weights in each checkpoint.
#[derive(Serialize, Deserialize)]
struct CheckpointState {
    fingerprint: String,
    phase: usize,
    /// Epochs of `phase` already done.
    epochs_done: usize,
    adam_step: usize,
    /// Updates of the weight average so far.
    #[serde(default)]
    average_updates: usize,
    history: History,
}

const STATE_KEY: &str = "fracture_checkpoint";

/// A checkpoint read back: every tensor (weights and optimiser moments) and the position.
struct Resume {
    tensors: HashMap<String, Tensor>,
    state: CheckpointState,
}

impl Resume {
    /// The model's own tensors, without the optimiser's moments and the weight average.
    fn model_tensors(&self) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter(|(name, _)| {
                !name.starts_with(crate::optim::STATE_PREFIX) && !name.starts_with(crate::average::PREFIX)
            })
            .map(|(name, tensor)| (name.clone(), tensor.clone()))
            .collect()
    }
}

pub struct Checkpoint {
    pub path: PathBuf,
}

impl Checkpoint {
    /// The checkpoint kept beside an output model file.
    pub fn beside(output: &Path) -> Self {
        let mut name = output.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".checkpoint");
        Self {
            path: output.with_file_name(name),
        }
    }

    fn error(&self, message: impl ToString) -> FitError {
        FitError::Checkpoint {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    fn save(
        &self,
        card: &ModelCard,
        params: &Params,
        adam: &Adam,
        average: Option<&WeightAverage>,
        state: &CheckpointState,
    ) -> Result<(), FitError> {
        let mut tensors = params.tensors();
        tensors.extend(adam.state()?);
        if let Some(average) = average {
            tensors.extend(average.tensors());
        }
        let mut card = card.clone();
        card.notes.push("Training checkpoint: not a finished model.".into());
        // The run's position travels in a second metadata entry of the same file.
        let state_json = serde_json::to_string(state).map_err(|e| self.error(e))?;
        let entries = HashMap::from([(STATE_KEY.to_string(), state_json)]);
        let bytes = ModelFile::to_bytes_with_entries(&card, &tensors, StorageDType::F32, entries)?;
        crate::write_atomically(&self.path, &bytes).map_err(|e| self.error(e))
    }

    fn load(&self, device: &Device) -> Result<Option<Resume>, FitError> {
        if !self.path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&self.path).map_err(|e| self.error(e))?;
        let file = ModelFile::from_bytes(&bytes, device).map_err(|e| self.error(e))?;
        let state_json = file
            .entries
            .get(STATE_KEY)
            .ok_or_else(|| self.error("no training state in this file"))?;
        let state: CheckpointState = serde_json::from_str(state_json).map_err(|e| self.error(e))?;
        Ok(Some(Resume {
            tensors: file.tensors,
            state,
        }))
    }
}

/// Called after every epoch (for logging).
pub type EpochObserver<'a> = dyn FnMut(&EpochRecord) + 'a;

struct Fit<'a> {
    card: &'a ModelCard,
    params: &'a Params,
    model: &'a Model,
    device: &'a Device,
    checkpoint: Option<Checkpoint>,
    /// Where an interrupted run stopped; its weights are already in `params`.
    resume: Option<Resume>,
    /// Identifies the run in every checkpoint it writes.
    fingerprint: String,
    /// Told of the batches within an epoch and of feature caching.
    progress: &'a dyn Progress,
}

impl Fit<'_> {
    fn run(&self, data: &FitData, config: &FitConfig, on_epoch: &mut EpochObserver) -> Result<History, FitError> {
        let fingerprint = &self.fingerprint;
        let resume = self.resume.as_ref();
        let mut history = History::default();
        if let Some(saved) = resume {
            history = saved.state.history.clone();
            for record in &history.epochs {
                on_epoch(record);
            }
        }
        let mut average = match config.weight_average {
            0.0 => None,
            decay => Some(WeightAverage::new(self.params, decay)?),
        };
        if let (Some(average), Some(saved)) = (&mut average, resume) {
            average.load(&saved.tensors, saved.state.average_updates)?;
        }

        let mut bank: Option<FeatureBank> = None;
        for (phase_index, phase) in config.phases.iter().enumerate() {
            let mut first_epoch = 0;
            let prefixes = self.scope_prefixes(&phase.scope);
            let mut adam = Adam::new(self.params.trainable(prefixes.as_deref()), phase.lr)?;
            adam.weight_decay = config.weight_decay;
            if let Some(saved) = resume {
                if phase_index < saved.state.phase {
                    continue;
                }
                if phase_index == saved.state.phase {
                    first_epoch = saved.state.epochs_done;
                    adam.load_state(&saved.tensors, saved.state.adam_step)?;
                }
            }
            let cached = self.can_cache(config, phase) && first_epoch < phase.epochs;
            if cached && bank.is_none() {
                bank = Some(FeatureBank::build(self, data, config)?);
            }
            for epoch in first_epoch..phase.epochs {
                let mut steps = Steps {
                    adam: &mut adam,
                    average: &mut average,
                };
                let mut record = match (&bank, cached) {
                    (Some(bank), true) => self.cached_epoch(bank, data, config, phase_index, epoch, &mut steps)?,
                    _ => self.epoch(data, config, phase_index, epoch, &mut steps)?,
                };
                if let Some(average) = &mut average {
                    // The average's own validation, at the size this epoch trained at.
                    average.swap()?;
                    let probabilities = self.validate(data, phase.size_at(epoch, self.card.input_size()));
                    average.swap()?;
                    if let Some(probabilities) = probabilities? {
                        let truth: Vec<bool> = data.validation.iter().map(|&i| data.labels[i]).collect();
                        record.averaged_val_auc = crate::metrics::roc_auc(&probabilities, &truth);
                    }
                }
                // The last step may have blown the weights up after a finite loss.
                if let Some(name) = self.params.first_non_finite()? {
                    return Err(FitError::Diverged {
                        phase: phase.name.clone(),
                        epoch: epoch + 1,
                        what: format!("`{name}` holds a non-finite value"),
                    });
                }
                on_epoch(&record);
                history.epochs.push(record);
                if let Some(checkpoint) = &self.checkpoint {
                    let state = CheckpointState {
                        fingerprint: fingerprint.clone(),
                        phase: phase_index,
                        epochs_done: epoch + 1,
                        adam_step: adam.step,
                        average_updates: average.as_ref().map_or(0, |a| a.updates),
                        history: history.clone(),
                    };
                    checkpoint.save(self.card, self.params, &adam, average.as_ref(), &state)?;
                }
            }
        }
        if let Some(average) = &mut average {
            average.swap()?;
        }
        Ok(history)
    }

    fn scope_prefixes(&self, scope: &Scope) -> Option<Vec<String>> {
        let head: Vec<String> = self.model.head_prefixes().iter().map(|s| s.to_string()).collect();
        match scope {
            Scope::All => None,
            Scope::Head => Some(head),
            Scope::Prefixes(prefixes) => Some(prefixes.iter().cloned().chain(head).collect()),
        }
    }

    /// A head-only phase with the base in inference mode sees each image only
    /// through its pooled features, which the bank can hold.
    fn can_cache(&self, config: &FitConfig, phase: &Phase) -> bool {
        // Mixup blends input images, which banked features no longer are.
        config.feature_bank > 0
            && config.mixup == 0.0
            && phase.scope == Scope::Head
            && !phase.batch_norm_stats
            && self.model.can_cache_features()
    }

    /// One head-only epoch on banked features: each image contributes one of its
    /// views, drawn per epoch; validation reads the banked plain images.
    fn cached_epoch(
        &self,
        bank: &FeatureBank,
        data: &FitData,
        config: &FitConfig,
        phase_index: usize,
        epoch: usize,
        steps: &mut Steps,
    ) -> Result<EpochRecord, FitError> {
        let phase = &config.phases[phase_index];
        let started = Instant::now();
        let order = epoch_order(data, config, phase_index, epoch);
        let batches = order.len().div_ceil(config.batch_size);
        let mut tally = Tally::default();
        for (batch_index, batch) in order.chunks(config.batch_size).enumerate() {
            let rows: Vec<u32> = batch
                .iter()
                .map(|&i| {
                    let view = derive_seed(config.seed, ("view", phase_index, epoch, i)) as usize % bank.views;
                    (bank.first_row[&i] + view) as u32
                })
                .collect();
            let pooled = bank.train.index_select(&Tensor::new(rows, self.device)?, 0)?;
            let targets = labels_tensor(data.labels, batch, config.label_smoothing, self.device)?;
            let step_seed = derive_seed(config.seed, ("dropout", phase_index, epoch, batch_index));
            steps.adam.lr = phase.lr_at(epoch, batch_index, batches);
            let logits = self.model.classify(&pooled, Some(step_seed))?;
            let loss = bce_with_logits(&logits, &targets)?;
            let loss_value = check_loss(&loss, phase, epoch)?;
            steps.step(&loss)?;
            tally.add(loss_value, &logits, batch, data.labels)?;
        }
        let validation = match &bank.validation {
            Some(features) => Some(probabilities_from_logits(
                &self.model.classify(features, None)?.detach(),
            )?),
            None => None,
        };
        Ok(tally.record(phase, epoch, validation, data, started))
    }

    fn epoch(
        &self,
        data: &FitData,
        config: &FitConfig,
        phase_index: usize,
        epoch: usize,
        steps: &mut Steps,
    ) -> Result<EpochRecord, FitError> {
        let phase = &config.phases[phase_index];
        let started = Instant::now();
        let order = epoch_order(data, config, phase_index, epoch);

        let batches = order.len().div_ceil(config.batch_size);
        let progress = self.progress;
        progress.start(
            &format!("{} {}/{}", phase.name, epoch + 1, phase.epochs),
            "batches",
            batches as u64,
        );

        let size = phase.size_at(epoch, self.card.input_size());
        let preprocessing = Preprocessing {
            input_size: size,
            ..self.card.preprocessing.clone()
        };
        let mut tally = Tally::default();
        for (batch_index, batch) in order.chunks(config.batch_size).enumerate() {
            let images: Vec<Rgb32FImage> = batch
                .par_iter()
                .map(|&i| {
                    let mut rng =
                        ChaCha8Rng::seed_from_u64(derive_seed(config.seed, ("augment", phase_index, epoch, i)));
                    // Augmented at full size, then shrunk: the small epochs see what the large ones would, coarser.
                    preprocess::resize(&config.augmentation.apply(&data.images[i], &mut rng), size)
                })
                .collect();
            let refs: Vec<&Rgb32FImage> = images.iter().collect();
            let xs = preprocess::to_tensor(&refs, &preprocessing, self.device)?;
            let targets = labels_tensor(data.labels, batch, config.label_smoothing, self.device)?;
            let (xs, targets) = if config.mixup > 0.0 {
                let mut rng =
                    ChaCha8Rng::seed_from_u64(derive_seed(config.seed, ("mixup", phase_index, epoch, batch_index)));
                mixup(&xs, &targets, config.mixup, &mut rng)?
            } else {
                (xs, targets)
            };
            let step_seed = derive_seed(config.seed, ("dropout", phase_index, epoch, batch_index));
            steps.adam.lr = phase.lr_at(epoch, batch_index, batches);
            let logits = match &phase.scope {
                // Frozen base: its output is a constant, so no graph is built through it.
                Scope::Head => {
                    let features = if phase.batch_norm_stats {
                        self.model.features(&xs, true)?.detach()
                    } else {
                        self.model.frozen_features(&xs)?
                    };
                    self.model.head(&features, Some(step_seed))?
                }
                _ => self.model.forward(
                    &xs,
                    Mode {
                        dropout_seed: Some(step_seed),
                        batch_stats: phase.batch_norm_stats,
                    },
                )?,
            };
            let loss = bce_with_logits(&logits, &targets)?;
            let loss_value = check_loss(&loss, phase, epoch)?;
            steps.step(&loss)?;
            tally.add(loss_value, &logits, batch, data.labels)?;
            progress.message(&format!("loss {:.4}", tally.mean_loss()));
            progress.advance(1);
        }
        progress.finish();

        let validation = self.validate(data, size)?;
        Ok(tally.record(phase, epoch, validation, data, started))
    }

    /// P(positive) of the validation images at `size` pixels, if there are any.
    fn validate(&self, data: &FitData, size: usize) -> Result<Option<Vec<f64>>, FitError> {
        if data.validation.is_empty() {
            return Ok(None);
        }
        if size == self.card.input_size() {
            return Ok(Some(predict(
                self.model,
                data.images,
                &data.validation,
                &self.card.preprocessing,
                32,
                self.device,
            )?));
        }
        let preprocessing = Preprocessing {
            input_size: size,
            ..self.card.preprocessing.clone()
        };
        let resized: Vec<Rgb32FImage> = data
            .validation
            .par_iter()
            .map(|&i| preprocess::resize(&data.images[i], size))
            .collect();
        let indices: Vec<usize> = (0..resized.len()).collect();
        Ok(Some(predict(
            self.model,
            &resized,
            &indices,
            &preprocessing,
            32,
            self.device,
        )?))
    }
}

/// What each optimiser step moves: the weights (through Adam) and their average.
struct Steps<'a> {
    adam: &'a mut Adam,
    average: &'a mut Option<WeightAverage>,
}

impl Steps<'_> {
    fn step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        self.adam.backward_step(loss)?;
        if let Some(average) = self.average.as_mut() {
            average.update()?;
        }
        Ok(())
    }
}

/// The batch loss, read once; an error before the step when it shows the run has diverged.
fn check_loss(loss: &Tensor, phase: &Phase, epoch: usize) -> Result<f64, FitError> {
    let value = loss.to_scalar::<f32>()? as f64;
    if value.is_finite() && value < DIVERGED_LOSS {
        return Ok(value);
    }
    Err(FitError::Diverged {
        phase: phase.name.clone(),
        epoch: epoch + 1,
        what: format!("batch loss {value:e}"),
    })
}

/// Mixup (Zhang et al. 2018): λ·x + (1-λ)·x[π] and the same for the targets,
/// with one λ ~ Beta(α, α) per batch, folded to λ ≥ 0.5 so that each row stays
/// mostly its own image (the tally's accuracy reads the row's own label).
fn mixup(xs: &Tensor, targets: &Tensor, alpha: f64, rng: &mut ChaCha8Rng) -> Result<(Tensor, Tensor), FitError> {
    let beta = rand_distr::Beta::new(alpha, alpha).map_err(|e| FitError::Config(format!("--mixup {alpha}: {e}")))?;
    let lambda: f64 = rand_distr::Distribution::sample(&beta, rng);
    let lambda = lambda.max(1.0 - lambda);
    let mut partner: Vec<u32> = (0..xs.dim(0)? as u32).collect();
    partner.shuffle(rng);
    let partner = Tensor::new(partner, xs.device())?;
    let blend = |t: &Tensor| -> candle_core::Result<Tensor> {
        (t * lambda)? + (t.index_select(&partner, 0)? * (1.0 - lambda))?
    };
    Ok((blend(xs)?, blend(targets)?))
}

/// The training images in an epoch's seeded order.
fn epoch_order(data: &FitData, config: &FitConfig, phase_index: usize, epoch: usize) -> Vec<usize> {
    let mut order = data.train.clone();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(derive_seed(
        config.seed,
        ("shuffle", phase_index, epoch),
    )));
    order
}

/// Running training loss and accuracy of an epoch.
#[derive(Default)]
struct Tally {
    loss_sum: f64,
    correct: usize,
    seen: usize,
}

impl Tally {
    fn add(&mut self, loss: f64, logits: &Tensor, batch: &[usize], labels: &[bool]) -> candle_core::Result<()> {
        self.loss_sum += loss * batch.len() as f64;
        let predictions: Vec<f32> = logits.detach().to_vec1()?;
        self.correct += predictions
            .iter()
            .zip(batch)
            .filter(|(logit, &i)| (**logit >= 0.0) == labels[i])
            .count();
        self.seen += batch.len();
        Ok(())
    }

    fn mean_loss(&self) -> f64 {
        self.loss_sum / self.seen.max(1) as f64
    }

    /// The epoch's record, with validation loss and accuracy from P(positive)
    /// of the validation images, when there are any.
    fn record(
        &self,
        phase: &Phase,
        epoch: usize,
        validation: Option<Vec<f64>>,
        data: &FitData,
        started: Instant,
    ) -> EpochRecord {
        let (val_loss, val_accuracy, val_auc) = match validation {
            Some(probabilities) => {
                let (loss, accuracy) = loss_and_accuracy(&probabilities, data.labels, &data.validation);
                let truth: Vec<bool> = data.validation.iter().map(|&i| data.labels[i]).collect();
                (
                    Some(loss),
                    Some(accuracy),
                    crate::metrics::roc_auc(&probabilities, &truth),
                )
            }
            None => (None, None, None),
        };
        EpochRecord {
            phase: phase.name.clone(),
            epoch: epoch + 1,
            lr: phase.lr_at(epoch, 0, 1),
            train_loss: self.mean_loss(),
            train_accuracy: self.correct as f64 / self.seen.max(1) as f64,
            val_loss,
            val_accuracy,
            val_auc,
            averaged_val_auc: None,
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

/// Pooled backbone features, computed once for the head-only phases: `views`
/// augmented views of every training image (the same augmentation the plain
/// loop draws, from seeds of their own), and the validation images as they are.
struct FeatureBank {
    views: usize,
    /// Row of each training image's first view in `train`; its views follow.
    first_row: HashMap<usize, usize>,
    train: Tensor,
    validation: Option<Tensor>,
}

impl FeatureBank {
    fn build(fit: &Fit, data: &FitData, config: &FitConfig) -> Result<Self, FitError> {
        // Without augmentation every view would be the same image.
        let views = if config.augmentation == Augmentation::NONE {
            1
        } else {
            config.feature_bank
        };
        let jobs: Vec<(usize, Option<usize>)> = data
            .train
            .iter()
            .flat_map(|&i| (0..views).map(move |v| (i, Some(v))))
            .chain(data.validation.iter().map(|&i| (i, None)))
            .collect();
        fit.progress.start("caching features", "views", jobs.len() as u64);
        let mut pooled = Vec::with_capacity(jobs.len().div_ceil(32));
        for chunk in jobs.chunks(32) {
            let images: Vec<Rgb32FImage> = chunk
                .par_iter()
                .map(|&(i, view)| match view {
                    Some(v) if views > 1 => {
                        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(config.seed, ("bank", i, v)));
                        config.augmentation.apply(&data.images[i], &mut rng)
                    }
                    _ => data.images[i].clone(),
                })
                .collect();
            let refs: Vec<&Rgb32FImage> = images.iter().collect();
            let xs = preprocess::to_tensor(&refs, &fit.card.preprocessing, fit.device)?;
            pooled.push(fit.model.pool(&fit.model.frozen_features(&xs)?)?);
            fit.progress.advance(chunk.len() as u64);
        }
        fit.progress.finish();
        let all = Tensor::cat(&pooled, 0)?;
        let train_rows = data.train.len() * views;
        let first_row = data.train.iter().enumerate().map(|(k, &i)| (i, k * views)).collect();
        let validation = (!data.validation.is_empty())
            .then(|| all.narrow(0, train_rows, data.validation.len()))
            .transpose()?;
        Ok(Self {
            views,
            first_row,
            train: all.narrow(0, 0, train_rows)?,
            validation,
        })
    }
}

/// A model to train: its card (architecture, preprocessing, classes), the
/// weights it starts from, and the schedule.
pub struct TrainSpec<'a> {
    pub card: &'a ModelCard,
    pub init: Option<&'a HashMap<String, Tensor>>,
    pub config: &'a FitConfig,
    pub device: &'a Device,
    pub progress: &'a dyn Progress,
}

pub struct Trained {
    pub params: Params,
    pub model: Model,
    pub history: History,
}

/// Builds the model (fresh, or from `init`) and runs the whole schedule.
pub fn train(
    spec: &TrainSpec,
    data: &FitData,
    checkpoint: Option<Checkpoint>,
    on_epoch: &mut EpochObserver,
) -> Result<Trained, FitError> {
    spec.config.validate()?;
    if data.train.is_empty() {
        return Err(FitError::Config("no training images".into()));
    }
    let fingerprint = RunFingerprint::training(spec.card, spec.config, data).to_string();
    let resume = match &checkpoint {
        Some(checkpoint) => checkpoint.load(spec.device)?,
        None => None,
    };
    if let (Some(checkpoint), Some(saved)) = (&checkpoint, &resume) {
        if saved.state.fingerprint != fingerprint {
            return Err(checkpoint
                .error("belongs to a different run (model, data or schedule changed); delete it to start afresh"));
        }
    }
    // A resumed run's weights come in as --init's do, but complete: the
    // checkpoint must hold every tensor the model asks for, and nothing else.
    let params = match (&resume, spec.init) {
        (Some(saved), _) => Params::resumed(&saved.model_tensors())?,
        (None, Some(tensors)) => Params::with_tensors(spec.config.seed, tensors)?,
        (None, None) => Params::new(spec.config.seed),
    };
    let model = Model::new(
        &spec.card.architecture,
        spec.card.input_size(),
        params.var_builder(spec.device),
    );
    let unused = params.unused_names();
    let model = match (&checkpoint, &resume) {
        (Some(checkpoint), Some(_)) => {
            let model = model.map_err(|e| checkpoint.error(e))?;
            if let Some(first) = unused.first() {
                return Err(checkpoint.error(format!("holds tensor `{first}`, which the model does not have")));
            }
            model
        }
        _ => {
            let model = model?;
            if let Some(first) = unused.first() {
                return Err(FitError::Config(format!(
                    "initial weights hold {} tensor(s) that {} does not have, e.g. `{first}`",
                    unused.len(),
                    spec.card.architecture.display_name()
                )));
            }
            model
        }
    };
    let fit = Fit {
        card: spec.card,
        params: &params,
        model: &model,
        device: spec.device,
        checkpoint,
        resume,
        fingerprint,
        progress: spec.progress,
    };
    let history = fit.run(data, spec.config, on_epoch)?;
    Ok(Trained { params, model, history })
}

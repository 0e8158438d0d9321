//! The command line as clap reads it: every command, flag and default.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use fracture_core::models::{cnn::CnnConfig, densenet::DenseNetConfig};
use fracture_core::{Architecture, ModelCard, OperatingPoint};
use fracture_train::bench::BenchMode;
use fracture_train::fit::Progressive;
use fracture_train::schedule::Recipe;

#[derive(Parser, Debug)]
#[command(
    name = "fracture",
    version,
    about = "Train and run bone-fracture (abnormality) classifiers on X-rays."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Worker threads for every parallel part (kernels, decoding) [default: the
    /// scheduler's allocation (SLURM_CPUS_PER_TASK) where set, else the cores
    /// this process may use].
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model on a dataset directory and write it as .safetensors with its model card.
    Train(TrainArgs),
    /// Stratified k-fold cross-validation, grouped by patient when known.
    #[command(alias = "eval-w-kfold")]
    Kfold(KfoldArgs),
    /// Predict P(abnormal) for image files or directories.
    Detect(DetectArgs),
    /// Print throughput (images/s) and peak memory of inference or training steps.
    Bench(BenchArgs),
    /// Write a synthetic dataset (bars with and without cracks) to try the tools on.
    Synth(SynthArgs),
    /// Convert torchvision DenseNet weights (.pth or .safetensors state dict) into a model file.
    Import(ImportArgs),
    /// Pick a seeded, stratified, patient-disjoint held-out set and write its patient ids.
    Split(SplitArgs),
    /// Print a model file's card as JSON, or update what it says about the data.
    Card(CardCommandArgs),
    /// Draw the out-of-fold ROC curves of several kfold reports in one SVG.
    Roc(RocArgs),
    /// Fit a model's temperature, test-time augmentation and operating points
    /// on held-out images, and record them in its card.
    Calibrate(CalibrateArgs),
    /// Score two models on the same labelled images, or two k-fold runs on their
    /// out-of-fold predictions: each one's AUC and kappa, and how much B gains
    /// over A, with a paired bootstrap over patients.
    Compare(CompareArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModelName {
    Cnn,
    Densenet121,
    Densenet169,
    Densenet201,
    /// A tiny DenseNet for tests and quick trials.
    DensenetTiny,
}

impl ModelName {
    pub fn architecture(self, kernel: usize) -> Architecture {
        match self {
            ModelName::Cnn => Architecture::Cnn(CnnConfig::with_kernel(kernel)),
            ModelName::Densenet121 => Architecture::Densenet(DenseNetConfig::densenet121()),
            ModelName::Densenet169 => Architecture::Densenet(DenseNetConfig::densenet169()),
            ModelName::Densenet201 => Architecture::Densenet(DenseNetConfig::densenet201()),
            ModelName::DensenetTiny => Architecture::Densenet(DenseNetConfig::tiny()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AugmentStrength {
    /// The study's: flip, rotation 0.1, zoom 0.2, brightness 0.4.
    Study,
    /// Flip, rotation 0.05, zoom 0.1, brightness 0.1.
    Mild,
    /// Flip, rotation 0.05, zoom 0.2, brightness 0.1, shifts up to 0.1, gamma 0.74-1.35.
    Strong,
    None,
}

fn parse_progressive(text: &str) -> std::result::Result<Progressive, String> {
    let (size, epochs) = text
        .split_once(':')
        .ok_or_else(|| format!("`{text}` is not SIZE:EPOCHS, e.g. 128:20"))?;
    let size = size
        .trim()
        .parse()
        .map_err(|_| format!("`{size}` is not a size in pixels"))?;
    let epochs = epochs
        .trim()
        .parse()
        .map_err(|_| format!("`{epochs}` is not a number of epochs"))?;
    Ok(Progressive { size, epochs })
}

#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Dataset directory: class folders (Fracture/, Normal/) or the MURA layout.
    #[arg(short, long = "input", value_name = "DIR")]
    pub input: PathBuf,
    /// Name of the abnormal class folder, when it is not fracture/positive/abnormal.
    #[arg(long, value_name = "NAME")]
    pub positive: Option<String>,
    /// With a MURA-v1.1 root: the study type to read, e.g. XR_HUMERUS.
    #[arg(long, value_name = "TYPE")]
    pub study: Option<String>,
    /// Use only the patients listed in FILE (one id per line, as written by `split`).
    #[arg(long, value_name = "FILE", conflicts_with = "exclude_patients")]
    pub patients: Option<PathBuf>,
    /// Leave out the patients listed in FILE, e.g. a held-out target set.
    #[arg(long, value_name = "FILE")]
    pub exclude_patients: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    #[arg(long, value_enum, default_value = "cnn")]
    pub model: ModelName,
    /// Convolution size of the cnn: 1 is the study's; 3 is our variant.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=7))]
    pub kernel: u8,
    /// Start from these weights (an `fracture import`ed ImageNet model or a MURA-stage model).
    #[arg(long, value_name = "W.safetensors")]
    pub init: Option<PathBuf>,
    /// Schedule: the study's (two phases for DenseNet) or one phase training everything.
    #[arg(long, value_enum)]
    pub recipe: Option<RecipeArg>,
    /// Epochs of the first (or only) phase [default: cnn 35, DenseNet head 25].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Learning rate of the first phase [default: 1e-3].
    #[arg(long)]
    pub lr: Option<f64>,
    /// DenseNet fine-tuning epochs [default: 10].
    #[arg(long)]
    pub fine_tune_epochs: Option<usize>,
    /// DenseNet fine-tuning learning rate [default: 1e-5].
    #[arg(long)]
    pub fine_tune_lr: Option<f64>,
    /// Only unfreeze parameters starting with these prefixes when fine-tuning (e.g. features.denseblock4).
    #[arg(long, value_name = "PREFIX")]
    pub unfreeze: Vec<String>,
    /// Images per step [default: 6, the study's; 16 with --recipe scratch].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Warm-up epochs, then cosine decay of the first phase's rate to 0
    /// [default: 2 for DenseNet's scratch recipe; others keep a constant rate].
    #[arg(long, value_name = "N")]
    pub warmup_epochs: Option<usize>,
    /// Keep the learning rate constant (no warm-up, no decay), as the study did.
    #[arg(long, conflicts_with = "warmup_epochs")]
    pub constant_lr: bool,
    /// AdamW weight decay of convolution and linear weights [default: 0.05 scratch, 0 study].
    #[arg(long, value_name = "X")]
    pub weight_decay: Option<f64>,
    /// Move the targets towards 0.5 by this much [default: 0.1 scratch, 0 study].
    #[arg(long, value_name = "X")]
    pub label_smoothing: Option<f64>,
    /// Keep an exponential moving average of the weights with this decay per
    /// step (e.g. 0.998) and write it as the model [default: off].
    #[arg(long, value_name = "DECAY")]
    pub weight_average: Option<f64>,
    /// Mixup with Beta(ALPHA, ALPHA) blending of each batch with a shuffled copy
    /// (0.2 is usual) [default: off].
    #[arg(long, value_name = "ALPHA")]
    pub mixup: Option<f64>,
    /// Progressive resizing, SIZE:EPOCHS: the first EPOCHS epochs at SIZE px, the
    /// rest at --size (DenseNet only).
    #[arg(long, value_name = "SIZE:EPOCHS", value_parser = parse_progressive)]
    pub progressive: Option<Progressive>,
    /// Augmentation strength [default: study for the study's recipe, mild for scratch].
    #[arg(long, value_enum, conflicts_with = "no_augment")]
    pub augment: Option<AugmentStrength>,
    /// Augmented views per image whose features DenseNet's frozen-base phase computes
    /// once and reuses (0: run the base at every step with a fresh augmentation, as
    /// the study did).
    #[arg(long, default_value_t = 8)]
    pub feature_bank: usize,
    /// Input size in pixels (square).
    #[arg(long, default_value_t = 150)]
    pub size: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Train without augmentation (the same as --augment none).
    #[arg(long)]
    pub no_augment: bool,
    /// Hide the per-batch progress bar (epoch lines are still printed).
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output model file.
    #[arg(short, long, value_name = "MODEL.safetensors")]
    pub output: PathBuf,
    /// Fraction of patients held out for per-epoch validation.
    #[arg(long, default_value_t = 0.2)]
    pub val_split: f64,
    /// Validate on exactly these patients (e.g. a committed development split)
    /// instead of a random --val-split; they are not trained on.
    #[arg(long, value_name = "FILE", conflicts_with = "val_split")]
    pub val_patients: Option<PathBuf>,
    /// Store weights as f16 (half the size; loaded as f32).
    #[arg(long)]
    pub f16: bool,
    /// Train on labels the images give themselves instead of the data set's, for
    /// a first stage whose weights start `train --init` (the output is no detector).
    #[arg(long, value_enum, value_name = "TASK")]
    pub pretext: Option<PretextTask>,
    #[command(flatten)]
    pub card: CardArgs,
}

/// `train --pretext`: a self-supervised task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PretextTask {
    /// Each image upright (negative) and turned by a random quarter, half or
    /// three-quarter turn (positive)
    Rotation,
}

/// What a model card says about its data, beyond what the dataset itself shows.
#[derive(Args, Debug, Clone, Default)]
pub struct CardArgs {
    /// The training data in words, e.g. "MURA v1.1 XR_HUMERUS train split" [default: the directory].
    #[arg(long, value_name = "TEXT")]
    pub data_source: Option<String>,
    /// Terms of use of the training data that bind the weights.
    #[arg(long, value_name = "TEXT")]
    pub data_terms: Option<String>,
    /// A note for the card (repeatable), e.g. what the positive class covers.
    #[arg(long = "note", value_name = "TEXT")]
    pub notes: Vec<String>,
}

impl CardArgs {
    pub fn apply(&self, card: &mut ModelCard) -> Result<()> {
        if self.data_source.is_some() || self.data_terms.is_some() {
            let Some(training) = card.training.as_mut() else {
                bail!("the model card has no training section to describe (an imported model?)")
            };
            if let Some(source) = &self.data_source {
                training.source = source.clone();
            }
            if let Some(terms) = &self.data_terms {
                training.terms = Some(terms.clone());
            }
        }
        card.notes.extend(self.notes.iter().cloned());
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.data_source.is_none() && self.data_terms.is_none() && self.notes.is_empty()
    }
}

#[derive(Args, Debug)]
pub struct SplitArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// About how many images the held-out set should have.
    #[arg(long)]
    pub images: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Where to write the held-out patient ids.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
}

#[derive(Args, Debug)]
pub struct CardCommandArgs {
    /// The model file: its card is printed, or updated with the options below.
    #[arg(value_name = "MODEL.safetensors")]
    pub model: PathBuf,
    #[command(flatten)]
    pub card: CardArgs,
    /// Rewrite the weights as f16 (half the download; loaded as f32). Check the
    /// predictions against the f32 file before shipping it.
    #[arg(long)]
    pub f16: bool,
}

#[derive(Args, Debug)]
pub struct RocArgs {
    /// kfold reports (`--report` files), each optionally named in the legend as `NAME=REPORT.json`
    /// (the file name otherwise).
    #[arg(value_name = "[NAME=]REPORT.json", required = true)]
    pub reports: Vec<String>,
    #[arg(short, long, value_name = "OUT.svg")]
    pub output: PathBuf,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct KfoldArgs {
    #[command(subcommand)]
    pub action: Option<KfoldAction>,
    /// None only with `merge`, which reads no data set.
    #[command(flatten)]
    pub data: Option<DataArgs>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 10)]
    pub folds: usize,
    /// Run fold I (1-based) alone and write its shard report to --report, for
    /// `kfold merge`: one job of a Slurm array or Kubernetes Indexed Job.
    #[arg(long, value_name = "I", requires = "report")]
    pub fold: Option<usize>,
    /// Write every figure, per fold, and the out-of-fold predictions as JSON
    /// (plus an ROC curve as SVG beside it).
    #[arg(long, value_name = "OUT.json")]
    pub report: Option<PathBuf>,
    /// Fraction of each fold's training patients held out to log validation curves.
    #[arg(long, default_value_t = 0.0)]
    pub val_split: f64,
}

#[derive(Subcommand, Debug)]
pub enum KfoldAction {
    /// Merge the shard reports of one run (`kfold --fold I`) into the report and
    /// summary the unsharded run writes.
    Merge(MergeArgs),
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Shard reports, one per fold, in any order.
    #[arg(value_name = "SHARD.json", required = true, num_args = 1..)]
    pub shards: Vec<PathBuf>,
    #[arg(long, value_name = "OUT.json")]
    pub report: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Csv,
    Json,
}

#[derive(Args, Debug)]
pub struct DetectArgs {
    #[arg(long, value_name = "MODEL.safetensors")]
    pub weights: PathBuf,
    /// Image files or directories (searched recursively).
    #[arg(short, long = "input", value_name = "PATH", num_args = 1.., required = true)]
    pub inputs: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Also write each image with its heat map (class activation map) as
    /// `DIR/NAME.heatmap.png` (DenseNet models).
    #[arg(long, value_name = "DIR")]
    pub heatmap: Option<PathBuf>,
    /// Which of the card's thresholds labels the images.
    #[arg(long, value_enum, default_value = "balanced")]
    pub operating_point: OperatingPointArg,
    /// One row per study (MURA study folder, or DICOM StudyInstanceUID; any
    /// other image is a study of its own): the mean of its images' probabilities.
    #[arg(long)]
    pub by_study: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OperatingPointArg {
    /// Best agreement with the labels (maximum kappa).
    Balanced,
    /// Sensitivity at least 0.90 on the development predictions.
    Sensitive,
    /// Specificity at least 0.90 on the development predictions.
    Specific,
}

impl From<OperatingPointArg> for OperatingPoint {
    fn from(arg: OperatingPointArg) -> Self {
        match arg {
            OperatingPointArg::Balanced => OperatingPoint::Balanced,
            OperatingPointArg::Sensitive => OperatingPoint::Sensitive,
            OperatingPointArg::Specific => OperatingPoint::Specific,
        }
    }
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("held_out").required(true).args(["input", "out_of_fold"])))]
pub struct CalibrateArgs {
    #[arg(long, value_name = "MODEL.safetensors")]
    pub weights: PathBuf,
    /// The held-out images to calibrate on (a development split: use --patients).
    #[command(flatten)]
    pub data: Option<DataArgs>,
    /// Calibrate on the out-of-fold predictions of this `kfold --report` instead:
    /// a k-fold run of the recipe that trained --weights on the same images.
    #[arg(long, value_name = "REPORT.json", conflicts_with = "input")]
    pub out_of_fold: Option<PathBuf>,
    /// Test-time augmentation to record: the image and its mirror (the default
    /// with -i), or the image alone (the only choice with --out-of-fold).
    #[arg(long, value_enum)]
    pub tta: Option<TtaArg>,
    /// The calibrated model file (may be the input file).
    #[arg(short, long, value_name = "OUT.safetensors")]
    pub output: PathBuf,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TtaArg {
    /// The mean over the image and its horizontal mirror.
    Flip,
    /// The image alone.
    None,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "densenet121")]
    pub model: ModelName,
    #[arg(long, value_enum, default_value = "infer")]
    pub mode: BenchModeArg,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 150)]
    pub size: usize,
    /// Untimed runs before measuring.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed runs; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SynthLayout {
    Classes,
    Mura,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SynthFormat {
    Png,
    /// DICOM: 16-bit MONOCHROME2 with a VOI window, uncompressed (Explicit VR Little Endian).
    Dcm,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value = "classes")]
    pub layout: SynthLayout,
    /// Images per class (class layout) or patients (MURA layout).
    #[arg(long, default_value_t = 50)]
    pub count: usize,
    #[arg(long, default_value_t = 150)]
    pub size: u32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// File format of the images (DICOM shows the same pixels as the PNG).
    #[arg(long, value_enum, default_value = "png")]
    pub format: SynthFormat,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// torchvision DenseNet state dict: `torch.save(model.state_dict(), f)` (.pth) or safetensors.
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    /// Output model file; without a one-output classifier it is for `train --init` only.
    #[arg(short, long, value_name = "OUT.safetensors")]
    pub output: PathBuf,
}

/// `--recipe`: the library's [`Recipe`], as the command line names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RecipeArg {
    /// The study's: cnn 35 epochs; DenseNet 25 head-only epochs with the base
    /// frozen, then 10 fine-tuning epochs at 1e-5, BatchNorm in inference mode.
    Study,
    /// One phase training everything with batch statistics, for DenseNet from
    /// random weights: AdamW at a peak of 3e-4 after a 2-epoch warm-up, cosine
    /// decay, label smoothing 0.1, batch 16, the mild augmentation.
    Scratch,
}

impl From<RecipeArg> for Recipe {
    fn from(arg: RecipeArg) -> Self {
        match arg {
            RecipeArg::Study => Recipe::Study,
            RecipeArg::Scratch => Recipe::Scratch,
        }
    }
}

/// `bench --mode`: the library's [`BenchMode`], as the command line names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchModeArg {
    /// Forward pass in inference mode.
    Infer,
    /// Forward, backward and an Adam step over every parameter.
    Train,
    /// The head-only step: the base runs forward without a graph.
    Frozen,
}

impl From<BenchModeArg> for BenchMode {
    fn from(arg: BenchModeArg) -> Self {
        match arg {
            BenchModeArg::Infer => BenchMode::Infer,
            BenchModeArg::Train => BenchMode::Train,
            BenchModeArg::Frozen => BenchMode::Frozen,
        }
    }
}

#[derive(Args, Debug)]
// An optional flattened group still requires its required fields (clap
// issue 5092); kfold reports need no images.
#[command(mut_arg("input", |arg| arg.required(false)))]
pub struct CompareArgs {
    /// A (the reference), then B: two model files, or two `kfold --report`
    /// files of runs over the same images. Differences are B minus A.
    #[arg(value_name = "MODEL.safetensors|REPORT.json", num_args = 2, required = true)]
    pub models: Vec<PathBuf>,
    /// With model files, the labelled images to score both on: images neither
    /// model trained or was tuned on (a development split: use --patients).
    #[command(flatten)]
    pub data: Option<DataArgs>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: CompareFormat,
    /// Both models' image-level ROC curves in one SVG.
    #[arg(long, value_name = "OUT.svg")]
    pub plot: Option<PathBuf>,
    /// Bootstrap resamples of the patients (of the images without patient ids).
    #[arg(long, default_value_t = fracture_train::metrics::BOOTSTRAP_RESAMPLES as u64,
          value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
    pub resamples: u64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompareFormat {
    Text,
    Json,
}

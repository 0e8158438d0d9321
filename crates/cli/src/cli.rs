//! The `fracture` command line: parse, call the library, print.
//!
//! Exit codes: 0 success; 1 the run failed (the message names the file or
//! option at fault); 2 bad command line (clap's own code).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Parser, Subcommand, ValueEnum};
use fracture_core::card::SourceWeights;
use fracture_core::models::{cnn::CnnConfig, densenet::DenseNetConfig};
use fracture_core::weights::{ModelFile, StorageDType};
use fracture_core::{Architecture, ModelCard, OperatingPoint, Predictor, TtaView};
use indicatif::{ProgressBar, ProgressStyle};

use fracture_train::progress::Progress;
use sha2::{Digest, Sha256};

use fracture_train::augment::Augmentation;
use fracture_train::calibration::HeldOut;
use fracture_train::dataset::{self, Dataset, ScanOptions};
use fracture_train::files;
use fracture_train::fit::{self, Checkpoint, FitConfig, FitData, Progressive, TrainSpec};
use fracture_train::kfold::{self, FoldResult, KfoldObserver, KfoldSpec, RunIdentity, ShardReport};
use fracture_train::merge;
use fracture_train::report::{self, EpochRecord};
use fracture_train::schedule::{self, Overrides, Recipe};

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
    fn architecture(self, kernel: usize) -> Architecture {
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
    pub recipe: Option<Recipe>,
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
    #[command(flatten)]
    pub card: CardArgs,
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
    fn apply(&self, card: &mut ModelCard) -> Result<()> {
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

    fn is_empty(&self) -> bool {
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
    pub mode: fracture_train::bench::BenchMode,
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

pub fn run(cli: Cli) -> Result<()> {
    if let Some(threads) = thread_budget(cli.threads)? {
        use_threads(threads)?;
    }
    match cli.command {
        Command::Train(args) => train(args),
        Command::Kfold(args) => kfold(args),
        Command::Detect(args) => detect(args),
        Command::Bench(args) => bench(args),
        Command::Synth(args) => synth(args),
        Command::Import(args) => import(args),
        Command::Split(args) => split(args),
        Command::Card(args) => card(args),
        Command::Roc(args) => roc(args),
        Command::Calibrate(args) => calibrate(args),
    }
}

/// `--threads`, else what a scheduler allotted (SLURM_CPUS_PER_TASK, or a CPU
/// limit or mask narrower than the machine, as a container or `taskset` sets);
/// None leaves the defaults, which then agree: every core.
fn thread_budget(flag: Option<usize>) -> Result<Option<usize>> {
    if let Some(threads) = flag {
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        return Ok(Some(threads));
    }
    let slurm = std::env::var("SLURM_CPUS_PER_TASK")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n: &usize| n > 0);
    // An explicit RAYON_NUM_THREADS already reaches both rayon and the kernels.
    let user_set = std::env::var_os("RAYON_NUM_THREADS").is_some();
    Ok(slurm.or_else(|| if user_set { None } else { narrower_than_the_machine() }))
}

/// rayon sizes its pool by the cores this process may use (affinity, cgroup
/// quota), but candle's kernels count the machine's physical cores: inside a
/// container limited to 8 of 64 cores they would start 32 threads each.
#[cfg(unix)]
fn narrower_than_the_machine() -> Option<usize> {
    let usable = std::thread::available_parallelism().ok()?.get();
    // SAFETY: sysconf reads a constant of the running system.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    (online > 0 && (usable as i64) < online as i64).then_some(usable)
}

#[cfg(not(unix))]
fn narrower_than_the_machine() -> Option<usize> {
    None
}

/// One budget for rayon's pool and for the kernels (candle and gemm size their
/// splits from RAYON_NUM_THREADS). Runs before any thread exists.
fn use_threads(threads: usize) -> Result<()> {
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .with_context(|| format!("cannot start {threads} worker threads"))
}

fn scan_dataset(data: &DataArgs) -> Result<Dataset> {
    let options = ScanOptions {
        positive: data.positive.clone(),
        study: data.study.clone(),
    };
    let mut dataset = dataset::scan(&data.input, &options)?;
    for (list, keep) in [(&data.patients, true), (&data.exclude_patients, false)] {
        if let Some(list) = list {
            let listed = dataset::read_patient_list(list)?;
            dataset.filter_patients(list, &listed, keep)?;
        }
    }
    Ok(dataset)
}

fn split(args: SplitArgs) -> Result<()> {
    files::check_output_path(&args.output)?;
    let dataset = scan_dataset(&args.data)?;
    eprint!("{}", dataset.summary());
    if !dataset.has_patients {
        bail!(
            "{}: a held-out set needs patient ids (MURA layout)",
            args.data.input.display()
        );
    }
    let total = dataset.samples.len();
    if args.images == 0 || args.images >= total {
        bail!(
            "--images {} must be between 1 and {} (the dataset's size)",
            args.images,
            total - 1
        );
    }
    let labels: Vec<bool> = dataset.samples.iter().map(|s| s.positive).collect();
    let groups: Vec<usize> = dataset.samples.iter().map(|s| s.group).collect();
    let (_, held_out) =
        fracture_train::folds::grouped_split(&labels, &groups, args.images as f64 / total as f64, args.seed)?;
    let patients: std::collections::BTreeSet<&str> = held_out
        .iter()
        .map(|&i| dataset.group_names[groups[i]].as_str())
        .collect();
    let positives = held_out.iter().filter(|&&i| labels[i]).count();
    let mut text = format!(
        "# fracture split -i {} --images {} --seed {}\n# {} patients, {} images ({} abnormal, {} normal)\n",
        args.data.input.display(),
        args.images,
        args.seed,
        patients.len(),
        held_out.len(),
        positives,
        held_out.len() - positives
    );
    for id in &patients {
        text += id;
        text.push('\n');
    }
    fracture_train::write_atomically(&args.output, text.as_bytes())
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    eprintln!(
        "held out {} patients, {} images ({positives} abnormal): wrote {}",
        patients.len(),
        held_out.len(),
        args.output.display()
    );
    Ok(())
}

fn card(args: CardCommandArgs) -> Result<()> {
    let bytes = files::read_regular_file(&args.model, files::MAX_INPUT_BYTES)?;
    let file = ModelFile::from_bytes(&bytes, &Device::Cpu)
        .with_context(|| format!("{} is not a model file", args.model.display()))?;
    let mut card = file.card;
    if args.card.is_empty() && !args.f16 {
        println!("{}", serde_json::to_string_pretty(&card)?);
        return Ok(());
    }
    args.card
        .apply(&mut card)
        .with_context(|| args.model.display().to_string())?;
    // Loading widens to f32; f16 -> f32 -> f16 is exact, so unless asked the weights are unchanged.
    let storage = if args.f16 { StorageDType::F16 } else { file.storage };
    let bytes = ModelFile::to_bytes(&card, &file.tensors, storage)?;
    fracture_train::write_atomically(&args.model, &bytes)
        .with_context(|| format!("cannot write {}", args.model.display()))?;
    let what = if args.f16 {
        "stored the weights as f16 in"
    } else {
        "updated the card of"
    };
    eprintln!("{what} {}", args.model.display());
    Ok(())
}

fn roc(args: RocArgs) -> Result<()> {
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

/// Terminal progress bars on stderr, one task at a time; hidden with `--quiet`.
struct Bars {
    bar: std::sync::Mutex<ProgressBar>,
    quiet: bool,
}

impl Bars {
    fn new(quiet: bool) -> Self {
        Self {
            bar: std::sync::Mutex::new(ProgressBar::hidden()),
            quiet,
        }
    }

    fn bar(&self) -> std::sync::MutexGuard<'_, ProgressBar> {
        // A panic elsewhere while drawing leaves a usable bar behind.
        self.bar.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Progress for Bars {
    fn start(&self, task: &str, unit: &str, total: u64) {
        if self.quiet {
            return;
        }
        let template = format!("  {{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{msg}}  ({{eta}} left)");
        let bar = ProgressBar::new(total).with_style(
            ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(task.to_string());
        *self.bar() = bar;
    }

    fn advance(&self, steps: u64) {
        self.bar().inc(steps);
    }

    fn message(&self, message: &str) {
        self.bar().set_message(message.to_string());
    }

    fn finish(&self) {
        self.bar().finish_and_clear();
    }
}

/// Scans, prints the summary, and decodes every image at the model's size.
fn load_dataset(data: &DataArgs, card: &ModelCard, quiet: bool) -> Result<(Dataset, Vec<image::Rgb32FImage>)> {
    let mut dataset = scan_dataset(data)?;
    let images = dataset.load_images(&card.preprocessing, &Bars::new(quiet));
    eprint!("{}", dataset.summary());
    dataset.check_trainable()?;
    Ok((dataset, images))
}

struct Prepared {
    card: ModelCard,
    init: Option<HashMap<String, Tensor>>,
    config: FitConfig,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The card template, initial weights and schedule that `train` and `kfold` share.
fn prepare(args: &ModelArgs, device: &Device) -> Result<Prepared> {
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
    let recipe = args.recipe.unwrap_or(match (&architecture, &init) {
        (Architecture::Densenet(_), None) => {
            eprintln!(
                "note: the study's DenseNet recipe freezes a pretrained base; without --init it would \
                 freeze random weights, so training from scratch uses --recipe scratch"
            );
            Recipe::Scratch
        }
        _ => Recipe::Study,
    });
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

fn print_epoch(prefix: &str, record: &EpochRecord) {
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

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!("{stem}{suffix}"))
}

fn train(args: TrainArgs) -> Result<()> {
    files::check_output_path(&args.output)?;
    let device = Device::Cpu;
    if !(0.0..0.9).contains(&args.val_split) {
        bail!("--val-split {} must be in [0, 0.9)", args.val_split);
    }
    let Prepared { mut card, init, config } = prepare(&args.model, &device)?;
    let (dataset, images) = load_dataset(&args.data, &card, args.model.quiet)?;
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
    card.training = Some(dataset.training_summary(schedule));
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

fn kfold(args: KfoldArgs) -> Result<()> {
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
    let run_id = format!(
        "{:016x}",
        fracture_train::params::derive_seed(
            args.model.seed,
            (
                serde_json::to_string(&config)?,
                serde_json::to_string(&card.architecture)?,
                card.input_size(),
                args.folds,
                args.val_split.to_bits(),
                dataset
                    .samples
                    .iter()
                    .map(|s| s.path.display().to_string())
                    .collect::<Vec<_>>(),
                card.init.as_ref().map(|s| s.sha256.clone()),
            )
        )
    );
    let state_dir = match &args.report {
        Some(report) => with_suffix(report, &format!(".partial-{run_id}")),
        None => std::env::temp_dir().join(format!("fracture-kfold-{run_id}")),
    };
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

/// An image to detect: named on the command line, or found below a directory
/// that was (then `relative` is its path below that directory).
struct InputFile {
    path: PathBuf,
    named: bool,
    relative: PathBuf,
}

/// Image files named on the command line, and those found in directories.
/// A directory entry that cannot be listed is skipped and named; symbolic
/// links to files count as files, links to directories are not followed.
fn expand_inputs(inputs: &[PathBuf]) -> Vec<InputFile> {
    let mut files = Vec::new();
    for input in inputs {
        if !input.is_dir() {
            let relative = input.file_name().map_or_else(|| input.clone(), PathBuf::from);
            files.push(InputFile {
                path: input.clone(),
                named: true,
                relative,
            });
            continue;
        }
        for entry in walkdir::WalkDir::new(input).sort_by_file_name() {
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) => {
                    let at = err.path().unwrap_or(input);
                    eprintln!(
                        "skipped {}: cannot be listed ({})",
                        files::printable_path(at),
                        err.io_error().map_or_else(|| err.to_string(), |e| e.to_string())
                    );
                    continue;
                }
            };
            let path = entry.path();
            let is_image = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| dataset::IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
            let is_file = entry.file_type().is_file()
                || (entry.path_is_symlink() && std::fs::metadata(path).is_ok_and(|m| m.is_file()));
            if is_file && is_image {
                let relative = path
                    .strip_prefix(input)
                    .map_or_else(|_| path.to_path_buf(), Path::to_path_buf);
                files.push(InputFile {
                    path: entry.into_path(),
                    named: false,
                    relative,
                });
            }
        }
    }
    files
}

/// A CSV field, quoted where it holds a separator, a quote or a line break.
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

fn detect(args: DetectArgs) -> Result<()> {
    let device = Device::Cpu;
    let bytes = files::read_regular_file(&args.weights, files::MAX_INPUT_BYTES).context("--weights")?;
    let mut predictor =
        Predictor::from_bytes(&bytes, &device).with_context(|| format!("--weights {}", args.weights.display()))?;
    predictor
        .set_operating_point(args.operating_point.into())
        .with_context(|| format!("--operating-point for {}", args.weights.display()))?;
    if let Some(dir) = &args.heatmap {
        if !predictor.model().has_class_activation_map() {
            bail!(
                "--heatmap needs a DenseNet model: {} has no class activation map",
                predictor.card().architecture.display_name()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create --heatmap {}", dir.display()))?;
    }
    let files = expand_inputs(&args.inputs);
    let mut heatmap_names = HeatmapNames::default();
    if files.is_empty() {
        bail!(
            "no image files found in {}",
            args.inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    let mut rows = DetectRows::new(args.format, args.by_study);
    let (mut failed_named, mut succeeded) = (0usize, 0usize);
    for chunk in files.chunks(16) {
        let loaded: Vec<_> = {
            use rayon::prelude::*;
            chunk
                .par_iter()
                .map(|file| {
                    let path = &file.path;
                    // The skip line names the path already.
                    let bytes =
                        files::read_regular_file(path, files::MAX_INPUT_BYTES).map_err(|e| e.problem.to_string())?;
                    let study = if args.by_study {
                        study_of(path, &bytes).map_err(|e| e.to_string())?
                    } else {
                        String::new()
                    };
                    let input = if args.heatmap.is_some() {
                        // The heat map comes from the same forward pass as the probability.
                        predictor
                            .detect(&bytes)
                            .map(Loaded::Detection)
                            .map_err(|e| e.to_string())?
                    } else {
                        fracture_core::preprocess::load(&bytes, &predictor.card().preprocessing)
                            .map(Loaded::Input)
                            .map_err(|e| e.to_string())?
                    };
                    Ok::<_, String>((input, study))
                })
                .collect()
        };
        let inputs: Vec<&image::Rgb32FImage> = loaded
            .iter()
            .filter_map(|r| match r {
                Ok((Loaded::Input(image), _)) => Some(image),
                _ => None,
            })
            .collect();
        let mut probabilities = predictor.probabilities(&inputs)?.into_iter();
        for (file, result) in chunk.iter().zip(&loaded) {
            let path = &file.path;
            let (probability, study) = match result {
                Err(reason) => {
                    eprintln!("skipped {}: {reason}", files::printable_path(path));
                    failed_named += usize::from(file.named);
                    continue;
                }
                Ok((Loaded::Input(_), study)) => (
                    probabilities.next().context("internal: prediction count mismatch")?,
                    study,
                ),
                Ok((Loaded::Detection(detection), study)) => {
                    if let Some(dir) = &args.heatmap {
                        write_heatmap(detection, &dir.join(heatmap_names.name_for(&file.relative)))?;
                    }
                    (detection.prediction.probability, study)
                }
            };
            succeeded += 1;
            rows.image(&predictor, files::printable_path(path), probability, study.clone())?;
        }
    }
    if succeeded == 0 {
        bail!("no image could be read");
    }
    rows.finish(&predictor)?;
    if failed_named > 0 {
        bail!("{failed_named} file(s) named on the command line could not be read");
    }
    Ok(())
}

/// The study an image belongs to: its DICOM StudyInstanceUID, its MURA study
/// folder, or (neither) the image alone.
fn study_of(path: &Path, bytes: &[u8]) -> fracture_core::Result<String> {
    if fracture_core::dicom::is_dicom(bytes) {
        if let Some(uid) = fracture_core::dicom::study_instance_uid(bytes)? {
            return Ok(uid);
        }
    }
    Ok(fracture_train::study::mura_study(path).unwrap_or_else(|| path.display().to_string()))
}

/// Detect's output: a row per image as it comes, or with --by-study a row per
/// study once every image is in.
struct DetectRows {
    format: Format,
    by_study: bool,
    json: Vec<serde_json::Value>,
    /// (study, probability) of each image, for --by-study.
    images: Vec<(String, f64)>,
    out: std::io::StdoutLock<'static>,
}

impl DetectRows {
    fn new(format: Format, by_study: bool) -> Self {
        let mut out = std::io::stdout().lock();
        if format == Format::Csv {
            let header = if by_study {
                "study,images,probability,label"
            } else {
                "path,probability,label"
            };
            // A closed stdout shows up at the first row's write, which reports it.
            let _ = writeln!(out, "{header}");
        }
        Self {
            format,
            by_study,
            json: Vec::new(),
            images: Vec::new(),
            out,
        }
    }

    fn image(&mut self, predictor: &Predictor, path: String, probability: f64, study: String) -> Result<()> {
        if self.by_study {
            self.images.push((study, probability));
            return Ok(());
        }
        let label = predictor.prediction(probability).label;
        match self.format {
            Format::Text => writeln!(self.out, "{path}\t{:.2}%\t{label}", probability * 100.0)?,
            Format::Csv => writeln!(self.out, "{},{probability:.6},{}", csv_field(&path), csv_field(&label))?,
            Format::Json => self
                .json
                .push(serde_json::json!({ "path": path, "probability": probability, "label": label })),
        }
        Ok(())
    }

    fn finish(mut self, predictor: &Predictor) -> Result<()> {
        if self.by_study {
            let (keys, probabilities): (Vec<String>, Vec<f64>) = std::mem::take(&mut self.images).into_iter().unzip();
            for study in fracture_train::study::group(&keys, &probabilities) {
                let (images, probability) = (study.members.len(), study.probability);
                let label = predictor.prediction(probability).label;
                match self.format {
                    Format::Text => writeln!(
                        self.out,
                        "{}\t{images} image(s)\t{:.2}%\t{label}",
                        study.key,
                        probability * 100.0
                    )?,
                    Format::Csv => writeln!(
                        self.out,
                        "{},{images},{probability:.6},{}",
                        csv_field(&study.key),
                        csv_field(&label)
                    )?,
                    Format::Json => self.json.push(serde_json::json!({
                        "study": study.key, "images": images, "probability": probability, "label": label,
                    })),
                }
            }
        }
        if self.format == Format::Json {
            serde_json::to_writer_pretty(&mut self.out, &self.json)?;
            writeln!(self.out)?;
        }
        Ok(())
    }
}

/// A detect input: preprocessed for the batched forward pass, or, with
/// `--heatmap`, already run one by one to get its class activation map.
enum Loaded {
    Input(image::Rgb32FImage),
    Detection(fracture_core::predict::Detection),
}

/// Heat-map file names: the image's path below the directory it was found
/// in (so MURA's many `image1.png` do not overwrite one another), made
/// unique with `-2`, `-3`… where two named files share a name.
#[derive(Default)]
struct HeatmapNames {
    used: std::collections::HashSet<PathBuf>,
}

impl HeatmapNames {
    fn name_for(&mut self, relative: &Path) -> PathBuf {
        let stem = relative
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let folder = relative.parent().unwrap_or(Path::new(""));
        let mut name = folder.join(format!("{stem}.heatmap.png"));
        let mut copy = 1;
        while !self.used.insert(name.clone()) {
            copy += 1;
            name = folder.join(format!("{stem}-{copy}.heatmap.png"));
        }
        name
    }
}

fn write_heatmap(detection: &fracture_core::predict::Detection, out: &Path) -> Result<()> {
    let Some(heatmap) = &detection.heatmap else {
        return Ok(());
    };
    if let Some(folder) = out.parent() {
        std::fs::create_dir_all(folder).with_context(|| format!("cannot create {}", folder.display()))?;
    }
    fracture_core::cam::overlay(&detection.input, heatmap)
        .save(out)
        .with_context(|| format!("cannot write {}", out.display()))
}

fn calibrate(args: CalibrateArgs) -> Result<()> {
    files::check_output_path(&args.output)?;
    use fracture_train::calibration;
    let device = Device::Cpu;
    let bytes = files::read_regular_file(&args.weights, files::MAX_INPUT_BYTES).context("--weights")?;
    let file =
        ModelFile::from_bytes(&bytes, &device).with_context(|| format!("--weights {}", args.weights.display()))?;
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
            let model = file
                .build_model(&device)
                .with_context(|| format!("--weights {}", args.weights.display()))?;
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

    let ci = |m: &fracture_train::metrics::BinaryMetrics| match (m.auc, m.auc_ci) {
        (Some(auc), Some((lo, hi))) => format!("{auc:.3} (95% CI {lo:.3}-{hi:.3})"),
        (Some(auc), None) => format!("{auc:.3}"),
        _ => "undefined".into(),
    };
    println!("calibrated on {chosen_on}, TTA {:?}", card.tta);
    println!(
        "temperature {temperature:.3}: expected calibration error {:.3} -> {:.3}",
        before.ece, after.ece
    );
    println!(
        "images: ROC AUC {}  kappa {:.3} at the balanced point",
        ci(image),
        image.kappa
    );
    println!("studies ({}): ROC AUC {}  kappa {:.3}", study.n, ci(study), study.kappa);
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

/// The model's logits under each view for every image of a development
/// split, with what calibration needs to know about those images.
fn development_predictions(
    model: &fracture_core::Model,
    card: &ModelCard,
    data: &DataArgs,
    views: &[TtaView],
    quiet: bool,
) -> Result<HeldOut> {
    let device = Device::Cpu;
    let (dataset, images) = load_dataset(data, card, quiet)?;
    let progress = Bars::new(quiet);
    progress.start("predicting", "images", images.len() as u64);
    let mut view_logits = Vec::with_capacity(images.len());
    let batch = fracture_core::predict::images_per_batch(card.input_size()).min(32);
    for chunk in images.chunks(batch) {
        let refs: Vec<&image::Rgb32FImage> = chunk.iter().collect();
        view_logits.extend(model.view_logits(&refs, &card.preprocessing, views, batch, &device)?);
        progress.advance(chunk.len() as u64);
    }
    progress.finish();
    let chosen_on = format!(
        "{} images{} of {}",
        images.len(),
        dataset
            .patients()
            .map(|p| format!(" ({p} patients)"))
            .unwrap_or_default(),
        data.patients.as_ref().map_or_else(
            || data.input.display().to_string(),
            |list| format!("the patients in {}", list.display())
        ),
    );
    Ok(HeldOut {
        view_logits,
        labels: dataset.samples.iter().map(|s| s.positive).collect(),
        groups: dataset
            .has_patients
            .then(|| dataset.samples.iter().map(|s| s.group).collect()),
        study_keys: dataset
            .samples
            .iter()
            .map(|s| fracture_train::study::mura_study(&s.path).unwrap_or_else(|| s.path.display().to_string()))
            .collect(),
        chosen_on,
    })
}

fn synth(args: SynthArgs) -> Result<()> {
    if args.size < 32 {
        bail!("--size must be at least 32");
    }
    let format = match args.format {
        SynthFormat::Png => fracture_train::synthetic::FileFormat::Png,
        SynthFormat::Dcm => fracture_train::synthetic::FileFormat::Dicom,
    };
    let written = match args.layout {
        SynthLayout::Classes => {
            fracture_train::synthetic::write_class_folders_as(&args.output, args.count, args.size, args.seed, format)?
                .len()
        }
        SynthLayout::Mura => {
            fracture_train::synthetic::write_mura_as(&args.output, args.count, args.size, args.seed, format)?.len()
        }
    };
    eprintln!("wrote {written} synthetic images to {}", args.output.display());
    Ok(())
}

fn import(args: ImportArgs) -> Result<()> {
    files::check_output_path(&args.output)?;
    let source = args.from.display().to_string();
    let bytes = files::read_regular_file(&args.from, 4 * files::MAX_INPUT_BYTES).context("--from")?;
    let imported =
        fracture_train::import::import_torchvision(&bytes, &source).with_context(|| format!("--from {source}"))?;
    let out = imported
        .to_bytes()
        .with_context(|| format!("cannot serialise the weights of {source}"))?;
    fracture_train::write_atomically(&args.output, &out)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!("{}", imported.summary());
    println!("wrote {} ({:.2} MB)", args.output.display(), out.len() as f64 / 1e6);
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    let result = fracture_train::bench::run(
        &args.model.architecture(1),
        args.mode,
        args.batch,
        args.size,
        args.warmup,
        args.reps,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    println!(
        "{} {:?} batch {} at {} px: {:.1} images/s (median of {} runs after {} warm-up, {:.1} ms per batch, {} threads)",
        result.model,
        result.mode,
        result.batch,
        result.size,
        result.images_per_second,
        result.repetitions,
        result.warmup,
        result.median_seconds * 1e3,
        result.threads
    );
    match result.peak_memory_bytes {
        Some(bytes) => println!("peak memory {:.0} MiB", bytes as f64 / (1024.0 * 1024.0)),
        None => println!("peak memory unknown on this platform"),
    }
    Ok(())
}

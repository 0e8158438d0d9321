//! The study's protocol: stratified k-fold cross-validation (grouped by
//! patient when the dataset knows patients), a fresh model per fold, and the
//! study's summary lines plus pooled out-of-fold AUC, sensitivity,
//! specificity, kappa and Brier score.
//!
//! Each finished fold is saved at once, so an interrupted run resumes at the
//! fold it was in (and that fold at its last epoch).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use fracture_core::ModelCard;
use image::Rgb32FImage;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use crate::calibration::HeldOut;
use crate::dataset::Dataset;
use crate::fingerprint::RunFingerprint;
use crate::fit::{self, Checkpoint, FitConfig, FitData, FitError, TrainSpec};
use crate::folds::{grouped_split, stratified_group_kfold};
use crate::metrics::{mean_std, BinaryMetrics};
use crate::progress::Progress;
use crate::report::{EpochRecord, History};

#[derive(Debug, thiserror::Error)]
pub enum KfoldError {
    #[error(transparent)]
    Fit(#[from] FitError),
    #[error("{0}")]
    Folds(String),
    #[error("{path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("fold {fold} is outside 1..={folds}")]
    NoSuchFold { fold: usize, folds: usize },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FoldResult {
    pub fold: usize,
    pub train_images: usize,
    pub test_images: usize,
    pub test_groups: usize,
    /// Mean BCE and accuracy at the card's threshold on the held-out fold:
    /// what the study's `model.evaluate` printed per fold.
    pub loss: f64,
    pub accuracy: f64,
    pub metrics: BinaryMetrics,
    pub seconds: f64,
    pub history: History,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutOfFold {
    pub path: String,
    pub positive: bool,
    pub probability: f64,
    pub fold: usize,
    pub group: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KfoldReport {
    pub model: String,
    /// The folds' input size; absent in reports written before it was recorded.
    #[serde(default)]
    pub input_size: Option<usize>,
    pub folds: usize,
    pub seed: u64,
    pub grouped_by_patient: bool,
    pub threshold: f64,
    pub dataset: fracture_core::card::TrainingSummary,
    pub config: FitConfig,
    pub mean_loss: f64,
    pub std_loss: f64,
    pub mean_accuracy: f64,
    pub std_accuracy: f64,
    /// Metrics over all out-of-fold predictions together.
    pub pooled: BinaryMetrics,
    /// Pooled out-of-fold, one prediction per study (the mean of its images).
    #[serde(default)]
    pub study_level: Option<BinaryMetrics>,
    /// Calibration of the pooled out-of-fold probabilities.
    #[serde(default)]
    pub calibration: Option<crate::calibration::CalibrationFigures>,
    pub per_fold: Vec<FoldResult>,
    pub predictions: Vec<OutOfFold>,
    pub seconds: f64,
}

impl KfoldReport {
    /// The study's two lines, then ours.
    pub fn summary(&self) -> String {
        let p = &self.pooled;
        let mut out = format!(
            "Average Loss: {:.2} (+/- {:.2})\nAverage Accuracy: {:.2}% (+/- {:.2}%)\n",
            self.mean_loss,
            self.std_loss,
            self.mean_accuracy * 100.0,
            self.std_accuracy * 100.0
        );
        match (p.auc, p.auc_ci) {
            (Some(auc), Some((lo, hi))) => {
                out += &format!(
                    "Pooled ROC AUC: {auc:.3} (95% CI {lo:.3}-{hi:.3}, bootstrap over {})\n",
                    self.unit()
                )
            }
            (Some(auc), None) => out += &format!("Pooled ROC AUC: {auc:.3}\n"),
            _ => out += "Pooled ROC AUC: undefined (one class only)\n",
        }
        out += &format!(
            "Sensitivity: {:.1}%  Specificity: {:.1}%  (threshold {:.2})\nCohen's kappa: {:.3}  Brier score: {:.3}\n",
            p.sensitivity * 100.0,
            p.specificity * 100.0,
            self.threshold,
            p.kappa,
            p.brier
        );
        if let Some(study) = &self.study_level {
            out += &format!(
                "Study level ({} studies, mean of their images): ROC AUC {}  kappa {:.3}\n",
                study.n,
                study.auc_text(),
                study.kappa
            );
        }
        if let Some(calibration) = &self.calibration {
            out += &calibration.summary();
            out += "\n";
        }
        out += &format!("{} folds, {} images, {:.0} s\n", self.folds, p.n, self.seconds);
        out
    }

    fn unit(&self) -> &'static str {
        if self.grouped_by_patient {
            "patients"
        } else {
            "images"
        }
    }

    /// Each prediction's patient as an index, where the run grouped by patient.
    pub fn patient_indices(&self) -> Option<Vec<usize>> {
        self.grouped_by_patient.then(|| group_indices(&self.predictions))
    }

    /// Each prediction's study key (see [`crate::study::study_key`]).
    pub fn study_keys(&self) -> Vec<String> {
        study_keys(&self.predictions)
    }

    /// The out-of-fold predictions as held-out predictions to calibrate on.
    /// The folds predicted each image once, without test-time views and at
    /// temperature 1, so its logit is the logit of its probability.
    pub fn held_out(&self, described_as: &str) -> HeldOut {
        let logit = |p: f64| {
            // A probability that rounded to 0 or 1 keeps a large finite logit.
            let p = p.clamp(1e-12, 1.0 - 1e-12);
            (p / (1.0 - p)).ln()
        };
        HeldOut {
            view_logits: self.predictions.iter().map(|p| vec![logit(p.probability)]).collect(),
            labels: self.predictions.iter().map(|p| p.positive).collect(),
            groups: self.patient_indices(),
            study_keys: self.study_keys(),
            chosen_on: format!(
                "{} out-of-fold predictions{} of a {}-fold run ({described_as})",
                self.predictions.len(),
                self.dataset
                    .patients
                    .filter(|_| self.grouped_by_patient)
                    .map(|p| format!(" ({p} patients)"))
                    .unwrap_or_default(),
                self.folds
            ),
        }
    }

    /// The first way the weights behind `card` were trained differently from
    /// this run's folds (model, input size, data, schedule), in words; `None`
    /// when the card's training is this run's recipe on this run's images, so
    /// that operating points chosen on its out-of-fold predictions belong to
    /// them. The seed may differ: it changes one draw, not the recipe.
    pub fn recipe_difference(&self, card: &ModelCard) -> Option<String> {
        let model = card.architecture.display_name();
        if model != self.model {
            return Some(format!(
                "the weights are a {model}, the k-fold run trained a {}",
                self.model
            ));
        }
        let Some(size) = self.input_size else {
            return Some(
                "the report does not record its input size (it was written by an older fracture): \
                 run its kfold command again, which reassembles the report from the saved folds"
                    .into(),
            );
        };
        if size != card.input_size() {
            return Some(format!(
                "the weights take {} px, the k-fold run trained at {size} px",
                card.input_size()
            ));
        }
        let Some(training) = &card.training else {
            return Some("the weights' card does not say how they were trained".into());
        };
        let counts = |t: &fracture_core::card::TrainingSummary| (t.images, t.positives, t.negatives, t.patients);
        if counts(training) != counts(&self.dataset) {
            return Some(format!(
                "the weights were trained on {} images ({} abnormal, {} normal), the k-fold run's data set has {} ({} abnormal, {} normal)",
                training.images, training.positives, training.negatives,
                self.dataset.images, self.dataset.positives, self.dataset.negatives
            ));
        }
        let without_seed = |value: &serde_json::Value| {
            let mut value = value.clone();
            if let Some(map) = value.as_object_mut() {
                map.remove("seed");
            }
            value
        };
        let folds = serde_json::to_value(&self.config).unwrap_or_default();
        (without_seed(&training.schedule) != without_seed(&folds)).then(|| {
            format!(
                "the weights were trained with another schedule: {} against the folds' {}",
                without_seed(&training.schedule),
                without_seed(&folds)
            )
        })
    }
}

/// What makes fold results parts of one run: shards merge only when all of
/// this agrees.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunIdentity {
    pub model: String,
    pub input_size: usize,
    pub folds: usize,
    pub seed: u64,
    pub validation_fraction: f64,
    pub grouped_by_patient: bool,
    pub threshold: f64,
    /// [`Dataset::fingerprint`]: relative paths, sizes, labels and groups.
    pub data_fingerprint: String,
    /// SHA-256 of the `--init` weights, if any.
    pub init_sha256: Option<String>,
    pub config: FitConfig,
    pub dataset: fracture_core::card::TrainingSummary,
}

impl RunIdentity {
    pub fn of(spec: &KfoldSpec, dataset: &Dataset) -> Self {
        RunIdentity {
            model: spec.card.architecture.display_name(),
            input_size: spec.card.input_size(),
            folds: spec.folds,
            seed: spec.config.seed,
            validation_fraction: spec.validation_fraction,
            grouped_by_patient: dataset.has_patients,
            threshold: spec.card.threshold,
            data_fingerprint: dataset.fingerprint(),
            init_sha256: spec.card.init.as_ref().map(|s| s.sha256.clone()),
            config: spec.config.clone(),
            dataset: dataset.training_summary(serde_json::to_value(spec.config).unwrap_or_default()),
        }
    }

    /// The first thing that differs from `other`, in words, or None when both
    /// describe the same run. Where the data set was mounted does not count.
    pub fn difference(&self, other: &RunIdentity) -> Option<String> {
        let differs = |what: &str, a: String, b: String| (a != b).then(|| format!("{what} {a} against {b}"));
        let config = |c: &FitConfig| serde_json::to_string(c).unwrap_or_default();
        differs(
            "data set",
            self.data_fingerprint.clone(),
            other.data_fingerprint.clone(),
        )
        .or_else(|| differs("model", self.model.clone(), other.model.clone()))
        .or_else(|| differs("input size", self.input_size.to_string(), other.input_size.to_string()))
        .or_else(|| differs("folds", self.folds.to_string(), other.folds.to_string()))
        .or_else(|| differs("seed", self.seed.to_string(), other.seed.to_string()))
        .or_else(|| {
            differs(
                "validation split",
                self.validation_fraction.to_string(),
                other.validation_fraction.to_string(),
            )
        })
        .or_else(|| differs("threshold", self.threshold.to_string(), other.threshold.to_string()))
        .or_else(|| {
            differs(
                "grouping by patient",
                self.grouped_by_patient.to_string(),
                other.grouped_by_patient.to_string(),
            )
        })
        .or_else(|| {
            differs(
                "initial weights",
                format!("{:?}", self.init_sha256),
                format!("{:?}", other.init_sha256),
            )
        })
        .or_else(|| differs("recipe", config(&self.config), config(&other.config)))
    }
}

/// One fold's figures and its out-of-fold predictions.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FoldShard {
    pub result: FoldResult,
    pub predictions: Vec<OutOfFold>,
}

/// What `kfold --fold I` writes: one fold of a run, and the run it belongs to.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShardReport {
    /// Always [`ShardReport::FORMAT`]; tells a shard from any other JSON file.
    pub format: String,
    pub run: RunIdentity,
    pub shard: FoldShard,
}

impl ShardReport {
    pub const FORMAT: &'static str = "fracture-kfold-shard/1";
}

pub struct KfoldSpec<'a> {
    pub card: &'a ModelCard,
    pub init: Option<&'a HashMap<String, Tensor>>,
    pub config: &'a FitConfig,
    pub folds: usize,
    /// Fraction of each fold's training part held out to log validation
    /// curves; 0 trains on all of it.
    pub validation_fraction: f64,
    pub device: &'a Device,
    pub progress: &'a dyn Progress,
    /// Where finished folds and the running fold's checkpoint are kept.
    pub state_dir: &'a Path,
}

/// Where a k-fold run keeps its finished folds until its report is written:
/// beside the report (`REPORT.partial-ID`), else in the temporary folder.
/// The run's fingerprint names it, so only the same run resumes from it.
pub fn state_dir(report: Option<&Path>, run: &RunFingerprint) -> PathBuf {
    match report {
        Some(report) => {
            let stem = report
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            report.with_file_name(format!("{stem}.partial-{run}"))
        }
        None => std::env::temp_dir().join(format!("fracture-kfold-{run}")),
    }
}

/// Called when a fold starts (`fold`, `folds`) and after each epoch.
pub trait KfoldObserver {
    fn fold_started(&mut self, fold: usize, folds: usize, resumed: bool);
    fn epoch(&mut self, fold: usize, record: &EpochRecord);
    fn fold_finished(&mut self, result: &FoldResult);
}

/// Every fold, then the pooled report.
pub fn run(
    spec: &KfoldSpec,
    dataset: &Dataset,
    images: &[Rgb32FImage],
    observer: &mut dyn KfoldObserver,
) -> Result<KfoldReport, KfoldError> {
    let started = Instant::now();
    let shards = run_folds(spec, dataset, images, None, observer)?;
    Ok(assemble(
        &RunIdentity::of(spec, dataset),
        shards,
        started.elapsed().as_secs_f64(),
    ))
}

/// Trains and evaluates the folds (all, or the 1-based `only` one), each on
/// exactly the split the whole run gives it: the folds are drawn from the seed
/// and the data alone, so fold I in its own process is fold I of the run.
pub fn run_folds(
    spec: &KfoldSpec,
    dataset: &Dataset,
    images: &[Rgb32FImage],
    only: Option<usize>,
    observer: &mut dyn KfoldObserver,
) -> Result<Vec<FoldShard>, KfoldError> {
    if let Some(fold) = only.filter(|&f| f == 0 || f > spec.folds) {
        return Err(KfoldError::NoSuchFold {
            fold,
            folds: spec.folds,
        });
    }
    let labels: Vec<bool> = dataset.samples.iter().map(|s| s.positive).collect();
    let groups: Vec<usize> = dataset.samples.iter().map(|s| s.group).collect();
    let test_folds = stratified_group_kfold(&labels, &groups, spec.folds, spec.config.seed)
        .map_err(|e| KfoldError::Folds(e.to_string()))?;
    std::fs::create_dir_all(spec.state_dir).map_err(|e| KfoldError::State {
        path: spec.state_dir.to_path_buf(),
        message: e.to_string(),
    })?;

    let mut shards = Vec::new();
    for (fold, test) in test_folds.iter().enumerate() {
        if only.is_some_and(|only| only != fold + 1) {
            continue;
        }
        let fold_file = spec.state_dir.join(format!("fold{:02}.json", fold + 1));
        let in_test: std::collections::HashSet<usize> = test.iter().copied().collect();
        let rest: Vec<usize> = (0..labels.len()).filter(|i| !in_test.contains(i)).collect();

        let (result, probabilities) = match load_fold(&fold_file)? {
            Some(saved) => {
                observer.fold_started(fold + 1, spec.folds, true);
                saved
            }
            None => {
                observer.fold_started(fold + 1, spec.folds, false);
                let saved = train_fold(spec, fold, &labels, &groups, images, &rest, test, observer)?;
                let json = serde_json::to_vec_pretty(&saved).map_err(|e| KfoldError::State {
                    path: fold_file.clone(),
                    message: e.to_string(),
                })?;
                crate::write_atomically(&fold_file, &json).map_err(|e| KfoldError::State {
                    path: fold_file.clone(),
                    message: e.to_string(),
                })?;
                saved
            }
        };
        observer.fold_finished(&result);
        let predictions = test
            .iter()
            .zip(&probabilities)
            .map(|(&i, &probability)| {
                let sample = &dataset.samples[i];
                OutOfFold {
                    path: sample.path.display().to_string(),
                    positive: sample.positive,
                    probability,
                    fold: fold + 1,
                    group: dataset.group_names[sample.group].clone(),
                }
            })
            .collect();
        shards.push(FoldShard { result, predictions });
    }
    Ok(shards)
}

/// The report of a run from its folds' shards, in fold order.
pub fn assemble(run: &RunIdentity, shards: Vec<FoldShard>, seconds: f64) -> KfoldReport {
    let (results, predictions): (Vec<FoldResult>, Vec<Vec<OutOfFold>>) = shards
        .into_iter()
        .map(|shard| (shard.result, shard.predictions))
        .unzip();
    let predictions: Vec<OutOfFold> = predictions.into_iter().flatten().collect();
    let scores: Vec<f64> = predictions.iter().map(|p| p.probability).collect();
    let truth: Vec<bool> = predictions.iter().map(|p| p.positive).collect();
    let group_ids = group_indices(&predictions);
    let groups = run.grouped_by_patient.then_some(group_ids.as_slice());
    let pooled = BinaryMetrics::compute(&scores, &truth, groups, run.threshold, run.seed);
    let study_keys = study_keys(&predictions);
    let study_level = crate::calibration::study_metrics(&study_keys, &scores, &truth, groups, run.threshold, run.seed);
    let calibration = crate::calibration::CalibrationFigures::of(&scores, &truth);
    let (mean_loss, std_loss) = mean_std(&results.iter().map(|r| r.loss).collect::<Vec<_>>());
    let (mean_accuracy, std_accuracy) = mean_std(&results.iter().map(|r| r.accuracy).collect::<Vec<_>>());
    KfoldReport {
        model: run.model.clone(),
        input_size: Some(run.input_size),
        folds: run.folds,
        seed: run.seed,
        grouped_by_patient: run.grouped_by_patient,
        threshold: run.threshold,
        dataset: run.dataset.clone(),
        config: run.config.clone(),
        mean_loss,
        std_loss,
        mean_accuracy,
        std_accuracy,
        pooled,
        study_level: Some(study_level),
        calibration: Some(calibration),
        per_fold: results,
        predictions,
        seconds,
    }
}

/// Each prediction's study: its MURA study folder, else the image itself.
fn study_keys(predictions: &[OutOfFold]) -> Vec<String> {
    predictions
        .iter()
        .map(|p| crate::study::study_key(Path::new(&p.path)))
        .collect()
}

fn group_indices(predictions: &[OutOfFold]) -> Vec<usize> {
    let mut names: Vec<&str> = predictions.iter().map(|p| p.group.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    predictions
        .iter()
        .map(|p| names.binary_search(&p.group.as_str()).unwrap_or(0))
        .collect()
}

type SavedFold = (FoldResult, Vec<f64>);

fn load_fold(path: &Path) -> Result<Option<SavedFold>, KfoldError> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|e| KfoldError::State {
        path: path.into(),
        message: e.to_string(),
    })?;
    serde_json::from_slice(&bytes).map(Some).map_err(|e| KfoldError::State {
        path: path.into(),
        message: format!("unreadable fold result ({e}); delete it"),
    })
}

#[allow(clippy::too_many_arguments)]
fn train_fold(
    spec: &KfoldSpec,
    fold: usize,
    labels: &[bool],
    groups: &[usize],
    images: &[Rgb32FImage],
    rest: &[usize],
    test: &[usize],
    observer: &mut dyn KfoldObserver,
) -> Result<SavedFold, KfoldError> {
    let started = Instant::now();
    let (train, validation) = if spec.validation_fraction > 0.0 {
        let rest_labels: Vec<bool> = rest.iter().map(|&i| labels[i]).collect();
        let rest_groups: Vec<usize> = rest.iter().map(|&i| groups[i]).collect();
        let (t, v) = grouped_split(&rest_labels, &rest_groups, spec.validation_fraction, spec.config.seed)
            .map_err(|e| KfoldError::Folds(format!("fold {}: {e}", fold + 1)))?;
        (
            t.iter().map(|&i| rest[i]).collect(),
            v.iter().map(|&i| rest[i]).collect(),
        )
    } else {
        (rest.to_vec(), Vec::new())
    };
    let data = FitData {
        images,
        labels,
        train,
        validation,
    };
    let train_spec = TrainSpec {
        card: spec.card,
        init: spec.init,
        config: spec.config,
        device: spec.device,
        progress: spec.progress,
    };
    let checkpoint = Checkpoint {
        path: spec.state_dir.join(format!("fold{:02}.checkpoint", fold + 1)),
    };
    let checkpoint_path = checkpoint.path.clone();
    let trained = fit::train(&train_spec, &data, Some(checkpoint), &mut |record| {
        observer.epoch(fold + 1, record)
    })?;
    let probabilities = fit::predict(&trained.model, images, test, &spec.card.preprocessing, 32, spec.device)?;
    let truth: Vec<bool> = test.iter().map(|&i| labels[i]).collect();
    let test_groups: Vec<usize> = test.iter().map(|&i| groups[i]).collect();
    let metrics = BinaryMetrics::compute(&probabilities, &truth, None, spec.card.threshold, spec.config.seed);
    let mut distinct_groups = test_groups.clone();
    distinct_groups.sort_unstable();
    distinct_groups.dedup();
    let result = FoldResult {
        fold: fold + 1,
        train_images: data.train.len(),
        test_images: test.len(),
        test_groups: distinct_groups.len(),
        loss: metrics.loss,
        accuracy: metrics.accuracy,
        metrics,
        seconds: started.elapsed().as_secs_f64(),
        history: trained.history,
    };
    let _ = std::fs::remove_file(checkpoint_path);
    Ok((result, probabilities))
}

#[cfg(test)]
mod tests {
    /// The folder of finished folds sits beside the report and carries the run's fingerprint.
    #[test]
    fn the_state_folder_is_named_after_the_report_and_the_run() {
        let run = crate::fingerprint::RunFingerprint::kfold(
            &fracture_core::ModelCard::new(
                fracture_core::Architecture::Cnn(fracture_core::models::cnn::CnnConfig::study()),
                32,
            ),
            &crate::fit::FitConfig {
                phases: Vec::new(),
                batch_size: 1,
                augmentation: crate::augment::Augmentation::NONE,
                seed: 1,
                feature_bank: 0,
                weight_decay: 0.0,
                label_smoothing: 0.0,
                mixup: 0.0,
                weight_average: 0.0,
            },
            3,
            0.0,
            &crate::dataset::Dataset {
                root: "/d".into(),
                layout: crate::dataset::Layout::ClassFolders,
                classes: fracture_core::Classes::default(),
                samples: Vec::new(),
                group_names: Vec::new(),
                has_patients: false,
                skipped: Vec::new(),
            },
        );
        assert_eq!(
            super::state_dir(Some(std::path::Path::new("out/k.json")), &run),
            std::path::PathBuf::from(format!("out/k.partial-{run}"))
        );
        assert!(super::state_dir(None, &run).ends_with(format!("fracture-kfold-{run}")));
    }

    /// A resumed run reads finished folds back from JSON: their floats must
    /// come back bit for bit, or its report differs from an uninterrupted one.
    #[test]
    fn fold_results_round_trip_through_json_exactly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(14);
        let values: Vec<f64> = (0..20_000)
            .map(|i| match i % 3 {
                0 => rng.random::<f64>(),
                1 => rng.random::<f64>() * 1e-7,
                _ => f64::from_bits(rng.random::<u64>() >> 2),
            })
            .filter(|v| v.is_finite())
            .collect();
        let json = serde_json::to_string(&values).unwrap();
        let back: Vec<f64> = serde_json::from_str(&json).unwrap();
        let differing = values
            .iter()
            .zip(&back)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differing,
            0,
            "{differing} of {} floats changed on the way through JSON",
            values.len()
        );
    }
}

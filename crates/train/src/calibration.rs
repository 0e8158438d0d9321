//! From held-out predictions to what a model card promises: a temperature
//! that makes P(abnormal) mean what it says, the three operating points, and
//! the figures that show both (expected calibration error, reliability bins).
//!
//! Everything here is chosen on predictions the model was not trained on (a
//! development split, or out-of-fold predictions); choosing it on test data
//! would make the test figures optimistic.

use candle_core::Device;
use fracture_core::{Model, ModelCard, OperatingPoint, OperatingPoints, TtaView};
use image::Rgb32FImage;
use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::metrics::{BinaryMetrics, Confusion};
use crate::progress::Progress;
use crate::study::study_key;

/// Sensitivity of the `sensitive` point and specificity of the `specific` one.
pub const TARGET_RATE: f64 = 0.90;

/// Bins of the reliability diagram and of the expected calibration error.
pub const BINS: usize = 10;

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// P(positive) of each image: the mean over its views of sigmoid(logit / T),
/// as [`fracture_core::ModelCard::probability_from_view_logits`] computes it.
pub fn tempered(view_logits: &[Vec<f64>], temperature: f64) -> Vec<f64> {
    view_logits
        .iter()
        .map(|views| views.iter().map(|z| sigmoid(z / temperature)).sum::<f64>() / views.len().max(1) as f64)
        .collect()
}

/// The temperature minimising the mean cross-entropy of [`tempered`]
/// probabilities, searched (golden section on its logarithm) in [0.05, 20].
/// 1.0 when there is nothing to fit (no images, or one class only).
pub fn fit_temperature(view_logits: &[Vec<f64>], labels: &[bool]) -> f64 {
    if view_logits.len() != labels.len() || !labels.contains(&true) || !labels.contains(&false) {
        return 1.0;
    }
    let loss = |log_t: f64| crate::metrics::bce_loss(&tempered(view_logits, log_t.exp()), labels);
    let (mut low, mut high) = (0.05f64.ln(), 20f64.ln());
    let ratio = (5f64.sqrt() - 1.0) / 2.0;
    let (mut a, mut b) = (high - ratio * (high - low), low + ratio * (high - low));
    let (mut loss_a, mut loss_b) = (loss(a), loss(b));
    for _ in 0..80 {
        if loss_a <= loss_b {
            (high, b, loss_b) = (b, a, loss_a);
            a = high - ratio * (high - low);
            loss_a = loss(a);
        } else {
            (low, a, loss_a) = (a, b, loss_b);
            b = low + ratio * (high - low);
            loss_b = loss(b);
        }
    }
    ((low + high) / 2.0).exp()
}

/// The three operating points on calibrated scores. Each threshold is one of
/// the scores (a score at or above it is positive), so the confusion at the
/// stored threshold reproduces the chosen one exactly.
/// - `balanced`: Cohen's kappa at its maximum (the highest of equal thresholds);
/// - `sensitive`: the highest threshold whose sensitivity is at least 0.90;
/// - `specific`: the lowest threshold whose specificity is at least 0.90.
///
/// Without both classes there is nothing to choose: all three are 0.5.
pub fn operating_points(scores: &[f64], labels: &[bool], chosen_on: &str) -> OperatingPoints {
    let fallback = OperatingPoints {
        balanced: 0.5,
        sensitive: 0.5,
        specific: 0.5,
        chosen_on: chosen_on.into(),
    };
    if scores.len() != labels.len()
        || !labels.contains(&true)
        || !labels.contains(&false)
        || scores.iter().any(|s| s.is_nan())
    {
        return fallback;
    }
    let mut candidates: Vec<f64> = scores.to_vec();
    candidates.sort_by(f64::total_cmp);
    candidates.dedup();
    // Above every score: nothing is positive (specificity 1).
    candidates.push(f64::INFINITY);
    let at = |t: f64| Confusion::at_threshold(scores, labels, t);
    let mut balanced = (f64::NEG_INFINITY, 0.5);
    let (mut sensitive, mut specific) = (candidates[0], None);
    for &t in &candidates {
        let confusion = at(t);
        let kappa = confusion.cohen_kappa();
        if kappa >= balanced.0 {
            balanced = (kappa, t);
        }
        if confusion.sensitivity() >= TARGET_RATE {
            sensitive = t;
        }
        if specific.is_none() && confusion.specificity() >= TARGET_RATE {
            specific = Some(t);
        }
    }
    // A threshold above every score is stored as 1.0 (the card's range); no
    // probability below 1 reaches it, as no score reached the infinite one.
    let clip = |t: f64| t.min(1.0);
    OperatingPoints {
        balanced: clip(balanced.1),
        sensitive: clip(sensitive),
        specific: clip(specific.unwrap_or(f64::INFINITY)),
        chosen_on: chosen_on.into(),
    }
}

/// One bin of a reliability diagram: images whose P(positive) falls in
/// `[lower, upper)` (the last bin includes 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    pub lower: f64,
    pub upper: f64,
    pub count: usize,
    /// Mean predicted probability of the bin's images (NaN when empty).
    #[serde(with = "crate::metrics::nan_as_null")]
    pub mean_probability: f64,
    /// Fraction of them that are positive (NaN when empty).
    #[serde(with = "crate::metrics::nan_as_null")]
    pub observed: f64,
}

pub fn reliability(scores: &[f64], labels: &[bool], bins: usize) -> Vec<ReliabilityBin> {
    let bins = bins.max(1);
    let mut sums = vec![(0usize, 0.0f64, 0usize); bins];
    for (&score, &label) in scores.iter().zip(labels) {
        if !score.is_finite() {
            continue;
        }
        let bin = ((score.clamp(0.0, 1.0) * bins as f64) as usize).min(bins - 1);
        sums[bin].0 += 1;
        sums[bin].1 += score;
        sums[bin].2 += usize::from(label);
    }
    sums.into_iter()
        .enumerate()
        .map(|(i, (count, sum, positives))| ReliabilityBin {
            lower: i as f64 / bins as f64,
            upper: (i + 1) as f64 / bins as f64,
            count,
            mean_probability: if count == 0 { f64::NAN } else { sum / count as f64 },
            observed: if count == 0 {
                f64::NAN
            } else {
                positives as f64 / count as f64
            },
        })
        .collect()
}

/// Expected calibration error: the images' share-weighted mean gap between a
/// bin's mean probability and its observed positive rate (0 is perfect).
pub fn expected_calibration_error(scores: &[f64], labels: &[bool], bins: usize) -> f64 {
    let bins = reliability(scores, labels, bins);
    let total: usize = bins.iter().map(|b| b.count).sum();
    if total == 0 {
        return f64::NAN;
    }
    bins.iter()
        .filter(|b| b.count > 0)
        .map(|b| b.count as f64 / total as f64 * (b.mean_probability - b.observed).abs())
        .sum()
}

/// The confusion-based figures at each operating point, for cards and notes.
pub fn at_operating_points(scores: &[f64], labels: &[bool], points: &OperatingPoints) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for point in OperatingPoint::ALL {
        let threshold = points.threshold(point);
        let confusion = Confusion::at_threshold(scores, labels, threshold);
        out.insert(
            point.name().into(),
            serde_json::json!({
                "threshold": threshold,
                "sensitivity": confusion.sensitivity(),
                "specificity": confusion.specificity(),
                "kappa": confusion.cohen_kappa(),
                "accuracy": confusion.accuracy(),
            }),
        );
    }
    serde_json::Value::Object(out)
}

/// Study-level figures: each study's probability is the mean of its images',
/// its label theirs (MURA labels studies), its patient the first image's.
pub fn study_metrics(
    keys: &[String],
    scores: &[f64],
    labels: &[bool],
    groups: Option<&[usize]>,
    threshold: f64,
    seed: u64,
) -> BinaryMetrics {
    use crate::study::{group, of_first_image, probabilities};
    let studies = group(keys, scores);
    let study_groups = groups.map(|g| of_first_image(&studies, g));
    BinaryMetrics::compute(
        &probabilities(&studies),
        &of_first_image(&studies, labels),
        study_groups.as_deref(),
        threshold,
        seed,
    )
}

/// How well P(abnormal) matches the observed rate on held-out predictions.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CalibrationFigures {
    #[serde(with = "crate::metrics::nan_as_null")]
    pub ece: f64,
    /// Mean cross-entropy: what the temperature minimises. On a few hundred
    /// images the binned ECE moves by a few hundredths between neighbouring
    /// temperatures, so a fit can raise it while this falls; both are shown.
    /// Absent (NaN) in reports written before it was recorded.
    #[serde(default = "not_recorded", with = "crate::metrics::nan_as_null")]
    pub log_loss: f64,
    pub bins: Vec<ReliabilityBin>,
}

fn not_recorded() -> f64 {
    f64::NAN
}

impl CalibrationFigures {
    pub fn of(scores: &[f64], labels: &[bool]) -> Self {
        Self {
            ece: expected_calibration_error(scores, labels, BINS),
            log_loss: crate::metrics::bce_loss(scores, labels),
            bins: reliability(scores, labels, BINS),
        }
    }

    /// One line for text reports; a report written before the log loss was
    /// recorded says nothing of it rather than "NaN".
    pub fn summary(&self) -> String {
        let mut line = format!("Expected calibration error: {:.3} ({} bins)", self.ece, self.bins.len());
        if self.log_loss.is_finite() {
            line += &format!(", log loss {:.4}", self.log_loss);
        }
        line
    }
}

/// Held-out predictions a card's temperature and operating points are chosen
/// on: a development split run through the model, or the out-of-fold
/// predictions of a k-fold run of the recipe that trained it.
#[derive(Clone, Debug)]
pub struct HeldOut {
    /// Each image's logit under each test-time view.
    pub view_logits: Vec<Vec<f64>>,
    pub labels: Vec<bool>,
    /// Each image's patient, where the data set knows patients: the
    /// bootstrap intervals resample patients, not images.
    pub groups: Option<Vec<usize>>,
    /// Each image's study (the MURA study folder, else the image itself).
    pub study_keys: Vec<String>,
    /// Which images, in words, for the card and the printout.
    pub chosen_on: String,
}

impl HeldOut {
    /// `model`'s logits under each of `views` for every image of a development
    /// split (`images`, decoded from `dataset` at the card's preprocessing);
    /// `source` says in words where the split came from (a patient list, a folder).
    pub fn predict(
        model: &Model,
        card: &ModelCard,
        dataset: &Dataset,
        images: &[Rgb32FImage],
        views: &[TtaView],
        source: &str,
        progress: &dyn Progress,
    ) -> fracture_core::Result<Self> {
        let device = Device::Cpu;
        progress.start("predicting", "images", images.len() as u64);
        let mut view_logits = Vec::with_capacity(images.len());
        let batch = fracture_core::predict::images_per_batch(card.input_size()).min(32);
        for chunk in images.chunks(batch) {
            let refs: Vec<&Rgb32FImage> = chunk.iter().collect();
            view_logits.extend(model.view_logits(&refs, &card.preprocessing, views, batch, &device)?);
            progress.advance(chunk.len() as u64);
        }
        progress.finish();
        let patients = dataset
            .patients()
            .map(|p| format!(" ({p} patients)"))
            .unwrap_or_default();
        Ok(HeldOut {
            view_logits,
            labels: dataset.samples.iter().map(|s| s.positive).collect(),
            groups: dataset
                .has_patients
                .then(|| dataset.samples.iter().map(|s| s.group).collect()),
            study_keys: dataset.samples.iter().map(|s| study_key(&s.path)).collect(),
            chosen_on: format!("{} images{patients} of {source}", images.len()),
        })
    }
}

/// What calibration chose and how the held-out predictions score under it.
#[derive(Clone, Debug)]
pub struct Calibrated {
    pub temperature: f64,
    pub points: OperatingPoints,
    /// Calibrated P(abnormal) of each held-out image.
    pub scores: Vec<f64>,
    /// Image-level figures at the balanced point.
    pub images: BinaryMetrics,
    /// Study-level figures (mean of a study's images) at the balanced point.
    pub studies: BinaryMetrics,
    pub before: CalibrationFigures,
    pub after: CalibrationFigures,
}

/// Fits the temperature, then chooses the operating points on the tempered
/// probabilities (a threshold means the probability the card reports).
pub fn calibrate(held_out: &HeldOut, seed: u64) -> Calibrated {
    let HeldOut {
        view_logits, labels, ..
    } = held_out;
    let groups = held_out.groups.as_deref();
    let temperature = fit_temperature(view_logits, labels);
    let scores = tempered(view_logits, temperature);
    let points = operating_points(&scores, labels, &held_out.chosen_on);
    let images = BinaryMetrics::compute(&scores, labels, groups, points.balanced, seed);
    let studies = study_metrics(&held_out.study_keys, &scores, labels, groups, points.balanced, seed);
    Calibrated {
        temperature,
        before: CalibrationFigures::of(&tempered(view_logits, 1.0), labels),
        after: CalibrationFigures::of(&scores, labels),
        points,
        scores,
        images,
        studies,
    }
}

impl Calibrated {
    /// Writes the choice into `card` (its test-time views, temperature,
    /// threshold and operating points) and the figures behind it under
    /// `metrics[entry]`.
    pub fn record(&self, held_out: &HeldOut, tta: Vec<TtaView>, entry: &str, card: &mut ModelCard) {
        card.tta = tta;
        card.temperature = self.temperature;
        card.threshold = self.points.balanced;
        card.operating_points = Some(self.points.clone());
        card.metrics.insert(
            entry.into(),
            serde_json::json!({
                "images": self.images,
                "studies": self.studies,
                "operating_points": at_operating_points(&self.scores, &held_out.labels, &self.points),
                "ece_before_temperature": self.before.ece,
                "ece": self.after.ece,
                "log_loss_before_temperature": self.before.log_loss,
                "log_loss": self.after.log_loss,
                "chosen_on": held_out.chosen_on,
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Labels drawn from sigmoid(z), logits reported as z·3: the fitted
    /// temperature must undo the factor.
    #[test]
    fn fitted_temperature_undoes_overconfidence() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (mut logits, mut labels) = (Vec::new(), Vec::new());
        for _ in 0..4000 {
            let z: f64 = rng.random_range(-4.0..4.0);
            labels.push(rng.random::<f64>() < sigmoid(z));
            logits.push(vec![3.0 * z]);
        }
        let t = fit_temperature(&logits, &labels);
        assert!((t - 3.0).abs() < 0.25, "temperature {t}");
        let before = expected_calibration_error(&tempered(&logits, 1.0), &labels, BINS);
        let after = expected_calibration_error(&tempered(&logits, t), &labels, BINS);
        assert!(after < 0.03 && after < before / 2.0, "ECE {before} -> {after}");
        assert_eq!(fit_temperature(&logits, &vec![true; logits.len()]), 1.0);
    }

    /// The printout and the card show the log loss beside the ECE because the
    /// fit minimises the former: it must fall (or stay) even where the
    /// binned ECE of a small set rises.
    #[test]
    fn calibration_reports_the_log_loss_it_minimises() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (mut view_logits, mut labels) = (Vec::new(), Vec::new());
        for _ in 0..255 {
            let z: f64 = rng.random_range(-3.0..3.0);
            labels.push(rng.random::<f64>() < sigmoid(z));
            view_logits.push(vec![1.8 * z]);
        }
        let held_out = HeldOut {
            study_keys: (0..labels.len()).map(|i| format!("s{i}")).collect(),
            view_logits,
            labels,
            groups: None,
            chosen_on: "test".into(),
        };
        let calibrated = calibrate(&held_out, 1);
        let loss_at = |t: f64| crate::metrics::bce_loss(&tempered(&held_out.view_logits, t), &held_out.labels);
        assert!((calibrated.before.log_loss - loss_at(1.0)).abs() < 1e-12);
        assert!((calibrated.after.log_loss - loss_at(calibrated.temperature)).abs() < 1e-12);
        for nearby in [0.9, 1.1] {
            let loss = loss_at(calibrated.temperature * nearby);
            assert!(
                calibrated.after.log_loss <= loss,
                "{} > {loss}",
                calibrated.after.log_loss
            );
        }
        assert!(calibrated.after.log_loss < calibrated.before.log_loss);

        let old_report = r#"{"ece": 0.05, "bins": []}"#;
        let figures: CalibrationFigures = serde_json::from_str(old_report).unwrap();
        assert!(figures.log_loss.is_nan() && figures.ece == 0.05);
        assert_eq!(figures.summary(), "Expected calibration error: 0.050 (0 bins)");
        let fresh = CalibrationFigures {
            log_loss: 0.53125,
            ..figures
        };
        assert_eq!(
            fresh.summary(),
            "Expected calibration error: 0.050 (0 bins), log loss 0.5312"
        );
    }

    #[test]
    fn operating_points_meet_their_rates_at_the_edge() {
        // 10 negatives at 0.05..0.50, 10 positives at 0.30..0.75 (overlapping).
        let scores: Vec<f64> = (1..=10)
            .map(|i| i as f64 * 0.05)
            .chain((6..=15).map(|i| i as f64 * 0.05))
            .collect();
        let labels: Vec<bool> = (0..20).map(|i| i >= 10).collect();
        let points = operating_points(&scores, &labels, "test");
        let at = |t| Confusion::at_threshold(&scores, &labels, t);
        let above = |t: f64| scores.iter().copied().filter(|&s| s > t).fold(f64::INFINITY, f64::min);
        let below = |t: f64| {
            scores
                .iter()
                .copied()
                .filter(|&s| s < t)
                .fold(f64::NEG_INFINITY, f64::max)
        };
        assert!(at(points.sensitive).sensitivity() >= TARGET_RATE);
        // The next higher score would miss one more positive; the next lower one
        // would let one more negative through.
        assert!(at(above(points.sensitive)).sensitivity() < TARGET_RATE, "{points:?}");
        assert!(at(points.specific).specificity() >= TARGET_RATE);
        assert!(at(below(points.specific)).specificity() < TARGET_RATE, "{points:?}");
        let best = at(points.balanced).cohen_kappa();
        for &t in &scores {
            assert!(
                at(t).cohen_kappa() <= best + 1e-12,
                "kappa at {t} beats the balanced point"
            );
        }
        let single = operating_points(&[0.2, 0.7], &[true, true], "one class");
        assert_eq!((single.balanced, single.sensitive, single.specific), (0.5, 0.5, 0.5));
    }

    #[test]
    fn studies_are_scored_by_their_mean() {
        let keys: Vec<String> = ["s1", "s1", "s2", "s3", "s3"].iter().map(|s| s.to_string()).collect();
        // s1 (positive) 0.9 and 0.5 -> 0.7; s2 (negative) 0.6; s3 (negative) 0.2 and 0.4 -> 0.3.
        let metrics = study_metrics(
            &keys,
            &[0.9, 0.5, 0.6, 0.2, 0.4],
            &[true, true, false, false, false],
            None,
            0.65,
            1,
        );
        assert_eq!((metrics.n, metrics.positives), (3, 1));
        assert_eq!(metrics.auc, Some(1.0));
        assert_eq!(metrics.accuracy, 1.0);
    }

    #[test]
    fn reliability_bins_count_and_average() {
        let bins = reliability(&[0.05, 0.08, 0.95, 1.0], &[false, true, true, true], 10);
        assert_eq!(
            bins.iter().map(|b| b.count).collect::<Vec<_>>(),
            [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
        );
        assert!((bins[0].mean_probability - 0.065).abs() < 1e-12 && bins[0].observed == 0.5);
        assert!(bins[1].observed.is_nan());
        // Bin 0 is off by 0.435, bin 9 by 0.025, each with half the images.
        let ece = expected_calibration_error(&[0.05, 0.08, 0.95, 1.0], &[false, true, true, true], 10);
        assert!((ece - 0.23).abs() < 1e-12, "{ece}");
    }
}

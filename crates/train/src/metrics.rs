//! Binary classification metrics for the abnormal-vs-normal classifier.
//!
//! Conventions shared by every function here:
//! - `scores` are probabilities P(abnormal); `labels` are `true` for abnormal
//!   (the positive class).
//! - A case is called positive when `score >= threshold`.
//! - Input that cannot be measured never panics. Functions returning `Option`
//!   give `None`, functions returning `f64` give NaN, [`roc_curve`] gives an
//!   empty curve and [`Confusion::at_threshold`] gives an all-zero matrix when
//!   `scores` and `labels` differ in length. Ranking functions (AUC, ROC,
//!   bootstrap, Youden) also refuse NaN scores, since a NaN has no rank.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Bootstrap resamples used by [`BinaryMetrics::compute`].
pub const BOOTSTRAP_RESAMPLES: usize = 2000;
/// Confidence level of the AUC interval in [`BinaryMetrics::compute`].
pub const CI_LEVEL: f64 = 0.95;
/// The conventional decision threshold, and the fallback of
/// [`youden_threshold`] when validation data cannot justify another one.
pub const DEFAULT_THRESHOLD: f64 = 0.5;
/// Probabilities are clamped to `[EPSILON, 1 - EPSILON]` in [`bce_loss`], the
/// same epsilon Keras uses, so a confident mistake costs ~16.1 instead of ∞.
pub const EPSILON: f64 = 1e-7;

/// JSON cannot represent NaN or ±∞ and `serde_json` writes them as `null`,
/// which a plain `f64` field then refuses to read back. Undefined metrics
/// (sensitivity of a fold without positives, a diverged loss) are normal
/// here, so such fields go through this module: non-finite values are written
/// as `null` and `null` is read back as NaN.
pub mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        if value.is_finite() {
            serializer.serialize_f64(*value)
        } else {
            serializer.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
    }
}

/// One point of a ROC curve: calling every case with `score >= threshold`
/// positive gives this false-positive and true-positive rate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RocPoint {
    pub fpr: f64,
    pub tpr: f64,
    pub threshold: f64,
}

/// Cases sorted by ascending score, cut into blocks of equal scores. Built once
/// so that bootstrap resamples only change case weights and never re-sort.
struct RankedCases {
    order: Vec<usize>,
    /// Exclusive end (into `order`) of each block of tied scores.
    block_ends: Vec<usize>,
}

impl RankedCases {
    /// `None` if any score is NaN.
    fn new(scores: &[f64]) -> Option<Self> {
        if scores.iter().any(|s| s.is_nan()) {
            return None;
        }
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let mut block_ends = Vec::new();
        for pos in 1..order.len() {
            // `==` rather than total_cmp so that -0.0 and 0.0 count as a tie.
            if scores[order[pos]] != scores[order[pos - 1]] {
                block_ends.push(pos);
            }
        }
        if !order.is_empty() {
            block_ends.push(order.len());
        }
        Some(Self { order, block_ends })
    }

    /// Index ranges into `order`, one per block of tied scores, ascending.
    fn blocks(&self) -> impl DoubleEndedIterator<Item = std::ops::Range<usize>> + '_ {
        (0..self.block_ends.len()).map(move |block| {
            let start = if block == 0 { 0 } else { self.block_ends[block - 1] };
            start..self.block_ends[block]
        })
    }

    /// Mann–Whitney AUC where case `i` counts `weights[i]` times (0 drops it).
    /// `None` when the weighted sample lacks a class.
    fn weighted_auc(&self, labels: &[bool], weights: &[u32]) -> Option<f64> {
        // Twice the U statistic stays an integer even with half-counted ties,
        // so the sum is exact however many cases there are.
        let mut twice_u: u64 = 0;
        let mut negatives_below: u64 = 0;
        let mut positives: u64 = 0;
        for block in self.blocks() {
            let (mut pos, mut neg) = (0u64, 0u64);
            for &case in &self.order[block] {
                let w = u64::from(weights[case]);
                if labels[case] {
                    pos += w;
                } else {
                    neg += w;
                }
            }
            twice_u += pos * (2 * negatives_below + neg);
            negatives_below += neg;
            positives += pos;
        }
        if positives == 0 || negatives_below == 0 {
            return None;
        }
        Some(twice_u as f64 / (2.0 * positives as f64 * negatives_below as f64))
    }
}

/// Area under the ROC curve as the Mann–Whitney statistic: the probability
/// that a random abnormal case scores above a random normal one, ties
/// counting one half.
///
/// `None` if either class is absent, the lengths differ or a score is NaN.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    if scores.len() != labels.len() {
        return None;
    }
    let ranked = RankedCases::new(scores)?;
    ranked.weighted_auc(labels, &vec![1; scores.len()])
}

/// ROC curve from (0, 0) to (1, 1) with one point per distinct score, highest
/// threshold first. Tied scores move the curve in a single (diagonal) step.
///
/// The first point's threshold is the highest score + 1 (as scikit-learn did
/// before 1.3) rather than +∞, so the curve survives a JSON round trip.
/// Empty if either class is absent, the lengths differ or a score is NaN.
pub fn roc_curve(scores: &[f64], labels: &[bool]) -> Vec<RocPoint> {
    if scores.len() != labels.len() {
        return Vec::new();
    }
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    let Some(ranked) = RankedCases::new(scores) else {
        return Vec::new();
    };
    let Some(&top) = ranked.order.last() else {
        return Vec::new();
    };
    if positives == 0 || negatives == 0 {
        return Vec::new();
    }
    let mut curve = vec![RocPoint {
        fpr: 0.0,
        tpr: 0.0,
        threshold: scores[top] + 1.0,
    }];
    let (mut tp, mut fp) = (0usize, 0usize);
    for block in ranked.blocks().rev() {
        let cases = &ranked.order[block];
        for &case in cases {
            if labels[case] {
                tp += 1;
            } else {
                fp += 1;
            }
        }
        curve.push(RocPoint {
            fpr: fp as f64 / negatives as f64,
            tpr: tp as f64 / positives as f64,
            threshold: scores[cases[0]],
        });
    }
    curve
}

/// Percentile bootstrap confidence interval of [`roc_auc`]: cases are drawn
/// with replacement (ChaCha8 seeded with `seed`, so the interval is
/// reproducible), resamples that lack a class are skipped, and the interval
/// is the central `level` share of the resampled AUCs (numpy's default
/// linear interpolation between order statistics).
///
/// `None` if the AUC itself is undefined, `resamples` is 0, `level` is not
/// strictly between 0 and 1, or every resample lacked a class.
///
/// MURA has several images per patient; cases of one patient are not
/// independent, so prefer [`bootstrap_auc_ci_grouped`] whenever patient ids
/// are known — this one is then too narrow.
pub fn bootstrap_auc_ci(
    scores: &[f64],
    labels: &[bool],
    resamples: usize,
    level: f64,
    seed: u64,
) -> Option<(f64, f64)> {
    let n = scores.len();
    bootstrap(scores, labels, resamples, level, seed, |rng, weights| {
        for _ in 0..n {
            weights[rng.random_range(0..n)] += 1;
        }
    })
}

/// Cluster bootstrap of [`roc_auc`]: whole groups (patients) are drawn with
/// replacement, each drawn group contributing all of its cases, as many draws
/// as there are groups. Otherwise as [`bootstrap_auc_ci`]. Group ids are
/// arbitrary numbers; they are visited in ascending order so that the result
/// only depends on the seed. With one case per group and groups numbered
/// `0..n` in case order, the result equals [`bootstrap_auc_ci`] for the same
/// seed.
///
/// `None` also when `groups` differs in length from `scores`.
pub fn bootstrap_auc_ci_grouped(
    scores: &[f64],
    labels: &[bool],
    groups: &[usize],
    resamples: usize,
    level: f64,
    seed: u64,
) -> Option<(f64, f64)> {
    if groups.len() != scores.len() {
        return None;
    }
    let members = group_members(groups);
    bootstrap(scores, labels, resamples, level, seed, |rng, weights| {
        draw_groups(&members, rng, weights)
    })
}

/// Each group's cases, groups in ascending id order (so that draws depend only
/// on the seed).
fn group_members(groups: &[usize]) -> Vec<Vec<usize>> {
    let mut members: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (case, &group) in groups.iter().enumerate() {
        members.entry(group).or_default().push(case);
    }
    members.into_values().collect()
}

/// One cluster resample: as many group draws as there are groups, each drawn
/// group adding all of its cases.
fn draw_groups(members: &[Vec<usize>], rng: &mut ChaCha8Rng, weights: &mut [u32]) {
    for _ in 0..members.len() {
        for &case in &members[rng.random_range(0..members.len())] {
            weights[case] += 1;
        }
    }
}

/// How much better scorer B ranks the same cases than scorer A.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairedDifference {
    /// AUC of B minus AUC of A on all cases.
    pub difference: f64,
    /// Percentile interval of the difference over paired resamples.
    pub ci: (f64, f64),
    /// Share of the resamples in which B's AUC exceeded A's.
    pub b_above_share: f64,
}

/// Paired cluster bootstrap of the difference between two scorers' AUCs on
/// the same cases: each resample draws groups (patients) as
/// [`bootstrap_auc_ci_grouped`] does, with the same draws for its seed, and
/// scores A and B on the same draw. Pairing cancels what the two share (which
/// cases are hard), so the interval is far narrower than the two AUC
/// intervals side by side suggest.
///
/// `None` if either AUC is undefined, the lengths differ, `resamples` is 0,
/// `level` is not strictly between 0 and 1, or every resample lacked a class.
pub fn paired_auc_difference(
    a: &[f64],
    b: &[f64],
    labels: &[bool],
    groups: &[usize],
    resamples: usize,
    level: f64,
    seed: u64,
) -> Option<PairedDifference> {
    let n = labels.len();
    if a.len() != n || b.len() != n || groups.len() != n || resamples == 0 || !(level > 0.0 && level < 1.0) {
        return None;
    }
    let (ranked_a, ranked_b) = (RankedCases::new(a)?, RankedCases::new(b)?);
    let all = vec![1; n];
    let difference = ranked_b.weighted_auc(labels, &all)? - ranked_a.weighted_auc(labels, &all)?;
    let members = group_members(groups);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut weights = vec![0u32; n];
    let mut differences = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        weights.fill(0);
        draw_groups(&members, &mut rng, &mut weights);
        // Both scorers see the same labels and weights, so both are defined or neither.
        if let (Some(auc_a), Some(auc_b)) = (
            ranked_a.weighted_auc(labels, &weights),
            ranked_b.weighted_auc(labels, &weights),
        ) {
            differences.push(auc_b - auc_a);
        }
    }
    if differences.is_empty() {
        return None;
    }
    let above = differences.iter().filter(|&&d| d > 0.0).count();
    let b_above_share = above as f64 / differences.len() as f64;
    differences.sort_by(f64::total_cmp);
    Some(PairedDifference {
        difference,
        ci: central_interval(&differences, level),
        b_above_share,
    })
}

/// Shared bootstrap loop; `draw` adds one resample's multiplicities to the
/// zeroed `weights`.
fn bootstrap(
    scores: &[f64],
    labels: &[bool],
    resamples: usize,
    level: f64,
    seed: u64,
    mut draw: impl FnMut(&mut ChaCha8Rng, &mut [u32]),
) -> Option<(f64, f64)> {
    if resamples == 0 || !(level > 0.0 && level < 1.0) || scores.len() != labels.len() {
        return None;
    }
    let ranked = RankedCases::new(scores)?;
    // An undefined point estimate makes any interval meaningless.
    ranked.weighted_auc(labels, &vec![1; scores.len()])?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut weights = vec![0u32; scores.len()];
    let mut aucs = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        weights.fill(0);
        draw(&mut rng, &mut weights);
        if let Some(auc) = ranked.weighted_auc(labels, &weights) {
            aucs.push(auc);
        }
    }
    if aucs.is_empty() {
        return None;
    }
    aucs.sort_by(f64::total_cmp);
    Some(central_interval(&aucs, level))
}

/// The interval holding the central `level` share of sorted, non-empty
/// `values`, leaving (1 − level)/2 in each tail.
fn central_interval(sorted: &[f64], level: f64) -> (f64, f64) {
    let tail = (1.0 - level) / 2.0;
    (quantile(sorted, tail), quantile(sorted, 1.0 - tail))
}

/// Quantile of sorted, non-empty `values` with linear interpolation
/// (numpy's default `method="linear"`).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let position = (sorted.len() - 1) as f64 * q.clamp(0.0, 1.0);
    let lower = position.floor() as usize;
    let upper = position.ceil() as usize;
    let fraction = position - lower as f64;
    sorted[lower] + fraction * (sorted[upper] - sorted[lower])
}

/// `numerator / denominator`, NaN when the denominator is zero: a rate over
/// an empty set is undefined, not 0.
fn ratio(numerator: usize, denominator: usize) -> f64 {
    if denominator == 0 {
        f64::NAN
    } else {
        numerator as f64 / denominator as f64
    }
}

/// Confusion matrix at a threshold. `fn_` because `fn` is a keyword; in JSON
/// the field is called `fn`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Confusion {
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
}

impl Confusion {
    /// Counts with `score >= threshold` called abnormal. A NaN score is
    /// never `>=` anything, so it counts as called normal. All zeros if the
    /// lengths differ.
    pub fn at_threshold(scores: &[f64], labels: &[bool], threshold: f64) -> Confusion {
        let mut confusion = Confusion::default();
        if scores.len() != labels.len() {
            return confusion;
        }
        for (&score, &label) in scores.iter().zip(labels) {
            match (score >= threshold, label) {
                (true, true) => confusion.tp += 1,
                (true, false) => confusion.fp += 1,
                (false, false) => confusion.tn += 1,
                (false, true) => confusion.fn_ += 1,
            }
        }
        confusion
    }

    /// Number of cases.
    pub fn total(&self) -> usize {
        self.tp + self.fp + self.tn + self.fn_
    }

    /// (tp + tn) / n; NaN if there are no cases.
    pub fn accuracy(&self) -> f64 {
        ratio(self.tp + self.tn, self.total())
    }

    /// Recall of the abnormal class, tp / (tp + fn); NaN without abnormal cases.
    pub fn sensitivity(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }

    /// Recall of the normal class, tn / (tn + fp); NaN without normal cases.
    pub fn specificity(&self) -> f64 {
        ratio(self.tn, self.tn + self.fp)
    }

    /// Positive predictive value, tp / (tp + fp); NaN if nothing was called
    /// abnormal.
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }

    /// Cohen's kappa between prediction and label: (p_o − p_e) / (1 − p_e)
    /// with p_e the agreement expected from the marginals alone. NaN if there
    /// are no cases or p_e = 1 (labels and predictions are one and the same
    /// class), where scikit-learn also returns NaN.
    pub fn cohen_kappa(&self) -> f64 {
        let n = self.total() as f64;
        if n == 0.0 {
            return f64::NAN;
        }
        let observed = (self.tp + self.tn) as f64 / n;
        let called_pos = (self.tp + self.fp) as f64;
        let called_neg = (self.tn + self.fn_) as f64;
        let actual_pos = (self.tp + self.fn_) as f64;
        let actual_neg = (self.tn + self.fp) as f64;
        let expected = (called_pos * actual_pos + called_neg * actual_neg) / (n * n);
        if expected >= 1.0 {
            return f64::NAN;
        }
        (observed - expected) / (1.0 - expected)
    }
}

/// Brier score, the mean squared distance between probability and outcome
/// (0 perfect, 0.25 for always answering 0.5). NaN if empty or the lengths
/// differ.
pub fn brier(scores: &[f64], labels: &[bool]) -> f64 {
    mean_over_cases(scores, labels, |p, y| (p - if y { 1.0 } else { 0.0 }).powi(2))
}

/// Mean binary cross-entropy with probabilities clamped to
/// `[EPSILON, 1 − EPSILON]` (as Keras does), so the value matches the
/// training loss the study reported. NaN if empty or the lengths differ.
pub fn bce_loss(scores: &[f64], labels: &[bool]) -> f64 {
    mean_over_cases(scores, labels, |p, y| {
        let p = p.clamp(EPSILON, 1.0 - EPSILON);
        if y {
            -p.ln()
        } else {
            -(1.0 - p).ln()
        }
    })
}

fn mean_over_cases(scores: &[f64], labels: &[bool], per_case: impl Fn(f64, bool) -> f64) -> f64 {
    if scores.is_empty() || scores.len() != labels.len() {
        return f64::NAN;
    }
    let sum: f64 = scores.iter().zip(labels).map(|(&p, &y)| per_case(p, y)).sum();
    sum / scores.len() as f64
}

/// Mean and population standard deviation (ddof = 0, numpy's `np.std`
/// default, which is what the study printed for its fold results).
/// (NaN, NaN) for an empty slice.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let variance = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, variance.sqrt())
}

/// Threshold maximising Youden's J = sensitivity + specificity − 1. Meant for
/// validation data only: picking it on test data inflates the test figures.
///
/// The returned value is one of the scores, so
/// `Confusion::at_threshold(.., youden_threshold(..))` reproduces the optimum.
/// Among equally good thresholds the highest wins (fewer false alarms).
/// Falls back to [`DEFAULT_THRESHOLD`] when no threshold beats chance
/// (J ≤ 0), a class is absent, the lengths differ or a score is NaN, since
/// the data then gives no reason to move away from 0.5.
pub fn youden_threshold(scores: &[f64], labels: &[bool]) -> f64 {
    let mut best_threshold = DEFAULT_THRESHOLD;
    let mut best_j = 0.0;
    for point in roc_curve(scores, labels) {
        let j = point.tpr - point.fpr;
        if j > best_j {
            best_j = j;
            best_threshold = point.threshold;
        }
    }
    best_threshold
}

/// Everything reported for one evaluation set (a fold, or a held-out split).
/// NaN values (e.g. sensitivity of a set without abnormal cases) are stored
/// as `null` in JSON.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct BinaryMetrics {
    pub n: usize,
    pub positives: usize,
    #[serde(with = "nan_as_null")]
    pub accuracy: f64,
    pub auc: Option<f64>,
    /// 95% bootstrap interval of `auc`; over patients when groups were given.
    pub auc_ci: Option<(f64, f64)>,
    #[serde(with = "nan_as_null")]
    pub sensitivity: f64,
    #[serde(with = "nan_as_null")]
    pub specificity: f64,
    #[serde(with = "nan_as_null")]
    pub kappa: f64,
    #[serde(with = "nan_as_null")]
    pub brier: f64,
    /// Mean binary cross-entropy, see [`bce_loss`].
    #[serde(with = "nan_as_null")]
    pub loss: f64,
    /// Decision threshold behind the confusion-based figures.
    #[serde(with = "nan_as_null")]
    pub threshold: f64,
    pub confusion: Confusion,
}

impl BinaryMetrics {
    /// Computes every metric at `threshold`. The AUC interval uses
    /// [`BOOTSTRAP_RESAMPLES`] resamples at [`CI_LEVEL`], over patients
    /// ([`bootstrap_auc_ci_grouped`]) when `groups` is given, else over cases.
    ///
    /// If `scores` and `labels` differ in length nothing can be paired, so
    /// the result describes an empty set: n = 0, `None` AUC, NaN elsewhere.
    pub fn compute(
        scores: &[f64],
        labels: &[bool],
        groups: Option<&[usize]>,
        threshold: f64,
        seed: u64,
    ) -> BinaryMetrics {
        let (scores, labels) = if scores.len() == labels.len() {
            (scores, labels)
        } else {
            (&[][..], &[][..])
        };
        let confusion = Confusion::at_threshold(scores, labels, threshold);
        let auc_ci = match groups {
            Some(groups) => bootstrap_auc_ci_grouped(scores, labels, groups, BOOTSTRAP_RESAMPLES, CI_LEVEL, seed),
            None => bootstrap_auc_ci(scores, labels, BOOTSTRAP_RESAMPLES, CI_LEVEL, seed),
        };
        BinaryMetrics {
            n: labels.len(),
            positives: labels.iter().filter(|&&l| l).count(),
            accuracy: confusion.accuracy(),
            auc: roc_auc(scores, labels),
            auc_ci,
            sensitivity: confusion.sensitivity(),
            specificity: confusion.specificity(),
            kappa: confusion.cohen_kappa(),
            brier: brier(scores, labels),
            loss: bce_loss(scores, labels),
            threshold,
            confusion,
        }
    }

    /// The AUC and its interval as printouts give them:
    /// `0.812 (95% CI 0.750-0.870)`.
    pub fn auc_text(&self) -> String {
        match (self.auc, self.auc_ci) {
            (Some(auc), Some((lo, hi))) => format!("{auc:.3} ({:.0}% CI {lo:.3}-{hi:.3})", CI_LEVEL * 100.0),
            (Some(auc), None) => format!("{auc:.3}"),
            (None, _) => "undefined".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: bool = true;
    const F: bool = false;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// Scores that separate the classes imperfectly: abnormal ~ U(0.3, 1),
    /// normal ~ U(0, 0.7), alternating labels.
    fn synthetic(n: usize, seed: u64) -> (Vec<f64>, Vec<bool>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let labels: Vec<bool> = (0..n).map(|i| i % 2 == 0).collect();
        let scores = labels
            .iter()
            .map(|&l| {
                if l {
                    rng.random_range(0.3..1.0)
                } else {
                    rng.random_range(0.0..0.7)
                }
            })
            .collect();
        (scores, labels)
    }

    #[test]
    fn auc_counts_pairs() {
        // Positive/negative pairs: 0.35>0.1 win, 0.35<0.4 loss, 0.8 beats
        // both → 3 of 4 pairs = 0.75.
        assert_eq!(roc_auc(&[0.1, 0.4, 0.35, 0.8], &[F, F, T, T]), Some(0.75));
    }

    #[test]
    fn auc_counts_ties_as_half() {
        // Positives {0.5, 0.9}, negatives {0.2, 0.5}: 0.5>0.2 (1),
        // 0.5=0.5 (½), 0.9 beats both (2) → 3.5 / 4 = 0.875.
        assert_eq!(roc_auc(&[0.2, 0.5, 0.5, 0.9], &[F, T, F, T]), Some(0.875));
        // Every pair tied → ½.
        assert_eq!(roc_auc(&[0.3; 5], &[T, F, T, F, F]), Some(0.5));
    }

    #[test]
    fn auc_extremes_and_undefined() {
        assert_eq!(roc_auc(&[0.1, 0.2, 0.8, 0.9], &[F, F, T, T]), Some(1.0));
        assert_eq!(roc_auc(&[0.9, 0.8, 0.2, 0.1], &[F, F, T, T]), Some(0.0));
        assert_eq!(roc_auc(&[0.1, 0.9], &[T, T]), None);
        assert_eq!(roc_auc(&[0.1, 0.9], &[F, F]), None);
        assert_eq!(roc_auc(&[], &[]), None);
        assert_eq!(roc_auc(&[0.1, 0.9], &[F, T, T]), None);
        assert_eq!(roc_auc(&[0.1, f64::NAN], &[F, T]), None);
    }

    #[test]
    fn roc_curve_steps_through_distinct_thresholds() {
        // P = 2, N = 2. Thresholds 0.9 → tp 1; 0.5 → tp 2, fp 1 (the tie is
        // one diagonal step); 0.2 → all positive.
        let curve = roc_curve(&[0.2, 0.5, 0.5, 0.9], &[F, T, F, T]);
        let expected = [(0.0, 0.0, 1.9), (0.0, 0.5, 0.9), (0.5, 1.0, 0.5), (1.0, 1.0, 0.2)];
        assert_eq!(curve.len(), expected.len());
        for (point, (fpr, tpr, threshold)) in curve.iter().zip(expected) {
            assert!(close(point.fpr, fpr) && close(point.tpr, tpr), "{point:?}");
            assert!(close(point.threshold, threshold), "{point:?}");
        }
        assert!(roc_curve(&[0.2, 0.4], &[T, T]).is_empty());
        assert!(roc_curve(&[0.2], &[T, F]).is_empty());
    }

    #[test]
    fn roc_curve_area_equals_mann_whitney_auc() {
        // Trapezoids under the curve must give the rank statistic, ties
        // included (scores rounded to create many ties).
        let (scores, labels) = synthetic(300, 7);
        let scores: Vec<f64> = scores.iter().map(|s| (s * 10.0).round() / 10.0).collect();
        let curve = roc_curve(&scores, &labels);
        let area: f64 = curve
            .windows(2)
            .map(|w| (w[1].fpr - w[0].fpr) * (w[1].tpr + w[0].tpr) / 2.0)
            .sum();
        let auc = roc_auc(&scores, &labels).expect("both classes present");
        assert!((area - auc).abs() < 1e-12, "area {area} vs auc {auc}");
        // And every point must match the confusion matrix at its threshold.
        for point in &curve[1..] {
            let c = Confusion::at_threshold(&scores, &labels, point.threshold);
            assert!(close(point.tpr, c.sensitivity()) && close(point.fpr, 1.0 - c.specificity()));
        }
    }

    #[test]
    fn confusion_counts_threshold_inclusively() {
        // At 0.4: 0.8 (T) tp, 0.4 (F) fp since 0.4 >= 0.4, 0.35 (T) fn,
        // 0.1 (F) tn.
        let c = Confusion::at_threshold(&[0.1, 0.4, 0.35, 0.8], &[F, F, T, T], 0.4);
        assert_eq!(
            c,
            Confusion {
                tp: 1,
                fp: 1,
                tn: 1,
                fn_: 1
            }
        );
        let c = Confusion::at_threshold(&[0.1, 0.4, 0.35, 0.8], &[F, F, T, T], 0.41);
        assert_eq!(
            c,
            Confusion {
                tp: 1,
                fp: 0,
                tn: 2,
                fn_: 1
            }
        );
        assert_eq!(Confusion::at_threshold(&[0.5], &[T, F], 0.5), Confusion::default());
    }

    #[test]
    fn confusion_rates_and_kappa_by_hand() {
        // Wikipedia's kappa example: n = 50, p_o = 35/50 = 0.7;
        // called abnormal 30, actually abnormal 25, called normal 20,
        // actually normal 25 → p_e = (30·25 + 20·25)/2500 = 0.5;
        // κ = (0.7 − 0.5)/(1 − 0.5) = 0.4.
        let c = Confusion {
            tp: 20,
            fn_: 5,
            fp: 10,
            tn: 15,
        };
        assert!(close(c.accuracy(), 0.7));
        assert!(close(c.sensitivity(), 0.8)); // 20/25
        assert!(close(c.specificity(), 0.6)); // 15/25
        assert!(close(c.precision(), 2.0 / 3.0)); // 20/30
        assert!(close(c.cohen_kappa(), 0.4));
        // Agreement no better than chance: p_o = 0.5, p_e = 0.5 → 0.
        let c = Confusion {
            tp: 5,
            fn_: 5,
            fp: 5,
            tn: 5,
        };
        assert!(close(c.cohen_kappa(), 0.0));
        // Perfect agreement on both classes → 1.
        assert!(close(
            Confusion {
                tp: 3,
                tn: 4,
                ..Default::default()
            }
            .cohen_kappa(),
            1.0
        ));
    }

    #[test]
    fn confusion_undefined_rates_are_nan() {
        let only_normals = Confusion {
            tn: 4,
            ..Default::default()
        };
        assert!(only_normals.sensitivity().is_nan());
        assert!(only_normals.precision().is_nan());
        assert!(only_normals.cohen_kappa().is_nan()); // p_e = 1
        assert!(close(only_normals.specificity(), 1.0));
        assert!(Confusion::default().accuracy().is_nan());
    }

    #[test]
    fn brier_by_hand() {
        // (0.9−1)² + (0.2−0)² + (0.6−0)² = 0.01 + 0.04 + 0.36 = 0.41; /3.
        assert!(close(brier(&[0.9, 0.2, 0.6], &[T, F, F]), 0.41 / 3.0));
        assert!(brier(&[], &[]).is_nan());
        assert!(brier(&[0.5], &[T, F]).is_nan());
    }

    #[test]
    fn bce_by_hand_and_clamped() {
        // −(ln 0.9 + ln 0.8)/2 = (0.1053605 + 0.2231436)/2 = 0.1642520.
        let loss = bce_loss(&[0.9, 0.2], &[T, F]);
        assert!((loss - 0.164_252_0).abs() < 1e-6, "{loss}");
        // A certain mistake costs −ln(1e-7) = 16.118096 instead of ∞.
        let loss = bce_loss(&[0.0, 1.0], &[T, F]);
        assert!((loss - 16.118_096).abs() < 1e-5, "{loss}");
        assert!(bce_loss(&[], &[]).is_nan());
    }

    #[test]
    fn mean_std_is_population_std() {
        // Mean 5; squared deviations 9,1,1,1,0,0,4,16 sum to 32; 32/8 = 4 →
        // std 2 (the sample std, ddof = 1, would be √(32/7) ≈ 2.138).
        assert_eq!(mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]), (5.0, 2.0));
        assert_eq!(mean_std(&[3.0]), (3.0, 0.0));
        let (m, s) = mean_std(&[]);
        assert!(m.is_nan() && s.is_nan());
    }

    #[test]
    fn youden_picks_best_threshold() {
        // P = 2, N = 3. J per threshold: 0.9 → ½−0 = 0.5; 0.7 → ½−⅓ = 0.17;
        // 0.6 → 1−⅓ = 0.67 (best); 0.3 → 1−⅔ = 0.33; 0.1 → 0.
        let scores = [0.1, 0.3, 0.6, 0.7, 0.9];
        let labels = [F, F, T, F, T];
        assert_eq!(youden_threshold(&scores, &labels), 0.6);
        // J = 0.5 at both 0.8 (tpr ½, fpr 0) and 0.35 (tpr 1, fpr ½): the
        // higher threshold wins.
        assert_eq!(youden_threshold(&[0.1, 0.4, 0.35, 0.8], &[F, F, T, T]), 0.8);
    }

    #[test]
    fn youden_falls_back_without_signal() {
        // Inverted scores: J ≤ 0 everywhere.
        assert_eq!(
            youden_threshold(&[0.9, 0.8, 0.2, 0.1], &[F, F, T, T]),
            DEFAULT_THRESHOLD
        );
        assert_eq!(youden_threshold(&[0.9, 0.8], &[T, T]), DEFAULT_THRESHOLD);
    }

    #[test]
    fn quantiles_interpolate_like_numpy() {
        // np.quantile([1, 2, 3, 4, 5], 0.1) = 1 + 0.4·(2 − 1) = 1.4
        // (position 0.1·4 = 0.4); 0.25 → position 1 → exactly 2.
        let values = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert!(close(quantile(&values, 0.1), 1.4));
        assert_eq!(quantile(&values, 0.25), 2.0);
        assert_eq!(quantile(&values, 1.0), 5.0);
        assert_eq!(quantile(&[7.0], 0.3), 7.0);
        // 0, 1, …, 100: a 90% interval leaves 5% per tail → (5, 95); 95%
        // leaves 2.5% → (2.5, 97.5).
        let values: Vec<f64> = (0..=100).map(f64::from).collect();
        let (lo, hi) = central_interval(&values, 0.90);
        assert!(close(lo, 5.0) && close(hi, 95.0), "{lo} {hi}");
        let (lo, hi) = central_interval(&values, 0.95);
        assert!(close(lo, 2.5) && close(hi, 97.5), "{lo} {hi}");
    }

    #[test]
    fn bootstrap_ci_contains_estimate_and_is_reproducible() {
        let (scores, labels) = synthetic(200, 1);
        let auc = roc_auc(&scores, &labels).expect("both classes present");
        let ci = bootstrap_auc_ci(&scores, &labels, 1000, 0.95, 42).expect("defined");
        assert!(ci.0 < auc && auc < ci.1, "{ci:?} vs {auc}");
        assert!(0.0 <= ci.0 && ci.1 <= 1.0);
        assert_eq!(bootstrap_auc_ci(&scores, &labels, 1000, 0.95, 42), Some(ci));
        assert_ne!(bootstrap_auc_ci(&scores, &labels, 1000, 0.95, 43), Some(ci));
        // A lower level gives a nested, narrower interval.
        let ci80 = bootstrap_auc_ci(&scores, &labels, 1000, 0.80, 42).expect("defined");
        assert!(ci.0 < ci80.0 && ci80.1 < ci.1, "{ci80:?} inside {ci:?}");
    }

    #[test]
    fn bootstrap_ci_narrows_with_more_data() {
        let width = |n| {
            let (scores, labels) = synthetic(n, 3);
            let (lo, hi) = bootstrap_auc_ci(&scores, &labels, 500, 0.95, 9).expect("defined");
            hi - lo
        };
        let (small, large) = (width(40), width(1000));
        // Width shrinks like 1/√n: 25× the data should give about ⅕.
        assert!(large < small / 2.5, "small {small}, large {large}");
    }

    #[test]
    fn bootstrap_rejects_undefined_input() {
        assert_eq!(bootstrap_auc_ci(&[0.1, 0.2], &[T, T], 100, 0.95, 0), None);
        let (scores, labels) = synthetic(20, 0);
        assert_eq!(bootstrap_auc_ci(&scores, &labels, 0, 0.95, 0), None);
        assert_eq!(bootstrap_auc_ci(&scores, &labels, 100, 1.0, 0), None);
        assert_eq!(bootstrap_auc_ci(&scores, &labels, 100, f64::NAN, 0), None);
        assert_eq!(bootstrap_auc_ci_grouped(&scores, &labels, &[0; 3], 100, 0.95, 0), None);
    }

    #[test]
    fn grouped_bootstrap_with_singletons_matches_case_bootstrap() {
        let (scores, labels) = synthetic(60, 5);
        let groups: Vec<usize> = (0..60).collect();
        assert_eq!(
            bootstrap_auc_ci_grouped(&scores, &labels, &groups, 300, 0.95, 11),
            bootstrap_auc_ci(&scores, &labels, 300, 0.95, 11),
        );
    }

    #[test]
    fn grouped_bootstrap_widens_for_repeated_patients() {
        // Each of 60 patients contributes 4 identical images. The case
        // bootstrap believes it has 240 independent cases; the patient
        // bootstrap sees 60 and must give a clearly wider interval.
        let (base_scores, base_labels) = synthetic(60, 5);
        let scores: Vec<f64> = base_scores.iter().flat_map(|&s| [s; 4]).collect();
        let labels: Vec<bool> = base_labels.iter().flat_map(|&l| [l; 4]).collect();
        let groups: Vec<usize> = (0..60).flat_map(|g| [g * 10; 4]).collect();
        let auc = roc_auc(&scores, &labels).expect("defined");
        let (glo, ghi) = bootstrap_auc_ci_grouped(&scores, &labels, &groups, 1000, 0.95, 2).expect("defined");
        let (clo, chi) = bootstrap_auc_ci(&scores, &labels, 1000, 0.95, 2).expect("defined");
        assert!(glo < auc && auc < ghi);
        assert!(
            ghi - glo > 1.5 * (chi - clo),
            "grouped {glo}..{ghi}, cases {clo}..{chi}"
        );
        assert_eq!(
            bootstrap_auc_ci_grouped(&scores, &labels, &groups, 1000, 0.95, 2),
            Some((glo, ghi))
        );
        // Copies scale every weight alike and leave the AUC unchanged, and
        // the 60 patients are drawn exactly as the 60 base cases would be:
        // the patient bootstrap equals the case bootstrap of the base data.
        assert_eq!(
            bootstrap_auc_ci(&base_scores, &base_labels, 1000, 0.95, 2),
            Some((glo, ghi))
        );
    }

    #[test]
    fn grouped_bootstrap_draws_every_image_of_a_patient() {
        // Each patient has an abnormal study (listed first) and a normal
        // one. Every resample of patients therefore has both classes; one
        // that kept only some images of a patient could lose a class.
        let (scores, _) = synthetic(60, 8);
        let labels: Vec<bool> = (0..60).map(|i| i % 2 == 0).collect();
        let groups: Vec<usize> = (0..60).map(|i| i / 2).collect();
        let auc = roc_auc(&scores, &labels).expect("defined");
        let (lo, hi) = bootstrap_auc_ci_grouped(&scores, &labels, &groups, 500, 0.95, 4).expect("defined");
        assert!(lo < auc && auc < hi, "{lo}..{hi} vs {auc}");
    }

    #[test]
    fn a_scorer_against_itself_or_a_monotone_copy_differs_by_nothing() {
        let (a, labels) = synthetic(80, 12);
        let groups: Vec<usize> = (0..80).map(|i| i / 3).collect();
        let rescaled: Vec<f64> = a.iter().map(|s| 2.0 * s + 1.0).collect();
        for b in [&a, &rescaled] {
            let paired = paired_auc_difference(&a, b, &labels, &groups, 300, 0.95, 1).expect("defined");
            assert_eq!(paired.difference, 0.0);
            assert_eq!(paired.ci, (0.0, 0.0));
            assert_eq!(paired.b_above_share, 0.0);
        }
    }

    #[test]
    fn a_better_scorer_wins_every_resample_and_its_gain_is_the_auc_gap() {
        let (a, labels) = synthetic(80, 13);
        let perfect: Vec<f64> = labels.iter().map(|&l| if l { 0.9 } else { 0.1 }).collect();
        let groups: Vec<usize> = (0..80).map(|i| i / 2).collect();
        let paired = paired_auc_difference(&a, &perfect, &labels, &groups, 500, 0.95, 2).expect("defined");
        let gap = 1.0 - roc_auc(&a, &labels).expect("defined");
        assert!(close(paired.difference, gap), "{} vs {gap}", paired.difference);
        assert!(
            paired.ci.0 > 0.0 && paired.ci.0 <= gap && gap <= paired.ci.1,
            "{:?}",
            paired.ci
        );
        assert_eq!(paired.b_above_share, 1.0);
        // Swapping the scorers mirrors the figures.
        let swapped = paired_auc_difference(&perfect, &a, &labels, &groups, 500, 0.95, 2).expect("defined");
        assert!(close(swapped.difference, -gap));
        assert!(close(swapped.ci.0, -paired.ci.1) && close(swapped.ci.1, -paired.ci.0));
    }

    #[test]
    fn pairing_narrows_the_interval_of_two_similar_scorers() {
        // B is A with a little noise: each AUC alone is uncertain by the
        // sample's luck, which the two share; their difference is not.
        let (a, labels) = synthetic(200, 14);
        let mut rng = ChaCha8Rng::seed_from_u64(15);
        let b: Vec<f64> = a.iter().map(|s| s + rng.random_range(-0.03..0.03)).collect();
        let groups: Vec<usize> = (0..200).map(|i| i / 2).collect();
        let (lo, hi) = bootstrap_auc_ci_grouped(&a, &labels, &groups, 1000, 0.95, 3).expect("defined");
        let paired = paired_auc_difference(&a, &b, &labels, &groups, 1000, 0.95, 3).expect("defined");
        let (dlo, dhi) = paired.ci;
        assert!(dlo <= paired.difference && paired.difference <= dhi);
        assert!(
            (dhi - dlo) < (hi - lo) / 3.0,
            "paired {dlo}..{dhi} against one AUC's {lo}..{hi}"
        );
    }

    #[test]
    fn paired_differences_refuse_what_cannot_be_paired() {
        let (a, labels) = synthetic(20, 16);
        let groups: Vec<usize> = (0..20).collect();
        assert_eq!(paired_auc_difference(&a, &a[..19], &labels, &groups, 10, 0.95, 0), None);
        assert_eq!(paired_auc_difference(&a, &a, &labels, &groups[..19], 10, 0.95, 0), None);
        assert_eq!(paired_auc_difference(&a, &a, &labels, &groups, 0, 0.95, 0), None);
        assert_eq!(paired_auc_difference(&a, &a, &labels, &groups, 10, 1.0, 0), None);
        let mut with_nan = a.clone();
        with_nan[3] = f64::NAN;
        assert_eq!(
            paired_auc_difference(&a, &with_nan, &labels, &groups, 10, 0.95, 0),
            None
        );
        assert_eq!(paired_auc_difference(&a, &a, &[true; 20], &groups, 10, 0.95, 0), None);
    }

    #[test]
    fn binary_metrics_by_hand() {
        let scores = [0.1, 0.4, 0.35, 0.8];
        let labels = [F, F, T, T];
        let m = BinaryMetrics::compute(&scores, &labels, None, 0.4, 0);
        assert_eq!((m.n, m.positives), (4, 2));
        assert_eq!(
            m.confusion,
            Confusion {
                tp: 1,
                fp: 1,
                tn: 1,
                fn_: 1
            }
        );
        assert_eq!(m.auc, Some(0.75));
        assert!(close(m.accuracy, 0.5) && close(m.sensitivity, 0.5) && close(m.specificity, 0.5));
        // p_o = ½, p_e = (2·2 + 2·2)/16 = ½ → κ = 0.
        assert!(close(m.kappa, 0.0));
        // (0.01 + 0.16 + 0.4225 + 0.04)/4 = 0.158125.
        assert!(close(m.brier, 0.158_125));
        assert_eq!(m.threshold, 0.4);
        let (lo, hi) = m.auc_ci.expect("both classes present");
        assert!(lo <= 0.75 && 0.75 <= hi);
        let grouped = BinaryMetrics::compute(&scores, &labels, Some(&[1, 1, 2, 3]), 0.4, 0);
        assert!(grouped.auc_ci.is_some());
        let mismatched = BinaryMetrics::compute(&scores, &labels[..3], None, 0.4, 0);
        assert_eq!((mismatched.n, mismatched.auc), (0, None));

        assert_eq!(m.auc_text(), format!("0.750 (95% CI {lo:.3}-{hi:.3})"));
        assert_eq!(mismatched.auc_text(), "undefined");
    }

    #[test]
    fn binary_metrics_json_round_trip_keeps_nan() {
        // No abnormal cases and none called abnormal: AUC None, sensitivity
        // NaN, and p_e = 1 makes kappa NaN — JSON `null`, which must read
        // back.
        let m = BinaryMetrics::compute(&[0.2, 0.7], &[F, F], None, 0.9, 0);
        assert!(m.sensitivity.is_nan() && m.kappa.is_nan() && m.auc.is_none());
        let json = serde_json::to_string(&m).expect("serialise");
        assert!(
            json.contains("\"sensitivity\":null") && json.contains("\"fn\":0"),
            "{json}"
        );
        let back: BinaryMetrics = serde_json::from_str(&json).expect("deserialise");
        assert!(back.sensitivity.is_nan() && back.kappa.is_nan());
        assert_eq!(back.specificity, 1.0);
        assert_eq!(back.confusion, m.confusion);
    }
}

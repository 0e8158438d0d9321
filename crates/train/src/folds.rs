//! Patient-grouped, class-stratified folds and splits.
//!
//! MURA has several images per patient, and images of one patient look alike,
//! so a patient's images must all sit on the same side of every split or the
//! evaluation measures memory instead of generalisation. Groups are arbitrary
//! `usize` ids (patient numbers); labels are `true` for abnormal.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    #[error("cross-validation needs at least 2 folds, got {0}")]
    TooFewFolds(usize),
    #[error("{labels} labels but {groups} patient ids: each sample needs exactly one of each")]
    LengthMismatch { labels: usize, groups: usize },
    #[error("no samples to split")]
    Empty,
    #[error("only one class present: all {samples} samples are {class}")]
    OneClass { samples: usize, class: &'static str },
    #[error("only {groups} patients for {folds} folds")]
    TooFewGroups { groups: usize, folds: usize },
    #[error(
        "{folds} folds need at least {folds} samples of one class, \
         but there are only {positives} abnormal and {negatives} normal"
    )]
    TooFewPerClass {
        folds: usize,
        positives: usize,
        negatives: usize,
    },
    #[error("validation fraction must be strictly between 0 and 1, got {0}")]
    InvalidFraction(f64),
}

/// Class columns in scikit-learn's order (`np.unique` sorts `False` first),
/// so that the floating-point evaluation below adds them in the same order.
const NEGATIVE: usize = 0;
const POSITIVE: usize = 1;

/// Samples gathered by group, groups in ascending id order (as `np.unique`).
struct GroupTable {
    /// Group index of every sample.
    group_of_sample: Vec<usize>,
    /// Per group: [negatives, positives].
    counts: Vec<[usize; 2]>,
    /// Whole data set: [negatives, positives].
    totals: [usize; 2],
}

impl GroupTable {
    /// Checks the inputs every splitter shares and builds the table.
    fn new(labels: &[bool], groups: &[usize]) -> Result<Self, FoldError> {
        if labels.len() != groups.len() {
            return Err(FoldError::LengthMismatch {
                labels: labels.len(),
                groups: groups.len(),
            });
        }
        if labels.is_empty() {
            return Err(FoldError::Empty);
        }
        let positives = labels.iter().filter(|&&l| l).count();
        if positives == 0 || positives == labels.len() {
            let class = if positives == 0 { "normal" } else { "abnormal" };
            return Err(FoldError::OneClass {
                samples: labels.len(),
                class,
            });
        }
        let mut index_of_id = BTreeMap::new();
        for &id in groups {
            index_of_id.entry(id).or_insert(0);
        }
        for (index, slot) in index_of_id.values_mut().enumerate() {
            *slot = index;
        }
        let mut counts = vec![[0usize; 2]; index_of_id.len()];
        let mut group_of_sample = Vec::with_capacity(groups.len());
        for (id, &label) in groups.iter().zip(labels) {
            let group = index_of_id[id];
            group_of_sample.push(group);
            counts[group][usize::from(label)] += 1;
        }
        Ok(Self {
            group_of_sample,
            counts,
            totals: [labels.len() - positives, positives],
        })
    }

    fn n_groups(&self) -> usize {
        self.counts.len()
    }

    /// Sample indices (ascending) whose group satisfies `keep`.
    fn samples_where(&self, keep: impl Fn(usize) -> bool) -> Vec<usize> {
        (0..self.group_of_sample.len())
            .filter(|&i| keep(self.group_of_sample[i]))
            .collect()
    }
}

/// The held-out (test) sample indices of each of `k` folds, each sorted
/// ascending; the folds partition `0..labels.len()`.
///
/// Same algorithm as scikit-learn's `StratifiedGroupKFold(shuffle=True)`:
/// groups are shuffled (ChaCha8 seeded with `seed`), stably sorted by the
/// standard deviation of their class counts (most lopsided first, so large
/// single-class patients are placed while there is still room to balance
/// them), and each is assigned to the fold that minimises the mean over
/// classes of the standard deviation across folds of the share of that
/// class's samples in the fold; near-ties (`np.isclose`) go to the fold with
/// fewer samples. Evaluation is done in the same floating-point order as
/// scikit-learn, so for the same group order the folds are identical. With
/// one sample per group this is a stratified k-fold.
///
/// As in scikit-learn, a class with fewer samples than folds is accepted
/// (some folds then lack it and their AUC is undefined) as long as the other
/// class has at least `k` samples.
pub fn stratified_group_kfold(
    labels: &[bool],
    groups: &[usize],
    k: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, FoldError> {
    if k < 2 {
        return Err(FoldError::TooFewFolds(k));
    }
    let table = GroupTable::new(labels, groups)?;
    if table.n_groups() < k {
        return Err(FoldError::TooFewGroups {
            groups: table.n_groups(),
            folds: k,
        });
    }
    let [negatives, positives] = table.totals;
    if positives < k && negatives < k {
        return Err(FoldError::TooFewPerClass {
            folds: k,
            positives,
            negatives,
        });
    }
    let mut order: Vec<usize> = (0..table.n_groups()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    Ok(folds_in_order(&table, order, k))
}

/// The greedy assignment of scikit-learn's `_iter_test_indices`, visiting
/// groups in `order` before the stable sort.
fn folds_in_order(table: &GroupTable, mut order: Vec<usize>, k: usize) -> Vec<Vec<usize>> {
    // std of a group's two class counts is |a − b| / 2: sorting by |a − b|
    // gives the same order without rounding.
    order.sort_by_key(|&g| std::cmp::Reverse(table.counts[g][0].abs_diff(table.counts[g][1])));
    let totals = table.totals.map(|t| t as f64);
    let mut fold_counts = vec![[0.0f64; 2]; k];
    let mut fold_of_group = vec![0usize; table.n_groups()];
    for group in order {
        let add = table.counts[group].map(|c| c as f64);
        let best = best_fold(&mut fold_counts, totals, add);
        fold_counts[best][NEGATIVE] += add[NEGATIVE];
        fold_counts[best][POSITIVE] += add[POSITIVE];
        fold_of_group[group] = best;
    }
    (0..k)
        .map(|fold| table.samples_where(|g| fold_of_group[g] == fold))
        .collect()
}

/// scikit-learn's `_find_best_fold`, including its tie rule.
fn best_fold(fold_counts: &mut [[f64; 2]], totals: [f64; 2], add: [f64; 2]) -> usize {
    let mut best = 0;
    let mut min_eval = f64::INFINITY;
    let mut min_samples = f64::INFINITY;
    for fold in 0..fold_counts.len() {
        fold_counts[fold][NEGATIVE] += add[NEGATIVE];
        fold_counts[fold][POSITIVE] += add[POSITIVE];
        let eval = imbalance(fold_counts, totals);
        fold_counts[fold][NEGATIVE] -= add[NEGATIVE];
        fold_counts[fold][POSITIVE] -= add[POSITIVE];
        let samples = fold_counts[fold][NEGATIVE] + fold_counts[fold][POSITIVE];
        if eval < min_eval || (is_close(eval, min_eval) && samples < min_samples) {
            min_eval = eval;
            min_samples = samples;
            best = fold;
        }
    }
    best
}

/// `np.mean(np.std(fold_counts / totals, axis=0))`, summing in numpy's order
/// (sequentially down the fold axis) so that exact ties break the same way.
fn imbalance(fold_counts: &[[f64; 2]], totals: [f64; 2]) -> f64 {
    let k = fold_counts.len() as f64;
    let mut std_sum = 0.0;
    for class in [NEGATIVE, POSITIVE] {
        let share = |f: &[f64; 2]| f[class] / totals[class];
        let mean = fold_counts.iter().map(share).fold(0.0, |acc, x| acc + x) / k;
        let variance = fold_counts
            .iter()
            .map(|f| (share(f) - mean) * (share(f) - mean))
            .fold(0.0, |acc, x| acc + x)
            / k;
        std_sum += variance.sqrt();
    }
    std_sum / 2.0
}

/// `np.isclose` with its default tolerances; infinities are only close to
/// themselves.
fn is_close(a: f64, b: f64) -> bool {
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    (a - b).abs() <= 1e-8 + 1e-5 * b.abs()
}

/// A seeded, stratified, patient-disjoint `(train, validation)` split with
/// about `fraction` of the samples in validation; both index lists sorted.
///
/// Patients are visited in shuffled order and each joins validation if that
/// brings validation's abnormal and normal counts (relative to their totals)
/// closer to `fraction` of each class. A random subset of patients, rather
/// than k-fold's lopsided-first order, keeps validation representative of
/// patient sizes. Afterwards both sides are made non-empty, and if one side
/// lacks a class the smallest patient that has it is moved across, provided
/// the other side keeps both of its classes.
pub fn grouped_split(
    labels: &[bool],
    groups: &[usize],
    fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>), FoldError> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(FoldError::InvalidFraction(fraction));
    }
    let table = GroupTable::new(labels, groups)?;
    if table.n_groups() < 2 {
        return Err(FoldError::TooFewGroups {
            groups: table.n_groups(),
            folds: 2,
        });
    }
    let mut order: Vec<usize> = (0..table.n_groups()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));

    let totals = table.totals.map(|t| t as f64);
    let target = totals.map(|t| t * fraction);
    let distance = |counts: [f64; 2]| (0..2).map(|c| (counts[c] - target[c]).abs() / totals[c]).sum::<f64>();
    let mut in_validation = vec![false; table.n_groups()];
    let mut validation = [0.0f64; 2];
    for &group in &order {
        let counts = table.counts[group];
        let with = [validation[0] + counts[0] as f64, validation[1] + counts[1] as f64];
        if distance(with) < distance(validation) {
            validation = with;
            in_validation[group] = true;
        }
    }

    for to_validation in [true, false] {
        if side_counts(&table, &in_validation, to_validation) == [0, 0] {
            move_smallest(&table, &order, &mut in_validation, to_validation, None, false);
        }
    }
    for to_validation in [true, false] {
        for class in [NEGATIVE, POSITIVE] {
            // Recounted each time: a patient moved for one class may also
            // have brought the other.
            if side_counts(&table, &in_validation, to_validation)[class] == 0 {
                move_smallest(&table, &order, &mut in_validation, to_validation, Some(class), true);
            }
        }
    }

    let train = table.samples_where(|g| !in_validation[g]);
    let validation = table.samples_where(|g| in_validation[g]);
    Ok((train, validation))
}

/// [negatives, positives] on the validation side (`true`) or the train side.
fn side_counts(table: &GroupTable, in_validation: &[bool], validation_side: bool) -> [usize; 2] {
    let mut counts = [0, 0];
    for (group, &side) in in_validation.iter().enumerate() {
        if side == validation_side {
            counts[0] += table.counts[group][0];
            counts[1] += table.counts[group][1];
        }
    }
    counts
}

/// Moves the smallest group (ties: earliest in the shuffled `order`) that
/// has `class` (any group if `None`) onto the `to_validation` side, provided
/// the side it leaves stays non-empty and, if `keep_classes`, keeps every
/// class it has. Does nothing when no group qualifies.
fn move_smallest(
    table: &GroupTable,
    order: &[usize],
    in_validation: &mut [bool],
    to_validation: bool,
    class: Option<usize>,
    keep_classes: bool,
) {
    let source = side_counts(table, in_validation, !to_validation);
    let candidate = order
        .iter()
        .copied()
        .filter(|&g| in_validation[g] != to_validation)
        .filter(|&g| class.is_none_or(|c| table.counts[g][c] > 0))
        .filter(|&g| {
            let left = [source[0] - table.counts[g][0], source[1] - table.counts[g][1]];
            let non_empty = left != [0, 0];
            let kept = !keep_classes || (0..2).all(|c| source[c] == 0 || left[c] > 0);
            non_empty && kept
        })
        .min_by_key(|&g| table.counts[g][0] + table.counts[g][1]);
    if let Some(group) = candidate {
        in_validation[group] = to_validation;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use std::collections::{BTreeSet, HashMap};

    /// MURA-like data: 1–4 images per patient, patient ids sparse, about
    /// 47% abnormal, one patient in ten with both an abnormal and a normal
    /// study.
    fn mura_like(patients: usize, seed: u64) -> (Vec<bool>, Vec<usize>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut labels, mut groups) = (Vec::new(), Vec::new());
        for patient in 0..patients {
            let abnormal = rng.random_bool(0.47);
            let mixed = rng.random_bool(0.1);
            for image in 0..rng.random_range(1..=4) {
                labels.push(if mixed && image % 2 == 1 { !abnormal } else { abnormal });
                groups.push(10_000 + 7 * patient);
            }
        }
        (labels, groups)
    }

    fn positive_rate(indices: &[usize], labels: &[bool]) -> f64 {
        indices.iter().filter(|&&i| labels[i]).count() as f64 / indices.len() as f64
    }

    fn sklearn_case(n: usize, k: usize, group: fn(usize) -> usize, label: fn(usize) -> bool) -> Vec<Vec<usize>> {
        let labels: Vec<bool> = (0..n).map(label).collect();
        let groups: Vec<usize> = (0..n).map(group).collect();
        let table = GroupTable::new(&labels, &groups).expect("valid input");
        let identity = (0..table.n_groups()).collect();
        folds_in_order(&table, identity, k)
    }

    #[test]
    fn matches_scikit_learn_for_the_same_group_order() {
        // Expected folds printed by scikit-learn 1.9.1,
        // StratifiedGroupKFold(n_splits=k, shuffle=False), whose group order
        // is ascending id — the identity order here.
        let folds = sklearn_case(60, 4, |i| (i * i + 3 * i) % 17, |i| i % 5 == 0 || i % 7 == 1);
        assert_eq!(
            folds,
            vec![
                vec![0, 14, 15, 16, 17, 31, 32, 33, 34, 48, 49, 50, 51],
                vec![4, 6, 7, 8, 10, 21, 23, 24, 25, 27, 38, 40, 41, 42, 44, 55, 57, 58, 59],
                vec![1, 3, 11, 13, 18, 20, 28, 30, 35, 37, 45, 47, 52, 54],
                vec![2, 5, 9, 12, 19, 22, 26, 29, 36, 39, 43, 46, 53, 56],
            ]
        );
        let folds = sklearn_case(90, 10, |i| (i * 13) % 41, |i| i % 3 == 0 || i % 11 == 2);
        assert_eq!(
            folds,
            vec![
                vec![7, 32, 35, 37, 48, 73, 76, 78, 89],
                vec![4, 10, 15, 29, 45, 51, 56, 70, 86],
                vec![1, 26, 34, 39, 42, 67, 75, 80, 83],
                vec![0, 13, 22, 40, 41, 54, 63, 81, 82],
                vec![5, 9, 23, 30, 46, 50, 64, 71, 87],
                vec![2, 20, 24, 28, 43, 61, 65, 69, 84],
                vec![6, 17, 31, 36, 47, 58, 72, 77, 88],
                vec![14, 16, 18, 27, 55, 57, 59, 68],
                vec![3, 11, 12, 33, 44, 52, 53, 74, 85],
                vec![8, 19, 21, 25, 38, 49, 60, 62, 66, 79],
            ]
        );
        // One sample per group: a plain stratified 5-fold.
        let folds = sklearn_case(25, 5, |i| i, |i| i % 3 == 0);
        assert_eq!(
            folds,
            vec![
                vec![0, 5, 10, 15, 20],
                vec![1, 6, 11, 16, 21],
                vec![2, 8, 12, 17, 23],
                vec![3, 7, 13, 18, 22],
                vec![4, 9, 14, 19, 24],
            ]
        );
    }

    #[test]
    fn folds_partition_samples_and_keep_patients_together() {
        let (labels, groups) = mura_like(150, 1);
        let folds = stratified_group_kfold(&labels, &groups, 10, 42).expect("valid input");
        assert_eq!(folds.len(), 10);
        let mut all: Vec<usize> = folds.concat();
        all.sort_unstable();
        assert_eq!(all, (0..labels.len()).collect::<Vec<_>>());
        let mut fold_of_patient = HashMap::new();
        for (fold, indices) in folds.iter().enumerate() {
            assert!(!indices.is_empty());
            assert!(indices.windows(2).all(|w| w[0] < w[1]), "fold {fold} not sorted");
            for &i in indices {
                let first = *fold_of_patient.entry(groups[i]).or_insert(fold);
                assert_eq!(first, fold, "patient {} split across folds", groups[i]);
            }
        }
    }

    #[test]
    fn grouped_folds_keep_the_class_ratio() {
        let (labels, groups) = mura_like(300, 2);
        let global = positive_rate(&(0..labels.len()).collect::<Vec<_>>(), &labels);
        let folds = stratified_group_kfold(&labels, &groups, 10, 7).expect("valid input");
        let sizes: Vec<usize> = folds.iter().map(Vec::len).collect();
        let mean_size = labels.len() as f64 / 10.0;
        for (fold, indices) in folds.iter().enumerate() {
            let rate = positive_rate(indices, &labels);
            assert!((rate - global).abs() < 0.05, "fold {fold}: {rate} vs {global}");
            assert!((indices.len() as f64 - mean_size).abs() < 0.15 * mean_size, "{sizes:?}");
        }
    }

    #[test]
    fn singleton_groups_give_exact_stratified_folds() {
        // 100 abnormal + 100 normal over 10 folds: 10 + 10 in each.
        let labels: Vec<bool> = (0..200).map(|i| i % 2 == 0).collect();
        let groups: Vec<usize> = (0..200).collect();
        for seed in [0, 1, 2] {
            let folds = stratified_group_kfold(&labels, &groups, 10, seed).expect("valid input");
            for indices in &folds {
                assert_eq!(indices.len(), 20);
                assert_eq!(indices.iter().filter(|&&i| labels[i]).count(), 10);
            }
        }
    }

    #[test]
    fn as_many_groups_as_folds_gives_one_group_per_fold() {
        // Six patients of 1–4 images each (9 abnormal, 7 normal), six folds.
        let sizes = [4, 1, 3, 2, 4, 2];
        let abnormal = [true, false, true, false, false, true];
        let mut labels = Vec::new();
        let mut groups = Vec::new();
        for (patient, (&size, &label)) in sizes.iter().zip(&abnormal).enumerate() {
            labels.extend(std::iter::repeat_n(label, size));
            groups.extend(std::iter::repeat_n(patient, size));
        }
        for seed in 0..20 {
            let folds = stratified_group_kfold(&labels, &groups, 6, seed).expect("valid input");
            for indices in &folds {
                let patients: BTreeSet<usize> = indices.iter().map(|&i| groups[i]).collect();
                assert_eq!(patients.len(), 1, "seed {seed}: {folds:?}");
            }
        }
    }

    #[test]
    fn seed_decides_the_folds() {
        let (labels, groups) = mura_like(100, 3);
        let a = stratified_group_kfold(&labels, &groups, 5, 1).expect("valid input");
        let b = stratified_group_kfold(&labels, &groups, 5, 1).expect("valid input");
        let c = stratified_group_kfold(&labels, &groups, 5, 2).expect("valid input");
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn kfold_errors_explain_themselves() {
        let labels = [true, false, true, false, true, false, true];
        let groups = [1, 2, 3, 4, 5, 6, 7];
        let err = |r: Result<Vec<Vec<usize>>, FoldError>| r.expect_err("must fail").to_string();
        assert_eq!(
            err(stratified_group_kfold(&labels, &groups, 10, 0)),
            "only 7 patients for 10 folds"
        );
        assert!(matches!(
            stratified_group_kfold(&labels, &groups, 1, 0),
            Err(FoldError::TooFewFolds(1))
        ));
        assert!(matches!(
            stratified_group_kfold(&labels, &groups, 0, 0),
            Err(FoldError::TooFewFolds(0))
        ));
        assert_eq!(
            err(stratified_group_kfold(&[true; 4], &[1, 2, 3, 4], 2, 0)),
            "only one class present: all 4 samples are abnormal"
        );
        assert!(err(stratified_group_kfold(&[false; 3], &[1, 2, 3], 2, 0))
            .starts_with("only one class present: all 3 samples are normal"));
        assert!(matches!(
            stratified_group_kfold(&labels, &groups[..6], 2, 0),
            Err(FoldError::LengthMismatch { labels: 7, groups: 6 })
        ));
        assert!(matches!(stratified_group_kfold(&[], &[], 2, 0), Err(FoldError::Empty)));
        // 4 abnormal and 3 normal cannot fill 5 folds with either class.
        assert!(matches!(
            stratified_group_kfold(&labels, &groups, 5, 0),
            Err(FoldError::TooFewPerClass {
                folds: 5,
                positives: 4,
                negatives: 3
            })
        ));
    }

    #[test]
    fn split_is_patient_disjoint_stratified_and_about_the_right_size() {
        let (labels, groups) = mura_like(400, 4);
        let (train, validation) = grouped_split(&labels, &groups, 0.2, 42).expect("valid input");
        let mut all = [train.clone(), validation.clone()].concat();
        all.sort_unstable();
        assert_eq!(all, (0..labels.len()).collect::<Vec<_>>());
        let train_patients: BTreeSet<usize> = train.iter().map(|&i| groups[i]).collect();
        assert!(validation.iter().all(|&i| !train_patients.contains(&groups[i])));
        let share = validation.len() as f64 / labels.len() as f64;
        assert!((share - 0.2).abs() < 0.01, "validation share {share}");
        let global = positive_rate(&all, &labels);
        assert!((positive_rate(&validation, &labels) - global).abs() < 0.02);
        assert_eq!(
            grouped_split(&labels, &groups, 0.2, 42).expect("valid input"),
            (train.clone(), validation)
        );
        assert_ne!(grouped_split(&labels, &groups, 0.2, 43).expect("valid input").0, train);
    }

    #[test]
    fn split_keeps_both_sides_usable_on_tiny_data() {
        // Two patients: one must go to each side whatever the fraction.
        for fraction in [0.01, 0.2, 0.99] {
            let (train, validation) =
                grouped_split(&[true, true, false], &[5, 5, 9], fraction, 0).expect("valid input");
            assert!(!train.is_empty() && !validation.is_empty(), "{fraction}");
        }
        // A single abnormal image: moving it to validation would leave
        // training without abnormal cases, so training keeps it.
        let labels = [true, false, false, false, false];
        let (train, _) = grouped_split(&labels, &[1, 2, 3, 4, 5], 0.2, 3).expect("valid input");
        assert!(train.contains(&0));
        // Two abnormal patients among six: validation gets one of them.
        let labels = [true, true, false, false, false, false];
        for seed in 0..10 {
            let (train, validation) = grouped_split(&labels, &[1, 2, 3, 4, 5, 6], 0.2, seed).expect("valid input");
            assert!(validation.iter().any(|&i| labels[i]), "seed {seed}");
            assert!(validation.iter().any(|&i| !labels[i]), "seed {seed}");
            assert!(train.iter().any(|&i| labels[i]), "seed {seed}");
        }
    }

    #[test]
    fn rescue_move_never_strips_the_other_side_of_a_class() {
        // Patients: 1 abnormal (in training, its only abnormal case), 2 and
        // 3 normal (2 in validation). Validation lacks abnormal cases but
        // taking patient 1 would leave training without any.
        let table = GroupTable::new(&[true, false, false], &[1, 2, 3]).expect("valid input");
        let order = [0, 1, 2];
        let mut in_validation = [false, true, false];
        move_smallest(&table, &order, &mut in_validation, true, Some(POSITIVE), true);
        assert_eq!(in_validation, [false, true, false]);
        // Emptiness is the only limit when classes need not be kept.
        move_smallest(&table, &order, &mut in_validation, true, Some(POSITIVE), false);
        assert_eq!(in_validation, [true, true, false]);
        // The smallest qualifying patient moves: of the two normal patients
        // in training (2 images and 1 image), the one-image patient.
        let table = GroupTable::new(&[false, false, true, false], &[1, 1, 2, 3]).expect("valid input");
        let mut in_validation = [false, true, false];
        move_smallest(&table, &[0, 1, 2], &mut in_validation, true, Some(NEGATIVE), true);
        assert_eq!(in_validation, [false, true, true]);
    }

    #[test]
    fn split_errors() {
        assert!(matches!(
            grouped_split(&[true, false], &[1, 2], 0.0, 0),
            Err(FoldError::InvalidFraction(_))
        ));
        assert!(matches!(
            grouped_split(&[true, false], &[1, 2], f64::NAN, 0),
            Err(FoldError::InvalidFraction(_))
        ));
        assert_eq!(
            grouped_split(&[true, false], &[1, 1], 0.2, 0)
                .expect_err("one patient")
                .to_string(),
            "only 1 patients for 2 folds"
        );
        assert!(matches!(
            grouped_split(&[true, true], &[1, 2], 0.2, 0),
            Err(FoldError::OneClass { .. })
        ));
    }
}

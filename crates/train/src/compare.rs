//! Two models on the same labelled images: each one's image and study figures,
//! and how much better B ranks the images than A, with a paired bootstrap
//! over patients. On a development split of a hundred patients a second
//! training seed moves the AUC by about 0.01, so a recipe's gain means little
//! without the interval of the paired difference.

use std::collections::HashMap;

use serde::Serialize;

use crate::kfold::KfoldReport;
use crate::metrics::{self, BinaryMetrics, PairedDifference, CI_LEVEL};
use crate::study;

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("model {model} scored {scored} images, but {expected} are labelled")]
    Unpaired {
        model: &'static str,
        scored: usize,
        expected: usize,
    },
    #[error("{what} has {found} entries for {expected} images")]
    Mislabelled {
        what: &'static str,
        found: usize,
        expected: usize,
    },
    #[error(
        "the two k-fold runs predicted different images ({only_a} only in A, {only_b} only in B, e.g. {example}): \
         compare runs over the same data set"
    )]
    DifferentImages {
        only_a: usize,
        only_b: usize,
        example: String,
    },
    #[error("{path} is abnormal in one k-fold run and normal in the other")]
    LabelsDisagree { path: String },
}

/// One model's calibrated P(abnormal) for every image, and the threshold of
/// its balanced operating point.
#[derive(Clone, Copy, Debug)]
pub struct Scored<'a> {
    pub probabilities: &'a [f64],
    pub threshold: f64,
}

/// The labelled images both models scored, in the same order.
#[derive(Clone, Copy, Debug)]
pub struct Cases<'a> {
    pub labels: &'a [bool],
    /// Each image's patient; `None` resamples images, which is too narrow
    /// when a patient has several.
    pub patients: Option<&'a [usize]>,
    /// Each image's study (see [`study::study_key`]).
    pub study_keys: &'a [String],
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelFigures {
    /// At the model's balanced threshold.
    pub images: BinaryMetrics,
    /// A study's probability is the mean of its images'.
    pub studies: BinaryMetrics,
}

#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub a: ModelFigures,
    pub b: ModelFigures,
    /// B's image AUC minus A's.
    pub images: Option<PairedDifference>,
    /// B's study AUC minus A's.
    pub studies: Option<PairedDifference>,
    /// Patients the bootstrap resampled; `None` when it resampled images.
    pub patients: Option<usize>,
    pub resamples: usize,
    pub level: f64,
}

/// Figures of A and B and their paired differences. The single-model
/// figures are those `calibrate` prints for the same probabilities and seed.
pub fn compare(a: Scored, b: Scored, cases: Cases, resamples: usize, seed: u64) -> Result<Comparison, CompareError> {
    let n = cases.labels.len();
    for (model, scored) in [("A", &a), ("B", &b)] {
        if scored.probabilities.len() != n {
            return Err(CompareError::Unpaired {
                model,
                scored: scored.probabilities.len(),
                expected: n,
            });
        }
    }
    if cases.study_keys.len() != n {
        return Err(CompareError::Mislabelled {
            what: "the study list",
            found: cases.study_keys.len(),
            expected: n,
        });
    }
    if let Some(patients) = cases.patients.filter(|p| p.len() != n) {
        return Err(CompareError::Mislabelled {
            what: "the patient list",
            found: patients.len(),
            expected: n,
        });
    }
    let each_image_alone: Vec<usize> = (0..n).collect();
    let groups = cases.patients.unwrap_or(&each_image_alone);

    // Both models' studies come out of `group` in the same order (first
    // appearance of each key), so they pair up by position.
    let studies_a = study::group(cases.study_keys, a.probabilities);
    let studies_b = study::group(cases.study_keys, b.probabilities);
    let (study_scores_a, study_scores_b) = (study::probabilities(&studies_a), study::probabilities(&studies_b));
    let study_labels = study::of_first_image(&studies_a, cases.labels);
    let study_groups = study::of_first_image(&studies_a, groups);

    // The same figures as `calibration::study_metrics`, from the studies grouped once.
    let figures = |scored: &Scored, study_scores: &[f64]| ModelFigures {
        images: BinaryMetrics::compute(scored.probabilities, cases.labels, Some(groups), scored.threshold, seed),
        studies: BinaryMetrics::compute(study_scores, &study_labels, Some(&study_groups), scored.threshold, seed),
    };
    let paired = |a: &[f64], b: &[f64], labels: &[bool], groups: &[usize]| {
        metrics::paired_auc_difference(a, b, labels, groups, resamples, CI_LEVEL, seed)
    };
    let images = paired(a.probabilities, b.probabilities, cases.labels, groups);
    let studies = paired(&study_scores_a, &study_scores_b, &study_labels, &study_groups);

    Ok(Comparison {
        a: figures(&a, &study_scores_a),
        b: figures(&b, &study_scores_b),
        images,
        studies,
        patients: cases.patients.map(|_| distinct_count(groups)),
        resamples,
        level: CI_LEVEL,
    })
}

/// The out-of-fold predictions of two k-fold runs over the same images,
/// paired by image path: each image was predicted in both by a model that
/// never saw its patient, so two recipes compare on all the images rather
/// than on one development split.
#[derive(Clone, Debug)]
pub struct PairedOutOfFold {
    /// A's and B's P(abnormal), in A's order.
    pub a: Vec<f64>,
    pub b: Vec<f64>,
    pub labels: Vec<bool>,
    /// A's patients, where its run grouped by patient.
    pub patients: Option<Vec<usize>>,
    pub study_keys: Vec<String>,
}

impl PairedOutOfFold {
    pub fn new(a: &KfoldReport, b: &KfoldReport) -> Result<Self, CompareError> {
        let b_by_path: HashMap<&str, (bool, f64)> = b
            .predictions
            .iter()
            .map(|p| (p.path.as_str(), (p.positive, p.probability)))
            .collect();
        let a_paths: std::collections::HashSet<&str> = a.predictions.iter().map(|p| p.path.as_str()).collect();
        let only_a: Vec<&str> = a_paths.iter().copied().filter(|p| !b_by_path.contains_key(p)).collect();
        let only_b: Vec<&str> = b_by_path.keys().copied().filter(|p| !a_paths.contains(p)).collect();
        if !only_a.is_empty() || !only_b.is_empty() || a.predictions.len() != b.predictions.len() {
            let example = only_a
                .iter()
                .chain(&only_b)
                .min()
                .map_or_else(|| "an image predicted twice".to_string(), |p| p.to_string());
            return Err(CompareError::DifferentImages {
                only_a: only_a.len(),
                only_b: only_b.len(),
                example,
            });
        }
        let mut probabilities_b = Vec::with_capacity(a.predictions.len());
        for prediction in &a.predictions {
            let (positive, probability) = b_by_path[prediction.path.as_str()];
            if positive != prediction.positive {
                return Err(CompareError::LabelsDisagree {
                    path: prediction.path.clone(),
                });
            }
            probabilities_b.push(probability);
        }
        Ok(Self {
            a: a.predictions.iter().map(|p| p.probability).collect(),
            b: probabilities_b,
            labels: a.predictions.iter().map(|p| p.positive).collect(),
            patients: a.patient_indices(),
            study_keys: a.study_keys(),
        })
    }
}

fn distinct_count(groups: &[usize]) -> usize {
    let mut distinct = groups.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    distinct.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four patients with one abnormal two-image study and one normal
    /// one-image study each.
    fn cases() -> (Vec<bool>, Vec<usize>, Vec<String>) {
        let mut labels = Vec::new();
        let mut patients = Vec::new();
        let mut keys = Vec::new();
        for patient in 0..4 {
            for (study, positive, images) in [(1, true, 2), (2, false, 1)] {
                for _ in 0..images {
                    labels.push(positive);
                    patients.push(patient);
                    keys.push(format!("patient{patient}/study{study}"));
                }
            }
        }
        (labels, patients, keys)
    }

    #[test]
    fn the_better_model_gains_at_both_levels_and_studies_pair_by_key() {
        let (labels, patients, keys) = cases();
        // A scores patient 3's normal image (0.7) above most abnormal ones; B ranks perfectly.
        let a = [0.9, 0.6, 0.2, 0.8, 0.7, 0.3, 0.6, 0.7, 0.1, 0.5, 0.6, 0.7];
        let b = [0.9, 0.8, 0.2, 0.8, 0.7, 0.3, 0.6, 0.7, 0.1, 0.9, 0.6, 0.4];
        let cases = Cases {
            labels: &labels,
            patients: Some(&patients),
            study_keys: &keys,
        };
        let comparison = compare(
            Scored {
                probabilities: &a,
                threshold: 0.5,
            },
            Scored {
                probabilities: &b,
                threshold: 0.5,
            },
            cases,
            200,
            7,
        )
        .expect("paired");
        assert_eq!(comparison.patients, Some(4));
        assert_eq!((comparison.a.images.n, comparison.a.studies.n), (12, 8));
        let (auc_a, auc_b) = (comparison.a.images.auc.unwrap(), comparison.b.images.auc.unwrap());
        assert_eq!(auc_b, 1.0);
        let images = comparison.images.expect("defined");
        assert!((images.difference - (auc_b - auc_a)).abs() < 1e-12);
        assert!(images.difference > 0.0 && images.ci.0 >= 0.0);
        // Patient 3's studies: A means 0.55 (abnormal) against 0.7 (normal), B 0.75 against 0.4.
        let studies = comparison.studies.expect("defined");
        let study_gain = comparison.b.studies.auc.unwrap() - comparison.a.studies.auc.unwrap();
        assert!(study_gain > 0.0 && (studies.difference - study_gain).abs() < 1e-12);
        assert_eq!(comparison.b.studies.auc, Some(1.0));
    }

    #[test]
    fn without_patients_the_images_are_resampled_and_mismatches_are_errors() {
        let (labels, _, keys) = cases();
        let a: Vec<f64> = (0..12).map(|i| i as f64 / 12.0).collect();
        let scored = Scored {
            probabilities: &a,
            threshold: 0.5,
        };
        let cases = Cases {
            labels: &labels,
            patients: None,
            study_keys: &keys,
        };
        let comparison = compare(scored, scored, cases, 50, 1).expect("paired");
        assert_eq!(comparison.patients, None);
        assert_eq!(comparison.images.expect("defined").ci, (0.0, 0.0));

        let short = Scored {
            probabilities: &a[..11],
            threshold: 0.5,
        };
        let error = compare(scored, short, cases, 50, 1).unwrap_err().to_string();
        assert_eq!(error, "model B scored 11 images, but 12 are labelled");
        let error = compare(
            scored,
            scored,
            Cases {
                study_keys: &keys[..3],
                ..cases
            },
            50,
            1,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(error, "the study list has 3 entries for 12 images");
    }
}

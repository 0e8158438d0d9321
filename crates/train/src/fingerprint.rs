//! What identifies a run, so that what it leaves behind (a training
//! checkpoint, a k-fold run's folder of finished folds) is only ever resumed
//! by the same run. Anything that changes the result is in it; where the
//! output goes is not.
//!
//! The two kinds hash different things because they resume different
//! things: a checkpoint holds weights, so every pixel that trained them
//! counts; a k-fold folder holds finished folds, named before any image is
//! decoded, so the files and the fold layout count. The values are those
//! earlier versions wrote (a test pins them), so runs interrupted under one
//! version resume under the next.

use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};

use fracture_core::ModelCard;

use crate::dataset::Dataset;
use crate::fit::{FitConfig, FitData};
use crate::params::derive_seed;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunFingerprint(String);

impl RunFingerprint {
    /// A training run: the model and its input size and preprocessing, the
    /// schedule (with its seed), the initial weights, which images train and
    /// which validate, their labels, and every pixel (another data set with
    /// the same count and labels, or the same images edited, is another run).
    pub fn training(card: &ModelCard, config: &FitConfig, data: &FitData) -> Self {
        let mut hasher = DefaultHasher::new();
        serde_json::to_string(&card.architecture)
            .unwrap_or_default()
            .hash(&mut hasher);
        card.input_size().hash(&mut hasher);
        serde_json::to_string(config).unwrap_or_default().hash(&mut hasher);
        data.train.hash(&mut hasher);
        data.validation.hash(&mut hasher);
        data.labels.hash(&mut hasher);
        for image in data.images {
            (image.width(), image.height()).hash(&mut hasher);
            for value in image.as_raw() {
                value.to_bits().hash(&mut hasher);
            }
        }
        serde_json::to_string(&card.preprocessing)
            .unwrap_or_default()
            .hash(&mut hasher);
        card.init.as_ref().map(|init| init.sha256.clone()).hash(&mut hasher);
        Self(format!("{:016x}", hasher.finish()))
    }

    /// A k-fold run: the schedule (with its seed), the model and its input
    /// size, the number of folds, the validation share of each fold, the data
    /// set's files and the initial weights.
    pub fn kfold(
        card: &ModelCard,
        config: &FitConfig,
        folds: usize,
        validation_fraction: f64,
        dataset: &Dataset,
    ) -> Self {
        let files: Vec<String> = dataset.samples.iter().map(|s| s.path.display().to_string()).collect();
        let seed = derive_seed(
            config.seed,
            (
                serde_json::to_string(config).unwrap_or_default(),
                serde_json::to_string(&card.architecture).unwrap_or_default(),
                card.input_size(),
                folds,
                validation_fraction.to_bits(),
                files,
                card.init.as_ref().map(|s| s.sha256.clone()),
            ),
        );
        Self(format!("{seed:016x}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{Layout, Sample};
    use crate::schedule::{self, Overrides, Recipe};
    use fracture_core::models::densenet::DenseNetConfig;
    use fracture_core::{Architecture, Classes};
    use image::Rgb32FImage;
    use std::path::PathBuf;

    fn card() -> ModelCard {
        ModelCard::new(Architecture::Densenet(DenseNetConfig::tiny()), 32)
    }

    fn config() -> FitConfig {
        schedule::config(&card().architecture, Recipe::Scratch, &Overrides::default(), 42, 0)
    }

    /// Checkpoints and k-fold folders written by earlier versions carry these
    /// values: a change here would silently restart interrupted runs.
    #[test]
    fn fingerprints_keep_the_values_earlier_versions_wrote() {
        let images: Vec<Rgb32FImage> = (0..3)
            .map(|i| Rgb32FImage::from_fn(4, 3, |x, y| image::Rgb([x as f32 / 4.0, y as f32 / 3.0, i as f32])))
            .collect();
        let labels = [true, false, true];
        let data = FitData {
            images: &images,
            labels: &labels,
            train: vec![0, 1],
            validation: vec![2],
        };
        let dataset = Dataset {
            root: PathBuf::from("/data"),
            layout: Layout::Mura,
            classes: Classes::default(),
            samples: (0..3)
                .map(|i| Sample {
                    path: PathBuf::from(format!("/data/patient0000{i}/study1_positive/image1.png")),
                    positive: i != 1,
                    group: i,
                })
                .collect(),
            group_names: (0..3).map(|i| format!("patient0000{i}")).collect(),
            has_patients: true,
            skipped: Vec::new(),
        };
        let training = RunFingerprint::training(&card(), &config(), &data);
        let kfold = RunFingerprint::kfold(&card(), &config(), 5, 0.0, &dataset);
        assert_eq!(training.as_str(), "043070de302a6788");
        assert_eq!(kfold.as_str(), "abc16f25d3f62d2a");
    }
}

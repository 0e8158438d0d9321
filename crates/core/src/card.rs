//! The model card: everything a model file needs to be used correctly,
//! stored as JSON in the safetensors `__metadata__` under [`CARD_KEY`].

use serde::{Deserialize, Serialize};

pub use crate::models::Architecture;
pub use crate::preprocess::{Preprocessing, TtaView, IMAGENET_MEAN, IMAGENET_STD};
use crate::{Error, Result};

/// The `__metadata__` key that holds the card.
pub const CARD_KEY: &str = "model_card";
/// Bumped when a card written by a newer version could be misread by an older one.
pub const FORMAT: &str = "fracture-model/1";

/// Which output means what. The model's single logit is P(`positive`): the
/// study mixed up its class indices, so the card says it in words.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Classes {
    pub negative: String,
    pub positive: String,
}

impl Default for Classes {
    fn default() -> Self {
        Self {
            negative: "normal".into(),
            positive: "abnormal".into(),
        }
    }
}

/// What the model was trained on and how.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct TrainingSummary {
    /// Where the data came from, in words (a directory name, "MURA v1.1 XR_HUMERUS train").
    pub source: String,
    pub layout: String,
    /// The images (and their patients) the weights were trained on.
    pub images: usize,
    pub positives: usize,
    pub negatives: usize,
    pub patients: Option<usize>,
    /// Images of the same data set held out of training to validate on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_images: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_patients: Option<usize>,
    pub skipped: usize,
    /// Licence or terms of use of the training data, where they bind the weights.
    pub terms: Option<String>,
    /// The schedule as run: phases, epochs, learning rates, batch size, augmentation.
    pub schedule: serde_json::Value,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SourceWeights {
    pub file: String,
    pub sha256: String,
}

fn identity_only() -> Vec<TtaView> {
    vec![TtaView::Identity]
}

fn unit_temperature() -> f64 {
    1.0
}

/// Where a user wants the label's threshold: the three points stored in the card.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatingPoint {
    /// Agreement with the labels at its best (maximum Cohen's kappa).
    #[default]
    Balanced,
    /// Sensitivity at least 0.90: few abnormal studies missed, more false alarms.
    Sensitive,
    /// Specificity at least 0.90: few false alarms, more missed abnormal studies.
    Specific,
}

impl OperatingPoint {
    pub const ALL: [OperatingPoint; 3] = [
        OperatingPoint::Balanced,
        OperatingPoint::Sensitive,
        OperatingPoint::Specific,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OperatingPoint::Balanced => "balanced",
            OperatingPoint::Sensitive => "sensitive",
            OperatingPoint::Specific => "specific",
        }
    }
}

impl std::str::FromStr for OperatingPoint {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        OperatingPoint::ALL
            .into_iter()
            .find(|p| p.name() == text)
            .ok_or_else(|| {
                Error::Card(format!(
                    "unknown operating point `{text}` (expected balanced, sensitive or specific)"
                ))
            })
    }
}

/// Thresholds on the calibrated P(abnormal), chosen on predictions the model
/// was not trained on (a development split or out-of-fold predictions).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct OperatingPoints {
    pub balanced: f64,
    pub sensitive: f64,
    pub specific: f64,
    /// Which predictions they were chosen on, in words.
    pub chosen_on: String,
}

impl OperatingPoints {
    pub fn threshold(&self, point: OperatingPoint) -> f64 {
        match point {
            OperatingPoint::Balanced => self.balanced,
            OperatingPoint::Sensitive => self.sensitive,
            OperatingPoint::Specific => self.specific,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModelCard {
    pub format: String,
    pub architecture: Architecture,
    pub preprocessing: Preprocessing,
    pub classes: Classes,
    /// P(positive) at or above this is labelled positive; the `balanced`
    /// operating point when the card has them.
    pub threshold: f64,
    /// Test-time augmentation: P(positive) is the mean over these views.
    #[serde(default = "identity_only")]
    pub tta: Vec<TtaView>,
    /// Temperature scaling: P(positive) = sigmoid(logit / temperature), fitted
    /// on held-out predictions so that the probability means what it says.
    #[serde(default = "unit_temperature")]
    pub temperature: f64,
    #[serde(default)]
    pub operating_points: Option<OperatingPoints>,
    #[serde(default)]
    pub training: Option<TrainingSummary>,
    /// Validation figures measured when the model was made (free-form: accuracy, auc, ...).
    #[serde(default)]
    pub metrics: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Weights this model started from (an ImageNet import, a MURA-stage model).
    #[serde(default)]
    pub init: Option<SourceWeights>,
    pub software: String,
    #[serde(default)]
    pub notes: Vec<String>,
}

impl ModelCard {
    pub fn new(architecture: Architecture, input_size: usize) -> Self {
        let preprocessing = architecture.default_preprocessing(input_size);
        Self {
            format: FORMAT.into(),
            architecture,
            preprocessing,
            classes: Classes::default(),
            threshold: 0.5,
            tta: identity_only(),
            temperature: 1.0,
            operating_points: None,
            training: None,
            metrics: Default::default(),
            seed: None,
            init: None,
            software: concat!("fracture ", env!("CARGO_PKG_VERSION")).into(),
            notes: vec!["Research use only. Not a medical device; not for clinical decisions.".into()],
        }
    }

    pub fn input_size(&self) -> usize {
        self.preprocessing.input_size
    }

    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::Card(e.to_string()))
    }

    pub fn from_json(json: &str) -> Result<Self> {
        let card: ModelCard = serde_json::from_str(json).map_err(|e| Error::Card(e.to_string()))?;
        card.validate()?;
        Ok(card)
    }

    pub fn validate(&self) -> Result<()> {
        if self.format != FORMAT {
            return Err(Error::Card(format!(
                "format `{}` is not supported (expected `{FORMAT}`)",
                self.format
            )));
        }
        self.preprocessing.validate()?;
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(Error::Card(format!("threshold {} is outside [0, 1]", self.threshold)));
        }
        if self.tta.is_empty() || (1..self.tta.len()).any(|i| self.tta[..i].contains(&self.tta[i])) {
            return Err(Error::Card(format!(
                "tta {:?} must list each view once, at least one",
                self.tta
            )));
        }
        if !(self.temperature.is_finite() && (0.01..=100.0).contains(&self.temperature)) {
            return Err(Error::Card(format!(
                "temperature {} is outside [0.01, 100]",
                self.temperature
            )));
        }
        if let Some(points) = &self.operating_points {
            for point in OperatingPoint::ALL {
                let threshold = points.threshold(point);
                if !(0.0..=1.0).contains(&threshold) {
                    return Err(Error::Card(format!(
                        "operating point {} at {threshold} is outside [0, 1]",
                        point.name()
                    )));
                }
            }
            if points.balanced != self.threshold {
                return Err(Error::Card(format!(
                    "threshold {} differs from the balanced operating point {}",
                    self.threshold, points.balanced
                )));
            }
        }
        self.architecture.validate(self.input_size())
    }

    pub fn label(&self, probability: f64) -> &str {
        self.label_at(probability, self.threshold)
    }

    pub fn label_at(&self, probability: f64, threshold: f64) -> &str {
        if probability >= threshold {
            &self.classes.positive
        } else {
            &self.classes.negative
        }
    }

    /// The threshold of an operating point; `balanced` is the card's threshold
    /// when it has no operating points, the others are then an error.
    pub fn threshold_at(&self, point: OperatingPoint) -> Result<f64> {
        match (&self.operating_points, point) {
            (Some(points), _) => Ok(points.threshold(point)),
            (None, OperatingPoint::Balanced) => Ok(self.threshold),
            (None, _) => Err(Error::Card(format!(
                "this model has no `{}` operating point: its card was not calibrated (`fracture calibrate`)",
                point.name()
            ))),
        }
    }

    /// P(positive) from the logits of one image's TTA views, in the card's order.
    pub fn probability_from_view_logits(&self, logits: &[f64]) -> f64 {
        let sum: f64 = logits.iter().map(|z| 1.0 / (1.0 + (-z / self.temperature).exp())).sum();
        sum / logits.len().max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{cnn::CnnConfig, densenet::DenseNetConfig};

    #[test]
    fn card_round_trips_through_json() {
        let card = ModelCard::new(Architecture::Densenet(DenseNetConfig::densenet121()), 150);
        let back = ModelCard::from_json(&card.to_json().unwrap()).unwrap();
        assert_eq!(card, back);
        assert_eq!(back.architecture.display_name(), "densenet121");
        assert_eq!(back.preprocessing.mean, IMAGENET_MEAN);
    }

    #[test]
    fn invalid_cards_are_rejected_with_reasons() {
        let mut card = ModelCard::new(Architecture::Cnn(CnnConfig::study()), 150);
        card.threshold = 1.5;
        let err = ModelCard::from_json(&card.to_json().unwrap()).unwrap_err();
        assert!(err.to_string().contains("threshold"), "{err}");

        let err = ModelCard::from_json(r#"{"format": "fracture-model/1"}"#).unwrap_err();
        assert!(err.to_string().contains("missing field"), "{err}");

        let mut card = ModelCard::new(Architecture::Cnn(CnnConfig::study()), 150);
        card.format = "other/9".into();
        let err = ModelCard::from_json(&card.to_json().unwrap()).unwrap_err();
        assert!(err.to_string().contains("other/9"), "{err}");
    }

    #[test]
    fn inference_fields_are_validated_on_load() {
        let base = ModelCard::new(Architecture::Densenet(DenseNetConfig::tiny()), 48);
        let reject = |card: ModelCard, word: &str| {
            let err = ModelCard::from_json(&card.to_json().unwrap()).unwrap_err().to_string();
            assert!(err.contains(word), "{err}");
        };
        reject(
            ModelCard {
                temperature: 0.0,
                ..base.clone()
            },
            "temperature",
        );
        // NaN is written as null, which no f64 field accepts.
        assert!(ModelCard::from_json(
            &ModelCard {
                temperature: f64::NAN,
                ..base.clone()
            }
            .to_json()
            .unwrap()
        )
        .is_err());
        reject(
            ModelCard {
                tta: vec![],
                ..base.clone()
            },
            "tta",
        );
        reject(
            ModelCard {
                tta: vec![TtaView::Identity, TtaView::Identity],
                ..base.clone()
            },
            "tta",
        );
        let points = OperatingPoints {
            balanced: 0.4,
            sensitive: 0.2,
            specific: 1.2,
            chosen_on: "test".into(),
        };
        reject(
            ModelCard {
                threshold: 0.4,
                operating_points: Some(points.clone()),
                ..base.clone()
            },
            "specific",
        );
        let points = OperatingPoints {
            specific: 0.7,
            ..points
        };
        reject(
            ModelCard {
                threshold: 0.5,
                operating_points: Some(points.clone()),
                ..base.clone()
            },
            "balanced",
        );
        let good = ModelCard {
            threshold: 0.4,
            operating_points: Some(points),
            tta: vec![TtaView::Identity, TtaView::HorizontalFlip],
            temperature: 1.7,
            ..base.clone()
        };
        let back = ModelCard::from_json(&good.to_json().unwrap()).unwrap();
        assert_eq!(back, good);
        assert_eq!(back.threshold_at(OperatingPoint::Sensitive).unwrap(), 0.2);
        assert_eq!(back.threshold_at(OperatingPoint::Specific).unwrap(), 0.7);
        // A card from before these fields: identity only, temperature 1, no points.
        let mut old: serde_json::Value = serde_json::from_str(&base.to_json().unwrap()).unwrap();
        for key in ["tta", "temperature", "operating_points"] {
            old.as_object_mut().unwrap().remove(key);
        }
        let old = ModelCard::from_json(&old.to_string()).unwrap();
        assert_eq!((old.tta.clone(), old.temperature), (vec![TtaView::Identity], 1.0));
        assert_eq!(old.threshold_at(OperatingPoint::Balanced).unwrap(), 0.5);
        assert!(old
            .threshold_at(OperatingPoint::Sensitive)
            .unwrap_err()
            .to_string()
            .contains("calibrate"));
    }

    #[test]
    fn view_probabilities_are_tempered_then_averaged() {
        let card = ModelCard {
            temperature: 2.0,
            ..ModelCard::new(Architecture::Cnn(CnnConfig::study()), 150)
        };
        let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
        let p = card.probability_from_view_logits(&[2.0, -1.0]);
        assert!((p - (sigmoid(1.0) + sigmoid(-0.5)) / 2.0).abs() < 1e-12, "{p}");
    }

    #[test]
    fn label_uses_probability_not_logit() {
        let card = ModelCard::new(Architecture::Cnn(CnnConfig::study()), 150);
        assert_eq!(card.label(0.5), "abnormal");
        assert_eq!(card.label(0.49), "normal");
    }
}

//! Model file + image bytes → probability and label: what `fracture detect`
//! and the browser both call.

use candle_core::{Device, Tensor};
use candle_nn::ops::sigmoid;
use image::Rgb32FImage;
use serde::Serialize;

use crate::card::ModelCard;
use crate::models::{Mode, Model};
use crate::preprocess;
use crate::weights::ModelFile;
use crate::Result;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    /// P(abnormal), the sigmoid of the logit. The study thresholded the raw logit at 0.5.
    pub probability: f64,
    pub label: String,
    pub positive: bool,
}

pub struct Predictor {
    model: Model,
    card: ModelCard,
    device: Device,
}

impl Predictor {
    pub fn from_bytes(model_bytes: &[u8], device: &Device) -> Result<Self> {
        let file = ModelFile::from_bytes(model_bytes, device)?;
        let model = file.build_model(device)?;
        Ok(Self { model, card: file.card, device: device.clone() })
    }

    pub fn card(&self) -> &ModelCard {
        &self.card
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Probabilities for images already at the input size.
    pub fn probabilities(&self, images: &[&Rgb32FImage]) -> Result<Vec<f64>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let xs = preprocess::to_tensor(images, &self.card.preprocessing, &self.device)?;
        let logits = self.model.forward(&xs, Mode::EVAL)?;
        Ok(probabilities_from_logits(&logits)?)
    }

    pub fn predict_bytes(&self, image_bytes: &[u8]) -> Result<Prediction> {
        let image = preprocess::load(image_bytes, &self.card.preprocessing)?;
        let probability = self.probabilities(&[&image])?[0];
        Ok(self.prediction(probability))
    }

    pub fn prediction(&self, probability: f64) -> Prediction {
        Prediction {
            probability,
            label: self.card.label(probability).to_string(),
            positive: probability >= self.card.threshold,
        }
    }
}

pub fn probabilities_from_logits(logits: &Tensor) -> candle_core::Result<Vec<f64>> {
    sigmoid(&logits.to_dtype(candle_core::DType::F32)?)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1()
}

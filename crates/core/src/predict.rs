//! Model file + image bytes → probability and label: what `fracture detect`
//! and the browser both call.

use candle_core::Device;
use image::Rgb32FImage;
use serde::Serialize;

use crate::cam::Heatmap;
use crate::card::{ModelCard, OperatingPoint};
use crate::models::Model;
pub use crate::models::{images_per_batch, probabilities_from_logits, BATCH_BYTES};
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

/// A prediction with what a person needs to judge it: where the model
/// looked, and whether the input looked like a radiograph at all.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Detection {
    #[serde(flatten)]
    pub prediction: Prediction,
    /// Class activation map over the model input (DenseNet only).
    pub heatmap: Option<Heatmap>,
    pub warnings: Vec<String>,
    /// Size of the decoded image, before resizing.
    pub width: u32,
    pub height: u32,
    /// What the model saw (resized, before normalisation), for display.
    #[serde(skip)]
    pub input: Rgb32FImage,
}

pub struct Predictor {
    model: Model,
    card: ModelCard,
    device: Device,
    /// The label's threshold: the card's, or one of its operating points.
    threshold: f64,
}

impl Predictor {
    pub fn from_bytes(model_bytes: &[u8], device: &Device) -> Result<Self> {
        let file = ModelFile::from_bytes(model_bytes, device)?;
        let model = file.build_model(device)?;
        let threshold = file.card.threshold;
        Ok(Self {
            model,
            card: file.card,
            device: device.clone(),
            threshold,
        })
    }

    /// Labels from now on follow this operating point of the card.
    pub fn set_operating_point(&mut self, point: OperatingPoint) -> Result<()> {
        self.threshold = self.card.threshold_at(point)?;
        Ok(())
    }

    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    pub fn card(&self) -> &ModelCard {
        &self.card
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Probabilities for images already at the input size, over the card's
    /// TTA views and at its temperature.
    pub fn probabilities(&self, images: &[&Rgb32FImage]) -> Result<Vec<f64>> {
        let logits = self.model.view_logits(
            images,
            &self.card.preprocessing,
            &self.card.tta,
            usize::MAX,
            &self.device,
        )?;
        Ok(logits
            .iter()
            .map(|row| self.card.probability_from_view_logits(row))
            .collect())
    }

    pub fn predict_bytes(&self, image_bytes: &[u8]) -> Result<Prediction> {
        let image = preprocess::load(image_bytes, &self.card.preprocessing)?;
        let probability = self.probabilities(&[&image])?[0];
        Ok(self.prediction(probability))
    }

    /// Decodes, predicts, and adds the heat map and input warnings.
    pub fn detect(&self, image_bytes: &[u8]) -> Result<Detection> {
        let decoded = preprocess::decode(image_bytes)?;
        let mut warnings = Vec::new();
        if preprocess::colourfulness(&decoded) > preprocess::COLOURFULNESS_WARNING {
            warnings.push("This is a colour image: it does not look like a radiograph.".to_string());
        }
        let input = preprocess::resize(&decoded, self.card.input_size());
        let xs = preprocess::to_tensor(&[&input], &self.card.preprocessing, &self.device)?;
        // The heat map is the plain image's; its logit is reused as the identity view.
        let features = self.model.features(&xs, false)?;
        let heatmap = match self.model.class_activation_map(&features)? {
            Some(cam) => {
                let cam = cam.squeeze(0)?;
                let (height, width) = cam.dims2()?;
                Some(Heatmap::normalised(width, height, cam.flatten_all()?.to_vec1::<f32>()?))
            }
            None => None,
        };
        let identity = self.model.head(&features, None)?;
        let logits = self.model.batch_view_logits(&xs, &self.card.tta, Some(&identity))?;
        let probability = self.card.probability_from_view_logits(&logits[0]);
        Ok(Detection {
            prediction: self.prediction(probability),
            heatmap,
            warnings,
            width: decoded.width(),
            height: decoded.height(),
            input,
        })
    }

    pub fn prediction(&self, probability: f64) -> Prediction {
        Prediction {
            probability,
            label: self.card.label_at(probability, self.threshold).to_string(),
            positive: probability >= self.threshold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::card::{Architecture, TtaView};
    use crate::models::densenet::DenseNetConfig;
    use crate::weights::StorageDType;
    use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgb};

    fn tiny_predictor() -> Predictor {
        let card = ModelCard::new(Architecture::Densenet(DenseNetConfig::tiny()), 48);
        let tensors = crate::testing::random_weights(&card);
        let bytes = ModelFile::to_bytes(&card, &tensors, StorageDType::F32).unwrap();
        Predictor::from_bytes(&bytes, &Device::Cpu).unwrap()
    }

    fn png(image: DynamicImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn detect_agrees_with_predict_and_adds_heatmap_and_warnings() {
        let predictor = tiny_predictor();
        let grey = png(DynamicImage::ImageLuma8(ImageBuffer::from_fn(70, 50, |x, y| {
            Luma([((x * 3 + y) % 256) as u8])
        })));
        let detection = predictor.detect(&grey).unwrap();
        let plain = predictor.predict_bytes(&grey).unwrap();
        assert_eq!(detection.prediction, plain);
        assert_eq!((detection.width, detection.height), (70, 50));
        let heatmap = detection.heatmap.unwrap();
        assert_eq!((heatmap.width, heatmap.height), (6, 6));
        assert!(heatmap.values.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(detection.warnings.is_empty());

        let flipped = png(DynamicImage::ImageLuma8(ImageBuffer::from_fn(70, 50, |x, y| {
            Luma([(((69 - x) * 3 + y) % 256) as u8])
        })));
        let mirrored = predictor.predict_bytes(&flipped).unwrap().probability;
        // The same weights, now with the mirror as a second view.
        let mut tta = predictor;
        tta.card.tta = vec![TtaView::Identity, TtaView::HorizontalFlip];
        let both = tta.detect(&grey).unwrap().prediction.probability;
        let mean = (plain.probability + mirrored) / 2.0;
        assert!(
            (both - mean).abs() < 1e-6,
            "TTA {both} vs the mean of the image and its mirror {mean}"
        );
        assert!((tta.predict_bytes(&grey).unwrap().probability - both).abs() < 1e-6);
        tta.card.temperature = 3.0;
        let tempered = tta.detect(&grey).unwrap().prediction.probability;
        assert!(
            (tempered - 0.5).abs() < (both - 0.5).abs(),
            "a higher temperature moves {both} towards 0.5, got {tempered}"
        );

        let colour = png(DynamicImage::ImageRgb8(ImageBuffer::from_fn(40, 40, |x, _| {
            Rgb([250, (x * 6) as u8, 10])
        })));
        assert_eq!(tta.detect(&colour).unwrap().warnings.len(), 1);
        assert!(tta.detect(b"not an image").is_err());
    }
}

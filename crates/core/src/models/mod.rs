//! One definition of each model, shared by training, native detection and the
//! browser. Parameter names follow torchvision so checkpoints map one to one.

pub mod batch_norm;
pub mod cnn;
pub mod densenet;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::ops::sigmoid;
use candle_nn::VarBuilder;
use image::Rgb32FImage;
use serde::{Deserialize, Serialize};

use crate::preprocess::{to_tensor, view_input, Preprocessing, TtaView};
use cnn::CnnConfig;
use densenet::DenseNetConfig;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum Architecture {
    Cnn(CnnConfig),
    Densenet(DenseNetConfig),
}

impl Architecture {
    /// Whether the configuration can run at `input_size`.
    pub fn validate(&self, input_size: usize) -> crate::Result<()> {
        match self {
            Architecture::Cnn(c) => c.validate(input_size),
            Architecture::Densenet(c) => c.validate(input_size),
        }
    }

    /// Whether the head pools globally, so the same weights run at any input
    /// size (progressive resizing); the CNN's dense layer is sized for one.
    pub fn pools_globally(&self) -> bool {
        matches!(self, Architecture::Densenet(_))
    }

    /// The name users type (`--model`) and read in reports.
    pub fn display_name(&self) -> String {
        match self {
            Architecture::Cnn(c) if c.kernel_size == 1 => "cnn".to_string(),
            Architecture::Cnn(c) => format!("cnn (kernel {}, ours)", c.kernel_size),
            Architecture::Densenet(c) => c.variant_name(),
        }
    }

    /// How images must be normalised for this architecture by default.
    pub fn default_preprocessing(&self, input_size: usize) -> Preprocessing {
        match self {
            Architecture::Cnn(_) => Preprocessing::unit(input_size),
            Architecture::Densenet(_) => Preprocessing::imagenet(input_size),
        }
    }
}

/// How a forward pass behaves. Dropout and BatchNorm are switched separately
/// because the study fine-tunes with dropout on but BatchNorm in inference mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mode {
    /// `Some(seed)`: dropout is active, with its mask drawn from `seed`.
    pub dropout_seed: Option<u64>,
    /// Normalise with the batch's statistics and update the running ones.
    pub batch_stats: bool,
}

impl Mode {
    pub const EVAL: Mode = Mode {
        dropout_seed: None,
        batch_stats: false,
    };

    pub fn train(step_seed: u64) -> Mode {
        Mode {
            dropout_seed: Some(step_seed),
            batch_stats: true,
        }
    }

    /// Training with BatchNorm kept in inference mode (Keras' `training=False` on the base).
    pub fn train_frozen_bn(step_seed: u64) -> Mode {
        Mode {
            dropout_seed: Some(step_seed),
            batch_stats: false,
        }
    }
}

/// One architecture's forward pass, cut where training and detection need
/// to stop or start: the backbone's feature map, what the head keeps of it,
/// and the logit.
trait Network: Send + Sync {
    /// The backbone's last feature map, `(batch, channels, h, w)`.
    fn features(&self, xs: &Tensor, batch_stats: bool) -> Result<Tensor>;
    /// [`Network::features`] in inference mode without a graph: a frozen
    /// base's output is a constant.
    fn frozen_features(&self, xs: &Tensor) -> Result<Tensor>;
    /// All the head ever sees of an image's features.
    fn pool(&self, features: &Tensor) -> Result<Tensor>;
    /// Logits `(batch,)` from pooled features; dropout is drawn from the seed.
    fn classify(&self, pooled: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor>;
    /// Where the logit comes from over the feature map, `(batch, h, w)`,
    /// where the architecture allows it without a backward pass.
    fn class_activation_map(&self, features: &Tensor) -> Result<Option<Tensor>>;
    /// Whether a frozen-base phase may bank pooled features instead of
    /// running the base every step.
    fn can_cache_features(&self) -> bool;
    /// Whether [`Network::class_activation_map`] gives maps.
    fn has_class_activation_map(&self) -> bool;
}

/// A model of any architecture. Callers never ask which: everything they
/// need is a method here, and [`Model::new`] is the one place that picks.
pub struct Model {
    network: Box<dyn Network>,
}

impl Model {
    pub fn new(architecture: &Architecture, input_size: usize, vb: VarBuilder) -> Result<Self> {
        let network: Box<dyn Network> = match architecture {
            Architecture::Cnn(cfg) => Box::new(cnn::Cnn::new(cfg, input_size, vb)?),
            Architecture::Densenet(cfg) => Box::new(densenet::DenseNet::new(cfg, vb)?),
        };
        Ok(Self { network })
    }

    /// Logits of shape `(batch,)`: P(positive) is their sigmoid.
    pub fn forward(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        self.head(&self.features(xs, mode.batch_stats)?, mode.dropout_seed)
    }

    /// The backbone's last feature map, `(batch, channels, h, w)`.
    pub fn features(&self, xs: &Tensor, batch_stats: bool) -> Result<Tensor> {
        self.network.features(xs, batch_stats)
    }

    /// [`Model::features`] of a frozen base: inference mode, no graph.
    pub fn frozen_features(&self, xs: &Tensor) -> Result<Tensor> {
        self.network.frozen_features(xs)
    }

    /// Logits from [`Model::features`].
    pub fn head(&self, features: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        self.classify(&self.pool(features)?, dropout_seed)
    }

    /// What the head keeps of the features: all a frozen-base phase needs to bank.
    pub fn pool(&self, features: &Tensor) -> Result<Tensor> {
        self.network.pool(features)
    }

    /// Logits from [`Model::pool`]ed features.
    pub fn classify(&self, pooled: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        self.network.classify(pooled, dropout_seed)
    }

    /// Class activation map over [`Model::features`], `(batch, h, w)`; `None`
    /// where the architecture has none (the CNN's dense layers mix positions).
    pub fn class_activation_map(&self, features: &Tensor) -> Result<Option<Tensor>> {
        self.network.class_activation_map(features)
    }

    /// Whether [`Model::class_activation_map`] gives maps for this architecture.
    pub fn has_class_activation_map(&self) -> bool {
        self.network.has_class_activation_map()
    }

    /// Whether a frozen-base phase may bank [`Model::pool`]ed features.
    pub fn can_cache_features(&self) -> bool {
        self.network.can_cache_features()
    }

    /// Parameter-name prefixes of the classification head, trained alone
    /// while the base is frozen.
    pub fn head_prefixes(&self) -> &'static [&'static str] {
        &["classifier."]
    }

    /// P(positive) of each image (already at the input size) in eval mode,
    /// in batches of at most `max_batch` that fit the memory budget.
    pub fn probabilities(
        &self,
        images: &[&Rgb32FImage],
        preprocessing: &Preprocessing,
        max_batch: usize,
        device: &Device,
    ) -> crate::Result<Vec<f64>> {
        self.batched(images, preprocessing, max_batch, device, |xs| {
            Ok(probabilities_from_logits(&self.forward(xs, Mode::EVAL)?.detach())?)
        })
    }

    /// Each image's logit under each view, `[image][view]`, in eval mode and
    /// batched as [`Model::probabilities`].
    pub fn view_logits(
        &self,
        images: &[&Rgb32FImage],
        preprocessing: &Preprocessing,
        views: &[TtaView],
        max_batch: usize,
        device: &Device,
    ) -> crate::Result<Vec<Vec<f64>>> {
        self.batched(images, preprocessing, max_batch, device, |xs| {
            self.batch_view_logits(xs, views, None)
        })
    }

    /// [`Model::view_logits`] of one batch tensor; `identity` reuses logits the
    /// caller already has for the plain input.
    pub fn batch_view_logits(
        &self,
        xs: &Tensor,
        views: &[TtaView],
        identity: Option<&Tensor>,
    ) -> crate::Result<Vec<Vec<f64>>> {
        let mut rows = vec![Vec::with_capacity(views.len()); xs.dim(0)?];
        for &view in views {
            let logits = match (view, identity) {
                (TtaView::Identity, Some(logits)) => logits.clone(),
                _ => self.forward(&view_input(view, xs)?, Mode::EVAL)?,
            };
            let values: Vec<f64> = logits.to_dtype(DType::F64)?.to_vec1()?;
            for (row, value) in rows.iter_mut().zip(values) {
                row.push(value);
            }
        }
        Ok(rows)
    }

    /// The one inference loop: images to normalised batches within the
    /// memory budget, each handed to `per_batch`.
    fn batched<T>(
        &self,
        images: &[&Rgb32FImage],
        preprocessing: &Preprocessing,
        max_batch: usize,
        device: &Device,
        mut per_batch: impl FnMut(&Tensor) -> crate::Result<Vec<T>>,
    ) -> crate::Result<Vec<T>> {
        let batch = max_batch.min(images_per_batch(preprocessing.input_size)).max(1);
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(batch) {
            let xs = to_tensor(chunk, preprocessing, device)?;
            out.extend(per_batch(&xs)?);
        }
        Ok(out)
    }
}

/// Memory one forward pass may take, whatever the input size a card names.
pub const BATCH_BYTES: usize = 1 << 30;

/// Peak activation memory of an inference forward pass per input pixel,
/// from DenseNet121 (the largest shipped architecture): a batch of 16 at
/// 2048 px was seen to take 15 GB, 223 bytes a pixel; rounded up.
const BYTES_PER_INPUT_PIXEL: usize = 230;

/// How many images of `input_size` pixels a side fit one batch (at least one).
pub fn images_per_batch(input_size: usize) -> usize {
    (BATCH_BYTES / (BYTES_PER_INPUT_PIXEL * input_size * input_size).max(1)).max(1)
}

pub fn probabilities_from_logits(logits: &Tensor) -> candle_core::Result<Vec<f64>> {
    sigmoid(&logits.to_dtype(DType::F32)?)?.to_dtype(DType::F64)?.to_vec1()
}

/// A bias-free 2-D convolution, on our im2col + GEMM kernels (see `ops::conv`).
pub(crate) fn conv2d(xs: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    crate::ops::conv::conv2d(xs, weight, padding, stride)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_shrink_with_the_input_size_to_stay_within_the_memory_budget() {
        assert!(images_per_batch(150) >= 16, "{}", images_per_batch(150));
        assert_eq!(images_per_batch(2048), 1);
        assert_eq!(images_per_batch(4096), 1);
        for size in [8, 150, 224, 512, 1024, 2048] {
            assert!(
                images_per_batch(size) * BYTES_PER_INPUT_PIXEL * size * size
                    <= BATCH_BYTES.max(BYTES_PER_INPUT_PIXEL * size * size)
            );
        }
    }
}

//! One definition of each model, shared by training, native detection and the
//! browser. Parameter names follow torchvision so checkpoints map one to one.

pub mod batch_norm;
pub mod cnn;
pub mod densenet;

use candle_core::{Result, Tensor};
use candle_nn::ops::sigmoid;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::preprocess::Preprocessing;
use cnn::CnnConfig;
use densenet::DenseNetConfig;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum Architecture {
    Cnn(CnnConfig),
    Densenet(DenseNetConfig),
}

impl Architecture {
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

pub enum Model {
    Cnn(cnn::Cnn),
    DenseNet(densenet::DenseNet),
}

impl Model {
    pub fn new(architecture: &Architecture, input_size: usize, vb: VarBuilder) -> Result<Self> {
        Ok(match architecture {
            Architecture::Cnn(cfg) => Model::Cnn(cnn::Cnn::new(cfg, input_size, vb)?),
            Architecture::Densenet(cfg) => Model::DenseNet(densenet::DenseNet::new(cfg, vb)?),
        })
    }

    /// Logits of shape `(batch,)`: P(positive) is their sigmoid.
    pub fn forward(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        match self {
            Model::Cnn(m) => m.forward(xs, mode),
            Model::DenseNet(m) => m.forward(xs, mode),
        }
    }

    /// Parameter-name prefixes of the classification head, trained alone
    /// while the base is frozen.
    pub fn head_prefixes(&self) -> &'static [&'static str] {
        &["classifier."]
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
    sigmoid(&logits.to_dtype(candle_core::DType::F32)?)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1()
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

//! One definition of each model, shared by training, native detection and the
//! browser. Parameter names follow torchvision so checkpoints map one to one.

pub mod batch_norm;
pub mod cnn;
pub mod densenet;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::card::Architecture;

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

/// A bias-free 2-D convolution, on our im2col + GEMM kernels (see `ops::conv`).
pub(crate) fn conv2d(xs: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    crate::ops::conv::conv2d(xs, weight, padding, stride)
}

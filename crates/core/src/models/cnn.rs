//! The study's naive CNN, faithfully: three ReLU convolutions (16, 32, 64
//! filters, **1×1 kernels**, same padding) each followed by a 2×2 max-pool,
//! dropout 0.2, flatten, a 128-unit ReLU dense layer and one logit.
//!
//! `kernel_size: 3` is our variant, not the study's; the card labels it so.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{conv2d, Network};
use crate::ops::{conv_relu_pool::conv_relu_pool, dropout};
use crate::{Error, Result as CoreResult};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CnnConfig {
    pub kernel_size: usize,
    pub filters: Vec<usize>,
    pub hidden: usize,
    pub dropout: f32,
}

impl CnnConfig {
    pub fn study() -> Self {
        Self {
            kernel_size: 1,
            filters: vec![16, 32, 64],
            hidden: 128,
            dropout: 0.2,
        }
    }

    pub fn with_kernel(kernel_size: usize) -> Self {
        Self {
            kernel_size,
            ..Self::study()
        }
    }

    /// Side of the last feature map: each pool halves it, rounding down (Keras' "valid").
    pub fn final_side(&self, input_size: usize) -> usize {
        self.filters.iter().fold(input_size, |side, _| side / 2)
    }

    pub fn validate(&self, input_size: usize) -> CoreResult<()> {
        if self.kernel_size.is_multiple_of(2) || self.kernel_size > 7 {
            return Err(Error::Card(format!(
                "cnn kernel_size {} must be odd and at most 7",
                self.kernel_size
            )));
        }
        if self.filters.is_empty() || self.filters.contains(&0) || self.hidden == 0 {
            return Err(Error::Card("cnn filters and hidden units must be non-zero".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Card(format!("cnn dropout {} is outside [0, 1)", self.dropout)));
        }
        if self.final_side(input_size) == 0 {
            return Err(Error::Card(format!(
                "input size {input_size} is too small for {} poolings",
                self.filters.len()
            )));
        }
        Ok(())
    }
}

/// Keras' default initialiser (Glorot uniform), so training starts where the study's did.
fn glorot(fan_in: usize, fan_out: usize) -> Init {
    let limit = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Init::Uniform { lo: -limit, up: limit }
}

/// A "same"-padded convolution with bias, as Keras' `Conv2D(padding="same")`.
#[derive(Clone, Debug)]
struct SameConv {
    weight: Tensor,
    bias: Tensor,
    kernel_size: usize,
}

impl SameConv {
    fn new(in_channels: usize, out_channels: usize, kernel_size: usize, vb: VarBuilder) -> Result<Self> {
        let area = kernel_size * kernel_size;
        let weight = vb.get_with_hints(
            (out_channels, in_channels, kernel_size, kernel_size),
            "weight",
            glorot(in_channels * area, out_channels * area),
        )?;
        let bias = vb.get_with_hints(out_channels, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            kernel_size,
        })
    }
}

impl Module for SameConv {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let out_channels = self.weight.dim(0)?;
        conv2d(xs, &self.weight, self.kernel_size / 2, 1)?.broadcast_add(&self.bias.reshape((1, out_channels, 1, 1))?)
    }
}

impl SameConv {
    /// `max_pool_2x2(relu(conv(xs) + bias))`, the whole layer as one op.
    fn forward_relu_pool(&self, xs: &Tensor) -> Result<Tensor> {
        conv_relu_pool(xs, &self.weight, &self.bias, self.kernel_size / 2)
    }
}

#[derive(Clone, Debug)]
pub struct Cnn {
    convs: Vec<SameConv>,
    fc: Linear,
    classifier: Linear,
    dropout: f32,
}

fn dense(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get_with_hints((out_features, in_features), "weight", glorot(in_features, out_features))?;
    let bias = vb.get_with_hints(out_features, "bias", Init::Const(0.0))?;
    Ok(Linear::new(weight, Some(bias)))
}

impl Cnn {
    pub fn new(cfg: &CnnConfig, input_size: usize, vb: VarBuilder) -> Result<Self> {
        cfg.validate(input_size)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut in_channels = 3;
        let mut convs = Vec::with_capacity(cfg.filters.len());
        for (i, &filters) in cfg.filters.iter().enumerate() {
            convs.push(SameConv::new(
                in_channels,
                filters,
                cfg.kernel_size,
                vb.pp(format!("conv{}", i + 1)),
            )?);
            in_channels = filters;
        }
        let side = cfg.final_side(input_size);
        let fc = dense(in_channels * side * side, cfg.hidden, vb.pp("fc"))?;
        let classifier = dense(cfg.hidden, 1, vb.pp("classifier"))?;
        Ok(Self {
            convs,
            fc,
            classifier,
            dropout: cfg.dropout,
        })
    }
}

impl Network for Cnn {
    /// The last convolution's pooled map.
    fn features(&self, xs: &Tensor, _batch_stats: bool) -> Result<Tensor> {
        let mut xs = xs.clone();
        for conv in &self.convs {
            xs = conv.forward_relu_pool(&xs)?;
        }
        Ok(xs)
    }

    fn frozen_features(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.features(xs, false)?.detach())
    }

    /// Flattened: the dense layer sees every position.
    fn pool(&self, features: &Tensor) -> Result<Tensor> {
        features.flatten_from(1)
    }

    /// Dropout, the hidden dense layer and the logit.
    fn classify(&self, pooled: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let xs = match dropout_seed {
            Some(seed) => dropout(pooled, self.dropout, seed)?,
            None => pooled.clone(),
        };
        let xs = self.fc.forward(&xs)?.relu()?;
        self.classifier.forward(&xs)?.squeeze(1)
    }

    /// None: the dense layers mix every position into the logit.
    fn class_activation_map(&self, _features: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The study trains the CNN end to end; its flattened map (20,736 values
    /// an image at 150 px) would make a bank twenty times DenseNet's.
    fn can_cache_features(&self) -> bool {
        false
    }

    fn has_class_activation_map(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{Architecture, Mode, Model};
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn study_cnn_has_the_studys_shapes() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = Model::new(&Architecture::Cnn(CnnConfig::study()), 150, vb).unwrap();
        let xs = Tensor::zeros((2, 3, 150, 150), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(model.forward(&xs, Mode::EVAL).unwrap().dims(), &[2]);
        let data = varmap.data().lock().unwrap();
        assert_eq!(data["conv1.weight"].as_tensor().dims(), &[16, 3, 1, 1]);
        assert_eq!(data["conv3.weight"].as_tensor().dims(), &[64, 32, 1, 1]);
        // 150 -> 75 -> 37 -> 18, as Keras' valid pooling gives.
        assert_eq!(data["fc.weight"].as_tensor().dims(), &[128, 64 * 18 * 18]);
        assert_eq!(data["classifier.weight"].as_tensor().dims(), &[1, 128]);
        let params: usize = data.values().map(|v| v.as_tensor().elem_count()).sum();
        // conv 1x1 layers, a 20,736 -> 128 dense layer and the logit: 2,657,185 in all.
        assert_eq!(params, 64 + 544 + 2112 + 20736 * 128 + 128 + 129);
    }

    #[test]
    fn one_by_one_matmul_path_equals_a_real_convolution() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let conv = SameConv::new(3, 4, 1, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        let xs = Tensor::randn(0f32, 1., (2, 3, 5, 7), &dev).unwrap();
        let fast = conv.forward(&xs).unwrap();
        let reference = xs
            .conv2d(&conv.weight, 0, 1, 1, 1)
            .unwrap()
            .broadcast_add(&conv.bias.reshape((1, 4, 1, 1)).unwrap())
            .unwrap();
        let diff = (fast - reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}

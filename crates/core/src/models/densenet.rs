//! DenseNet (Huang et al., 2017) in torchvision's layout and names, so that
//! torchvision state dicts load as they are:
//! `features.conv0`, `features.norm0`, `features.denseblockN.denselayerM.{norm1,conv1,norm2,conv2}`,
//! `features.transitionN.{norm,conv}`, `features.norm5`, then our binary head
//! (global average pooling → dropout → one-output `classifier`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use super::batch_norm::{batch_norm2d, BatchNorm2d};
use super::{conv2d, Network};
use crate::ops::dense_block::{dense_block, LayerTensors};
use crate::ops::{dropout, pool};
use crate::{Error, Result as CoreResult};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DenseNetConfig {
    pub growth_rate: usize,
    pub block_config: Vec<usize>,
    pub num_init_features: usize,
    /// Bottleneck width, in multiples of the growth rate.
    pub bn_size: usize,
    /// Dropout before the classifier (the study's head).
    pub head_dropout: f32,
}

impl DenseNetConfig {
    fn torchvision(block_config: &[usize]) -> Self {
        Self {
            growth_rate: 32,
            block_config: block_config.to_vec(),
            num_init_features: 64,
            bn_size: 4,
            head_dropout: 0.2,
        }
    }

    pub fn densenet121() -> Self {
        Self::torchvision(&[6, 12, 24, 16])
    }

    pub fn densenet169() -> Self {
        Self::torchvision(&[6, 12, 32, 32])
    }

    pub fn densenet201() -> Self {
        Self::torchvision(&[6, 12, 48, 32])
    }

    /// A few thousand parameters, for tests: same structure, every code path.
    pub fn tiny() -> Self {
        Self {
            growth_rate: 4,
            block_config: vec![2, 2],
            num_init_features: 8,
            bn_size: 2,
            head_dropout: 0.2,
        }
    }

    pub fn from_depth(depth: usize) -> Option<Self> {
        match depth {
            121 => Some(Self::densenet121()),
            169 => Some(Self::densenet169()),
            201 => Some(Self::densenet201()),
            _ => None,
        }
    }

    pub fn variant_name(&self) -> String {
        for depth in [121, 169, 201] {
            if Self::from_depth(depth).as_ref() == Some(self) {
                return format!("densenet{depth}");
            }
        }
        let layers: usize = self.block_config.iter().sum();
        format!("densenet (growth {}, {} dense layers)", self.growth_rate, layers)
    }

    /// Channels leaving the last block.
    pub fn num_features(&self) -> usize {
        let mut features = self.num_init_features;
        for (i, &layers) in self.block_config.iter().enumerate() {
            features += layers * self.growth_rate;
            if i + 1 != self.block_config.len() {
                features /= 2;
            }
        }
        features
    }

    /// Side of the last feature map: the stem divides by 4 and every transition by 2.
    pub fn final_side(&self, input_size: usize) -> usize {
        let stem = (input_size + 2 * 3 - 7) / 2 + 1;
        let pooled = (stem + 2 - 3) / 2 + 1;
        (1..self.block_config.len()).fold(pooled, |side, _| side / 2)
    }

    pub fn validate(&self, input_size: usize) -> CoreResult<()> {
        if self.growth_rate == 0 || self.num_init_features == 0 || self.bn_size == 0 {
            return Err(Error::Card("densenet sizes must be non-zero".into()));
        }
        if self.block_config.is_empty() || self.block_config.contains(&0) {
            return Err(Error::Card(format!(
                "invalid densenet block_config {:?}",
                self.block_config
            )));
        }
        if !(0.0..1.0).contains(&self.head_dropout) {
            return Err(Error::Card(format!(
                "densenet head_dropout {} is outside [0, 1)",
                self.head_dropout
            )));
        }
        if input_size < 7 || self.final_side(input_size) == 0 {
            return Err(Error::Card(format!(
                "input size {input_size} is too small for this densenet"
            )));
        }
        Ok(())
    }
}

/// torchvision initialises convolutions with Kaiming normal (fan in, ReLU gain).
fn conv_weight(in_channels: usize, out_channels: usize, kernel: usize, vb: &VarBuilder) -> Result<Tensor> {
    let fan_in = (in_channels * kernel * kernel) as f64;
    vb.get_with_hints(
        (out_channels, in_channels, kernel, kernel),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: (2.0 / fan_in).sqrt(),
        },
    )
}

#[derive(Clone, Debug)]
struct DenseLayer {
    norm1: BatchNorm2d,
    conv1: Tensor,
    norm2: BatchNorm2d,
    conv2: Tensor,
}

impl DenseLayer {
    fn new(in_channels: usize, growth: usize, bn_size: usize, vb: VarBuilder) -> Result<Self> {
        let bottleneck = bn_size * growth;
        Ok(Self {
            norm1: batch_norm2d(in_channels, vb.pp("norm1"))?,
            conv1: conv_weight(in_channels, bottleneck, 1, &vb.pp("conv1"))?,
            norm2: batch_norm2d(bottleneck, vb.pp("norm2"))?,
            conv2: conv_weight(bottleneck, growth, 3, &vb.pp("conv2"))?,
        })
    }

    fn tensors(&self) -> LayerTensors {
        LayerTensors {
            norm1: self.norm1.tensors(),
            conv1: self.conv1.clone(),
            norm2: self.norm2.tensors(),
            conv2: self.conv2.clone(),
        }
    }
}

/// Every layer reads all the channels before it (`cat` of the block input and the
/// earlier layers' outputs) and adds `growth` channels. It runs as one fused op
/// (`ops::dense_block`) that keeps the block in one buffer.
#[derive(Clone, Debug)]
struct DenseBlock {
    layers: Vec<DenseLayer>,
}

impl DenseBlock {
    fn new(layers: usize, in_channels: usize, growth: usize, bn_size: usize, vb: VarBuilder) -> Result<Self> {
        let layers = (0..layers)
            .map(|i| {
                DenseLayer::new(
                    in_channels + i * growth,
                    growth,
                    bn_size,
                    vb.pp(format!("denselayer{}", i + 1)),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    fn forward(&self, xs: &Tensor, batch_stats: bool, keep_graph: bool) -> Result<Tensor> {
        let Some(first) = self.layers.first() else {
            return Ok(xs.clone());
        };
        let tensors: Vec<LayerTensors> = self.layers.iter().map(DenseLayer::tensors).collect();
        let eps = first.norm1.eps();
        let (out, stats) = dense_block(xs, &tensors, batch_stats, eps, keep_graph)?;
        if let Some(stats) = stats {
            let (n, _, h, w) = xs.dims4()?;
            for (layer, s) in self.layers.iter().zip(stats) {
                layer.norm1.update_from_batch(&s.mean1, &s.var1, n * h * w)?;
                layer.norm2.update_from_batch(&s.mean2, &s.var2, n * h * w)?;
            }
        }
        Ok(out)
    }
}

#[derive(Clone, Debug)]
struct Transition {
    norm: BatchNorm2d,
    conv: Tensor,
}

impl Transition {
    fn new(in_channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: batch_norm2d(in_channels, vb.pp("norm"))?,
            conv: conv_weight(in_channels, out_channels, 1, &vb.pp("conv"))?,
        })
    }

    /// torchvision's `pool(conv(relu(norm(x))))`, computed as `conv(pool(relu(norm(x))))`:
    /// a bias-free 1×1 convolution and an average pool are both linear maps acting on
    /// different axes (channels, pixels), so they commute, and pooling first gives the
    /// convolution a quarter of the pixels.
    fn forward(&self, xs: &Tensor, batch_stats: bool) -> Result<Tensor> {
        let pooled = pool::avg_pool2d(&self.norm.forward_relu(xs, batch_stats)?, 2, 2)?;
        conv2d(&pooled, &self.conv, 0, 1)
    }
}

#[derive(Clone, Debug)]
pub struct DenseNet {
    conv0: Tensor,
    norm0: BatchNorm2d,
    blocks: Vec<(DenseBlock, Option<Transition>)>,
    norm5: BatchNorm2d,
    classifier: Linear,
    head_dropout: f32,
}

impl DenseNet {
    pub fn new(cfg: &DenseNetConfig, vb: VarBuilder) -> Result<Self> {
        let features = vb.pp("features");
        let conv0 = conv_weight(3, cfg.num_init_features, 7, &features.pp("conv0"))?;
        let norm0 = batch_norm2d(cfg.num_init_features, features.pp("norm0"))?;
        let mut channels = cfg.num_init_features;
        let mut blocks = Vec::with_capacity(cfg.block_config.len());
        for (i, &layers) in cfg.block_config.iter().enumerate() {
            let block = DenseBlock::new(
                layers,
                channels,
                cfg.growth_rate,
                cfg.bn_size,
                features.pp(format!("denseblock{}", i + 1)),
            )?;
            channels += layers * cfg.growth_rate;
            let transition = if i + 1 != cfg.block_config.len() {
                let t = Transition::new(channels, channels / 2, features.pp(format!("transition{}", i + 1)))?;
                channels /= 2;
                Some(t)
            } else {
                None
            };
            blocks.push((block, transition));
        }
        let norm5 = batch_norm2d(channels, features.pp("norm5"))?;
        // torchvision's Linear: uniform in ±1/sqrt(fan_in), zero bias.
        let bound = 1.0 / (channels as f64).sqrt();
        let classifier_vb = vb.pp("classifier");
        let weight = classifier_vb.get_with_hints((1, channels), "weight", Init::Uniform { lo: -bound, up: bound })?;
        let bias = classifier_vb.get_with_hints(1, "bias", Init::Const(0.0))?;
        Ok(Self {
            conv0,
            norm0,
            blocks,
            norm5,
            classifier: Linear::new(weight, Some(bias)),
            head_dropout: cfg.head_dropout,
        })
    }

    fn features_with(&self, xs: &Tensor, batch_stats: bool, keep_graph: bool) -> Result<Tensor> {
        let xs = conv2d(xs, &self.conv0, 3, 2)?;
        let mut xs = pool::max_pool2d(&self.norm0.forward_relu(&xs, batch_stats)?, 3, 2, 1)?;
        for (block, transition) in &self.blocks {
            xs = block.forward(&xs, batch_stats, keep_graph)?;
            if let Some(transition) = transition {
                xs = transition.forward(&xs, batch_stats)?;
            }
        }
        self.norm5.forward_relu(&xs, batch_stats)
    }
}

impl Network for DenseNet {
    /// The rectified last feature map. With the base frozen it depends on the
    /// image alone, so it can be cached.
    fn features(&self, xs: &Tensor, batch_stats: bool) -> Result<Tensor> {
        self.features_with(xs, batch_stats, true)
    }

    /// Building no graph even where the parameters are variables.
    fn frozen_features(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.features_with(xs, false, false)?.detach())
    }

    /// Global average pooling: `(batch, channels)`.
    fn pool(&self, features: &Tensor) -> Result<Tensor> {
        features.mean((2, 3))
    }

    /// Dropout and the logit.
    fn classify(&self, pooled: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let pooled = match dropout_seed {
            Some(seed) => dropout(pooled, self.head_dropout, seed)?,
            None => pooled.clone(),
        };
        self.classifier.forward(&pooled)?.squeeze(1)
    }

    /// `relu(Σ_k w_k A_k)` over the last feature map. Global average pooling
    /// followed by a linear layer makes this exact without a backward pass.
    fn class_activation_map(&self, features: &Tensor) -> Result<Option<Tensor>> {
        let channels = features.dim(1)?;
        let weights = self.classifier.weight().reshape((1, channels, 1, 1))?;
        Ok(Some(features.broadcast_mul(&weights)?.sum(1)?.relu()?))
    }

    fn can_cache_features(&self) -> bool {
        true
    }

    fn has_class_activation_map(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{Architecture, Mode, Model};
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn param_count(cfg: &DenseNetConfig) -> (usize, VarMap) {
        let varmap = VarMap::new();
        DenseNet::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        let count = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter(|(name, _)| !name.ends_with("running_mean") && !name.ends_with("running_var"))
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum();
        (count, varmap)
    }

    #[test]
    fn densenet121_matches_torchvisions_parameter_count_and_names() {
        let (count, varmap) = param_count(&DenseNetConfig::densenet121());
        // torchvision densenet121: 7,978,856 parameters with a 1000-way classifier
        // (1024 * 1000 + 1000); ours has a one-output head (1024 + 1).
        assert_eq!(count, 7_978_856 - 1_025_000 + 1_025);
        let data = varmap.data().lock().unwrap();
        for name in [
            "features.conv0.weight",
            "features.norm0.running_var",
            "features.denseblock1.denselayer1.norm1.weight",
            "features.denseblock1.denselayer6.conv2.weight",
            "features.transition3.conv.weight",
            "features.denseblock4.denselayer16.conv1.weight",
            "features.norm5.bias",
            "classifier.weight",
        ] {
            assert!(data.contains_key(name), "missing {name}");
        }
        assert_eq!(data["features.norm5.weight"].as_tensor().dims(), &[1024]);
        assert_eq!(DenseNetConfig::densenet121().num_features(), 1024);
        assert_eq!(DenseNetConfig::densenet121().final_side(150), 4);
        assert_eq!(DenseNetConfig::densenet121().final_side(224), 7);
    }

    #[test]
    fn tiny_densenet_runs_in_every_mode() {
        let cfg = DenseNetConfig::tiny();
        let varmap = VarMap::new();
        let model = Model::new(
            &Architecture::Densenet(cfg.clone()),
            33,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let xs = Tensor::randn(0f32, 1., (2, 3, 33, 33), &Device::Cpu).unwrap();
        for mode in [Mode::EVAL, Mode::train(1), Mode::train_frozen_bn(1)] {
            assert_eq!(model.forward(&xs, mode).unwrap().dims(), &[2]);
        }
        let features = model.features(&xs, false).unwrap();
        assert_eq!(
            features.dims(),
            &[2, cfg.num_features(), cfg.final_side(33), cfg.final_side(33)]
        );

        // Batch statistics move the dense layers' running statistics; inference mode does not.
        let running = |name: &str| -> Vec<f32> { varmap.data().lock().unwrap()[name].as_tensor().to_vec1().unwrap() };
        let name = "features.denseblock2.denselayer2.norm2.running_mean";
        let before = running(name);
        model.frozen_features(&xs).unwrap();
        model.forward(&xs, Mode::EVAL).unwrap();
        assert_eq!(running(name), before);
        model.forward(&xs, Mode::train(2)).unwrap();
        assert_ne!(running(name), before);
        assert_eq!(
            model.class_activation_map(&features).unwrap().unwrap().dims(),
            &[2, 4, 4]
        );
    }

    #[test]
    fn transition_pooling_first_equals_torchvisions_order_with_gradients() {
        // Odd side: floor mode drops the last row and column in both orders.
        let varmap = VarMap::new();
        let t = Transition::new(6, 3, VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu)).unwrap();
        let xs = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1., (2, 6, 7, 7), &Device::Cpu).unwrap()).unwrap();
        for batch_stats in [false, true] {
            let ours = t.forward(&xs, batch_stats).unwrap();
            let torchvision = pool::avg_pool2d(
                &conv2d(&t.norm.forward_relu(&xs, batch_stats).unwrap(), &t.conv, 0, 1).unwrap(),
                2,
                2,
            )
            .unwrap();
            assert_eq!(ours.dims(), &[2, 3, 3, 3]);
            let diff = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            assert!(diff(&ours, &torchvision) < 1e-12);
            let probe = Tensor::randn(0f64, 1., ours.dims(), &Device::Cpu).unwrap();
            let g_ours = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (&torchvision * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(diff(g_ours.get(&xs).unwrap(), g_ref.get(&xs).unwrap()) < 1e-12);
            assert!(diff(g_ours.get(&t.conv).unwrap(), g_ref.get(&t.conv).unwrap()) < 1e-12);
        }
    }
}

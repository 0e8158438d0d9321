//! Trainable parameters: core's tracked backend holding `Var`s, whose fresh
//! variables are drawn from a seeded generator (candle cannot seed its CPU
//! generator), optionally pre-filled from earlier weights.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::MutexGuard;

use candle_core::{Device, Result, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use fracture_core::models::batch_norm::RUNNING_STAT_SUFFIXES;
use fracture_core::tracked::{Missing, TrackedWeights};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// A seed for one purpose, derived from the run's seed: every parameter,
/// epoch and batch gets its own stream, so results do not depend on the
/// order in which things happen (or on a resume).
pub fn derive_seed(seed: u64, purpose: impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    seed.hash(&mut hasher);
    purpose.hash(&mut hasher);
    hasher.finish()
}

/// The trainable model's tensors: a tracked backend holding `Var`s, whose
/// missing tensors are drawn from a generator seeded by the run's seed and
/// the tensor's name.
pub struct Params {
    weights: TrackedWeights<Var>,
}

impl Params {
    /// Every tensor drawn fresh.
    pub fn new(seed: u64) -> Self {
        Self {
            weights: TrackedWeights::empty(Missing::Draw(Self::drawing(seed))),
        }
    }

    /// Starts from `tensors` (earlier weights); names the model does not ask
    /// for are reported by [`Params::unused_names`], and missing ones are
    /// drawn fresh.
    pub fn with_tensors(seed: u64, tensors: &HashMap<String, Tensor>) -> Result<Self> {
        Ok(Self {
            weights: TrackedWeights::new(tensors, Missing::Draw(Self::drawing(seed)))?,
        })
    }

    fn drawing(seed: u64) -> Box<fracture_core::tracked::Draw> {
        Box::new(move |name, shape, init, device| draw(seed, name, shape, init, device))
    }

    /// Exactly `tensors`, as a checkpoint holds them: a tensor the model
    /// asks for and they lack is an error, not a fresh draw.
    pub fn resumed(tensors: &HashMap<String, Tensor>) -> Result<Self> {
        Ok(Self {
            weights: TrackedWeights::new(tensors, Missing::Refuse)?,
        })
    }

    /// Tensors present (from initial weights) that no model layer asked for.
    pub fn unused_names(&self) -> Vec<String> {
        self.weights.unrequested()
    }

    pub fn var_builder(&self, device: &Device) -> VarBuilder<'_> {
        self.weights.var_builder(device)
    }

    /// Every variable by name.
    pub fn vars(&self) -> MutexGuard<'_, HashMap<String, Var>> {
        self.weights.slots()
    }

    /// The variables an optimiser may change: never BatchNorm's running
    /// statistics, and only those under `prefixes` when some are given.
    pub fn trainable(&self, prefixes: Option<&[String]>) -> Vec<(String, Var)> {
        let mut vars: Vec<(String, Var)> = self
            .vars()
            .iter()
            .filter(|(name, _)| !RUNNING_STAT_SUFFIXES.iter().any(|s| name.ends_with(s)))
            .filter(|(name, _)| prefixes.is_none_or(|ps| ps.iter().any(|p| name.starts_with(p.as_str()))))
            .map(|(name, var)| (name.clone(), var.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// The name of a parameter holding NaN or ±inf, if any (in name order).
    pub fn first_non_finite(&self) -> candle_core::Result<Option<String>> {
        let mut tensors: Vec<(String, Tensor)> = self.tensors().into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, tensor) in tensors {
            let finite = tensor
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| v.is_finite());
            if !finite {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// A snapshot of every tensor, as written to the model file.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.vars()
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
            .collect()
    }
}

/// A fresh tensor for `name`, from its own stream of the run's seed: the same
/// seed gives the same weights whatever order the layers are built in.
fn draw(seed: u64, name: &str, shape: &Shape, init: Init, device: &Device) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(seed, ("init", name)));
    let count = shape.elem_count();
    let values: Vec<f32> = match init {
        Init::Const(value) => vec![value as f32; count],
        Init::Uniform { lo, up } => (0..count).map(|_| rng.random_range(lo..up) as f32).collect(),
        Init::Randn { mean, stdev } => {
            let normal = Normal::new(mean, stdev).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            (0..count).map(|_| normal.sample(&mut rng) as f32).collect()
        }
        Init::Kaiming { .. } => candle_core::bail!("`{name}`: models here state their initialiser explicitly"),
    };
    Tensor::from_vec(values, shape, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fracture_core::card::Architecture;
    use fracture_core::models::{densenet::DenseNetConfig, Model};

    #[test]
    fn same_seed_same_weights_and_stats_are_never_trainable() {
        let arch = Architecture::Densenet(DenseNetConfig::tiny());
        let build = |seed| {
            let params = Params::new(seed);
            Model::new(&arch, 32, params.var_builder(&Device::Cpu)).unwrap();
            params
        };
        let (a, b, c) = (build(1), build(1), build(2));
        let w = |p: &Params| {
            p.tensors()["features.conv0.weight"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(w(&a), w(&b));
        assert_ne!(w(&a), w(&c));
        let trainable = a.trainable(None);
        assert!(trainable.iter().all(|(n, _)| !n.contains("running_")));
        assert!(trainable.iter().any(|(n, _)| n.ends_with("norm0.weight")));
        let head = a.trainable(Some(&["classifier.".to_string()]));
        let names: Vec<&str> = head.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["classifier.bias", "classifier.weight"]);
    }
}

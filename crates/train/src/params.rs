//! Trainable parameters: a VarMap whose fresh variables are drawn from a
//! seeded generator (candle cannot seed its CPU generator), optionally
//! pre-filled from earlier weights.

use std::collections::{BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use fracture_core::models::batch_norm::RUNNING_STAT_SUFFIXES;
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

pub struct Params {
    pub varmap: VarMap,
    seed: u64,
    /// Names the model asked for, to spot initial weights of another architecture.
    requested: Mutex<BTreeSet<String>>,
}

impl Params {
    pub fn new(seed: u64) -> Self {
        Self {
            varmap: VarMap::new(),
            seed,
            requested: Mutex::new(BTreeSet::new()),
        }
    }

    /// Tensors present (from initial weights) that no model layer asked for.
    pub fn unused_names(&self) -> Vec<String> {
        let requested = self.requested.lock().unwrap_or_else(|p| p.into_inner());
        let data = self.varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        let mut unused: Vec<String> = data.keys().filter(|k| !requested.contains(*k)).cloned().collect();
        unused.sort();
        unused
    }

    /// Starts from `tensors` (earlier weights); names the model does not ask
    /// for are simply never used, and missing ones are drawn fresh.
    pub fn with_tensors(seed: u64, tensors: &HashMap<String, Tensor>) -> Result<Self> {
        let params = Self::new(seed);
        {
            let mut data = params
                .varmap
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
            for (name, tensor) in tensors {
                data.insert(name.clone(), Var::from_tensor(&tensor.to_dtype(DType::F32)?.copy()?)?);
            }
        }
        Ok(params)
    }

    pub fn var_builder(&self, device: &Device) -> VarBuilder<'_> {
        VarBuilder::from_backend(Box::new(self), DType::F32, device.clone())
    }

    /// The variables an optimiser may change: never BatchNorm's running
    /// statistics, and only those under `prefixes` when some are given.
    pub fn trainable(&self, prefixes: Option<&[String]>) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        let mut vars: Vec<(String, Var)> = data
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
        let data = self.varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        data.iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
            .collect()
    }

    fn draw(&self, shape: &Shape, name: &str, init: Init, device: &Device) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(self.seed, ("init", name)));
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
}

impl SimpleBackend for &Params {
    fn get(&self, shape: Shape, name: &str, init: Init, dtype: DType, device: &Device) -> Result<Tensor> {
        if let Ok(mut requested) = self.requested.lock() {
            requested.insert(name.to_string());
        }
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        if let Some(var) = data.get(name) {
            if var.shape() != &shape {
                candle_core::bail!(
                    "initial weights: tensor `{name}` has shape {:?}, the model needs {:?}",
                    var.dims(),
                    shape.dims()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let var = Var::from_tensor(&self.draw(&shape, name, init, device)?.to_dtype(dtype)?)?;
        data.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        data.get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor `{name}`")))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().map(|d| d.contains_key(name)).unwrap_or(false)
    }
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

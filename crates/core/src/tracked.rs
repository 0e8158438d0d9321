//! Binding tensors to a model's layers: the one VarBuilder backend behind
//! every way a model gets its weights (a model file for detect, imported
//! weights, `--init` weights and checkpoints for training).
//!
//! It records every name the model asks for, so the caller can refuse a file
//! whose tensors nothing asked for (another architecture's weights), checks
//! each tensor's shape, and either refuses a missing tensor or has it drawn:
//! a model file must be complete, initial weights may lack a head.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// Draws a tensor the weights lack: its name, shape, the layer's initialiser.
pub type Draw = dyn Fn(&str, &Shape, Init, &Device) -> Result<Tensor> + Send + Sync;

/// What happens when the model asks for a tensor that is not there.
pub enum Missing {
    /// An error naming it: a model file or a checkpoint must be complete.
    Refuse,
    /// A fresh tensor from the initialiser, kept for later requests
    /// (training from scratch, or from weights without a head).
    Draw(Box<Draw>),
}

/// How the tensors are held: plain tensors for inference (no graph is kept
/// alive), `Var`s for training (the optimiser updates them in place).
pub trait Slot: Clone + Send {
    fn hold(tensor: Tensor) -> Result<Self>;
    fn tensor(&self) -> &Tensor;
}

impl Slot for Tensor {
    fn hold(tensor: Tensor) -> Result<Self> {
        Ok(tensor)
    }

    fn tensor(&self) -> &Tensor {
        self
    }
}

impl Slot for Var {
    fn hold(tensor: Tensor) -> Result<Self> {
        // Always a copy: a variable given here (another model's) must not
        // be trained in place through this one.
        Var::from_tensor(&tensor.detach())
    }

    fn tensor(&self) -> &Tensor {
        self.as_tensor()
    }
}

/// Tensors by name, and the names the model asked for.
pub struct TrackedWeights<S: Slot> {
    slots: Mutex<HashMap<String, S>>,
    requested: Mutex<BTreeSet<String>>,
    missing: Missing,
}

impl<S: Slot> TrackedWeights<S> {
    /// Holds nothing yet: every tensor is drawn (or refused).
    pub fn empty(missing: Missing) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            requested: Mutex::new(BTreeSet::new()),
            missing,
        }
    }

    /// Holds `tensors` (as f32: every weight here computes in f32).
    pub fn new(tensors: &HashMap<String, Tensor>, missing: Missing) -> Result<Self> {
        let slots = tensors
            .iter()
            .map(|(name, tensor)| Ok((name.clone(), S::hold(tensor.to_dtype(DType::F32)?)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Self {
            slots: Mutex::new(slots),
            requested: Mutex::new(BTreeSet::new()),
            missing,
        })
    }

    pub fn var_builder(&self, device: &Device) -> VarBuilder<'_> {
        VarBuilder::from_backend(Box::new(self), DType::F32, device.clone())
    }

    /// Held tensors the model never asked for, in name order.
    pub fn unrequested(&self) -> Vec<String> {
        let requested = lock(&self.requested);
        let mut names: Vec<String> = lock(&self.slots)
            .keys()
            .filter(|name| !requested.contains(*name))
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// Every held tensor, drawn ones included.
    pub fn slots(&self) -> MutexGuard<'_, HashMap<String, S>> {
        lock(&self.slots)
    }
}

/// A panic elsewhere cannot leave a map of tensors half-written: its
/// insertions are single calls.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<S: Slot> SimpleBackend for &TrackedWeights<S> {
    fn get(&self, shape: Shape, name: &str, init: Init, dtype: DType, device: &Device) -> Result<Tensor> {
        lock(&self.requested).insert(name.to_string());
        let mut slots = lock(&self.slots);
        if let Some(slot) = slots.get(name) {
            let tensor = slot.tensor();
            if tensor.shape() != &shape {
                // A plain message: `bail!` would append a backtrace when RUST_BACKTRACE is set.
                return Err(candle_core::Error::Msg(format!(
                    "tensor `{name}` has shape {:?}, the model needs {:?}",
                    tensor.dims(),
                    shape.dims()
                )));
            }
            return tensor.to_dtype(dtype)?.to_device(device);
        }
        match &self.missing {
            Missing::Refuse => Err(candle_core::Error::Msg(format!("missing tensor `{name}`"))),
            Missing::Draw(draw) => {
                let slot = S::hold(draw(name, &shape, init, device)?.to_dtype(dtype)?)?;
                let tensor = slot.tensor().clone();
                slots.insert(name.to_string(), slot);
                Ok(tensor)
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        lock(&self.requested).insert(name.to_string());
        lock(&self.slots)
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor `{name}`")))?
            .tensor()
            .to_dtype(dtype)?
            .to_device(device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        lock(&self.slots).contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(missing: Missing) -> TrackedWeights<Tensor> {
        let tensors = HashMap::from([
            (
                "a".to_string(),
                Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
            ),
            ("b".to_string(), Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap()),
        ]);
        TrackedWeights::new(&tensors, missing).unwrap()
    }

    #[test]
    fn strict_refuses_missing_and_misshapen_tensors_by_name_and_tracks_requests() {
        let weights = backend(Missing::Refuse);
        let vb = weights.var_builder(&Device::Cpu);
        assert_eq!(vb.get((2, 3), "a").unwrap().dims(), [2, 3]);
        let err = vb.get((3, 2), "b").unwrap_err().to_string();
        assert!(err.contains("`b` has shape [4], the model needs [3, 2]"), "{err}");
        let err = vb.get(5, "c").unwrap_err().to_string();
        assert!(err.contains("missing tensor `c`"), "{err}");
        assert_eq!(
            weights.unrequested(),
            Vec::<String>::new(),
            "a and b were both asked for"
        );
        let fresh = backend(Missing::Refuse);
        fresh.var_builder(&Device::Cpu).get((2, 3), "a").unwrap();
        assert_eq!(fresh.unrequested(), ["b"]);
    }

    #[test]
    fn draw_fills_missing_tensors_once_and_keeps_them() {
        let weights: TrackedWeights<Var> = TrackedWeights::new(
            &HashMap::new(),
            Missing::Draw(Box::new(|_, shape, _, device| Tensor::ones(shape, DType::F32, device))),
        )
        .unwrap();
        let vb = weights.var_builder(&Device::Cpu);
        let first = vb.get_with_hints(3, "w", Init::Const(0.0)).unwrap();
        assert_eq!(first.to_vec1::<f32>().unwrap(), [1.0; 3]);
        weights.slots()["w"]
            .set(&Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        // The second request gets the held variable, not a new draw.
        assert_eq!(vb.get(3, "w").unwrap().to_vec1::<f32>().unwrap(), [0.0; 3]);
    }
}

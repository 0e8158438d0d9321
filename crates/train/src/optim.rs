//! Adam as Keras implements it (epsilon 1e-7 added outside the square root),
//! with its moments exposed so a checkpoint can save and restore them, and
//! optionally AdamW's decoupled weight decay.

use std::collections::HashMap;

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};
use fracture_core::ops::{contiguous_range, contiguous_slice, unsupported_dtype};

/// Names of the moments in a checkpoint: `adam.m.` or `adam.v.`, then the weight's name.
pub(crate) const STATE_PREFIX: &str = "adam.";

pub struct Adam {
    params: Vec<(String, Var)>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    pub step: usize,
    pub lr: f64,
    /// Decoupled weight decay (AdamW): each step multiplies convolution and linear
    /// weights by `1 - lr·weight_decay`; biases and BatchNorm parameters are left alone.
    pub weight_decay: f64,
    beta1: f64,
    beta2: f64,
    epsilon: f64,
}

impl Adam {
    pub fn new(params: Vec<(String, Var)>, lr: f64) -> Result<Self> {
        let zeros = |(_, v): &(String, Var)| v.as_tensor().zeros_like();
        let first = params.iter().map(zeros).collect::<Result<_>>()?;
        let second = params.iter().map(zeros).collect::<Result<_>>()?;
        Ok(Self {
            params,
            first,
            second,
            step: 0,
            lr,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-7,
        })
    }

    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.apply(&grads)
    }

    pub fn apply(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let step_size = self.lr * (1.0 - self.beta2.powi(t)).sqrt() / (1.0 - self.beta1.powi(t));
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let grad = grad.contiguous()?;
            // In place: as separate tensor ops this was a dozen passes over every
            // parameter, each into a new tensor (a fifth of the naive CNN's step).
            self.first[i].inplace_op2(
                &grad,
                &Moment {
                    beta: self.beta1,
                    squared: false,
                },
            )?;
            self.second[i].inplace_op2(
                &grad,
                &Moment {
                    beta: self.beta2,
                    squared: true,
                },
            )?;
            let decay = if var.rank() >= 2 {
                self.lr * self.weight_decay
            } else {
                0.0
            };
            var.as_tensor().inplace_op3(
                &self.first[i],
                &self.second[i],
                &Update {
                    step_size,
                    epsilon: self.epsilon,
                    decay,
                },
            )?;
        }
        Ok(())
    }

    /// Moments under `adam.m.NAME` / `adam.v.NAME`, for checkpoints: copies, since
    /// the moments change in place.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut state = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            state.insert(format!("{STATE_PREFIX}m.{name}"), self.first[i].copy()?);
            state.insert(format!("{STATE_PREFIX}v.{name}"), self.second[i].copy()?);
        }
        Ok(state)
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for (i, (name, var)) in self.params.iter().enumerate() {
            for (moment, slot) in [("m", &mut self.first[i]), ("v", &mut self.second[i])] {
                let key = format!("{STATE_PREFIX}{moment}.{name}");
                let saved = state
                    .get(&key)
                    .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint lacks optimiser state `{key}`")))?;
                if saved.shape() != var.shape() {
                    candle_core::bail!("checkpoint optimiser state `{key}` has the wrong shape");
                }
                // A copy: the moments change in place, the checkpoint's tensors must not.
                *slot = saved.to_dtype(var.dtype())?.copy()?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// A first (`squared: false`) or second moment, updated in place from a gradient:
/// `m = β·m + (1 - β)·g` or `v = β·v + (1 - β)·g²`, in the order Keras computes them.
struct Moment {
    beta: f64,
    squared: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adam-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        fn run<T: candle_core::WithDType + num_traits::Float>(op: &Moment, moment: &mut [T], grad: &[T]) -> Result<()> {
            if moment.len() != grad.len() {
                candle_core::bail!("adam-moment: {} moments for {} gradients", moment.len(), grad.len());
            }
            let (keep, take) = (T::from_f64(op.beta), T::from_f64(1.0 - op.beta));
            for (m, &g) in moment.iter_mut().zip(grad) {
                let g = if op.squared { g * g } else { g };
                *m = *m * keep + g * take;
            }
            Ok(())
        }
        let (name, range) = (self.name(), contiguous_range(self.name(), l1)?);
        match s1 {
            CpuStorage::F32(data) => run::<f32>(self, &mut data[range], contiguous_slice(name, s2, l2)?),
            CpuStorage::F64(data) => run::<f64>(self, &mut data[range], contiguous_slice(name, s2, l2)?),
            other => Err(unsupported_dtype(name, other.dtype())),
        }
    }
}

/// `w = w·(1 - decay) - step_size·m / (√v + ε)`, in place.
struct Update {
    step_size: f64,
    epsilon: f64,
    decay: f64,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adam-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        fn run<T: candle_core::WithDType + num_traits::Float + std::ops::SubAssign + std::ops::MulAssign>(
            op: &Update,
            weight: &mut [T],
            m: &[T],
            v: &[T],
        ) -> Result<()> {
            if weight.len() != m.len() || weight.len() != v.len() {
                candle_core::bail!(
                    "adam-update: {} weights, {} and {} moments",
                    weight.len(),
                    m.len(),
                    v.len()
                );
            }
            let (step_size, epsilon) = (T::from_f64(op.step_size), T::from_f64(op.epsilon));
            let keep = T::from_f64(1.0 - op.decay);
            for ((w, &m), &v) in weight.iter_mut().zip(m).zip(v) {
                if op.decay != 0.0 {
                    *w *= keep;
                }
                *w -= m / (v.sqrt() + epsilon) * step_size;
            }
            Ok(())
        }
        let (name, range) = (self.name(), contiguous_range(self.name(), l1)?);
        match s1 {
            CpuStorage::F32(data) => run::<f32>(
                self,
                &mut data[range],
                contiguous_slice(name, s2, l2)?,
                contiguous_slice(name, s3, l3)?,
            ),
            CpuStorage::F64(data) => run::<f64>(
                self,
                &mut data[range],
                contiguous_slice(name, s2, l2)?,
                contiguous_slice(name, s3, l3)?,
            ),
            other => Err(unsupported_dtype(name, other.dtype())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_step_moves_each_weight_by_the_learning_rate() {
        // With bias correction, Adam's first step is lr * g / (|g| + eps) ≈ lr * sign(g).
        let w = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let mut adam = Adam::new(vec![("w".into(), w.clone())], 0.1).unwrap();
        let loss = (w.as_tensor() * Tensor::new(&[2f32, -3.0, 0.5], &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        adam.backward_step(&loss).unwrap();
        let after: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        for (a, e) in after.iter().zip([0.9f32, -1.9, 2.9]) {
            assert!((a - e).abs() < 1e-5, "{after:?}");
        }
    }

    /// The in-place kernels against Keras' update written as tensor ops (the
    /// optimiser's earlier form), over steps with changing gradients.
    #[test]
    fn in_place_steps_match_the_update_written_as_tensor_ops() {
        let dev = Device::Cpu;
        let start = [0.3f32, -1.2, 2.5, 0.0, 4.0];
        let w = Var::new(&start, &dev).unwrap();
        let mut adam = Adam::new(vec![("w".into(), w.clone())], 0.01).unwrap();
        let mut reference = Tensor::new(&start, &dev).unwrap();
        let (mut m, mut v) = (reference.zeros_like().unwrap(), reference.zeros_like().unwrap());
        for step in 1..=5 {
            let g = Tensor::new(&[0.5f32 * step as f32, -2.0, 1e-3, 3.0, -0.25], &dev).unwrap();
            let loss = (w.as_tensor() * &g).unwrap().sum_all().unwrap();
            adam.backward_step(&loss).unwrap();

            let (b1, b2, eps, lr): (f64, f64, f64, f64) = (0.9, 0.999, 1e-7, 0.01);
            let step_size = lr * (1.0 - b2.powi(step)).sqrt() / (1.0 - b1.powi(step));
            m = ((&m * b1).unwrap() + (&g * (1.0 - b1)).unwrap()).unwrap();
            v = ((&v * b2).unwrap() + (g.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap();
            let update = (&m / (v.sqrt().unwrap() + eps).unwrap()).unwrap();
            reference = (&reference - (update * step_size).unwrap()).unwrap();
        }
        let ours: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        let expected: Vec<f32> = reference.to_vec1().unwrap();
        for (a, e) in ours.iter().zip(&expected) {
            assert!((a - e).abs() <= 1e-6 * e.abs().max(1.0), "{ours:?} vs {expected:?}");
        }
        assert_ne!(ours, start.to_vec());
    }

    #[test]
    fn saved_state_is_a_copy_that_later_steps_leave_alone() {
        let w = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let mut adam = Adam::new(vec![("w".into(), w.clone())], 0.1).unwrap();
        let loss = || w.as_tensor().sqr().unwrap().sum_all().unwrap();
        adam.backward_step(&loss()).unwrap();
        let state = adam.state().unwrap();
        let saved: Vec<f32> = state["adam.m.w"].to_vec1().unwrap();
        adam.backward_step(&loss()).unwrap();
        assert_eq!(state["adam.m.w"].to_vec1::<f32>().unwrap(), saved);
        let mut restored = Adam::new(vec![("w".into(), w.clone())], 0.1).unwrap();
        restored.load_state(&state, 1).unwrap();
        restored.backward_step(&loss()).unwrap();
        assert_eq!(
            state["adam.m.w"].to_vec1::<f32>().unwrap(),
            saved,
            "a restored optimiser wrote into its checkpoint"
        );
    }

    /// AdamW: the same step with and without decay differs by lr·wd·w for a
    /// matrix and not at all for a bias.
    #[test]
    fn weight_decay_shrinks_matrices_only() {
        let dev = Device::Cpu;
        let step = |weight_decay: f64| {
            let matrix = Var::new(&[[2f32, -4.0]], &dev).unwrap();
            let bias = Var::new(&[3f32], &dev).unwrap();
            let mut adam = Adam::new(vec![("m".into(), matrix.clone()), ("b".into(), bias.clone())], 0.1).unwrap();
            adam.weight_decay = weight_decay;
            let loss = (matrix.as_tensor().sum_all().unwrap() + bias.as_tensor().sum_all().unwrap()).unwrap();
            adam.backward_step(&loss).unwrap();
            (
                matrix.as_tensor().to_vec2::<f32>().unwrap()[0].clone(),
                bias.as_tensor().to_vec1::<f32>().unwrap(),
            )
        };
        let ((plain_matrix, plain_bias), (decayed_matrix, decayed_bias)) = (step(0.0), step(0.5));
        assert_eq!(plain_bias, decayed_bias);
        for ((plain, decayed), start) in plain_matrix.iter().zip(&decayed_matrix).zip([2f32, -4.0]) {
            assert!(
                (plain - decayed - 0.05 * start).abs() < 1e-6,
                "{plain_matrix:?} vs {decayed_matrix:?}"
            );
        }
    }

    #[test]
    fn minimises_a_quadratic() {
        let w = Var::new(&[5f32, -3.0], &Device::Cpu).unwrap();
        let mut adam = Adam::new(vec![("w".into(), w.clone())], 0.1).unwrap();
        for _ in 0..500 {
            let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
            adam.backward_step(&loss).unwrap();
        }
        let after: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        assert!(after.iter().all(|v| v.abs() < 0.05), "{after:?}");
    }
}

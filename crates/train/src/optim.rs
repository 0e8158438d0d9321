//! Adam as Keras implements it (epsilon 1e-7 added outside the square root),
//! with its moments exposed so a checkpoint can save and restore them.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

pub struct Adam {
    params: Vec<(String, Var)>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    pub step: usize,
    pub lr: f64,
    beta1: f64,
    beta2: f64,
    epsilon: f64,
}

impl Adam {
    pub fn new(params: Vec<(String, Var)>, lr: f64) -> Result<Self> {
        let zeros = |(_, v): &(String, Var)| v.as_tensor().zeros_like();
        let first = params.iter().map(zeros).collect::<Result<_>>()?;
        let second = params.iter().map(zeros).collect::<Result<_>>()?;
        Ok(Self { params, first, second, step: 0, lr, beta1: 0.9, beta2: 0.999, epsilon: 1e-7 })
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
            let Some(grad) = grads.get(var.as_tensor()) else { continue };
            let m = ((&self.first[i] * self.beta1)? + (grad * (1.0 - self.beta1))?)?;
            let v = ((&self.second[i] * self.beta2)? + (grad.sqr()? * (1.0 - self.beta2))?)?;
            let update = (&m / (v.sqrt()? + self.epsilon)?)?;
            var.set(&(var.as_tensor() - (update * step_size)?)?)?;
            self.first[i] = m;
            self.second[i] = v;
        }
        Ok(())
    }

    /// Moments under `adam.m.NAME` / `adam.v.NAME`, for checkpoints.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut state = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            state.insert(format!("adam.m.{name}"), self.first[i].clone());
            state.insert(format!("adam.v.{name}"), self.second[i].clone());
        }
        state
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for (i, (name, var)) in self.params.iter().enumerate() {
            for (prefix, slot) in [("adam.m.", &mut self.first[i]), ("adam.v.", &mut self.second[i])] {
                let key = format!("{prefix}{name}");
                let saved = state
                    .get(&key)
                    .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint lacks optimiser state `{key}`")))?;
                if saved.shape() != var.shape() {
                    candle_core::bail!("checkpoint optimiser state `{key}` has the wrong shape");
                }
                *slot = saved.clone();
            }
        }
        self.step = step;
        Ok(())
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
        let loss = (w.as_tensor() * Tensor::new(&[2f32, -3.0, 0.5], &Device::Cpu).unwrap()).unwrap().sum_all().unwrap();
        adam.backward_step(&loss).unwrap();
        let after: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        for (a, e) in after.iter().zip([0.9f32, -1.9, 2.9]) {
            assert!((a - e).abs() < 1e-5, "{after:?}");
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

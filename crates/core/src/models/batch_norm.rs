//! BatchNorm2d with PyTorch's semantics (momentum 0.1, unbiased running
//! variance), switchable between batch statistics and running statistics.
//!
//! candle-nn's BatchNorm cannot keep inference-mode statistics while its
//! affine parameters train, which is how the study fine-tunes DenseNet.

use candle_core::{Result, Tensor, Var};

use crate::ops::norm::{self, NormTensors};
use candle_nn::{Init, VarBuilder};

/// Suffixes of the buffers that are statistics, not parameters: the
/// optimiser must never see them.
pub const RUNNING_STAT_SUFFIXES: [&str; 2] = [".running_mean", ".running_var"];

#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
    momentum: f64,
}

pub fn batch_norm2d(channels: usize, vb: VarBuilder) -> Result<BatchNorm2d> {
    Ok(BatchNorm2d {
        weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
        bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
        running_mean: vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?,
        running_var: vb.get_with_hints(channels, "running_var", Init::Const(1.0))?,
        eps: 1e-5,
        momentum: 0.1,
    })
}

impl BatchNorm2d {
    /// `relu(batch_norm(xs))`: DenseNet always follows a BatchNorm with a ReLU, and the
    /// pair runs as one fused op (see `ops::norm`).
    pub fn forward_relu(&self, xs: &Tensor, batch_stats: bool) -> Result<Tensor> {
        let channels = self.weight.dim(0)?;
        if xs.rank() != 4 || xs.dim(1)? != channels {
            candle_core::bail!("batch norm expects (N, {channels}, H, W), got {:?}", xs.dims());
        }
        if !batch_stats {
            // y = x * scale + shift, with the statistics as constants.
            let inv_std = (self.running_var.detach() + self.eps)?.sqrt()?.recip()?;
            let scale = (&self.weight * inv_std)?;
            let shift = (&self.bias - (self.running_mean.detach() * &scale)?)?;
            return norm::scale_shift_relu(xs, &scale, &shift);
        }
        let (ys, mean, biased_var) = norm::batch_norm_relu(xs, &self.weight, &self.bias, self.eps)?;
        let (n, _, h, w) = xs.dims4()?;
        let count = (n * h * w) as f64;
        self.update_running_stats(&mean, &(biased_var * (count / (count - 1.0)))?)?;
        Ok(ys)
    }

    pub(crate) fn eps(&self) -> f64 {
        self.eps
    }

    /// Its tensors, for ops that run BatchNorm inside a larger fused kernel.
    pub(crate) fn tensors(&self) -> NormTensors {
        NormTensors {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            running_mean: self.running_mean.clone(),
            running_var: self.running_var.clone(),
        }
    }

    /// Folds the batch statistics a fused kernel normalised with (mean and biased
    /// variance over `count` values per channel) into the running statistics.
    pub(crate) fn update_from_batch(&self, mean: &[f64], biased_var: &[f64], count: usize) -> Result<()> {
        let device = self.running_mean.device();
        let unbias = count as f64 / (count as f64 - 1.0);
        let mean = Tensor::from_slice(mean, mean.len(), device)?.to_dtype(self.running_mean.dtype())?;
        let var: Vec<f64> = biased_var.iter().map(|v| v * unbias).collect();
        let var = Tensor::from_vec(var, biased_var.len(), device)?.to_dtype(self.running_var.dtype())?;
        self.update_running_stats(&mean, &var)
    }

    /// Running statistics only move when they are live variables (training);
    /// a model loaded for inference holds plain tensors and is never changed.
    fn update_running_stats(&self, batch_mean: &Tensor, unbiased_var: &Tensor) -> Result<()> {
        for (running, batch) in [(&self.running_mean, batch_mean), (&self.running_var, unbiased_var)] {
            if running.is_variable() {
                let updated = ((running.detach() * (1.0 - self.momentum))? + (batch * self.momentum)?)?;
                Var::from_tensor(running)?.set(&updated)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn batch_mode_normalises_rectifies_and_updates_running_stats_like_pytorch() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let bn = batch_norm2d(2, vb).unwrap();
        // Channel 0 holds 1..=4, channel 1 holds 10 everywhere.
        let xs = Tensor::new(&[[[[1f32, 2.], [3., 4.]], [[10., 10.], [10., 10.]]]], &Device::Cpu).unwrap();
        let ys = bn.forward_relu(&xs, true).unwrap();
        let ys: Vec<f32> = ys.flatten_all().unwrap().to_vec1().unwrap();
        // mean 2.5, biased var 1.25
        let expected0: Vec<f32> = [1f32, 2., 3., 4.]
            .iter()
            .map(|v| ((v - 2.5) / (1.25f32 + 1e-5).sqrt()).max(0.0))
            .collect();
        for (y, e) in ys[..4].iter().zip(&expected0) {
            assert!((y - e).abs() < 1e-5, "{y} vs {e}");
        }
        assert!(ys[4..].iter().all(|v| v.abs() < 1e-5));

        let data = varmap.data().lock().unwrap();
        let rm: Vec<f32> = data["running_mean"].as_tensor().to_vec1().unwrap();
        let rv: Vec<f32> = data["running_var"].as_tensor().to_vec1().unwrap();
        // torch: 0.9 * 0 + 0.1 * 2.5; 0.9 * 1 + 0.1 * (5 / 3) with the unbiased variance.
        assert!((rm[0] - 0.25).abs() < 1e-6 && (rm[1] - 1.0).abs() < 1e-6, "{rm:?}");
        assert!(
            (rv[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6 && (rv[1] - 0.9).abs() < 1e-6,
            "{rv:?}"
        );
    }

    #[test]
    fn a_fused_kernels_batch_statistics_update_the_running_ones_like_pytorch() {
        let varmap = VarMap::new();
        let bn = batch_norm2d(2, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        // Biased variances over 5 values: unbiased ×5/4, as torch keeps them.
        bn.update_from_batch(&[2.0, -1.0], &[1.0, 0.4], 5).unwrap();
        let data = varmap.data().lock().unwrap();
        let rm: Vec<f32> = data["running_mean"].as_tensor().to_vec1().unwrap();
        let rv: Vec<f32> = data["running_var"].as_tensor().to_vec1().unwrap();
        assert!((rm[0] - 0.2).abs() < 1e-6 && (rm[1] + 0.1).abs() < 1e-6, "{rm:?}");
        assert!(
            (rv[0] - (0.9 + 0.1 * 1.25)).abs() < 1e-6 && (rv[1] - (0.9 + 0.1 * 0.5)).abs() < 1e-6,
            "{rv:?}"
        );
    }

    #[test]
    fn inference_mode_uses_running_stats_and_leaves_them_alone() {
        let mut tensors = std::collections::HashMap::new();
        let dev = Device::Cpu;
        tensors.insert("weight".to_string(), Tensor::new(&[2f32], &dev).unwrap());
        tensors.insert("bias".to_string(), Tensor::new(&[1f32], &dev).unwrap());
        tensors.insert("running_mean".to_string(), Tensor::new(&[3f32], &dev).unwrap());
        tensors.insert("running_var".to_string(), Tensor::new(&[4f32], &dev).unwrap());
        let bn = batch_norm2d(1, VarBuilder::from_tensors(tensors, DType::F32, &dev)).unwrap();
        let xs = Tensor::new(&[[[[5f32]]]], &dev).unwrap();
        let y: Vec<f32> = bn
            .forward_relu(&xs, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let expected = (5.0 - 3.0) / (4f32 + 1e-5).sqrt() * 2.0 + 1.0;
        assert!((y[0] - expected).abs() < 1e-6);
    }
}

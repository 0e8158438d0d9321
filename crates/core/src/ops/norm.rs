//! BatchNorm followed by ReLU, fused: DenseNet applies the pair before every
//! convolution, and as separate candle ops it costs about ten full passes over the
//! activations, each into a freshly allocated tensor, plus as many for the backward.
//! Fused, the forward is one pass (two with batch statistics) and the backward two.
//!
//! Two forms, matching the two ways `BatchNorm2d` runs:
//! - [`scale_shift_relu`]: `relu(x·scale[c] + shift[c])`, the inference-mode form, where
//!   scale and shift come from the running statistics (the caller computes them with
//!   candle ops on C-element tensors, so gradients reach BatchNorm's weight and bias);
//! - [`batch_norm_relu`]: normalisation with the batch's own statistics, whose gradient
//!   also flows through the mean and variance.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{float_op, Float};

/// One BatchNorm's tensors, as `BatchNorm2d` holds them.
#[derive(Clone, Debug)]
pub struct NormTensors {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

/// `relu(xs · scale + shift)` with per-channel `scale` and `shift` of shape (C,).
pub fn scale_shift_relu(xs: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let planes = Planes::new("scale-shift-relu", xs.dims(), &[scale.dims(), shift.dims()])?;
    xs.contiguous()?
        .apply_op3(&scale.contiguous()?, &shift.contiguous()?, ScaleShiftRelu(planes))
}

/// `relu(batch_norm(xs))` normalised with the batch's statistics over (N, H, W), then
/// `weight` and `bias` applied. Also returns the batch mean and the biased variance,
/// both (C,) and without gradient, for the running statistics.
pub fn batch_norm_relu(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let planes = Planes::new("batch-norm-relu", xs.dims(), &[weight.dims(), bias.dims()])?;
    if planes.batch * planes.pixels < 2 {
        bail!("batch norm in training mode needs more than one value per channel");
    }
    let xs = xs.contiguous()?;
    let stats = xs.apply_op1_no_bwd(&ChannelStats(planes))?;
    let (mean, var) = (stats.get(0)?, stats.get(1)?);
    let op = BatchNormRelu {
        planes,
        stats: stats.to_dtype(DType::F64)?.to_vec2()?,
        eps,
    };
    let ys = xs.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    Ok((ys, mean, var))
}

/// An NCHW tensor seen as N·C planes of H·W pixels.
#[derive(Clone, Copy, Debug)]
struct Planes {
    batch: usize,
    channels: usize,
    pixels: usize,
}

impl Planes {
    fn new(op: &str, dims: &[usize], per_channel: &[&[usize]]) -> Result<Self> {
        let &[batch, channels, h, w] = dims else {
            bail!("{op}: expected an NCHW (rank 4) input, got shape {dims:?}")
        };
        for dims in per_channel {
            if *dims != [channels] {
                bail!("{op}: per-channel parameters must have shape [{channels}], got {dims:?}")
            }
        }
        Ok(Self {
            batch,
            channels,
            pixels: h * w,
        })
    }

    fn channel(&self, plane: usize) -> usize {
        plane % self.channels
    }

    /// The planes of channel `c`, one per image.
    fn of_channel(&self, c: usize) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        (0..self.batch).map(move |n| {
            let start = (n * self.channels + c) * self.pixels;
            start..start + self.pixels
        })
    }
}

fn cast<T: Float>(v: f64) -> T {
    T::from_f64(v)
}

/// Per-channel sums over (N, H, W) of `f(index in x)`, in f64, one channel per task.
fn channel_sums<const K: usize>(planes: Planes, f: impl Fn(usize) -> [f64; K] + Sync) -> Vec<[f64; K]> {
    (0..planes.channels)
        .into_par_iter()
        .map(|c| {
            let mut acc = [0f64; K];
            for range in planes.of_channel(c) {
                for i in range {
                    for (a, v) in acc.iter_mut().zip(f(i)) {
                        *a += v;
                    }
                }
            }
            acc
        })
        .collect()
}

/// Writes `f(index)` for every element, plane by plane across threads.
fn map_planes<T: Float>(planes: Planes, len: usize, f: impl Fn(usize, usize) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); len];
    out.par_chunks_mut(planes.pixels.max(1))
        .enumerate()
        .for_each(|(plane, chunk)| {
            let c = planes.channel(plane);
            let base = plane * planes.pixels;
            for (i, v) in chunk.iter_mut().enumerate() {
                *v = f(base + i, c);
            }
        });
    out
}

fn relu<T: Float>(v: T) -> T {
    if v > T::zero() {
        v
    } else {
        T::zero()
    }
}

struct ScaleShiftRelu(Planes);

fn scale_shift_fwd<T: Float>(p: Planes, xs: &[T], scale: &[T], shift: &[T]) -> Vec<T> {
    map_planes(p, xs.len(), |i, c| relu(xs[i] * scale[c] + shift[c]))
}

impl CustomOp3 for ScaleShiftRelu {
    fn name(&self) -> &'static str {
        "scale-shift-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = float_op!(name, [(s1, l1) => x, (s2, l2) => a, (s3, l3) => b], scale_shift_fwd(
            self.0, x, a, b
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        scale: &Tensor,
        _shift: &Tensor,
        ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The ReLU passes gradient where the output is positive.
        let grad = grad.contiguous()?;
        let passed = grad.apply_op2_no_bwd(ys, &ReluMask)?;
        let dx = passed.broadcast_mul(&scale.reshape((1, (), 1, 1))?)?;
        let sums = xs.apply_op2_no_bwd(&passed, &ScaleShiftParamGrads(self.0))?;
        Ok((Some(dx), Some(sums.get(0)?), Some(sums.get(1)?)))
    }
}

/// (grad, relu output) → grad where the output is positive, else 0.
struct ReluMask;

impl candle_core::CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "relu-mask"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn mask<T: Float>(g: &[T], y: &[T]) -> Vec<T> {
            let mut out = vec![T::zero(); g.len()];
            out.par_chunks_mut(4096)
                .zip(g.par_chunks(4096).zip(y.par_chunks(4096)))
                .for_each(|(o, (g, y))| {
                    for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                        *o = if y > T::zero() { g } else { T::zero() };
                    }
                });
            out
        }
        let name = self.name();
        let out = float_op!(name, [(s1, l1) => g, (s2, l2) => y], mask(g, y));
        Ok((out, l1.shape().clone()))
    }
}

/// (x, masked grad) → (2, C): Σ grad·x (the scale's gradient) and Σ grad (the shift's).
struct ScaleShiftParamGrads(Planes);

impl candle_core::CustomOp2 for ScaleShiftParamGrads {
    fn name(&self) -> &'static str {
        "scale-shift-param-grads"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn sums<T: Float>(p: Planes, x: &[T], g: &[T]) -> Vec<T> {
            let sums = channel_sums(p, |i| [(g[i] * x[i]).into(), g[i].into()]);
            sums.iter()
                .map(|s| cast(s[0]))
                .chain(sums.iter().map(|s| cast(s[1])))
                .collect()
        }
        let (p, name) = (self.0, self.name());
        let out = float_op!(name, [(s1, l1) => x, (s2, l2) => g], sums(p, x, g));
        Ok((out, Shape::from((2, p.channels))))
    }
}

/// x → (2, C): the per-channel mean and biased variance over (N, H, W).
struct ChannelStats(Planes);

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "channel-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn stats<T: Float>(p: Planes, x: &[T]) -> Vec<T> {
            let count = (p.batch * p.pixels) as f64;
            let means: Vec<f64> = channel_sums(p, |i| [x[i].into()])
                .iter()
                .map(|s| s[0] / count)
                .collect();
            // Two passes: the centred sum of squares does not cancel catastrophically.
            let vars = channel_sums(p, |i| {
                let d = x[i].into() - means[(i / p.pixels) % p.channels];
                [d * d]
            });
            means
                .iter()
                .map(|&m| cast(m))
                .chain(vars.iter().map(|v| cast(v[0] / count)))
                .collect()
        }
        let (p, name) = (self.0, self.name());
        let out = float_op!(name, [(s, l) => x], stats(p, x));
        Ok((out, Shape::from((2, p.channels))))
    }
}

struct BatchNormRelu {
    planes: Planes,
    /// Row 0: mean, row 1: biased variance, per channel.
    stats: Vec<Vec<f64>>,
    eps: f64,
}

impl BatchNormRelu {
    fn inv_std(&self) -> Vec<f64> {
        self.stats[1].iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect()
    }

    fn forward<T: Float>(&self, xs: &[T], weight: &[T], bias: &[T]) -> Vec<T> {
        let inv_std = self.inv_std();
        let scale: Vec<T> = weight.iter().zip(&inv_std).map(|(&w, s)| cast(w.into() * s)).collect();
        let shift: Vec<T> = (0..self.planes.channels)
            .map(|c| cast(bias[c].into() - self.stats[0][c] * weight[c].into() * inv_std[c]))
            .collect();
        scale_shift_fwd(self.planes, xs, &scale, &shift)
    }
}

impl CustomOp3 for BatchNormRelu {
    fn name(&self) -> &'static str {
        "batch-norm-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = float_op!(name, [(s1, l1) => x, (s2, l2) => w, (s3, l3) => b], self.forward(x, w, b));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let p = self.planes;
        let grad = grad.contiguous()?;
        let passed = grad.apply_op2_no_bwd(ys, &ReluMask)?;
        // With x̂ = (x - mean)·inv_std: dbias = Σg, dweight = Σg·x̂ = inv_std·(Σg·x - mean·Σg).
        let raw = xs
            .apply_op2_no_bwd(&passed, &ScaleShiftParamGrads(p))?
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?;
        let inv_std = self.inv_std();
        let dbias = raw[1].clone();
        let dweight: Vec<f64> = (0..p.channels)
            .map(|c| inv_std[c] * (raw[0][c] - self.stats[0][c] * raw[1][c]))
            .collect();
        // dx = weight·inv_std/M · (M·g - dbias - x̂·dweight), per channel an affine map of (g, x).
        let count = (p.batch * p.pixels) as f64;
        let weight = weight.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let coefficients: Vec<[f64; 3]> = (0..p.channels)
            .map(|c| {
                let k = weight[c] * inv_std[c];
                let on_x = -k * inv_std[c] * dweight[c] / count;
                let constant = -k * dbias[c] / count - on_x * self.stats[0][c];
                [k, on_x, constant]
            })
            .collect();
        let dx = xs.apply_op2_no_bwd(
            &passed,
            &AffineGrad {
                planes: p,
                coefficients,
            },
        )?;
        let dtype = xs.dtype();
        let device = xs.device();
        let dweight = Tensor::from_vec(dweight, p.channels, device)?.to_dtype(dtype)?;
        let dbias = Tensor::from_vec(dbias, p.channels, device)?.to_dtype(dtype)?;
        Ok((Some(dx), Some(dweight), Some(dbias)))
    }
}

/// (x, g) → a·g + b·x + c with per-channel (a, b, c): BatchNorm's input gradient.
struct AffineGrad {
    planes: Planes,
    coefficients: Vec<[f64; 3]>,
}

impl candle_core::CustomOp2 for AffineGrad {
    fn name(&self) -> &'static str {
        "batch-norm-input-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn apply<T: Float>(op: &AffineGrad, x: &[T], g: &[T]) -> Vec<T> {
            let k: Vec<[T; 3]> = op.coefficients.iter().map(|c| c.map(cast)).collect();
            map_planes(op.planes, x.len(), |i, c| k[c][0] * g[i] + k[c][1] * x[i] + k[c][2])
        }
        let name = self.name();
        let out = float_op!(name, [(s1, l1) => x, (s2, l2) => g], apply(self, x, g));
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, uniform};
    use candle_core::{Var, D};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        uniform(shape, seed, -1.0, 1.0)
    }

    /// Gradients of `sum(ours · probe)` and `sum(reference · probe)` with respect to
    /// each named variable, equal within `tolerance`.
    fn assert_same_gradients(ours: &Tensor, reference: &Tensor, probe: &Tensor, vars: &[(&str, &Var)], tolerance: f64) {
        let g_ours = (ours * probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (reference * probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in vars {
            let d = max_abs_diff(g_ours.get(var).unwrap(), g_ref.get(var).unwrap());
            assert!(d < tolerance, "{name} gradient differs by {d}");
        }
    }

    fn per_channel(t: &Tensor) -> Tensor {
        t.reshape((1, (), 1, 1)).unwrap()
    }

    /// candle's own ops, the reference: BatchNorm with batch statistics, then ReLU.
    fn reference_batch_norm_relu(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Tensor {
        let mean = xs
            .mean_keepdim(0)
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .mean_keepdim(3)
            .unwrap();
        let centred = xs.broadcast_sub(&mean).unwrap();
        let var = centred
            .sqr()
            .unwrap()
            .mean_keepdim(0)
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .mean_keepdim(3)
            .unwrap();
        let normed = centred.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap();
        normed
            .broadcast_mul(&per_channel(weight))
            .unwrap()
            .broadcast_add(&per_channel(bias))
            .unwrap()
            .relu()
            .unwrap()
    }

    /// Ours against candle's composed ops in f64, outputs and the gradients of a random
    /// projection of the output: 1e-9.
    #[test]
    fn batch_norm_relu_matches_candles_ops_with_gradients() {
        for (shape, seed) in [([3usize, 5, 7, 9], 1u64), ([1, 3, 2, 3], 2), ([2, 17, 1, 1], 3)] {
            let xs = Var::from_tensor(&random(&shape, seed)).unwrap();
            let weight = Var::from_tensor(&random(&[shape[1]], seed + 10)).unwrap();
            let bias = Var::from_tensor(&random(&[shape[1]], seed + 20)).unwrap();
            let (ours, mean, var) = batch_norm_relu(&xs, &weight, &bias, 1e-5).unwrap();
            let reference = reference_batch_norm_relu(&xs, &weight, &bias, 1e-5);
            assert!(max_abs_diff(&ours, &reference) < 1e-9, "forward {shape:?}");

            let flat = xs.transpose(0, 1).unwrap().flatten_from(1).unwrap();
            assert!(max_abs_diff(&mean, &flat.mean(D::Minus1).unwrap()) < 1e-12);
            let biased = flat
                .broadcast_sub(&flat.mean_keepdim(D::Minus1).unwrap())
                .unwrap()
                .sqr()
                .unwrap()
                .mean(D::Minus1)
                .unwrap();
            assert!(max_abs_diff(&var, &biased) < 1e-12);

            let probe = random(&shape, seed + 30);
            assert_same_gradients(
                &ours,
                &reference,
                &probe,
                &[("input", &xs), ("weight", &weight), ("bias", &bias)],
                1e-9,
            );
        }
    }

    #[test]
    fn scale_shift_relu_matches_candles_ops_with_gradients() {
        let shape = [2usize, 7, 5, 3];
        let xs = Var::from_tensor(&random(&shape, 4)).unwrap();
        let scale = Var::from_tensor(&random(&[7], 5)).unwrap();
        let shift = Var::from_tensor(&random(&[7], 6)).unwrap();
        let ours = scale_shift_relu(&xs, &scale, &shift).unwrap();
        let reference = xs
            .broadcast_mul(&per_channel(&scale))
            .unwrap()
            .broadcast_add(&per_channel(&shift))
            .unwrap()
            .relu()
            .unwrap();
        assert!(max_abs_diff(&ours, &reference) < 1e-12);
        let probe = random(&shape, 7);
        assert_same_gradients(
            &ours,
            &reference,
            &probe,
            &[("input", &xs), ("scale", &scale), ("shift", &shift)],
            1e-12,
        );
    }

    #[test]
    fn f32_batch_norm_relu_agrees_with_f64_and_bad_shapes_fail() {
        let xs = random(&[4, 33, 9, 9], 8);
        let (w, b) = (random(&[33], 9), random(&[33], 10));
        let (exact, ..) = batch_norm_relu(&xs, &w, &b, 1e-5).unwrap();
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let (single, ..) = batch_norm_relu(&f32s(&xs), &f32s(&w), &f32s(&b), 1e-5).unwrap();
        assert!(max_abs_diff(&single.to_dtype(DType::F64).unwrap(), &exact) < 1e-5);

        assert!(batch_norm_relu(&xs, &random(&[32], 1), &b, 1e-5).is_err());
        assert!(scale_shift_relu(&xs.flatten_from(2).unwrap(), &w, &b).is_err());
        assert!(batch_norm_relu(&random(&[1, 2, 1, 1], 1), &random(&[2], 1), &random(&[2], 2), 1e-5).is_err());
    }
}

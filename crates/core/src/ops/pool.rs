//! 2-D max and average pooling with backward passes that are correct for training.
//!
//! candle 0.11.1's own pooling cannot be used to train DenseNet: its max-pool has no
//! backward unless kernel == stride, its max-pool backward spreads a window's gradient
//! over the window instead of routing it to the maximum, and its avg-pool backward gives
//! gradient to trailing rows/columns that floor mode drops. These ops follow PyTorch's
//! `MaxPool2d` / `AvgPool2d` (floor mode) in both directions.
//!
//! The kernels are plain loops over (n, c) planes, the planes spread over rayon's threads
//! (on wasm32, without threads, they run one after the other).

use std::ops::Range;

use candle_core::backend::BackendStorage;

use super::{simd_fn, unsupported_dtype};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// PyTorch `MaxPool2d(kernel, stride, padding)` semantics, floor mode, padding counts as -inf.
pub fn max_pool2d(xs: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let op = MaxPool2d(Pool {
        kernel,
        stride,
        padding,
    });
    // Validate here too so that bad arguments are reported the same way on every device.
    op.0.geometry(op.name(), xs.dims())?;
    xs.apply_op1(op)
}

/// PyTorch `AvgPool2d(kernel, stride)` semantics, no padding, floor mode: trailing rows/cols that fit no window are dropped and get zero gradient.
pub fn avg_pool2d(xs: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let op = AvgPool2d(Pool {
        kernel,
        stride,
        padding: 0,
    });
    op.0.geometry(op.name(), xs.dims())?;
    xs.apply_op1(op)
}

/// Square pooling window settings shared by the forward and backward ops.
#[derive(Clone, Copy, Debug)]
struct Pool {
    kernel: usize,
    stride: usize,
    padding: usize,
}

/// Sizes of one pooling call, derived from the input's dims.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    batch: usize,
    channels: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
}

impl Geometry {
    fn in_shape(&self) -> Shape {
        Shape::from((self.batch, self.channels, self.in_h, self.in_w))
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.batch, self.channels, self.out_h, self.out_w))
    }
}

impl Pool {
    fn geometry(&self, op: &str, dims: &[usize]) -> Result<Geometry> {
        let &[batch, channels, in_h, in_w] = dims else {
            bail!("{op}: expected an NCHW (rank 4) input, got shape {dims:?}")
        };
        let Pool {
            kernel,
            stride,
            padding,
        } = *self;
        if kernel == 0 || stride == 0 {
            bail!("{op}: kernel ({kernel}) and stride ({stride}) must be positive")
        }
        // PyTorch's limit; it also guarantees every window overlaps the input, so a
        // window's maximum is always a real element and never the -inf padding.
        if padding > kernel / 2 {
            bail!("{op}: padding ({padding}) must be at most half the kernel size ({kernel})")
        }
        Ok(Geometry {
            batch,
            channels,
            in_h,
            in_w,
            out_h: self.out_len(op, in_h)?,
            out_w: self.out_len(op, in_w)?,
        })
    }

    /// Output length along one spatial axis, `(len + 2 * padding - kernel) / stride + 1`,
    /// written so it cannot underflow.
    fn out_len(&self, op: &str, in_len: usize) -> Result<usize> {
        // Non-negative because padding <= kernel / 2.
        let span = self.kernel - 2 * self.padding;
        if in_len == 0 || in_len < span {
            bail!(
                "{op}: input size {in_len} gives an empty output for kernel {} with padding {}",
                self.kernel,
                self.padding
            )
        }
        Ok((in_len - span) / self.stride + 1)
    }

    /// Input indices covered by window `out_idx` along one axis, with the padding cut off.
    fn window(&self, out_idx: usize, in_len: usize) -> Range<usize> {
        let start = out_idx * self.stride; // in padded coordinates
        start.saturating_sub(self.padding)..(start + self.kernel - self.padding).min(in_len)
    }
}

/// Addressing of one (n, c) plane of a strided NCHW tensor.
#[derive(Clone, Copy)]
struct Plane {
    base: usize,
    row_stride: usize,
    col_stride: usize,
}

impl Plane {
    fn new(layout: &Layout, n: usize, c: usize) -> Self {
        let stride = layout.stride();
        Self {
            base: layout.start_offset() + n * stride[0] + c * stride[1],
            row_stride: stride[2],
            col_stride: stride[3],
        }
    }

    fn at(&self, h: usize, w: usize) -> usize {
        self.base + h * self.row_stride + w * self.col_stride
    }
}

/// The element types the kernels run on. `WithDType` has no NaN test, which max pooling
/// needs to propagate NaN like PyTorch.
trait PoolFloat: WithDType {
    fn is_nan(self) -> bool;
}

impl PoolFloat for f32 {
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
}

impl PoolFloat for f64 {
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
}

/// Position of the window's maximum. Strict `>` keeps the first maximum in scan order on
/// ties, as PyTorch does, so forward and backward agree on which element gets the gradient.
fn window_argmax<T: PoolFloat>(xs: &[T], plane: Plane, rows: Range<usize>, cols: Range<usize>) -> (usize, usize) {
    let mut best = (rows.start, cols.start);
    let mut best_val = xs[plane.at(rows.start, cols.start)];
    for h in rows {
        for w in cols.clone() {
            let v = xs[plane.at(h, w)];
            if v > best_val || (v.is_nan() && !best_val.is_nan()) {
                best = (h, w);
                best_val = v;
            }
        }
    }
    best
}

/// Fills `len` elements plane by plane, one (n, c) plane per task: `fill(n, c, plane)`.
/// Planes are independent, so threads never share an output element (one thread on wasm).
fn per_plane<T: PoolFloat>(g: Geometry, plane_len: usize, fill: impl Fn(usize, usize, &mut [T]) + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); g.batch * g.channels * plane_len];
    if plane_len > 0 {
        out.par_chunks_mut(plane_len)
            .enumerate()
            .for_each(|(i, plane)| fill(i / g.channels, i % g.channels, plane));
    }
    out
}

/// The argmax of every window when windows tile a contiguous plane (kernel == stride, no
/// padding: the cnn's 2×2 pools), as `f(oh, ow, input offset in the plane)`. Same scan
/// order and tie and NaN rules as [`window_argmax`], without its per-element addressing.
fn tile_argmax<T: PoolFloat>(xs: &[T], plane: Plane, pool: Pool, g: Geometry, mut f: impl FnMut(usize, usize, usize)) {
    let k = pool.kernel;
    let data = &xs[plane.base..plane.base + g.in_h * g.in_w];
    for oh in 0..g.out_h {
        for ow in 0..g.out_w {
            let first = oh * k * g.in_w + ow * k;
            let (mut best, mut best_val) = (first, data[first]);
            for dh in 0..k {
                let row = first + dh * g.in_w;
                for (dw, &v) in data[row..row + k].iter().enumerate() {
                    if v > best_val || (v.is_nan() && !best_val.is_nan()) {
                        best = row + dw;
                        best_val = v;
                    }
                }
            }
            f(oh, ow, best);
        }
    }
}

fn tiles(pool: Pool, g: Geometry, plane: Plane) -> bool {
    pool.kernel == pool.stride && pool.padding == 0 && plane.col_stride == 1 && plane.row_stride == g.in_w
}

/// `a` or `b`, whichever is larger, NaN if either is: the value of the window
/// maximum under [`window_argmax`]'s rules, which only the backward pass needs the
/// position of.
#[inline(always)]
fn nan_max<T: PoolFloat>(a: T, b: T) -> T {
    if b > a || b.is_nan() {
        b
    } else {
        a
    }
}

use PoolFloat as Float;

simd_fn! {
    /// `acc = nan_max(acc, row)`, element by element.
    fn max_into<T: Float>(acc: &mut [T], row: &[T]) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a = nan_max(*a, v);
        }
    }
}

/// The forward max-pool of one contiguous plane, separably: each output row's
/// window rows are first reduced to one row (a vectorised pass), then each
/// window's columns of that row.
fn max_pool_plane<T: PoolFloat>(data: &[T], pool: Pool, g: Geometry, acc: &mut [T], out: &mut [T]) {
    for (oh, out_row) in out.chunks_exact_mut(g.out_w).enumerate() {
        let mut rows = pool.window(oh, g.in_h);
        let first = rows.next().expect("every window overlaps the input");
        acc.copy_from_slice(&data[first * g.in_w..][..g.in_w]);
        for h in rows {
            max_into(acc, &data[h * g.in_w..][..g.in_w]);
        }
        for (ow, o) in out_row.iter_mut().enumerate() {
            let cols = pool.window(ow, g.in_w);
            *o = acc[cols.clone()]
                .iter()
                .skip(1)
                .fold(acc[cols.start], |m, &v| nan_max(m, v));
        }
    }
}

fn max_pool_fwd<T: PoolFloat>(xs: &[T], layout: &Layout, pool: Pool, g: Geometry) -> Vec<T> {
    per_plane(g, g.out_h * g.out_w, |n, c, out| {
        let plane = Plane::new(layout, n, c);
        if tiles(pool, g, plane) {
            let data = &xs[plane.base..];
            return tile_argmax(xs, plane, pool, g, |oh, ow, at| out[oh * g.out_w + ow] = data[at]);
        }
        if plane.col_stride == 1 && plane.row_stride == g.in_w {
            let mut acc = vec![T::zero(); g.in_w];
            return max_pool_plane(&xs[plane.base..][..g.in_h * g.in_w], pool, g, &mut acc, out);
        }
        for oh in 0..g.out_h {
            let rows = pool.window(oh, g.in_h);
            for ow in 0..g.out_w {
                let (h, w) = window_argmax(xs, plane, rows.clone(), pool.window(ow, g.in_w));
                out[oh * g.out_w + ow] = xs[plane.at(h, w)];
            }
        }
    })
}

/// Routes each output gradient to its window's argmax. The argmax is recomputed from the
/// input rather than stored, since a custom op's forward can only return one tensor.
fn max_pool_bwd<T: PoolFloat>(
    xs: &[T],
    xs_layout: &Layout,
    grad: &[T],
    grad_layout: &Layout,
    pool: Pool,
    g: Geometry,
) -> Vec<T> {
    per_plane(g, g.in_h * g.in_w, |n, c, grad_in| {
        let x_plane = Plane::new(xs_layout, n, c);
        let grad_plane = Plane::new(grad_layout, n, c);
        if tiles(pool, g, x_plane) {
            return tile_argmax(xs, x_plane, pool, g, |oh, ow, at| {
                grad_in[at] += grad[grad_plane.at(oh, ow)]
            });
        }
        for oh in 0..g.out_h {
            let rows = pool.window(oh, g.in_h);
            for ow in 0..g.out_w {
                let (h, w) = window_argmax(xs, x_plane, rows.clone(), pool.window(ow, g.in_w));
                // Overlapping windows may share an argmax, hence `+=`.
                grad_in[h * g.in_w + w] += grad[grad_plane.at(oh, ow)];
            }
        }
    })
}

fn avg_pool_fwd<T: PoolFloat>(xs: &[T], layout: &Layout, pool: Pool, g: Geometry) -> Vec<T> {
    let area = T::from_f64((pool.kernel * pool.kernel) as f64);
    per_plane(g, g.out_h * g.out_w, |n, c, out| {
        let plane = Plane::new(layout, n, c);
        for oh in 0..g.out_h {
            let rows = pool.window(oh, g.in_h);
            for ow in 0..g.out_w {
                let mut sum = T::zero();
                for h in rows.clone() {
                    for w in pool.window(ow, g.in_w) {
                        sum += xs[plane.at(h, w)];
                    }
                }
                out[oh * g.out_w + ow] = sum / area;
            }
        }
    })
}

/// Spreads each output gradient evenly over its own window only, so input rows/columns
/// that floor mode drops keep a zero gradient.
fn avg_pool_bwd<T: PoolFloat>(grad: &[T], grad_layout: &Layout, pool: Pool, g: Geometry) -> Vec<T> {
    let area = T::from_f64((pool.kernel * pool.kernel) as f64);
    per_plane(g, g.in_h * g.in_w, |n, c, grad_in| {
        let grad_plane = Plane::new(grad_layout, n, c);
        for oh in 0..g.out_h {
            let rows = pool.window(oh, g.in_h);
            for ow in 0..g.out_w {
                let cols = pool.window(ow, g.in_w);
                let share = grad[grad_plane.at(oh, ow)] / area;
                for h in rows.clone() {
                    let row = h * g.in_w;
                    for v in &mut grad_in[row + cols.start..row + cols.end] {
                        *v += share;
                    }
                }
            }
        }
    })
}

/// Checks that a gradient handed to a backward op has the forward output's shape; a
/// mismatch would otherwise surface as an out-of-bounds panic in the kernel.
fn check_grad_dims(op: &str, grad_layout: &Layout, g: Geometry) -> Result<()> {
    let expected = g.out_shape();
    if grad_layout.shape() != &expected {
        bail!(
            "{op}: gradient has shape {:?}, expected {:?}",
            grad_layout.dims(),
            expected.dims()
        )
    }
    Ok(())
}

struct MaxPool2d(Pool);

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max_pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0.geometry(self.name(), layout.dims())?;
        let out = match storage {
            CpuStorage::F32(xs) => CpuStorage::F32(max_pool_fwd(xs, layout, self.0, g)),
            CpuStorage::F64(xs) => CpuStorage::F64(max_pool_fwd(xs, layout, self.0, g)),
            other => return Err(unsupported_dtype(self.name(), other.dtype())),
        };
        Ok((out, g.out_shape()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = arg.apply_op2_no_bwd(grad_res, &MaxPool2dBackward(self.0))?;
        Ok(Some(grad))
    }
}

/// Max-pool input gradient as a function of (input, output gradient).
struct MaxPool2dBackward(Pool);

impl CustomOp2 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "max_pool2d_backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0.geometry(self.name(), xs_layout.dims())?;
        check_grad_dims(self.name(), grad_layout, g)?;
        let pool = self.0;
        let out = match (xs, grad) {
            (CpuStorage::F32(xs), CpuStorage::F32(grad)) => {
                CpuStorage::F32(max_pool_bwd(xs, xs_layout, grad, grad_layout, pool, g))
            }
            (CpuStorage::F64(xs), CpuStorage::F64(grad)) => {
                CpuStorage::F64(max_pool_bwd(xs, xs_layout, grad, grad_layout, pool, g))
            }
            (xs, grad) if xs.dtype() != grad.dtype() => bail!(
                "{}: input dtype {:?} differs from gradient dtype {:?}",
                self.name(),
                xs.dtype(),
                grad.dtype()
            ),
            (xs, _) => return Err(unsupported_dtype(self.name(), xs.dtype())),
        };
        Ok((out, g.in_shape()))
    }
}

struct AvgPool2d(Pool);

impl CustomOp1 for AvgPool2d {
    fn name(&self) -> &'static str {
        "avg_pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0.geometry(self.name(), layout.dims())?;
        let out = match storage {
            CpuStorage::F32(xs) => CpuStorage::F32(avg_pool_fwd(xs, layout, self.0, g)),
            CpuStorage::F64(xs) => CpuStorage::F64(avg_pool_fwd(xs, layout, self.0, g)),
            other => return Err(unsupported_dtype(self.name(), other.dtype())),
        };
        Ok((out, g.out_shape()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, in_h, in_w) = arg.dims4()?;
        let op = AvgPool2dBackward {
            pool: self.0,
            in_h,
            in_w,
        };
        Ok(Some(grad_res.apply_op1_no_bwd(&op)?))
    }
}

/// Avg-pool input gradient as a function of the output gradient alone; the input's
/// spatial size is needed because floor mode makes it ambiguous from the output's.
struct AvgPool2dBackward {
    pool: Pool,
    in_h: usize,
    in_w: usize,
}

impl CustomOp1 for AvgPool2dBackward {
    fn name(&self) -> &'static str {
        "avg_pool2d_backward"
    }

    fn cpu_fwd(&self, grad: &CpuStorage, grad_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let &[batch, channels, ..] = grad_layout.dims() else {
            bail!(
                "{}: expected an NCHW (rank 4) gradient, got shape {:?}",
                self.name(),
                grad_layout.dims()
            )
        };
        let g = self
            .pool
            .geometry(self.name(), &[batch, channels, self.in_h, self.in_w])?;
        check_grad_dims(self.name(), grad_layout, g)?;
        let out = match grad {
            CpuStorage::F32(grad) => CpuStorage::F32(avg_pool_bwd(grad, grad_layout, self.pool, g)),
            CpuStorage::F64(grad) => CpuStorage::F64(avg_pool_bwd(grad, grad_layout, self.pool, g)),
            other => return Err(unsupported_dtype(self.name(), other.dtype())),
        };
        Ok((out, g.in_shape()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Gradients of a piecewise-linear loss: central differences are exact up to rounding
    /// (about 1e-16 * |loss| / EPS), far below this tolerance.
    const EPS: f64 = 1e-6;
    const TOL: f64 = 1e-6;

    type PoolFn = dyn Fn(&Tensor) -> Result<Tensor>;

    fn uniform(rng: &mut ChaCha8Rng, len: usize) -> Vec<f64> {
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn tensor(data: &[f64], dims: &[usize]) -> Tensor {
        Tensor::from_slice(data, dims, &Device::Cpu).unwrap()
    }

    fn arange(dims: &[usize]) -> Tensor {
        let len = dims.iter().product::<usize>();
        let data: Vec<f64> = (0..len).map(|i| i as f64).collect();
        tensor(&data, dims)
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn grad_of(pool: &PoolFn, x: &Tensor) -> Tensor {
        let var = Var::from_tensor(x).unwrap();
        let loss = pool(var.as_tensor()).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        grads.get(var.as_tensor()).unwrap().clone()
    }

    /// Distinct values in [-1, 1) at least 2 / len apart, in random order. Independent
    /// draws can land within EPS of each other in one window (seen with these seeds), and
    /// then the finite difference straddles a change of argmax.
    fn shuffled_distinct(rng: &mut ChaCha8Rng, len: usize) -> Vec<f64> {
        let mut x: Vec<f64> = (0..len)
            .map(|i| 2.0 * (i as f64 + rng.random_range(0.25..0.75)) / len as f64 - 1.0)
            .collect();
        x.shuffle(rng);
        x
    }

    /// Compares autograd of `(pool(x) * weights).sum()` with central differences.
    fn check_grad(pool: &PoolFn, dims: &[usize], seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x = shuffled_distinct(&mut rng, dims.iter().product());
        let out_dims = pool(&tensor(&x, dims)).unwrap().dims().to_vec();
        let weights = tensor(&uniform(&mut rng, out_dims.iter().product()), &out_dims);
        let loss = |x: &Tensor| pool(x).unwrap().mul(&weights).unwrap().sum_all().unwrap();

        let var = Var::from_slice(&x, dims, &Device::Cpu).unwrap();
        let grads = loss(var.as_tensor()).backward().unwrap();
        let grad = values(grads.get(var.as_tensor()).unwrap());
        assert_eq!(grad.len(), x.len());

        let mut nonzero = 0;
        let mut xp = x.clone();
        for i in 0..x.len() {
            xp[i] = x[i] + EPS;
            let plus: f64 = loss(&tensor(&xp, dims)).to_scalar().unwrap();
            xp[i] = x[i] - EPS;
            let minus: f64 = loss(&tensor(&xp, dims)).to_scalar().unwrap();
            xp[i] = x[i];
            let fd = (plus - minus) / (2.0 * EPS);
            assert!(
                (grad[i] - fd).abs() <= TOL * fd.abs().max(1.0),
                "dims {dims:?}, element {i}: autograd {} vs finite difference {fd}",
                grad[i]
            );
            nonzero += usize::from(grad[i] != 0.0);
        }
        assert!(nonzero > 0, "dims {dims:?}: gradient is all zeros");
    }

    const SHAPES: [[usize; 4]; 4] = [[1, 3, 7, 9], [2, 5, 9, 9], [2, 3, 19, 19], [1, 5, 8, 8]];

    /// The tiled fast path (kernel == stride over a contiguous plane) against the general
    /// path, which a non-contiguous layout of the same values takes: equal outputs and
    /// gradients, ties (a constant plane) and odd trailing rows included.
    #[test]
    fn tiled_max_pool_equals_the_general_path() {
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let mut data: Vec<f64> = (0..2 * 3 * 7 * 9).map(|_| rng.random_range(-1.0..1.0)).collect();
        data[..63].iter_mut().for_each(|v| *v = 0.5);
        for kernel in [2, 3] {
            let contiguous = Var::from_tensor(&Tensor::from_vec(data.clone(), (2, 3, 7, 9), &dev).unwrap()).unwrap();
            // Stored as (N, C, W, H) and viewed back: same values, strided planes.
            let transposed = Tensor::from_vec(data.clone(), (2, 3, 7, 9), &dev)
                .unwrap()
                .transpose(2, 3)
                .unwrap()
                .contiguous()
                .unwrap();
            let strided = Var::from_tensor(&transposed).unwrap();
            let strided_view = strided.transpose(2, 3).unwrap();
            assert!(!strided_view.is_contiguous());
            let fast = max_pool2d(&contiguous, kernel, kernel, 0).unwrap();
            let general = max_pool2d(&strided_view, kernel, kernel, 0).unwrap();
            assert_eq!(values(&fast), values(&general), "kernel {kernel} forward");
            let probe = Tensor::from_vec(
                (0..fast.elem_count()).map(|i| i as f64).collect::<Vec<_>>(),
                fast.shape(),
                &dev,
            )
            .unwrap();
            let g_fast = (&fast * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g_general = (&general * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g_general = g_general.get(&strided).unwrap().transpose(2, 3).unwrap();
            assert_eq!(
                values(g_fast.get(&contiguous).unwrap()),
                values(&g_general),
                "kernel {kernel} gradient"
            );
        }
    }

    #[test]
    fn max_pool_forward_hand_computed() {
        let x = arange(&[1, 1, 4, 4]);
        let y = max_pool2d(&x, 2, 2, 0).unwrap();
        assert_eq!(y.dims(), &[1, 1, 2, 2]);
        assert_eq!(values(&y), [5.0, 7.0, 13.0, 15.0]);

        // 3x3 stride 1 padding 1 keeps the size; each output is its 3x3 neighbourhood's max.
        let y = max_pool2d(&arange(&[1, 1, 3, 3]), 3, 1, 1).unwrap();
        assert_eq!(values(&y), [4.0, 5.0, 5.0, 7.0, 8.0, 8.0, 7.0, 8.0, 8.0]);
    }

    #[test]
    fn max_pool_padding_counts_as_negative_infinity() {
        // All inputs negative: zero padding would leak 0.0 into the border windows.
        let x = arange(&[1, 1, 4, 4]).neg().unwrap().affine(1.0, -1.0).unwrap();
        let y = max_pool2d(&x, 3, 2, 1).unwrap();
        assert_eq!(y.dims(), &[1, 1, 2, 2]);
        assert_eq!(values(&y), [-1.0, -2.0, -5.0, -6.0]);
    }

    #[test]
    fn max_pool_propagates_nan() {
        let x = tensor(&[1.0, f64::NAN, 3.0, 2.0], &[1, 1, 2, 2]);
        assert!(values(&max_pool2d(&x, 2, 2, 0).unwrap())[0].is_nan());

        // The separable path of contiguous planes against the per-window scan of a
        // strided view of the same values: NaN exactly where a window holds one.
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut data = uniform(&mut rng, 7 * 9);
        (data[10], data[40]) = (f64::NAN, f64::NAN);
        let x = tensor(&data, &[1, 1, 7, 9]);
        let view = x
            .transpose(2, 3)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        assert!(!view.is_contiguous());
        let (fast, scanned) = (
            values(&max_pool2d(&x, 3, 2, 1).unwrap()),
            values(&max_pool2d(&view, 3, 2, 1).unwrap()),
        );
        assert!(fast.iter().any(|v| v.is_nan()) && fast.iter().any(|v| !v.is_nan()));
        for (a, b) in fast.iter().zip(&scanned) {
            assert!(a == b || (a.is_nan() && b.is_nan()), "{fast:?} vs {scanned:?}");
        }
    }

    #[test]
    fn avg_pool_forward_hand_computed() {
        let y = avg_pool2d(&arange(&[1, 1, 4, 4]), 2, 2).unwrap();
        assert_eq!(values(&y), [2.5, 4.5, 10.5, 12.5]);

        // 5x5 -> 2x2: the last row and column fit no window and are ignored.
        let y = avg_pool2d(&arange(&[1, 1, 5, 5]), 2, 2).unwrap();
        assert_eq!(y.dims(), &[1, 1, 2, 2]);
        assert_eq!(values(&y), [3.0, 5.0, 13.0, 15.0]);
    }

    #[test]
    fn forward_matches_candle_without_padding() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for dims in SHAPES {
            let x64 = tensor(&uniform(&mut rng, dims.iter().product()), &dims);
            for dtype in [DType::F32, DType::F64] {
                let x = x64.to_dtype(dtype).unwrap();
                for (kernel, stride) in [(2, 2), (3, 2), (3, 1), (3, 3)] {
                    let ours = max_pool2d(&x, kernel, stride, 0).unwrap();
                    let theirs = x.max_pool2d_with_stride(kernel, stride).unwrap();
                    assert_eq!(ours.dtype(), dtype);
                    assert_eq!(ours.dims(), theirs.dims());
                    assert_eq!(values(&ours), values(&theirs), "max {dims:?} {kernel}/{stride}");

                    let ours = avg_pool2d(&x, kernel, stride).unwrap();
                    let theirs = x.avg_pool2d_with_stride(kernel, stride).unwrap();
                    assert_eq!(ours.dims(), theirs.dims());
                    for (a, b) in values(&ours).iter().zip(values(&theirs)) {
                        assert!((a - b).abs() <= 1e-6, "avg {dims:?} {kernel}/{stride}");
                    }
                }
            }
        }
    }

    #[test]
    fn max_pool_grad_matches_finite_differences() {
        for (seed, dims) in SHAPES.iter().enumerate() {
            for (kernel, stride, padding) in [(3, 2, 1), (2, 2, 0), (3, 1, 1)] {
                let pool = move |x: &Tensor| max_pool2d(x, kernel, stride, padding);
                check_grad(&pool, dims, seed as u64);
            }
        }
    }

    #[test]
    fn avg_pool_grad_matches_finite_differences() {
        for (seed, dims) in SHAPES.iter().enumerate() {
            for (kernel, stride) in [(2, 2), (3, 2), (3, 3)] {
                let pool = move |x: &Tensor| avg_pool2d(x, kernel, stride);
                check_grad(&pool, dims, 100 + seed as u64);
            }
        }
    }

    #[test]
    fn grads_of_strided_inputs_match_finite_differences() {
        // Transposed and narrowed views reach the kernels with non-trivial strides/offsets.
        let max = |x: &Tensor| max_pool2d(&x.transpose(2, 3)?.narrow(2, 1, 8)?, 3, 2, 1);
        check_grad(&max, &[2, 3, 7, 9], 7);
        let avg = |x: &Tensor| avg_pool2d(&x.transpose(2, 3)?.narrow(3, 1, 6)?, 2, 2);
        check_grad(&avg, &[2, 3, 7, 9], 8);
    }

    #[test]
    fn strided_input_matches_contiguous_input() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let x = tensor(&uniform(&mut rng, 2 * 3 * 9 * 7), &[2, 3, 9, 7]);
        let view = x.transpose(2, 3).unwrap().narrow(3, 1, 7).unwrap();
        assert!(!view.is_contiguous());
        let copy = view.contiguous().unwrap();
        assert_eq!(
            values(&max_pool2d(&view, 3, 2, 1).unwrap()),
            values(&max_pool2d(&copy, 3, 2, 1).unwrap())
        );
        assert_eq!(
            values(&avg_pool2d(&view, 2, 2).unwrap()),
            values(&avg_pool2d(&copy, 2, 2).unwrap())
        );
    }

    #[test]
    fn max_pool_2x2_gradient_at_window_max_is_one() {
        for dtype in [DType::F32, DType::F64] {
            let x = arange(&[1, 1, 4, 4]).to_dtype(dtype).unwrap();
            let grad = grad_of(&|x: &Tensor| max_pool2d(x, 2, 2, 0), &x);
            assert_eq!(grad.dtype(), dtype);
            #[rustfmt::skip]
            let expected = [
                0.0, 0.0, 0.0, 0.0,
                0.0, 1.0, 0.0, 1.0,
                0.0, 0.0, 0.0, 0.0,
                0.0, 1.0, 0.0, 1.0,
            ];
            assert_eq!(values(&grad), expected);
        }
    }

    #[test]
    fn max_pool_gradient_accumulates_over_overlapping_windows() {
        // The centre is the maximum of all nine 3x3 windows.
        let x = tensor(&[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0], &[1, 1, 3, 3]);
        let grad = grad_of(&|x: &Tensor| max_pool2d(x, 3, 1, 1), &x);
        let mut expected = [0.0; 9];
        expected[4] = 9.0;
        assert_eq!(values(&grad), expected);
    }

    #[test]
    fn max_pool_ties_send_gradient_to_first_in_scan_order() {
        let x = Tensor::ones((1, 1, 4, 4), DType::F64, &Device::Cpu).unwrap();
        let grad = grad_of(&|x: &Tensor| max_pool2d(x, 2, 2, 0), &x);
        #[rustfmt::skip]
        let expected = [
            1.0, 0.0, 1.0, 0.0,
            0.0, 0.0, 0.0, 0.0,
            1.0, 0.0, 1.0, 0.0,
            0.0, 0.0, 0.0, 0.0,
        ];
        assert_eq!(values(&grad), expected);
    }

    #[test]
    fn avg_pool_19x19_drops_last_row_and_column() {
        let x = arange(&[2, 3, 19, 19]);
        let y = avg_pool2d(&x, 2, 2).unwrap();
        assert_eq!(y.dims(), &[2, 3, 9, 9]);
        let grad = values(&grad_of(&|x: &Tensor| avg_pool2d(x, 2, 2), &x));
        for plane in grad.chunks(19 * 19) {
            for (i, &g) in plane.iter().enumerate() {
                let (h, w) = (i / 19, i % 19);
                let expected = if h == 18 || w == 18 { 0.0 } else { 0.25 };
                assert_eq!(g, expected, "row {h}, column {w}");
            }
        }
    }

    #[test]
    fn invalid_arguments_are_errors() {
        let x = arange(&[1, 1, 4, 4]);
        let cases = [
            ("kernel 0", max_pool2d(&x, 0, 1, 0)),
            ("stride 0", max_pool2d(&x, 2, 0, 0)),
            ("padding > kernel / 2", max_pool2d(&x, 3, 1, 2)),
            ("output size 0", max_pool2d(&x, 5, 1, 0)),
            ("rank 3", max_pool2d(&x.squeeze(0).unwrap(), 2, 2, 0)),
            ("rank 5", max_pool2d(&x.unsqueeze(0).unwrap(), 2, 2, 0)),
            ("empty spatial dim", max_pool2d(&x.narrow(3, 0, 0).unwrap(), 2, 2, 1)),
            ("avg kernel 0", avg_pool2d(&x, 0, 1)),
            ("avg stride 0", avg_pool2d(&x, 2, 0)),
            ("avg output size 0", avg_pool2d(&x, 5, 5)),
            ("avg rank 3", avg_pool2d(&x.squeeze(0).unwrap(), 2, 2)),
        ];
        for (case, result) in cases {
            let err = result.expect_err(case).to_string();
            assert!(err.contains("pool2d"), "{case}: {err}");
        }
    }

    #[test]
    fn non_float_dtypes_are_errors() {
        let x = arange(&[1, 1, 4, 4]);
        for dtype in [DType::U32, DType::I64, DType::F16] {
            let x = x.to_dtype(dtype).unwrap();
            let err = max_pool2d(&x, 2, 2, 0).unwrap_err().to_string();
            assert!(
                err.contains("max_pool2d") && err.contains(&format!("{dtype:?}")),
                "{err}"
            );
            let err = avg_pool2d(&x, 2, 2).unwrap_err().to_string();
            assert!(
                err.contains("avg_pool2d") && err.contains(&format!("{dtype:?}")),
                "{err}"
            );
        }
    }
}

//! 2-D convolution (no bias, no groups, no dilation) as im2col + GEMM, forward and backward.
//!
//! candle 0.11.1 runs CPU convolutions through a tiled direct loop, its input gradient
//! through a naive transposed convolution and its weight gradient as a convolution whose
//! "kernel" is the whole output gradient. DenseNet121 spends most of a training step
//! there. Here all three are one matrix product per image on the `gemm` crate (which
//! picks AVX-512, AVX2/FMA, NEON or SIMD128 at run time; the browser's relaxed-SIMD
//! builds use our own fused kernel, `fused_gemm`): a 1×1 convolution with stride 1
//! multiplies the image directly, other kernels first unfold it (im2col) and fold the
//! input gradient back (col2im).
//!
//! Threads: with at least as many images as threads, each thread takes whole images
//! and runs its products single-threaded (no synchronisation inside the product);
//! with fewer (inference at batch 1), images run one after the other and each
//! product uses every thread.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;

use super::float_op;
use rayon::prelude::*;

/// `xs` (N, C, H, W) convolved with `weight` (O, C, KH, KW): PyTorch's `conv2d` with
/// zero padding on every side, `bias=None`, `dilation=1`, `groups=1`.
pub fn conv2d(xs: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let geometry = Geometry::new(xs.dims(), weight.dims(), padding, stride)?;
    xs.contiguous()?.apply_op2(&weight.contiguous()?, Conv2d(geometry))
}

/// Sizes of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) batch: usize,
    pub(crate) in_channels: usize,
    pub(crate) in_h: usize,
    pub(crate) in_w: usize,
    pub(crate) out_channels: usize,
    pub(crate) kernel_h: usize,
    pub(crate) kernel_w: usize,
    pub(crate) padding: usize,
    pub(crate) stride: usize,
    pub(crate) out_h: usize,
    pub(crate) out_w: usize,
}

impl Geometry {
    pub(crate) fn new(xs: &[usize], weight: &[usize], padding: usize, stride: usize) -> Result<Self> {
        let &[batch, in_channels, in_h, in_w] = xs else {
            bail!("conv2d: expected an NCHW (rank 4) input, got shape {xs:?}")
        };
        let &[out_channels, weight_channels, kernel_h, kernel_w] = weight else {
            bail!("conv2d: expected an (O, C, KH, KW) weight, got shape {weight:?}")
        };
        if weight_channels != in_channels {
            bail!("conv2d: the weight expects {weight_channels} input channels, the input has {in_channels}")
        }
        if stride == 0 || kernel_h == 0 || kernel_w == 0 {
            bail!("conv2d: kernel {kernel_h}x{kernel_w} and stride {stride} must be positive")
        }
        if in_h + 2 * padding < kernel_h || in_w + 2 * padding < kernel_w {
            bail!("conv2d: input {in_h}x{in_w} with padding {padding} is smaller than the kernel {kernel_h}x{kernel_w}")
        }
        Ok(Self {
            batch,
            in_channels,
            in_h,
            in_w,
            out_channels,
            kernel_h,
            kernel_w,
            padding,
            stride,
            out_h: (in_h + 2 * padding - kernel_h) / stride + 1,
            out_w: (in_w + 2 * padding - kernel_w) / stride + 1,
        })
    }

    /// A 1×1 kernel with stride 1 and no padding reads the image as it is.
    pub(crate) fn is_pointwise(&self) -> bool {
        self.kernel_h == 1 && self.kernel_w == 1 && self.stride == 1 && self.padding == 0
    }

    pub(crate) fn image_len(&self) -> usize {
        self.in_channels * self.in_h * self.in_w
    }

    pub(crate) fn out_pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Rows of the unfolded image: one per (channel, kernel row, kernel column).
    pub(crate) fn patch_len(&self) -> usize {
        self.in_channels * self.kernel_h * self.kernel_w
    }

    pub(crate) fn out_image_len(&self) -> usize {
        self.out_channels * self.out_pixels()
    }

    pub(crate) fn in_shape(&self) -> Shape {
        Shape::from((self.batch, self.in_channels, self.in_h, self.in_w))
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.batch, self.out_channels, self.out_h, self.out_w))
    }

    pub(crate) fn weight_shape(&self) -> Shape {
        Shape::from((self.out_channels, self.in_channels, self.kernel_h, self.kernel_w))
    }

    /// Input index along one axis for output position `out` and kernel offset `k`,
    /// or `None` where it falls in the padding.
    fn source(&self, out: usize, k: usize, len: usize) -> Option<usize> {
        (out * self.stride + k).checked_sub(self.padding).filter(|&i| i < len)
    }
}

pub(crate) use super::Float;

pub(crate) fn threads() -> usize {
    // candle counts RAYON_NUM_THREADS or the machine's cores; a browser has
    // neither, and there the pool the page started (one thread without it) is the budget.
    #[cfg(target_arch = "wasm32")]
    return rayon::current_num_threads();
    #[cfg(not(target_arch = "wasm32"))]
    candle_core::utils::get_num_threads().max(1)
}

/// Images split between threads when there are enough of them; otherwise the
/// product itself is parallel.
pub(crate) fn split_by_image(batch: usize) -> bool {
    threads() > 1 && batch >= threads()
}

pub(crate) fn gemm_parallelism(inner: bool) -> Parallelism {
    let threads = threads();
    if inner || threads == 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    }
}

/// Row-major matrix view: `rows`×`cols` starting at `ptr` with the given strides.
#[derive(Clone, Copy)]
pub(crate) struct Mat<T> {
    ptr: *const T,
    row_stride: isize,
    col_stride: isize,
}

impl<T> Mat<T> {
    pub(crate) fn rows(ptr: *const T, cols: usize) -> Self {
        Self {
            ptr,
            row_stride: cols as isize,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns stored at `ptr`.
    pub(crate) fn transposed(ptr: *const T, cols: usize) -> Self {
        Self {
            ptr,
            row_stride: 1,
            col_stride: cols as isize,
        }
    }

    pub(crate) fn strided(ptr: *const T, row_stride: usize, col_stride: usize) -> Self {
        Self {
            ptr,
            row_stride: row_stride as isize,
            col_stride: col_stride as isize,
        }
    }
}

/// `dst (m×n, row-major) = lhs (m×k) · rhs (k×n)`, or `+=` when `accumulate`.
// The GEMM's own shape parameters; a struct for them would only be unpacked again.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<T: Float>(
    dst: &mut [T],
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat<T>,
    rhs: Mat<T>,
    accumulate: bool,
    parallelism: Parallelism,
) {
    assert_eq!(dst.len(), m * n, "destination size");
    matmul_strided(dst, (n, 1), m, n, k, lhs, rhs, accumulate, parallelism)
}

/// [`matmul`] into a destination with its own (row, column) strides, e.g. one
/// tap `[.., .., ky, kx]` of a convolution kernel's gradient.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_strided<T: Float>(
    dst: &mut [T],
    (dst_row_stride, dst_col_stride): (usize, usize),
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat<T>,
    rhs: Mat<T>,
    accumulate: bool,
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = (m - 1) * dst_row_stride + (n - 1) * dst_col_stride;
    assert!(
        last < dst.len(),
        "destination of {} elements, {m}x{n} with strides ({dst_row_stride}, {dst_col_stride})",
        dst.len()
    );
    #[cfg(all(target_arch = "wasm32", feature = "relaxed-simd"))]
    if T::DTYPE == candle_core::DType::F32 {
        use super::fused_gemm::{self, Relaxed, Strided};
        // Only f32 has the dtype F32, so the casts keep the element type.
        fn strided<P>(ptr: P, row_stride: isize, col_stride: isize) -> Strided<P> {
            Strided {
                ptr,
                row_stride,
                col_stride,
            }
        }
        // SAFETY: as for gemm below; the module was loaded after a relaxed-SIMD probe.
        unsafe {
            fused_gemm::matmul::<Relaxed>(
                strided(
                    dst.as_mut_ptr().cast(),
                    dst_row_stride as isize,
                    dst_col_stride as isize,
                ),
                m,
                n,
                k,
                strided(lhs.ptr.cast(), lhs.row_stride, lhs.col_stride),
                strided(rhs.ptr.cast(), rhs.row_stride, rhs.col_stride),
                accumulate,
                parallelism,
            )
        };
        return;
    }
    // SAFETY: every destination element lies in `dst` (checked above) and the
    // callers build `lhs` and `rhs` from slices that hold m×k and k×n elements at
    // their strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_col_stride as isize,
            dst_row_stride as isize,
            accumulate,
            lhs.ptr,
            lhs.col_stride,
            lhs.row_stride,
            rhs.ptr,
            rhs.col_stride,
            rhs.row_stride,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Output columns `ox` whose input column `ox·stride + kx - padding` lies inside the
/// image: a contiguous range, so rows are copied as slices instead of element by element.
fn valid_columns(g: &Geometry, kx: usize) -> std::ops::Range<usize> {
    let first = g.padding.saturating_sub(kx).div_ceil(g.stride);
    let last = (g.in_w + g.padding)
        .checked_sub(kx + 1)
        .map_or(0, |max_shifted| max_shifted / g.stride + 1);
    first.min(g.out_w)..last.min(g.out_w).max(first.min(g.out_w))
}

/// Whether work outside the products should also be spread over threads: the
/// products are parallel, so no outer loop is.
pub(crate) fn is_parallel(par: Parallelism) -> bool {
    matches!(par, Parallelism::Rayon(n) if n > 1)
}

/// Unfolds one image (C, H, W) into `cols` (C·KH·KW, OH·OW), zeros where a window
/// reaches into the padding; rows across threads if `par` is parallel.
pub(crate) fn im2col<T: Float>(g: &Geometry, image: &[T], cols: &mut [T], par: Parallelism) {
    let fill_row = |(row, cols_row): (usize, &mut [T])| {
        let channel = row / (g.kernel_h * g.kernel_w);
        let ky = row / g.kernel_w % g.kernel_h;
        let kx = row % g.kernel_w;
        let plane = &image[channel * g.in_h * g.in_w..][..g.in_h * g.in_w];
        let valid = valid_columns(g, kx);
        for (oy, out_row) in cols_row.chunks_exact_mut(g.out_w).enumerate() {
            let Some(iy) = g.source(oy, ky, g.in_h) else {
                out_row.fill(T::zero());
                continue;
            };
            let in_row = &plane[iy * g.in_w..][..g.in_w];
            out_row[..valid.start].fill(T::zero());
            out_row[valid.end..].fill(T::zero());
            if valid.is_empty() {
                continue;
            }
            let first_ix = valid.start * g.stride + kx - g.padding;
            let dst = &mut out_row[valid.clone()];
            if g.stride == 1 {
                dst.copy_from_slice(&in_row[first_ix..][..dst.len()]);
            } else {
                for (value, &x) in dst.iter_mut().zip(in_row[first_ix..].iter().step_by(g.stride)) {
                    *value = x;
                }
            }
        }
    };
    let out_pixels = g.out_pixels();
    if is_parallel(par) {
        cols.par_chunks_exact_mut(out_pixels).enumerate().for_each(fill_row);
    } else {
        cols.chunks_exact_mut(out_pixels).enumerate().for_each(fill_row);
    }
}

/// The adjoint of [`im2col`]: adds every column entry back onto the pixel it came
/// from; channels across threads if `par` is parallel.
pub(crate) fn col2im<T: Float>(g: &Geometry, cols: &[T], image: &mut [T], par: Parallelism) {
    let out_pixels = g.out_pixels();
    let taps = g.kernel_h * g.kernel_w;
    let fold_channel = |(plane, channel_cols): (&mut [T], &[T])| {
        plane.fill(T::zero());
        for (tap, cols_row) in channel_cols.chunks_exact(out_pixels).enumerate() {
            let (ky, kx) = (tap / g.kernel_w, tap % g.kernel_w);
            let valid = valid_columns(g, kx);
            if valid.is_empty() {
                continue;
            }
            let first_ix = valid.start * g.stride + kx - g.padding;
            for (oy, out_row) in cols_row.chunks_exact(g.out_w).enumerate() {
                let Some(iy) = g.source(oy, ky, g.in_h) else { continue };
                let in_row = &mut plane[iy * g.in_w..][..g.in_w];
                let src = &out_row[valid.clone()];
                for (x, &value) in in_row[first_ix..].iter_mut().step_by(g.stride).zip(src) {
                    *x += value;
                }
            }
        }
    };
    let plane_len = g.in_h * g.in_w;
    if is_parallel(par) {
        image
            .par_chunks_exact_mut(plane_len)
            .zip(cols.par_chunks_exact(taps * out_pixels))
            .for_each(fold_channel);
    } else {
        image
            .chunks_exact_mut(plane_len)
            .zip(cols.chunks_exact(taps * out_pixels))
            .for_each(fold_channel);
    }
}

/// Runs `per_image(image index, scratch)` for every image, across threads when there
/// are enough images; `scratch` is an im2col buffer reused within a thread.
fn for_each_image<T: Float, F>(g: &Geometry, outputs: &mut [T], out_len: usize, per_image: F)
where
    F: Fn(usize, &mut [T], &mut Vec<T>, Parallelism) + Sync,
{
    let scratch_len = if g.is_pointwise() {
        0
    } else {
        g.patch_len() * g.out_pixels()
    };
    if split_by_image(g.batch) {
        outputs.par_chunks_mut(out_len).enumerate().for_each_init(
            || vec![T::zero(); scratch_len],
            |scratch, (n, out)| per_image(n, out, scratch, gemm_parallelism(true)),
        );
    } else {
        let mut scratch = vec![T::zero(); scratch_len];
        for (n, out) in outputs.chunks_mut(out_len).enumerate() {
            per_image(n, out, &mut scratch, gemm_parallelism(false));
        }
    }
}

fn forward<T: Float>(g: &Geometry, xs: &[T], weight: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); g.batch * g.out_image_len()];
    for_each_image(g, &mut out, g.out_image_len(), |n, out, scratch, par| {
        let image = &xs[n * g.image_len()..][..g.image_len()];
        let cols = if g.is_pointwise() {
            image
        } else {
            im2col(g, image, scratch, par);
            &scratch[..]
        };
        let w = Mat::rows(weight.as_ptr(), g.patch_len());
        let c = Mat::rows(cols.as_ptr(), g.out_pixels());
        matmul(out, g.out_channels, g.out_pixels(), g.patch_len(), w, c, false, par);
    });
    out
}

/// dL/dx = col2im(Wᵀ · dL/dy), image by image.
fn input_grad<T: Float>(g: &Geometry, grad: &[T], weight: &[T]) -> Vec<T> {
    let mut dx = vec![T::zero(); g.batch * g.image_len()];
    for_each_image(g, &mut dx, g.image_len(), |n, dx, scratch, par| {
        let grad = &grad[n * g.out_image_len()..][..g.out_image_len()];
        let w_t = Mat::transposed(weight.as_ptr(), g.patch_len());
        let dy = Mat::rows(grad.as_ptr(), g.out_pixels());
        if g.is_pointwise() {
            matmul(dx, g.patch_len(), g.out_pixels(), g.out_channels, w_t, dy, false, par);
        } else {
            matmul(
                scratch,
                g.patch_len(),
                g.out_pixels(),
                g.out_channels,
                w_t,
                dy,
                false,
                par,
            );
            col2im(g, scratch, dx, par);
        }
    });
    dx
}

/// dL/dW = Σₙ dL/dyₙ · im2col(xₙ)ᵀ. With images split between threads, each thread
/// sums its own images and the partial sums are added at the end.
fn weight_grad<T: Float>(g: &Geometry, xs: &[T], grad: &[T]) -> Vec<T> {
    let weight_len = g.out_channels * g.patch_len();
    let accumulate = |dw: &mut [T], images: std::ops::Range<usize>, scratch: &mut Vec<T>, par| {
        for n in images.clone() {
            let image = &xs[n * g.image_len()..][..g.image_len()];
            let cols = if g.is_pointwise() {
                image
            } else {
                im2col(g, image, scratch, par);
                &scratch[..]
            };
            let dy = Mat::rows(grad[n * g.out_image_len()..].as_ptr(), g.out_pixels());
            let cols_t = Mat::transposed(cols.as_ptr(), g.out_pixels());
            matmul(
                dw,
                g.out_channels,
                g.patch_len(),
                g.out_pixels(),
                dy,
                cols_t,
                n > images.start,
                par,
            );
        }
    };
    let scratch_len = if g.is_pointwise() {
        0
    } else {
        g.patch_len() * g.out_pixels()
    };
    if split_by_image(g.batch) {
        let parts = threads();
        let per_part = g.batch.div_ceil(parts);
        let partials: Vec<Vec<T>> = (0..parts)
            .into_par_iter()
            .map(|part| {
                let images = part * per_part..((part + 1) * per_part).min(g.batch);
                let mut dw = vec![T::zero(); weight_len];
                if !images.is_empty() {
                    accumulate(
                        &mut dw,
                        images,
                        &mut vec![T::zero(); scratch_len],
                        gemm_parallelism(true),
                    );
                }
                dw
            })
            .collect();
        add_up(partials)
    } else {
        let mut dw = vec![T::zero(); weight_len];
        accumulate(
            &mut dw,
            0..g.batch,
            &mut vec![T::zero(); scratch_len],
            gemm_parallelism(false),
        );
        dw
    }
}

/// The element-wise sum of per-thread partial results (empty if there are none).
pub(crate) fn add_up<T: Copy + std::ops::AddAssign>(parts: impl IntoIterator<Item = Vec<T>>) -> Vec<T> {
    let mut parts = parts.into_iter();
    let mut total = parts.next().unwrap_or_default();
    for part in parts {
        total.iter_mut().zip(&part).for_each(|(a, &b)| *a += b);
    }
    total
}

struct Conv2d(Geometry);

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let out = float_op!(self.name(), [(s1, l1) => xs, (s2, l2) => weight], forward(g, xs, weight));
        Ok((out, g.out_shape()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // A network's first convolution reads the images, which need no gradient:
        // skipping it spares a product and a col2im as large as the forward pass.
        let dx = xs
            .track_op()
            .then(|| grad.apply_op2_no_bwd(weight, &Conv2dInputGrad(self.0)))
            .transpose()?;
        let dw = weight
            .track_op()
            .then(|| xs.apply_op2_no_bwd(&grad, &Conv2dWeightGrad(self.0)))
            .transpose()?;
        Ok((dx, dw))
    }
}

/// (grad of the output, weight) → grad of the input.
struct Conv2dInputGrad(Geometry);

impl CustomOp2 for Conv2dInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-gemm-input-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let dx = float_op!(self.name(), [(s1, l1) => grad, (s2, l2) => weight], input_grad(g, grad, weight));
        Ok((dx, g.in_shape()))
    }
}

/// (input, grad of the output) → grad of the weight.
struct Conv2dWeightGrad(Geometry);

impl CustomOp2 for Conv2dWeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-gemm-weight-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let dw = float_op!(self.name(), [(s1, l1) => xs, (s2, l2) => grad], weight_grad(g, xs, grad));
        Ok((dw, g.weight_shape()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    pub(crate) use crate::testing::max_abs_diff;
    use crate::testing::uniform;
    use candle_core::{DType, Var};

    /// Uniform values in [-1, 1) from `seed`, as `dtype`.
    pub(crate) fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        uniform(shape, seed, -1.0, 1.0).to_dtype(dtype).unwrap()
    }

    /// Ours against candle's reference convolution (and its autograd), in f64 so that
    /// the comparison measures the algorithm and not rounding: 1e-10.
    fn check(
        batch: usize,
        channels: usize,
        side: (usize, usize),
        out: usize,
        kernel: usize,
        padding: usize,
        stride: usize,
    ) {
        let dtype = DType::F64;
        let xs = Var::from_tensor(&random(&[batch, channels, side.0, side.1], 1, dtype)).unwrap();
        let w = Var::from_tensor(&random(&[out, channels, kernel, kernel], 2, dtype)).unwrap();
        let ours = conv2d(&xs, &w, padding, stride).unwrap();
        let reference = xs.conv2d(&w, padding, stride, 1, 1).unwrap();
        assert_eq!(ours.dims(), reference.dims());
        let what = format!("batch {batch} channels {channels} side {side:?} out {out} kernel {kernel} padding {padding} stride {stride}");
        assert!(max_abs_diff(&ours, &reference) < 1e-10, "forward {what}");

        // A random projection of the output makes every output element's gradient differ.
        let probe = random(ours.dims(), 3, dtype);
        let g_ours = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (&reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("input", &xs), ("weight", &w)] {
            let a = g_ours.get(var).unwrap();
            let b = g_ref.get(var).unwrap();
            assert!(max_abs_diff(a, b) < 1e-10, "{name} gradient {what}");
        }
    }

    #[test]
    fn matches_candle_forward_and_gradients_on_awkward_shapes() {
        // Odd sides, batch 1, channel counts off the vector width, every DenseNet kernel.
        // Strided cases are square: candle's own input gradient takes the output padding
        // of both axes from the height, so it cannot serve as the reference otherwise.
        check(1, 3, (9, 9), 5, 7, 3, 2); // the stem
        check(2, 5, (11, 10), 7, 3, 1, 1); // a dense layer's 3x3
        check(3, 17, (5, 5), 9, 1, 0, 1); // a 1x1 bottleneck
        check(2, 4, (7, 7), 3, 1, 0, 2); // 1x1 with stride
        check(1, 2, (4, 4), 3, 3, 0, 1); // no padding
        check(5, 3, (8, 8), 2, 3, 1, 2); // strided 3x3, more images than threads
        check(1, 1, (3, 3), 1, 3, 2, 1); // padding larger than needed
    }

    #[test]
    fn an_input_without_gradient_gets_none_and_the_weight_still_its_own() {
        let xs = random(&[2, 3, 9, 9], 1, DType::F64);
        let w = Var::from_tensor(&random(&[4, 3, 7, 7], 2, DType::F64)).unwrap();
        let ours = conv2d(&xs, &w, 3, 2).unwrap();
        let probe = random(ours.dims(), 3, DType::F64);
        let grads = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&xs).is_none(), "a gradient was computed for the images");
        let reference = xs.conv2d(&w, 3, 2, 1, 1).unwrap();
        let expected = (&reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_abs_diff(grads.get(&w).unwrap(), expected.get(&w).unwrap()) < 1e-10);
    }

    #[test]
    fn f32_agrees_with_candle_within_rounding() {
        let xs = random(&[2, 33, 19, 19], 4, DType::F32);
        let w = random(&[32, 33, 3, 3], 5, DType::F32);
        let ours = conv2d(&xs, &w, 1, 1).unwrap();
        let reference = xs.conv2d(&w, 1, 1, 1, 1).unwrap();
        // 297-term sums of values in [-1, 1]: f32 rounding stays far below 1e-4.
        assert!(max_abs_diff(&ours, &reference) < 1e-4);
    }

    #[test]
    fn valid_columns_are_exactly_those_inside_the_image() {
        for in_w in 1..9 {
            for kernel in 1..6 {
                for padding in 0..4 {
                    for stride in 1..4 {
                        let Ok(g) = Geometry::new(&[1, 1, in_w, in_w], &[1, 1, kernel, kernel], padding, stride) else {
                            continue;
                        };
                        for kx in 0..kernel {
                            let expected: Vec<usize> =
                                (0..g.out_w).filter(|&ox| g.source(ox, kx, in_w).is_some()).collect();
                            let got: Vec<usize> = valid_columns(&g, kx).collect();
                            assert_eq!(
                                got, expected,
                                "in {in_w} kernel {kernel} padding {padding} stride {stride} kx {kx}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let xs = random(&[1, 3, 4, 4], 1, DType::F32);
        assert!(conv2d(&xs, &random(&[2, 4, 3, 3], 2, DType::F32), 1, 1).is_err());
        assert!(conv2d(&xs, &random(&[2, 3, 7, 7], 2, DType::F32), 1, 1).is_err());
        assert!(conv2d(&xs, &random(&[2, 3, 3, 3], 2, DType::F32), 1, 0).is_err());
        assert!(conv2d(
            &random(&[3, 4, 4], 1, DType::F32),
            &random(&[2, 3, 3, 3], 2, DType::F32),
            1,
            1
        )
        .is_err());
    }
}

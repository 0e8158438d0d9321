//! One layer of the study's CNN as one op: `max_pool_2x2(relu(conv2d(x, W) + b))`,
//! forward and backward.
//!
//! As three ops, a layer writes the convolution's output and the ReLU's, each the
//! layer's full resolution times its channels (46 MB a batch of 32 for the first layer
//! at 150 px), and its backward pass reads them back and writes their gradients, each
//! into a zero-filled accumulator of candle's. With 1×1 kernels the CNN does so little
//! arithmetic that this memory traffic was most of its training step. Fused, each
//! image's convolution lives in a per-thread scratch buffer: the forward pass writes
//! only the pooled output, and the backward pass recomputes the image's convolution
//! (one small product, cheaper than storing and reading it back) and produces the
//! input, weight and bias gradients directly.
//!
//! Same results as the three ops: the pool takes each 2×2 tile's first maximum (scan
//! order, as PyTorch), floor mode drops a trailing odd row or column, and the ReLU
//! passes gradient where its output is positive.
//!
//! Threads: as in `conv`, whole images per thread when there are enough of them,
//! otherwise every product uses all threads.

use std::ops::Range;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::conv::{
    add_up, col2im, gemm_parallelism, im2col, is_parallel, matmul, split_by_image, threads, Geometry, Mat,
};
use super::{float_op, lane_dot, simd_fn, Float};

/// `max_pool2d(relu(conv2d(xs, weight, padding) + bias), 2, 2)`: stride 1, `bias` of
/// shape (O,), the pool's 2×2 windows at stride 2 in floor mode.
pub fn conv_relu_pool(xs: &Tensor, weight: &Tensor, bias: &Tensor, padding: usize) -> Result<Tensor> {
    let g = Geometry::new(xs.dims(), weight.dims(), padding, 1)?;
    if bias.dims() != [g.out_channels] {
        bail!(
            "conv-relu-pool: bias has shape {:?}, expected ({},)",
            bias.dims(),
            g.out_channels
        )
    }
    if g.batch == 0 {
        bail!("conv-relu-pool: the batch is empty")
    }
    if g.out_h < 2 || g.out_w < 2 {
        bail!(
            "conv-relu-pool: a {}x{} convolution output is smaller than the 2x2 pool",
            g.out_h,
            g.out_w
        )
    }
    xs.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, ConvReluPool(g))
}

#[inline(always)]
fn relu<T: Float>(v: T) -> T {
    if v > T::zero() {
        v
    } else {
        T::zero()
    }
}

#[inline(always)]
fn max<T: Float>(a: T, b: T) -> T {
    if b > a {
        b
    } else {
        a
    }
}

/// Pooled sides: floor mode.
fn pooled(g: &Geometry) -> (usize, usize) {
    (g.out_h / 2, g.out_w / 2)
}

fn pooled_image_len(g: &Geometry) -> usize {
    let (h, w) = pooled(g);
    g.out_channels * h * w
}

simd_fn! {
    /// One channel's pooled plane from its convolution plane (`width` columns).
    fn pool_plane<T: Float>(conv: &[T], width: usize, bias: T, out: &mut [T]) {
        let pooled_w = width / 2;
        for (row, out_row) in out.chunks_exact_mut(pooled_w).enumerate() {
            let top = &conv[2 * row * width..][..2 * pooled_w];
            let bottom = &conv[(2 * row + 1) * width..][..2 * pooled_w];
            for ((o, t), b) in out_row.iter_mut().zip(top.chunks_exact(2)).zip(bottom.chunks_exact(2)) {
                let (y0, y1, y2, y3) = (relu(t[0] + bias), relu(t[1] + bias), relu(b[0] + bias), relu(b[1] + bias));
                *o = max(max(y0, y1), max(y2, y3));
            }
        }
    }
}

simd_fn! {
    /// The gradient of [`pool_plane`] with respect to its convolution plane: each
    /// tile's output gradient goes to the tile's first maximum when the ReLU passed
    /// it (the maximum is positive), everything else gets zero. Returns the plane's
    /// sum, the bias's gradient from this plane.
    fn unpool_plane<T: Float>(conv: &[T], width: usize, bias: T, grad: &[T], d_conv: &mut [T]) -> f64 {
        let pooled_w = width / 2;
        let pooled_h = grad.len() / pooled_w;
        for (row, grad_row) in grad.chunks_exact(pooled_w).enumerate() {
            let (top, bottom) = (2 * row * width, (2 * row + 1) * width);
            let (d_top, d_bottom) = d_conv[top..bottom + width].split_at_mut(width);
            let tiles = conv[top..][..2 * pooled_w]
                .chunks_exact(2)
                .zip(conv[bottom..][..2 * pooled_w].chunks_exact(2))
                .zip(grad_row)
                .zip(d_top.chunks_exact_mut(2).zip(d_bottom.chunks_exact_mut(2)));
            for (((t, b), &g), (dt, db)) in tiles {
                let y = [relu(t[0] + bias), relu(t[1] + bias), relu(b[0] + bias), relu(b[1] + bias)];
                let m = max(max(y[0], y[1]), max(y[2], y[3]));
                let g = if m > T::zero() { g } else { T::zero() };
                let first = y[0] == m;
                let second = !first && y[1] == m;
                let third = !first && !second && y[2] == m;
                let fourth = !(first || second || third);
                let pick = |won: bool| if won { g } else { T::zero() };
                (dt[0], dt[1], db[0], db[1]) = (pick(first), pick(second), pick(third), pick(fourth));
            }
            // An odd width's last column is in no tile.
            if width % 2 == 1 {
                (d_top[width - 1], d_bottom[width - 1]) = (T::zero(), T::zero());
            }
        }
        // Nor is an odd height's last row.
        d_conv[2 * pooled_h * width..].fill(T::zero());
        lane_dot(d_conv, None)
    }
}

/// Per-thread buffers: the unfolded image (empty for a 1×1 kernel, which reads the
/// image as it is), one image's convolution and its gradient.
struct Scratch<T> {
    cols: Vec<T>,
    conv: Vec<T>,
    d_conv: Vec<T>,
}

impl<T: Float> Scratch<T> {
    fn new(g: &Geometry, backward: bool) -> Self {
        let conv_len = g.out_channels * g.out_pixels();
        Self {
            cols: vec![
                T::zero();
                if g.is_pointwise() {
                    0
                } else {
                    g.patch_len() * g.out_pixels()
                }
            ],
            conv: vec![T::zero(); conv_len],
            d_conv: vec![T::zero(); if backward { conv_len } else { 0 }],
        }
    }
}

/// `scratch.conv = W · unfold(image)`; returns the unfolded image.
fn convolve<'a, T: Float>(
    g: &Geometry,
    image: &'a [T],
    weight: &[T],
    cols: &'a mut [T],
    conv_out: &mut [T],
    par: Parallelism,
) -> &'a [T] {
    let cols: &[T] = if g.is_pointwise() {
        image
    } else {
        im2col(g, image, cols, par);
        cols
    };
    let w = Mat::rows(weight.as_ptr(), g.patch_len());
    matmul(
        conv_out,
        g.out_channels,
        g.out_pixels(),
        g.patch_len(),
        w,
        Mat::rows(cols.as_ptr(), g.out_pixels()),
        false,
        par,
    );
    cols
}

fn forward<T: Float>(g: &Geometry, xs: &[T], weight: &[T], bias: &[T]) -> Vec<T> {
    let out_len = pooled_image_len(g);
    let (pooled_h, pooled_w) = pooled(g);
    let run = |n: usize, out: &mut [T], scratch: &mut Scratch<T>, par: Parallelism| {
        let image = &xs[n * g.image_len()..][..g.image_len()];
        convolve(g, image, weight, &mut scratch.cols, &mut scratch.conv, par);
        let pool = |(c, (conv, out)): (usize, (&[T], &mut [T]))| pool_plane(conv, g.out_w, bias[c], out);
        let (conv, plane) = (&scratch.conv, pooled_h * pooled_w);
        if is_parallel(par) {
            conv.par_chunks_exact(g.out_pixels())
                .zip(out.par_chunks_exact_mut(plane))
                .enumerate()
                .for_each(pool);
        } else {
            conv.chunks_exact(g.out_pixels())
                .zip(out.chunks_exact_mut(plane))
                .enumerate()
                .for_each(pool);
        }
    };
    let mut out = vec![T::zero(); g.batch * out_len];
    if split_by_image(g.batch) {
        out.par_chunks_mut(out_len).enumerate().for_each_init(
            || Scratch::new(g, false),
            |scratch, (n, out)| run(n, out, scratch, gemm_parallelism(true)),
        );
    } else {
        let mut scratch = Scratch::new(g, false);
        for (n, out) in out.chunks_mut(out_len).enumerate() {
            run(n, out, &mut scratch, gemm_parallelism(false));
        }
    }
    out
}

/// `[dx (only if wanted), dW, db]`, concatenated.
fn backward<T: Float>(g: &Geometry, xs: &[T], grad: &[T], weight: &[T], bias: &[T], want_dx: bool) -> Vec<T> {
    let parts = if split_by_image(g.batch) { threads() } else { 1 };
    let per_part = g.batch.div_ceil(parts);
    let par = gemm_parallelism(parts > 1);
    let ranges: Vec<Range<usize>> = (0..parts)
        .map(|p| p * per_part..((p + 1) * per_part).min(g.batch))
        .filter(|r| !r.is_empty())
        .collect();
    let mut dx = vec![T::zero(); if want_dx { g.batch * g.image_len() } else { 0 }];
    let dx_parts: Vec<&mut [T]> = if want_dx {
        dx.chunks_mut(per_part * g.image_len()).collect()
    } else {
        ranges.iter().map(|_| Default::default()).collect()
    };
    let (weight_len, pooled_len) = (weight.len(), pooled_image_len(g));
    let pooled_plane = pooled_len / g.out_channels;

    let partials: Vec<(Vec<T>, Vec<f64>)> = ranges
        .into_par_iter()
        .zip(dx_parts)
        .map(|(images, dx_part)| {
            let mut dw = vec![T::zero(); weight_len];
            let mut db = vec![0f64; g.out_channels];
            let mut scratch = Scratch::new(g, true);
            for (k, n) in images.enumerate() {
                let image = &xs[n * g.image_len()..][..g.image_len()];
                let cols = convolve(g, image, weight, &mut scratch.cols, &mut scratch.conv, par);
                let grad = &grad[n * pooled_len..][..pooled_len];
                let planes = scratch
                    .conv
                    .chunks_exact(g.out_pixels())
                    .zip(grad.chunks_exact(pooled_plane));
                for (c, ((conv, grad), d_conv)) in
                    planes.zip(scratch.d_conv.chunks_exact_mut(g.out_pixels())).enumerate()
                {
                    db[c] += unpool_plane(conv, g.out_w, bias[c], grad, d_conv);
                }
                let d_conv = Mat::rows(scratch.d_conv.as_ptr(), g.out_pixels());
                let cols_t = Mat::transposed(cols.as_ptr(), g.out_pixels());
                matmul(
                    &mut dw,
                    g.out_channels,
                    g.patch_len(),
                    g.out_pixels(),
                    d_conv,
                    cols_t,
                    k > 0,
                    par,
                );
                if want_dx {
                    let dx = &mut dx_part[k * g.image_len()..][..g.image_len()];
                    let w_t = Mat::transposed(weight.as_ptr(), g.patch_len());
                    if g.is_pointwise() {
                        matmul(
                            dx,
                            g.patch_len(),
                            g.out_pixels(),
                            g.out_channels,
                            w_t,
                            d_conv,
                            false,
                            par,
                        );
                    } else {
                        matmul(
                            &mut scratch.cols,
                            g.patch_len(),
                            g.out_pixels(),
                            g.out_channels,
                            w_t,
                            d_conv,
                            false,
                            par,
                        );
                        col2im(g, &scratch.cols, dx, par);
                    }
                }
            }
            (dw, db)
        })
        .collect();
    let (dws, dbs): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
    dx.extend(add_up(dws));
    dx.extend(add_up(dbs).into_iter().map(T::from_f64));
    dx
}

struct ConvReluPool(Geometry);

impl CustomOp3 for ConvReluPool {
    fn name(&self) -> &'static str {
        "conv-relu-pool"
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
        let g = &self.0;
        let out = float_op!(self.name(), [(s1, l1) => x, (s2, l2) => w, (s3, l3) => b], forward(g, x, w, b));
        let (h, w) = pooled(g);
        Ok((out, Shape::from((g.batch, g.out_channels, h, w))))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The first layer reads the images, which need no gradient.
        let want_dx = xs.track_op();
        let params = Tensor::cat(&[weight.flatten_all()?, bias.clone()], 0)?;
        let grads = xs.apply_op3_no_bwd(
            &grad.contiguous()?,
            &params,
            &ConvReluPoolGrad {
                geometry: self.0,
                want_dx,
            },
        )?;
        let dx_len = if want_dx { xs.elem_count() } else { 0 };
        let dx = want_dx
            .then(|| grads.narrow(0, 0, dx_len)?.reshape(xs.shape()))
            .transpose()?;
        let dw = grads.narrow(0, dx_len, weight.elem_count())?.reshape(weight.shape())?;
        let db = grads.narrow(0, dx_len + weight.elem_count(), bias.elem_count())?;
        Ok((dx, Some(dw), Some(db)))
    }
}

/// (input, grad of the output, [weight | bias]) → [grad of the input if wanted | of the weight | of the bias].
struct ConvReluPoolGrad {
    geometry: Geometry,
    want_dx: bool,
}

impl CustomOp3 for ConvReluPoolGrad {
    fn name(&self) -> &'static str {
        "conv-relu-pool-grad"
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
        let g = &self.geometry;
        let weight_len = g.out_channels * g.patch_len();
        let out = float_op!(
            self.name(),
            [(s1, l1) => x, (s2, l2) => grad, (s3, l3) => params],
            backward(g, x, grad, &params[..weight_len], &params[weight_len..], self.want_dx)
        );
        let dx_len = if self.want_dx { g.batch * g.image_len() } else { 0 };
        Ok((out, Shape::from(dx_len + weight_len + g.out_channels)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::conv2d;
    use crate::ops::conv::tests::{max_abs_diff, random};
    use crate::ops::pool::max_pool2d;
    use candle_core::DType;
    use candle_core::{Device, Var};

    /// The three ops the fused one replaces: our convolution and max-pool (each
    /// tested against candle and PyTorch's rules) and candle's own bias add and ReLU.
    fn unfused(xs: &Tensor, w: &Tensor, b: &Tensor, padding: usize) -> Tensor {
        let conv = conv2d(xs, w, padding, 1).unwrap();
        let biased = conv.broadcast_add(&b.reshape((1, (), 1, 1)).unwrap()).unwrap();
        max_pool2d(&biased.relu().unwrap(), 2, 2, 0).unwrap()
    }

    /// Outputs and the gradients of input, weight and bias against [`unfused`].
    fn check(
        batch: usize,
        channels: usize,
        side: (usize, usize),
        out: usize,
        kernel: usize,
        dtype: DType,
        tolerance: f64,
    ) {
        let what = format!("batch {batch} channels {channels} side {side:?} out {out} kernel {kernel} {dtype:?}");
        let xs = Var::from_tensor(&random(&[batch, channels, side.0, side.1], 1, dtype)).unwrap();
        let w = Var::from_tensor(&random(&[out, channels, kernel, kernel], 2, dtype)).unwrap();
        let b = Var::from_tensor(&(random(&[out], 3, dtype) * 0.3).unwrap()).unwrap();
        let padding = kernel / 2;
        let ours = conv_relu_pool(&xs, &w, &b, padding).unwrap();
        let reference = unfused(&xs, &w, &b, padding);
        assert_eq!(ours.dims(), reference.dims(), "{what}");
        assert!(max_abs_diff(&ours, &reference) < tolerance, "forward {what}");

        let probe = random(ours.dims(), 4, dtype);
        let g_ours = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (&reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("input", &xs), ("weight", &w), ("bias", &b)] {
            let expected = g_ref.get(var).unwrap();
            // Relative to the largest gradient: the bias's sums hundreds of terms.
            let scale = expected
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                .max(1.0);
            let diff = max_abs_diff(g_ours.get(var).unwrap(), expected) / scale;
            assert!(diff < tolerance, "{name} gradient {what}: {diff} relative");
        }
    }

    #[test]
    fn matches_the_three_ops_forward_and_backward_in_f64() {
        // The study's 1x1 layers and our 3x3 variant; odd sides (a row and a column in
        // no tile), batch 1 (products over threads) and 5 (images over threads),
        // channel counts off the vector width.
        check(1, 3, (9, 7), 5, 1, DType::F64, 1e-10);
        check(5, 3, (8, 8), 16, 1, DType::F64, 1e-10);
        check(2, 17, (6, 11), 9, 3, DType::F64, 1e-10);
        check(3, 1, (2, 2), 1, 3, DType::F64, 1e-10);
    }

    #[test]
    fn f32_agrees_within_rounding() {
        // Outputs are sums of at most 27 products of values in [-1, 1]; gradients are
        // compared relative to their largest.
        check(4, 3, (15, 15), 16, 3, DType::F32, 1e-5);
        check(4, 16, (20, 21), 32, 1, DType::F32, 1e-5);
    }

    #[test]
    fn ties_send_the_gradient_to_the_first_maximum_and_none_through_a_dead_relu() {
        // One channel, identity weight: the convolution is the image. Tile 1 ties at
        // 2 in its second and fourth place, tile 3 at 3 in its first three; tile 2 is
        // all negative (the ReLU blocks it).
        let image = Tensor::new(
            &[[[[1f64, 2., -1., -2., 3., 3.], [0., 2., -3., -4., 3., 1.]]]],
            &Device::Cpu,
        )
        .unwrap();
        let xs = Var::from_tensor(&image).unwrap();
        let w = Var::from_tensor(&Tensor::ones((1, 1, 1, 1), DType::F64, &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::zeros(1, DType::F64, &Device::Cpu).unwrap()).unwrap();
        let ys = conv_relu_pool(&xs, &w, &b, 0).unwrap();
        assert_eq!(ys.flatten_all().unwrap().to_vec1::<f64>().unwrap(), [2., 0., 3.]);
        let probe = Tensor::new(&[[[[10f64, 20., 30.]]]], &Device::Cpu).unwrap();
        let grads = (ys * probe).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(&xs).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(dx, [0., 10., 0., 0., 30., 0., 0., 0., 0., 0., 0., 0.]);
        assert_eq!(grads.get(&b).unwrap().to_vec1::<f64>().unwrap(), [40.]);
    }

    #[test]
    fn images_without_gradient_get_none() {
        let xs = random(&[2, 3, 6, 6], 1, DType::F64);
        let w = Var::from_tensor(&random(&[4, 3, 1, 1], 2, DType::F64)).unwrap();
        let b = Var::from_tensor(&random(&[4], 3, DType::F64)).unwrap();
        let grads = conv_relu_pool(&xs, &w, &b, 0)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&xs).is_none());
        let expected = unfused(&xs, &w, &b, 0).sum_all().unwrap().backward().unwrap();
        assert!(max_abs_diff(grads.get(&w).unwrap(), expected.get(&w).unwrap()) < 1e-10);
    }

    #[test]
    fn bad_shapes_are_errors_naming_the_op() {
        let xs = random(&[1, 3, 4, 4], 1, DType::F32);
        let w = random(&[2, 3, 1, 1], 2, DType::F32);
        let err = conv_relu_pool(&xs, &w, &random(&[3], 3, DType::F32), 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("conv-relu-pool") && err.contains("bias"), "{err}");
        assert!(conv_relu_pool(
            &random(&[1, 3, 1, 4], 1, DType::F32),
            &w,
            &random(&[2], 3, DType::F32),
            0
        )
        .is_err());
        assert!(conv_relu_pool(&random(&[3, 4, 4], 1, DType::F32), &w, &random(&[2], 3, DType::F32), 0).is_err());
        assert!(conv_relu_pool(
            &xs,
            &random(&[2, 3, 1, 1], 2, DType::F64),
            &random(&[2], 3, DType::F32),
            0
        )
        .is_err());
    }
}

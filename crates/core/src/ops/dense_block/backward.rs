//! The block's backward pass: both BatchNorm modes, image by image, recomputing
//! the two BatchNorm+ReLU outputs from the saved bottlenecks (see the parent module).

use super::*;

simd_fn! {
    /// Zeroes `dy` where the ReLU's input `x·a + b` is not positive (recomputed from the
    /// BatchNorm's input `x`, as the forward pass computed it, rather than read back from
    /// a stored output); returns `[Σ dy, Σ dy·x]` of the result.
    fn relu_grad_plane<T: Float>(dy: &mut [T], x: &[T], a: T, b: T) -> (f64, f64) {
        // One pass, in eight lanes as `lane_dot` sums (one accumulator would be a chain
        // of dependent additions): the mask and both sums while each value is loaded.
        let (mut sum, mut sum_x) = ([T::zero(); 8], [T::zero(); 8]);
        let masked = |g: T, x: T| if x * a + b > T::zero() { g } else { T::zero() };
        for (g8, x8) in dy.chunks_exact_mut(8).zip(x.chunks_exact(8)) {
            for i in 0..8 {
                let g = masked(g8[i], x8[i]);
                g8[i] = g;
                sum[i] += g;
                sum_x[i] += g * x8[i];
            }
        }
        let done = dy.len() / 8 * 8;
        let (mut tail, mut tail_x) = (T::zero(), T::zero());
        for (g, &x) in dy[done..].iter_mut().zip(&x[done..]) {
            *g = masked(*g, x);
            tail += *g;
            tail_x += *g * x;
        }
        let total = |lanes: [T; 8], tail: T| lanes.into_iter().map(Into::<f64>::into).sum::<f64>() + tail.into();
        (total(sum, tail), total(sum_x, tail_x))
    }
}

/// What [`relu_grad_and_sums`] does with the gradient it masked.
enum ThenNorm<'a, T> {
    /// Leaves it: a BatchNorm on batch statistics needs the whole batch's sums
    /// before its input gradient can be computed.
    Wait,
    /// A BatchNorm in inference mode, whose input gradient is just `weight·inv_std·dy`
    /// (no sums to wait for): computed in the same pass, while each plane is in cache,
    /// over `dy`...
    Overwrite,
    /// ... or added to this gradient.
    AddTo(&'a mut [T]),
}

/// The ReLU's backward on `dy`, and per channel `[Σ dy, Σ dy·x̂]` of the result added
/// to `sums`, with `x` the BatchNorm's input; then what `then` says.
#[allow(clippy::too_many_arguments)]
fn relu_grad_and_sums<T: Float>(
    dy: &mut [T],
    x: &[T],
    norm: &Affine,
    (scale, shift): (&[T], &[T]),
    pixels: usize,
    sums: &mut [f64],
    then: ThenNorm<T>,
    par: Parallelism,
) {
    simd_fn! {
        fn scale_plane<T: Float>(dy: &mut [T], k: T, add_to: Option<&mut [T]>) {
            match add_to {
                Some(dst) => dst.iter_mut().zip(dy.iter()).for_each(|(d, &g)| *d += k * g),
                None => dy.iter_mut().for_each(|g| *g = k * *g),
            }
        }
    }
    let finish = !matches!(then, ThenNorm::Wait);
    let plane = |c: usize, dy: &mut [T], add_to: Option<&mut [T]>| {
        let (s_dy, s_dyx) = relu_grad_plane(dy, &x[c * pixels..][..pixels], scale[c], shift[c]);
        if finish {
            scale_plane(dy, cast(norm.weight[c] * norm.inv_std[c]), add_to);
        }
        // Σ dy·x̂ = inv_std·(Σ dy·x - mean·Σ dy)
        [s_dy, norm.inv_std[c] * (s_dyx - norm.mean[c] * s_dy)]
    };
    let per_channel: Vec<[f64; 2]> = match then {
        ThenNorm::AddTo(dst) => {
            let dst = &mut dst[..dy.len()];
            let f = |(c, (dy, dst)): (usize, (&mut [T], &mut [T]))| plane(c, dy, Some(dst));
            if is_parallel(par) {
                dy.par_chunks_exact_mut(pixels)
                    .zip(dst.par_chunks_exact_mut(pixels))
                    .enumerate()
                    .map(f)
                    .collect()
            } else {
                dy.chunks_exact_mut(pixels)
                    .zip(dst.chunks_exact_mut(pixels))
                    .enumerate()
                    .map(f)
                    .collect()
            }
        }
        _ => each_plane(par, dy, pixels, |c, dy| plane(c, dy, None)),
    };
    for (sum, part) in sums.chunks_exact_mut(2).zip(per_channel) {
        sum[0] += part[0];
        sum[1] += part[1];
    }
}

/// BatchNorm's input gradient from `dy` (the gradient after the affine map), as a
/// per-channel affine function `k·dy + on_x·x + constant` of `dy` and `x`.
fn norm_input_grad_coefficients(norm: &Affine, sums: &[f64], batch_stats: bool, count: f64) -> Vec<[f64; 3]> {
    (0..norm.mean.len())
        .map(|c| {
            let k = norm.weight[c] * norm.inv_std[c];
            if !batch_stats {
                // Running statistics are constants: the map is just the scale.
                return [k, 0.0, 0.0];
            }
            // dx = k·(dy - Σdy/M - x̂·Σdy·x̂/M), x̂ = (x - mean)·inv_std
            let (s_dy, s_dyx) = (sums[2 * c], sums[2 * c + 1]);
            let on_x = -k * norm.inv_std[c] * s_dyx / count;
            [k, on_x, -k * s_dy / count - on_x * norm.mean[c]]
        })
        .collect()
}

/// `dst (=|+=) k·dy + on_x·x + constant`, plane by plane.
fn apply_input_grad<T: Float>(
    dy: &[T],
    x: &[T],
    coefficients: &[[f64; 3]],
    pixels: usize,
    dst: &mut [T],
    add: bool,
    par: Parallelism,
) {
    simd_fn! {
        fn plane<T: Float>(dst: &mut [T], dy: &[T], x: &[T], coefficients: [T; 3], add: bool) {
            let [k, on_x, constant] = coefficients;
            for ((d, &g), &v) in dst.iter_mut().zip(dy).zip(x) {
                let value = k * g + on_x * v + constant;
                *d = if add { *d + value } else { value };
            }
        }
    }
    each_plane(par, &mut dst[..dy.len()], pixels, |c, dst| {
        let (dy, x) = (&dy[c * pixels..][..pixels], &x[c * pixels..][..pixels]);
        plane(dst, dy, x, coefficients[c].map(cast::<T>), add)
    });
}

/// A 3×3 kernel (O, C, 3, 3) as (C, O, 3, 3), rotated by 180°.
fn flipped_transposed<T: Copy>(weight: &[T], out_channels: usize, in_channels: usize) -> Vec<T> {
    let mut flipped = Vec::with_capacity(weight.len());
    for c in 0..in_channels {
        for o in 0..out_channels {
            let kernel = &weight[(o * in_channels + c) * 9..][..9];
            flipped.extend(kernel.iter().rev());
        }
    }
    flipped
}

/// The gradient of [`conv3x3`]'s weight, `(+)= d_wide · tapᵀ` for each tap, from the
/// output gradient in wide rows whose discarded columns are zero.
fn conv3x3_weight_grad<T: Float>(
    d_wide: &[T],
    src: &[T],
    pad: Padded,
    d_weight: &mut [T],
    accumulate: bool,
    par: Parallelism,
) {
    let out_channels = d_wide.len() / pad.wide();
    let in_channels = d_weight.len() / (9 * out_channels);
    assert!(
        src.len() >= pad.len(in_channels),
        "padded input of {} elements for {in_channels} channels",
        src.len()
    );
    for tap in 0..9 {
        let dy = Mat::rows(d_wide.as_ptr(), pad.wide());
        let x_t = Mat::strided(src[pad.tap_offset(tap)..].as_ptr(), 1, pad.plane());
        let dst = &mut d_weight[tap..];
        matmul_strided(
            dst,
            (in_channels * 9, 9),
            out_channels,
            in_channels,
            pad.wide(),
            dy,
            x_t,
            accumulate,
            par,
        );
    }
}

/// Plain rows into wide ones; the discarded columns are left as they are (zero).
fn widen_rows<T: Copy>(src: &[T], w: usize, wide: &mut [T]) {
    for (dst, src) in wide.chunks_exact_mut(w + 2).zip(src.chunks_exact(w)) {
        dst[..w].copy_from_slice(src);
    }
}

impl DenseBlock {
    /// Gradients of the block's input and of the packed parameters, from the block's
    /// output `out` and its gradient `grad`.
    pub(super) fn backward<T: Float>(&self, out: &[T], grad: &[T]) -> Result<(Vec<T>, Vec<T>)> {
        let saved = lock(&self.saved);
        let Some(saved) = saved.as_ref().filter(|s| s.bottlenecks.len() == self.block.layers) else {
            bail!("dense block: backward without a saved forward pass")
        };
        with_slices::<T, _>(&self.all_tensors(), |slices| {
            self.backward_with(out, grad, &LayerSlices::of(slices), saved)
        })
    }

    fn backward_with<T: Float>(
        &self,
        out: &[T],
        grad: &[T],
        params: &[LayerSlices<T>],
        saved: &Saved,
    ) -> Result<(Vec<T>, Vec<T>)> {
        let b = self.block;
        let (pixels, image_len, bottleneck_len) = (b.pixels(), b.image_len(), b.bottleneck_len());
        let parts = Parts::new(b.batch);
        let pass = if self.batch_stats {
            Pass::Backward
        } else {
            Pass::InferenceBackward
        };
        let scratch = Scratch::<T>::for_parts(&parts, &b, pass);
        // The gradient of the whole block, completed layer by layer from the last:
        // a layer's own channels have all their gradient once the later layers are done.
        let mut d_out = grad.to_vec();
        // Batch statistics couple the images: each BatchNorm's input gradient waits for
        // sums over the whole batch, so a layer runs in three passes over the batch,
        // with its gradients kept between them. In inference mode a layer is one pass.
        let (mut d_bottleneck, mut d_normed1) = if self.batch_stats {
            (
                vec![T::zero(); b.batch * bottleneck_len],
                vec![T::zero(); b.batch * image_len],
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let mut layer_grads = Vec::with_capacity(b.layers);
        for (l, p) in params.iter().enumerate().rev() {
            let c_in = b.layer_in(l);
            let layer = LayerBackward {
                block: &b,
                c_in,
                p,
                bottleneck: T::cpu_storage_as_slice(&saved.bottlenecks[l])?,
                norms: &saved.norms[l],
                affine1: saved.norms[l].0.in_type::<T>(),
                affine2: saved.norms[l].1.in_type::<T>(),
                w2_flipped: flipped_transposed(p.conv2, b.growth, b.bottleneck),
                out,
            };
            let (d_w1, sums1, d_w2, sums2) = if self.batch_stats {
                // conv2 and norm2's ReLU.
                let d_bn = Images::new(&mut d_bottleneck, bottleneck_len);
                let d_out_read = &d_out;
                let results = parts.run(|part, images, _, par| {
                    let scratch = &mut *lock(&scratch[part]);
                    let mut d_w2 = vec![T::zero(); b.growth * b.bottleneck * 9];
                    let mut sums = vec![0f64; 2 * b.bottleneck];
                    for n in images.clone() {
                        let d_new = &d_out_read[n * image_len + c_in * pixels..][..b.growth * pixels];
                        // SAFETY: each image belongs to one part.
                        let d_y = unsafe { d_bn.image(n) };
                        layer.conv2_backward(n, d_new, scratch, &mut d_w2, n > images.start, d_y, par);
                        layer.relu_backward2(n, d_y, &mut sums, ThenNorm::Wait, par);
                    }
                    (d_w2, sums)
                });
                let (d_w2, sums2) = sum_weight_parts(results);
                let coefficients2 = norm_input_grad_coefficients(&layer.norms.1, &sums2, true, b.count());

                // norm2's input gradient, conv1, and norm1's ReLU.
                let d_n1 = Images::new(&mut d_normed1, image_len);
                let d_bn = &d_bottleneck;
                let results = parts.run(|part, images, _, par| {
                    let Scratch {
                        normed,
                        d_bottleneck: d_x2,
                        ..
                    } = &mut *lock(&scratch[part]);
                    let mut d_w1 = vec![T::zero(); b.bottleneck * c_in];
                    let mut sums = vec![0f64; 2 * c_in];
                    for n in images.clone() {
                        let d_bn = &d_bn[n * bottleneck_len..][..bottleneck_len];
                        apply_input_grad(d_bn, layer.bottleneck_of(n), &coefficients2, pixels, d_x2, false, par);
                        // SAFETY: each image belongs to one part.
                        let d_y = &mut unsafe { d_n1.image(n) }[..c_in * pixels];
                        layer.conv1_backward(n, d_x2, normed, &mut d_w1, n > images.start, d_y, par);
                        layer.relu_backward1(n, d_y, &mut sums, ThenNorm::Wait, par);
                    }
                    (d_w1, sums)
                });
                let (d_w1, sums1) = sum_weight_parts(results);
                let coefficients1 = norm_input_grad_coefficients(&layer.norms.0, &sums1, true, b.count());

                // norm1's input gradient joins the gradient of the channels this layer read.
                let d_all = Images::new(&mut d_out, image_len);
                let d_n1 = &d_normed1;
                parts.run(|_, images, _, par| {
                    for n in images {
                        let dy = &d_n1[n * image_len..][..c_in * pixels];
                        // SAFETY: each image belongs to one part.
                        let dst = &mut unsafe { d_all.image(n) }[..c_in * pixels];
                        apply_input_grad(dy, layer.input_of(n), &coefficients1, pixels, dst, true, par);
                    }
                });
                (d_w1, sums1, d_w2, sums2)
            } else {
                let d_all = Images::new(&mut d_out, image_len);
                let results = parts.run(|part, images, _, par| {
                    let scratch = &mut *lock(&scratch[part]);
                    let mut d_w2 = vec![T::zero(); b.growth * b.bottleneck * 9];
                    let mut d_w1 = vec![T::zero(); b.bottleneck * c_in];
                    let (mut sums2, mut sums1) = (vec![0f64; 2 * b.bottleneck], vec![0f64; 2 * c_in]);
                    for n in images.clone() {
                        // SAFETY: each image belongs to one part.
                        let (d_read, d_new) = unsafe { d_all.image(n) }.split_at_mut(c_in * pixels);
                        let mut d_x2 = std::mem::take(&mut scratch.d_bottleneck);
                        layer.conv2_backward(
                            n,
                            &d_new[..b.growth * pixels],
                            scratch,
                            &mut d_w2,
                            n > images.start,
                            &mut d_x2,
                            par,
                        );
                        layer.relu_backward2(n, &mut d_x2, &mut sums2, ThenNorm::Overwrite, par);
                        let mut d_y = std::mem::take(&mut scratch.d_input);
                        let d_y1 = &mut d_y[..c_in * pixels];
                        layer.conv1_backward(n, &d_x2, &mut scratch.normed, &mut d_w1, n > images.start, d_y1, par);
                        layer.relu_backward1(n, d_y1, &mut sums1, ThenNorm::AddTo(d_read), par);
                        (scratch.d_bottleneck, scratch.d_input) = (d_x2, d_y);
                    }
                    (d_w1, sums1, d_w2, sums2)
                });
                let (conv1, conv2): (Vec<_>, Vec<_>) =
                    results.into_iter().map(|(w1, s1, w2, s2)| ((w1, s1), (w2, s2))).unzip();
                let ((d_w1, sums1), (d_w2, sums2)) = (sum_weight_parts(conv1), sum_weight_parts(conv2));
                (d_w1, sums1, d_w2, sums2)
            };
            let (d_gamma1, d_beta1) = norm_param_grads(&sums1);
            let (d_gamma2, d_beta2) = norm_param_grads(&sums2);
            layer_grads.push([d_gamma1, d_beta1, d_w1, d_gamma2, d_beta2, d_w2]);
        }
        let input_len = b.in_channels * pixels;
        let d_xs: Vec<T> = d_out
            .chunks_exact(image_len)
            .flat_map(|image| image[..input_len].iter().copied())
            .collect();
        let d_params: Vec<T> = layer_grads.into_iter().rev().flatten().flatten().collect();
        Ok((d_xs, d_params))
    }
}

/// One layer's backward pass, image by image: what both BatchNorm modes share.
struct LayerBackward<'a, T> {
    block: &'a Block,
    c_in: usize,
    p: &'a LayerSlices<'a, T>,
    /// The layer's saved 1×1 convolution output over the batch.
    bottleneck: &'a [T],
    norms: &'a (Affine, Affine),
    affine1: (Vec<T>, Vec<T>),
    affine2: (Vec<T>, Vec<T>),
    w2_flipped: Vec<T>,
    /// The block's output: the channels each layer read.
    out: &'a [T],
}

impl<T: Float> LayerBackward<'_, T> {
    fn bottleneck_of(&self, n: usize) -> &[T] {
        let len = self.block.bottleneck_len();
        &self.bottleneck[n * len..][..len]
    }

    fn input_of(&self, n: usize) -> &[T] {
        &self.out[n * self.block.image_len()..][..self.c_in * self.block.pixels()]
    }

    /// conv2's weight gradient (`(+)=` into `d_w2`) and the gradient of its input
    /// (norm2's ReLU output) into `d_y`, from the layer's output gradient `d_new`.
    #[allow(clippy::too_many_arguments)]
    fn conv2_backward(
        &self,
        n: usize,
        d_new: &[T],
        scratch: &mut Scratch<T>,
        d_w2: &mut [T],
        accumulate: bool,
        d_y: &mut [T],
        par: Parallelism,
    ) {
        let b = self.block;
        let (pad, geometry) = (b.padded(), b.conv2_input_grad());
        let Scratch { cols, padded, wide, .. } = scratch;
        scale_shift_relu_padded(
            self.bottleneck_of(n),
            (&self.affine2.0, &self.affine2.1),
            pad,
            padded,
            par,
        );
        widen_rows(d_new, b.w, wide);
        conv3x3_weight_grad(wide, padded, pad, d_w2, accumulate, par);
        let d_cols = &mut cols[..geometry.patch_len() * b.pixels()];
        im2col(&geometry, d_new, d_cols, par);
        let (w, dy) = (
            Mat::rows(self.w2_flipped.as_ptr(), geometry.patch_len()),
            Mat::rows(d_cols.as_ptr(), b.pixels()),
        );
        matmul(
            &mut d_y[..b.bottleneck_len()],
            b.bottleneck,
            b.pixels(),
            geometry.patch_len(),
            w,
            dy,
            false,
            par,
        );
    }

    /// conv1's weight gradient (`(+)=` into `d_w1`) and the gradient of its input (norm1's
    /// ReLU output) into `d_y`, from the bottleneck's gradient `d_x2`.
    #[allow(clippy::too_many_arguments)]
    fn conv1_backward(
        &self,
        n: usize,
        d_x2: &[T],
        normed: &mut [T],
        d_w1: &mut [T],
        accumulate: bool,
        d_y: &mut [T],
        par: Parallelism,
    ) {
        let (b, c_in) = (self.block, self.c_in);
        let pixels = b.pixels();
        let normed = &mut normed[..c_in * pixels];
        scale_shift_relu(
            self.input_of(n),
            (&self.affine1.0, &self.affine1.1),
            pixels,
            normed,
            par,
        );
        let (dy, x_t) = (
            Mat::rows(d_x2.as_ptr(), pixels),
            Mat::transposed(normed.as_ptr(), pixels),
        );
        matmul(d_w1, b.bottleneck, c_in, pixels, dy, x_t, accumulate, par);
        let (w_t, dy) = (
            Mat::transposed(self.p.conv1.as_ptr(), c_in),
            Mat::rows(d_x2.as_ptr(), pixels),
        );
        matmul(d_y, c_in, pixels, b.bottleneck, w_t, dy, false, par);
    }

    fn relu_backward2(&self, n: usize, d_y: &mut [T], sums: &mut [f64], then: ThenNorm<T>, par: Parallelism) {
        let affine = (&self.affine2.0[..], &self.affine2.1[..]);
        relu_grad_and_sums(
            d_y,
            self.bottleneck_of(n),
            &self.norms.1,
            affine,
            self.block.pixels(),
            sums,
            then,
            par,
        );
    }

    fn relu_backward1(&self, n: usize, d_y: &mut [T], sums: &mut [f64], then: ThenNorm<T>, par: Parallelism) {
        let affine = (&self.affine1.0[..], &self.affine1.1[..]);
        relu_grad_and_sums(
            d_y,
            self.input_of(n),
            &self.norms.0,
            affine,
            self.block.pixels(),
            sums,
            then,
            par,
        );
    }
}

/// The parts' weight gradients and per-channel sums, added up.
fn sum_weight_parts<T: Float>(parts: Vec<(Vec<T>, Vec<f64>)>) -> (Vec<T>, Vec<f64>) {
    let (weights, sums): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
    (add_up(weights), add_up(sums))
}

/// BatchNorm's weight and bias gradients from the `[Σ dy, Σ dy·x̂]` sums.
fn norm_param_grads<T: Float>(sums: &[f64]) -> (Vec<T>, Vec<T>) {
    let d_weight = sums.chunks_exact(2).map(|s| cast(s[1])).collect();
    let d_bias = sums.chunks_exact(2).map(|s| cast(s[0])).collect();
    (d_weight, d_bias)
}

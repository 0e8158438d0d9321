//! A whole DenseNet dense block as one op, forward and backward: the
//! memory-efficient layout of Pleiss et al. (2017).
//!
//! Written as candle ops, every layer concatenates the block so far (a copy of all
//! earlier features, so a block costs O(layers²) copies), runs BatchNorm+ReLU into a
//! new tensor, and keeps both for the backward pass, whose concatenation gradients
//! are then added into fresh tensors again. Here the block lives in one buffer:
//! each layer reads the channels before it in place and writes its `growth` new
//! channels after them. Per-channel batch statistics are computed once per channel
//! (a channel never changes after it is written, so every later layer sees the same
//! statistics). The backward pass keeps only the block's output and each layer's
//! bottleneck (the 1×1 convolution's output) and recomputes the two BatchNorm+ReLU
//! outputs, which are cheap, instead of storing them.
//!
//! The block's parameters reach candle's autograd as one packed tensor (every
//! parameter flattened and concatenated), so that their gradients flow back to each
//! variable through candle's own `cat`; the running statistics are read, and
//! updated, by the caller.
//!
//! Threads: as in `conv`, images are split between threads when there are enough
//! of them, each thread running its products single-threaded; otherwise each
//! product uses every thread.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::conv::{self, add_up, im2col, is_parallel, matmul, matmul_strided, Geometry, Mat};
use super::{float_op, simd_fn, Float};

mod one_region;

/// One BatchNorm's tensors, as `BatchNorm2d` holds them.
#[derive(Clone, Debug)]
pub struct NormTensors {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

/// One dense layer: `conv2(relu(norm2(conv1(relu(norm1(x))))))`, torchvision's order.
#[derive(Clone, Debug)]
pub struct LayerTensors {
    pub norm1: NormTensors,
    pub conv1: Tensor,
    pub norm2: NormTensors,
    pub conv2: Tensor,
}

impl LayerTensors {
    /// The trainable tensors, in the order of the packed parameter tensor.
    fn trainable(&self) -> [&Tensor; 6] {
        [
            &self.norm1.weight,
            &self.norm1.bias,
            &self.conv1,
            &self.norm2.weight,
            &self.norm2.bias,
            &self.conv2,
        ]
    }

    /// Every tensor the forward pass reads: the trainable ones, then the running statistics.
    fn all(&self) -> [&Tensor; 10] {
        let [a, b, c, d, e, f] = self.trainable();
        [
            a,
            b,
            c,
            d,
            e,
            f,
            &self.norm1.running_mean,
            &self.norm1.running_var,
            &self.norm2.running_mean,
            &self.norm2.running_var,
        ]
    }
}

/// The batch statistics one layer normalised with: per channel mean and biased
/// variance of its two BatchNorms, for the caller's running statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerBatchStats {
    pub mean1: Vec<f64>,
    pub var1: Vec<f64>,
    pub mean2: Vec<f64>,
    pub var2: Vec<f64>,
}

/// The block's output `(N, C + layers·growth, H, W)`: its input followed by every
/// layer's new channels, as `cat` would give it. With `batch_stats`, the BatchNorms
/// use the batch's statistics, which are returned per layer (and no running
/// statistic is changed here); otherwise the running ones. `keep_graph: false`
/// builds no graph even where the parameters are variables (a frozen base).
pub fn dense_block(
    xs: &Tensor,
    layers: &[LayerTensors],
    batch_stats: bool,
    eps: f64,
    keep_graph: bool,
) -> Result<(Tensor, Option<Vec<LayerBatchStats>>)> {
    let block = Block::new(xs.dims(), layers)?;
    if xs.dtype() != layers[0].conv1.dtype() {
        bail!(
            "dense block: the input is {:?}, the parameters {:?}",
            xs.dtype(),
            layers[0].conv1.dtype()
        );
    }
    if batch_stats && block.batch * block.pixels() < 2 {
        bail!("batch norm in training mode needs more than one value per channel");
    }
    let saved = Arc::new(Mutex::new(None));
    let op = DenseBlock {
        block,
        layers: layers.to_vec(),
        batch_stats,
        eps,
        saved: saved.clone(),
    };
    let xs = xs.contiguous()?;
    let tracked = xs.track_op() || layers.iter().flat_map(|l| l.trainable()).any(|t| t.track_op());
    let out = if keep_graph && tracked {
        let packed: Vec<Tensor> = layers
            .iter()
            .flat_map(|l| l.trainable())
            .map(|t| t.flatten_all())
            .collect::<Result<_>>()?;
        xs.apply_op2(&Tensor::cat(&packed, 0)?, op)?
    } else {
        xs.apply_op1_no_bwd(&op)?
    };
    let stats = batch_stats
        .then(|| lock(&saved).as_ref().map(|s| s.batch_stats()))
        .flatten();
    Ok((out, stats))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sizes of one block.
#[derive(Clone, Copy, Debug)]
struct Block {
    batch: usize,
    in_channels: usize,
    growth: usize,
    bottleneck: usize,
    layers: usize,
    h: usize,
    w: usize,
}

impl Block {
    fn new(dims: &[usize], layers: &[LayerTensors]) -> Result<Self> {
        let &[batch, in_channels, h, w] = dims else {
            bail!("dense block: expected an NCHW (rank 4) input, got shape {dims:?}")
        };
        let Some(first) = layers.first() else {
            bail!("dense block: no layers")
        };
        let (bottleneck, growth) = (first.conv1.dim(0)?, first.conv2.dim(0)?);
        let block = Self {
            batch,
            in_channels,
            growth,
            bottleneck,
            layers: layers.len(),
            h,
            w,
        };
        for (l, layer) in layers.iter().enumerate() {
            let c = block.layer_in(l);
            let expected: [(&str, &Tensor, &[usize]); 10] = [
                ("norm1.weight", &layer.norm1.weight, &[c]),
                ("norm1.bias", &layer.norm1.bias, &[c]),
                ("norm1.running_mean", &layer.norm1.running_mean, &[c]),
                ("norm1.running_var", &layer.norm1.running_var, &[c]),
                ("conv1.weight", &layer.conv1, &[bottleneck, c, 1, 1]),
                ("norm2.weight", &layer.norm2.weight, &[bottleneck]),
                ("norm2.bias", &layer.norm2.bias, &[bottleneck]),
                ("norm2.running_mean", &layer.norm2.running_mean, &[bottleneck]),
                ("norm2.running_var", &layer.norm2.running_var, &[bottleneck]),
                ("conv2.weight", &layer.conv2, &[growth, bottleneck, 3, 3]),
            ];
            for (name, tensor, dims) in expected {
                if tensor.dims() != dims {
                    bail!(
                        "dense block: layer {} {name} has shape {:?}, expected {dims:?}",
                        l + 1,
                        tensor.dims()
                    )
                }
                if tensor.dtype() != layers[0].conv1.dtype() {
                    bail!(
                        "dense block: layer {} {name} is {:?}, not {:?}",
                        l + 1,
                        tensor.dtype(),
                        layers[0].conv1.dtype()
                    )
                }
            }
        }
        Ok(block)
    }

    fn pixels(&self) -> usize {
        self.h * self.w
    }

    fn out_channels(&self) -> usize {
        self.layer_in(self.layers)
    }

    /// Channels that layer `l` reads.
    fn layer_in(&self, l: usize) -> usize {
        self.in_channels + l * self.growth
    }

    fn image_len(&self) -> usize {
        self.out_channels() * self.pixels()
    }

    fn bottleneck_len(&self) -> usize {
        self.bottleneck * self.pixels()
    }

    /// Values per channel over the batch: what batch statistics average over.
    fn count(&self) -> f64 {
        (self.batch * self.pixels()) as f64
    }

    fn padded(&self) -> Padded {
        Padded { h: self.h, w: self.w }
    }

    /// conv2's input gradient as a convolution of its output gradient: with stride 1
    /// and padding 1 that is the same 3×3 convolution with the kernel flipped and its
    /// channels swapped ([`flipped_transposed`]), so it needs no col2im and its product
    /// sums over growth·9 terms instead of growth.
    fn conv2_input_grad(&self) -> Geometry {
        Geometry::new(
            &[1, self.growth, self.h, self.w],
            &[self.bottleneck, self.growth, 3, 3],
            1,
            1,
        )
        .expect("a padded 3x3 kernel fits every image")
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.batch, self.out_channels(), self.h, self.w))
    }
}

fn cast<T: Float>(v: f64) -> T {
    T::from_f64(v)
}

/// One BatchNorm as applied: `y = x·scale + shift`, with `x̂ = (x - mean)·inv_std`.
#[derive(Clone, Debug)]
struct Affine {
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    weight: Vec<f64>,
    scale: Vec<f64>,
    shift: Vec<f64>,
}

impl Affine {
    fn new<T: Float>(weight: &[T], bias: &[T], mean: &[f64], var: &[f64], eps: f64) -> Self {
        let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        let weight: Vec<f64> = weight.iter().map(|&w| w.into()).collect();
        let scale: Vec<f64> = weight.iter().zip(&inv_std).map(|(w, s)| w * s).collect();
        let shift = bias
            .iter()
            .zip(mean)
            .zip(&scale)
            .map(|((&b, m), s)| b.into() - m * s)
            .collect();
        Self {
            mean: mean.to_vec(),
            inv_std,
            weight,
            scale,
            shift,
        }
    }

    fn in_type<T: Float>(&self) -> (Vec<T>, Vec<T>) {
        (
            self.scale.iter().map(|&v| cast(v)).collect(),
            self.shift.iter().map(|&v| cast(v)).collect(),
        )
    }
}

/// Runs `f(c, plane)` on each `pixels`-long plane of `dst` and collects the results;
/// planes across threads when `par` is parallel (the products are, so nothing
/// outside them is).
fn each_plane<T: Send, R: Send>(
    par: Parallelism,
    dst: &mut [T],
    pixels: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    let f = |(c, plane): (usize, &mut [T])| f(c, plane);
    if is_parallel(par) {
        dst.par_chunks_exact_mut(pixels).enumerate().map(f).collect()
    } else {
        dst.chunks_exact_mut(pixels).enumerate().map(f).collect()
    }
}

/// `dst = relu(src·scale + shift)`, plane by plane; `dst` may be longer than `src`.
fn scale_shift_relu<T: Float>(src: &[T], (scale, shift): (&[T], &[T]), pixels: usize, dst: &mut [T], par: Parallelism) {
    simd_fn! {
        fn plane<T: Float>(dst: &mut [T], src: &[T], a: T, b: T) {
            for (d, &s) in dst.iter_mut().zip(src) {
                let y = s * a + b;
                *d = if y > T::zero() { y } else { T::zero() };
            }
        }
    }
    each_plane(par, &mut dst[..src.len()], pixels, |c, dst| {
        plane(dst, &src[c * pixels..][..pixels], scale[c], shift[c])
    });
}

/// Mean and biased variance over the batch of `channels` of images stored
/// `image_len` apart; two passes, as in `norm`.
fn channel_stats<T: Float>(
    data: &[T],
    image_len: usize,
    channels: Range<usize>,
    pixels: usize,
) -> (Vec<f64>, Vec<f64>) {
    let batch = data.len() / image_len;
    let count = (batch * pixels) as f64;
    let plane = |n: usize, c: usize| &data[n * image_len + c * pixels..][..pixels];
    channels
        .into_par_iter()
        .map(|c| {
            let mean = (0..batch)
                .map(|n| plane(n, c).iter().map(|&v| v.into()).sum::<f64>())
                .sum::<f64>()
                / count;
            let var = (0..batch)
                .map(|n| plane(n, c).iter().map(|&v| (v.into() - mean).powi(2)).sum::<f64>())
                .sum::<f64>()
                / count;
            (mean, var)
        })
        .unzip()
}

/// Disjoint per-image access to a buffer from several threads.
#[derive(Clone, Copy)]
struct Images<T> {
    ptr: *mut T,
    image_len: usize,
    batch: usize,
}

// SAFETY: `Images` is only used through `image`, whose callers touch each image
// from one thread at a time (see `Parts::run`).
unsafe impl<T: Send> Send for Images<T> {}
// SAFETY: as for `Send`: shared references never overlap in the images they reach.
unsafe impl<T: Send> Sync for Images<T> {}

impl<T> Images<T> {
    fn new(buffer: &mut [T], image_len: usize) -> Self {
        Self {
            ptr: buffer.as_mut_ptr(),
            image_len,
            batch: buffer.len() / image_len,
        }
    }

    /// # Safety
    /// No other reference to image `n` may be alive while the returned one is.
    #[allow(clippy::mut_from_ref)]
    unsafe fn image(&self, n: usize) -> &mut [T] {
        // SAFETY: the caller's promise, for the whole image.
        unsafe { self.part(n, 0..self.image_len) }
    }

    /// Elements `range` of image `n`, to read.
    ///
    /// # Safety
    /// Nothing may write these elements while the returned slice is alive.
    unsafe fn read(&self, n: usize, range: Range<usize>) -> &[T] {
        assert!(
            n < self.batch && range.start <= range.end && range.end <= self.image_len,
            "image {n} of {}, {range:?}",
            self.batch
        );
        // SAFETY: in bounds (checked above); no writer is the caller's promise.
        unsafe { std::slice::from_raw_parts(self.ptr.add(n * self.image_len + range.start), range.len()) }
    }

    /// Elements `range` of image `n`.
    ///
    /// # Safety
    /// No other reference to these elements may be alive while the returned one is.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, n: usize, range: Range<usize>) -> &mut [T] {
        assert!(
            n < self.batch && range.start <= range.end && range.end <= self.image_len,
            "image {n} of {}, {range:?}",
            self.batch
        );
        // SAFETY: in bounds (checked above); exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(n * self.image_len + range.start), range.len()) }
    }
}

/// How a batch is shared between threads: one range of images per thread when there
/// are enough images (each with single-threaded products); else, in the forward
/// pass, every thread takes all images and a [`Share`] of each layer's output
/// channels; else (the backward pass) one range with multi-threaded products.
#[derive(Clone, Copy, Debug)]
struct Parts {
    batch: usize,
    count: usize,
    split_channels: bool,
}

/// One part's share of a layer's output channels.
#[derive(Clone, Copy, Debug)]
struct Share {
    index: usize,
    count: usize,
}

impl Share {
    const WHOLE: Share = Share { index: 0, count: 1 };

    /// This share of `len` channels.
    fn of(&self, len: usize) -> Range<usize> {
        let per_share = len.div_ceil(self.count);
        (self.index * per_share).min(len)..((self.index + 1) * per_share).min(len)
    }
}

impl Parts {
    fn new(batch: usize) -> Self {
        let count = if conv::split_by_image(batch) {
            conv::threads().min(batch)
        } else {
            1
        };
        Self {
            batch,
            count,
            split_channels: false,
        }
    }

    /// Inference at batch 1 is a long chain of small products (a 4×4 image in the
    /// last block); multi-threading each of them costs a synchronisation per product,
    /// splitting each layer's output channels between threads one per layer. The
    /// element-wise work each product needs (BatchNorm+ReLU of its input, ~1/300 of
    /// its arithmetic) is repeated by every thread rather than synchronised.
    fn for_forward(batch: usize) -> Self {
        let threads = conv::threads();
        if conv::split_by_image(batch) || threads == 1 {
            Self::new(batch)
        } else {
            Self {
                batch,
                count: threads,
                split_channels: true,
            }
        }
    }

    /// Runs `work(part, images, share, parallelism)` for every part and returns each part's result.
    fn run<R: Send>(&self, work: impl Fn(usize, Range<usize>, Share, Parallelism) -> R + Sync) -> Vec<R> {
        if self.split_channels {
            let count = self.count;
            return (0..count)
                .into_par_iter()
                .map(|p| work(p, 0..self.batch, Share { index: p, count }, Parallelism::None))
                .collect();
        }
        if self.count == 1 {
            return vec![work(0, 0..self.batch, Share::WHOLE, conv::gemm_parallelism(false))];
        }
        let per_part = self.batch.div_ceil(self.count);
        (0..self.count)
            .into_par_iter()
            .map(|p| {
                work(
                    p,
                    p * per_part..((p + 1) * per_part).min(self.batch),
                    Share::WHOLE,
                    conv::gemm_parallelism(true),
                )
            })
            .collect()
    }
}

/// Per-part work buffers, allocated once per pass rather than once per layer; every
/// use overwrites what it reads.
struct Scratch<T> {
    /// BatchNorm+ReLU of the channels a layer reads, or of its bottleneck.
    normed: Vec<T>,
    /// conv2's unfolded output gradient.
    cols: Vec<T>,
    /// A bottleneck after BatchNorm+ReLU, with the zero border of [`Padded`].
    padded: Vec<T>,
    /// conv2's output (forward) or its gradient (backward) in wide rows; the
    /// backward pass relies on their discarded columns staying zero.
    wide: Vec<T>,
    /// The gradient of a bottleneck before its BatchNorm.
    d_bottleneck: Vec<T>,
    /// The gradient of a layer's input after its BatchNorm ([`Pass::InferenceBackward`]
    /// only: batch statistics keep it for the whole batch instead).
    d_input: Vec<T>,
}

/// The pass a [`Scratch`] serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Forward,
    /// With batch statistics.
    Backward,
    /// With running statistics (BatchNorm in inference mode).
    InferenceBackward,
}

impl<T: Float> Scratch<T> {
    /// `pass` leaves out the buffers it does not use.
    fn for_parts(parts: &Parts, block: &Block, pass: Pass) -> Vec<Mutex<Self>> {
        let widest_input = block.layer_in(block.layers - 1).max(block.bottleneck) * block.pixels();
        let backward_only = |len: usize| if pass == Pass::Forward { 0 } else { len };
        let inference_backward_only = |len: usize| if pass == Pass::InferenceBackward { len } else { 0 };
        (0..parts.count)
            .map(|_| {
                Mutex::new(Self {
                    normed: vec![T::zero(); widest_input],
                    cols: vec![T::zero(); backward_only(9 * block.growth * block.pixels())],
                    padded: vec![T::zero(); block.padded().len(block.bottleneck)],
                    wide: vec![T::zero(); block.growth * block.padded().wide()],
                    d_bottleneck: vec![T::zero(); backward_only(block.bottleneck_len())],
                    d_input: vec![T::zero(); inference_backward_only(widest_input)],
                })
            })
            .collect()
    }
}

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

/// The 3×3 convolution's input stored with its zero border: each channel an
/// (h+2)×(w+2) plane. The input under each kernel tap is then one strided matrix,
/// so the convolution is nine products over the input as it is (im2col would copy
/// it nine times first). Their outputs come as `h` rows of `w + 2` ("wide" rows)
/// whose last two columns are discarded.
#[derive(Clone, Copy, Debug)]
struct Padded {
    h: usize,
    w: usize,
}

impl Padded {
    fn row(&self) -> usize {
        self.w + 2
    }

    fn plane(&self) -> usize {
        (self.h + 2) * self.row()
    }

    /// Elements for `channels` planes, plus the two past the last plane that the
    /// discarded columns of the last row read.
    fn len(&self, channels: usize) -> usize {
        channels * self.plane() + 2
    }

    /// Output positions per channel: `h` wide rows.
    fn wide(&self) -> usize {
        self.h * self.row()
    }

    /// Where the input under `tap` (ky·3 + kx) starts, relative to the output position.
    fn tap_offset(&self, tap: usize) -> usize {
        tap / 3 * self.row() + tap % 3
    }
}

/// `dst = relu(src·scale + shift)` into the interior of padded planes; their border
/// is never written, so it stays zero.
fn scale_shift_relu_padded<T: Float>(
    src: &[T],
    (scale, shift): (&[T], &[T]),
    pad: Padded,
    dst: &mut [T],
    par: Parallelism,
) {
    simd_fn! {
        fn plane<T: Float>(dst: &mut [T], src: &[T], a: T, b: T, w: usize) {
            for (dst_row, src_row) in dst.chunks_exact_mut(w + 2).skip(1).zip(src.chunks_exact(w)) {
                for (d, &s) in dst_row[1..=w].iter_mut().zip(src_row) {
                    let y = s * a + b;
                    *d = if y > T::zero() { y } else { T::zero() };
                }
            }
        }
    }
    let pixels = pad.h * pad.w;
    let channels = src.len() / pixels;
    each_plane(par, &mut dst[..channels * pad.plane()], pad.plane(), |c, dst| {
        plane(dst, &src[c * pixels..][..pixels], scale[c], shift[c], pad.w)
    });
}

/// `dst (out_channels × wide rows) = conv3x3(weight, src)`, `src` padded, one product per tap.
fn conv3x3<T: Float>(weight: &[T], in_channels: usize, src: &[T], pad: Padded, dst: &mut [T], par: Parallelism) {
    let out_channels = weight.len() / (9 * in_channels);
    assert!(
        src.len() >= pad.len(in_channels),
        "padded input of {} elements for {in_channels} channels",
        src.len()
    );
    for tap in 0..9 {
        let w = Mat::strided(weight[tap..].as_ptr(), in_channels * 9, 9);
        let x = Mat::strided(src[pad.tap_offset(tap)..].as_ptr(), pad.plane(), 1);
        matmul(dst, out_channels, pad.wide(), in_channels, w, x, tap > 0, par);
    }
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

/// Wide rows (`w + 2` long) to plain ones, dropping the discarded columns.
fn narrow_rows<T: Copy>(wide: &[T], w: usize, dst: &mut [T]) {
    for (dst, src) in dst.chunks_exact_mut(w).zip(wide.chunks_exact(w + 2)) {
        dst.copy_from_slice(&src[..w]);
    }
}

/// Plain rows into wide ones; the discarded columns are left as they are (zero).
fn widen_rows<T: Copy>(src: &[T], w: usize, wide: &mut [T]) {
    for (dst, src) in wide.chunks_exact_mut(w + 2).zip(src.chunks_exact(w)) {
        dst[..w].copy_from_slice(src);
    }
}

/// What the forward pass leaves for the backward pass.
struct Saved {
    /// Per layer, the 1×1 convolution's output over the batch, (N, bottleneck, H, W).
    bottlenecks: Vec<CpuStorage>,
    /// Per layer, its two BatchNorms as applied.
    norms: Vec<(Affine, Affine)>,
    /// Per layer, the variances the BatchNorms used (the batch's, with batch statistics).
    variances: Vec<(Vec<f64>, Vec<f64>)>,
}

impl Saved {
    fn batch_stats(&self) -> Vec<LayerBatchStats> {
        self.norms
            .iter()
            .zip(&self.variances)
            .map(|((n1, n2), (v1, v2))| LayerBatchStats {
                mean1: n1.mean.clone(),
                var1: v1.clone(),
                mean2: n2.mean.clone(),
                var2: v2.clone(),
            })
            .collect()
    }
}

/// Runs `f` on the contiguous CPU data of `tensors` as `&[T]`, without copying.
fn with_slices<T: Float, R>(tensors: &[&Tensor], f: impl FnOnce(&[&[T]]) -> Result<R>) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .map(|(storage, layout)| {
            let Storage::Cpu(cpu) = &**storage else {
                bail!("dense block: runs on the CPU only")
            };
            let Some((start, end)) = layout.contiguous_offsets() else {
                bail!("dense block: expects contiguous parameters")
            };
            Ok(&T::cpu_storage_as_slice(cpu)?[start..end])
        })
        .collect::<Result<Vec<_>>>()?;
    f(&slices)
}

struct DenseBlock {
    block: Block,
    layers: Vec<LayerTensors>,
    batch_stats: bool,
    eps: f64,
    saved: Arc<Mutex<Option<Saved>>>,
}

/// One layer's parameters as slices, in [`LayerTensors::all`]'s order.
struct LayerSlices<'a, T> {
    norm1: [&'a [T]; 2],
    conv1: &'a [T],
    norm2: [&'a [T]; 2],
    conv2: &'a [T],
    running1: [&'a [T]; 2],
    running2: [&'a [T]; 2],
}

impl<'a, T> LayerSlices<'a, T> {
    fn of(slices: &[&'a [T]]) -> Vec<Self> {
        slices
            .chunks_exact(10)
            .map(|s| Self {
                norm1: [s[0], s[1]],
                conv1: s[2],
                norm2: [s[3], s[4]],
                conv2: s[5],
                running1: [s[6], s[7]],
                running2: [s[8], s[9]],
            })
            .collect()
    }
}

fn to_f64<T: Float>(values: &[T]) -> Vec<f64> {
    values.iter().map(|&v| v.into()).collect()
}

impl DenseBlock {
    fn all_tensors(&self) -> Vec<&Tensor> {
        self.layers.iter().flat_map(|l| l.all()).collect()
    }

    /// The BatchNorm over `channels`, from the batch's `stats` or the running statistics.
    fn affine<T: Float>(
        &self,
        [weight, bias]: [&[T]; 2],
        [rmean, rvar]: [&[T]; 2],
        stats: Option<(&[f64], &[f64])>,
    ) -> (Affine, Vec<f64>) {
        let (mean, var) = match stats {
            Some((mean, var)) => (mean.to_vec(), var.to_vec()),
            None => (to_f64(rmean), to_f64(rvar)),
        };
        (Affine::new(weight, bias, &mean, &var, self.eps), var)
    }

    fn forward<T: Float>(&self, xs: &[T], save: bool) -> Result<Vec<T>> {
        with_slices::<T, _>(&self.all_tensors(), |slices| {
            Ok(self.forward_with(xs, &LayerSlices::of(slices), save))
        })
    }

    fn forward_with<T: Float>(&self, xs: &[T], params: &[LayerSlices<T>], save: bool) -> Vec<T> {
        let b = self.block;
        let (pixels, image_len, bottleneck_len) = (b.pixels(), b.image_len(), b.bottleneck_len());
        let pad = b.padded();
        let mut out = vec![T::zero(); b.batch * image_len];
        let input_len = b.in_channels * pixels;
        for (dst, src) in out.chunks_exact_mut(image_len).zip(xs.chunks_exact(input_len)) {
            dst[..input_len].copy_from_slice(src);
        }
        // Batch statistics of every channel written so far.
        let (mut means, mut vars) = if self.batch_stats {
            channel_stats(&out, image_len, 0..b.in_channels, pixels)
        } else {
            (Vec::new(), Vec::new())
        };
        let parts = Parts::for_forward(b.batch);
        let scratch = Scratch::<T>::for_parts(&parts, &b, Pass::Forward);
        let mut saved = Saved {
            bottlenecks: Vec::new(),
            norms: Vec::new(),
            variances: Vec::new(),
        };
        if parts.split_channels && !self.batch_stats && !save {
            // Inference at small batches: no statistics to gather between layers, so
            // the whole block runs in one parallel region.
            let mut norms = Vec::with_capacity(params.len());
            for p in params {
                let (norm1, var1) = self.affine(p.norm1, p.running1, None);
                let (norm2, var2) = self.affine(p.norm2, p.running2, None);
                norms.push(one_region::LayerNorms::new(&norm1, &norm2));
                saved.norms.push((norm1, norm2));
                saved.variances.push((var1, var2));
            }
            one_region::forward(&b, params, &norms, &mut out, &scratch);
            *lock(&self.saved) = Some(saved);
            return out;
        }
        let mut bottleneck = Vec::new();
        for (l, p) in params.iter().enumerate() {
            // A saved bottleneck moves into `saved`; otherwise one buffer serves every layer.
            if bottleneck.is_empty() {
                bottleneck = vec![T::zero(); b.batch * bottleneck_len];
            }
            let c_in = b.layer_in(l);
            let stats1 = self.batch_stats.then(|| (&means[..c_in], &vars[..c_in]));
            let (norm1, var1) = self.affine(p.norm1, p.running1, stats1);
            let (scale1, shift1) = norm1.in_type::<T>();
            let bottlenecks = Images::new(&mut bottleneck, bottleneck_len);
            parts.run(|part, images, share, par| {
                let normed = &mut lock(&scratch[part]).normed;
                let rows = share.of(b.bottleneck);
                for n in images {
                    scale_shift_relu(
                        &out[n * image_len..][..c_in * pixels],
                        (&scale1, &shift1),
                        pixels,
                        normed,
                        par,
                    );
                    // SAFETY: each (image, share of channels) belongs to one part.
                    let dst = unsafe { bottlenecks.part(n, rows.start * pixels..rows.end * pixels) };
                    let (w, x) = (
                        Mat::rows(p.conv1[rows.start * c_in..].as_ptr(), c_in),
                        Mat::rows(normed.as_ptr(), pixels),
                    );
                    matmul(dst, rows.len(), pixels, c_in, w, x, false, par);
                }
            });
            let stats2 = self
                .batch_stats
                .then(|| channel_stats(&bottleneck, bottleneck_len, 0..b.bottleneck, pixels));
            let (norm2, var2) = self.affine(p.norm2, p.running2, stats2.as_ref().map(|(m, v)| (&m[..], &v[..])));
            let (scale2, shift2) = norm2.in_type::<T>();
            let images = Images::new(&mut out, image_len);
            parts.run(|part, range, share, par| {
                let Scratch { padded, wide, .. } = &mut *lock(&scratch[part]);
                let rows = share.of(b.growth);
                let conv2 = &p.conv2[rows.start * b.bottleneck * 9..rows.end * b.bottleneck * 9];
                let wide = &mut wide[..rows.len() * pad.wide()];
                for n in range {
                    scale_shift_relu_padded(
                        &bottleneck[n * bottleneck_len..][..bottleneck_len],
                        (&scale2, &shift2),
                        pad,
                        padded,
                        par,
                    );
                    conv3x3(conv2, b.bottleneck, padded, pad, wide, par);
                    // SAFETY: each (image, share of channels) belongs to one part.
                    let dst = unsafe { images.part(n, (c_in + rows.start) * pixels..(c_in + rows.end) * pixels) };
                    narrow_rows(wide, b.w, dst);
                }
            });
            if self.batch_stats {
                let (m, v) = channel_stats(&out, image_len, c_in..c_in + b.growth, pixels);
                means.extend(m);
                vars.extend(v);
            }
            if save {
                saved
                    .bottlenecks
                    .push(T::to_cpu_storage_owned(std::mem::take(&mut bottleneck)));
            }
            saved.norms.push((norm1, norm2));
            saved.variances.push((var1, var2));
        }
        *lock(&self.saved) = Some(saved);
        out
    }

    /// Gradients of the block's input and of the packed parameters, from the block's
    /// output `out` and its gradient `grad`.
    fn backward<T: Float>(&self, out: &[T], grad: &[T]) -> Result<(Vec<T>, Vec<T>)> {
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

impl DenseBlock {
    fn run_forward(&self, storage: &CpuStorage, layout: &Layout, save: bool) -> Result<(CpuStorage, Shape)> {
        let out = float_op!("dense block", [(storage, layout) => xs], self.forward(xs, save)?);
        Ok((out, self.block.out_shape()))
    }
}

impl CustomOp1 for DenseBlock {
    fn name(&self) -> &'static str {
        "dense-block"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run_forward(storage, layout, false)
    }
}

impl CustomOp2 for DenseBlock {
    fn name(&self) -> &'static str {
        "dense-block"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        _packed: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // The parameters are read from `self.layers`; the packed tensor only carries their gradient.
        self.run_forward(storage, layout, true)
    }

    fn bwd(
        &self,
        xs: &Tensor,
        packed: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grads = out.apply_op2_no_bwd(&grad.contiguous()?, &DenseBlockGrad(self))?;
        let d_xs = grads.narrow(0, 0, xs.elem_count())?.reshape(xs.shape())?;
        let d_packed = grads.narrow(0, xs.elem_count(), packed.elem_count())?;
        Ok((Some(d_xs), Some(d_packed)))
    }
}

/// (block output, its gradient) → the input's gradient followed by the packed parameters'.
struct DenseBlockGrad<'a>(&'a DenseBlock);

impl CustomOp2 for DenseBlockGrad<'_> {
    fn name(&self) -> &'static str {
        "dense-block-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let len;
        let grads = float_op!(self.name(), [(s1, l1) => out, (s2, l2) => grad], {
            let (mut d_xs, d_params) = self.0.backward(out, grad)?;
            d_xs.extend(d_params);
            len = d_xs.len();
            d_xs
        });
        Ok((grads, Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};

    fn random(shape: &[usize], seed: u64, lo: f64, hi: f64) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let data: Vec<f64> = (0..shape.iter().product::<usize>())
            .map(|_| rng.random_range(lo..hi))
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    fn max_abs(a: &Tensor) -> f64 {
        a.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Random layers whose trainable tensors are variables; running statistics are
    /// plain tensors away from 0 and 1 so that inference mode is not the identity.
    fn layers(
        in_channels: usize,
        growth: usize,
        bottleneck: usize,
        count: usize,
        seed: u64,
    ) -> (Vec<LayerTensors>, Vec<Var>) {
        let mut vars = Vec::new();
        let mut var = |shape: &[usize], seed: u64, lo: f64, hi: f64| {
            let v = Var::from_tensor(&random(shape, seed, lo, hi)).unwrap();
            vars.push(v.clone());
            v.as_tensor().clone()
        };
        let layers = (0..count)
            .map(|l| {
                let c = in_channels + l * growth;
                let s = seed + 100 * l as u64;
                LayerTensors {
                    norm1: NormTensors {
                        weight: var(&[c], s, 0.5, 1.5),
                        bias: var(&[c], s + 1, -0.5, 0.5),
                        running_mean: random(&[c], s + 2, -0.3, 0.3),
                        running_var: random(&[c], s + 3, 0.5, 2.0),
                    },
                    conv1: var(&[bottleneck, c, 1, 1], s + 4, -0.5, 0.5),
                    norm2: NormTensors {
                        weight: var(&[bottleneck], s + 5, 0.5, 1.5),
                        bias: var(&[bottleneck], s + 6, -0.5, 0.5),
                        running_mean: random(&[bottleneck], s + 7, -0.3, 0.3),
                        running_var: random(&[bottleneck], s + 8, 0.5, 2.0),
                    },
                    conv2: var(&[growth, bottleneck, 3, 3], s + 9, -0.3, 0.3),
                }
            })
            .collect();
        (layers, vars)
    }

    /// BatchNorm+ReLU from candle's own ops.
    fn reference_norm_relu(xs: &Tensor, norm: &NormTensors, batch_stats: bool, eps: f64) -> Tensor {
        let c = xs.dim(1).unwrap();
        let (mean, var) = if batch_stats {
            let mean = xs.mean_keepdim((0, 2, 3)).unwrap();
            let var = xs
                .broadcast_sub(&mean)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_keepdim((0, 2, 3))
                .unwrap();
            (mean, var)
        } else {
            (
                norm.running_mean.reshape((1, c, 1, 1)).unwrap(),
                norm.running_var.reshape((1, c, 1, 1)).unwrap(),
            )
        };
        let normed = xs
            .broadcast_sub(&mean)
            .unwrap()
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap();
        normed
            .broadcast_mul(&norm.weight.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&norm.bias.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .relu()
            .unwrap()
    }

    /// The block as torchvision writes it: a `cat` before every layer, candle's convolutions.
    fn reference(xs: &Tensor, layers: &[LayerTensors], batch_stats: bool, eps: f64) -> Tensor {
        let mut features = vec![xs.clone()];
        for layer in layers {
            let input = Tensor::cat(&features, 1).unwrap();
            let h = reference_norm_relu(&input, &layer.norm1, batch_stats, eps)
                .conv2d(&layer.conv1, 0, 1, 1, 1)
                .unwrap();
            let h = reference_norm_relu(&h, &layer.norm2, batch_stats, eps)
                .conv2d(&layer.conv2, 1, 1, 1, 1)
                .unwrap();
            features.push(h);
        }
        Tensor::cat(&features, 1).unwrap()
    }

    /// Ours against the reference in f64, outputs and the gradients of the input and
    /// of every trainable tensor: 1e-9 (the sums differ in order only).
    fn check(
        batch: usize,
        in_channels: usize,
        growth: usize,
        bottleneck: usize,
        count: usize,
        side: (usize, usize),
        batch_stats: bool,
    ) {
        let what = format!(
            "batch {batch} in {in_channels} growth {growth} bottleneck {bottleneck} layers {count} side {side:?} batch_stats {batch_stats}"
        );
        let eps = 1e-5;
        let xs = Var::from_tensor(&random(&[batch, in_channels, side.0, side.1], 7, -1.0, 1.0)).unwrap();
        let (layers, vars) = layers(in_channels, growth, bottleneck, count, 11);
        let (ours, stats) = dense_block(&xs, &layers, batch_stats, eps, true).unwrap();
        let expected = reference(&xs, &layers, batch_stats, eps);
        assert_eq!(ours.dims(), expected.dims(), "{what}");
        assert!(
            max_abs_diff(&ours, &expected) < 1e-9,
            "forward {what}: {}",
            max_abs_diff(&ours, &expected)
        );
        assert_eq!(stats.is_some(), batch_stats);

        let probe = random(ours.dims(), 3, -1.0, 1.0);
        let g_ours = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (&expected * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, var) in std::iter::once(&xs).chain(&vars).enumerate() {
            let (a, b) = (g_ours.get(var).unwrap(), g_ref.get(var).unwrap());
            assert!(max_abs(b) > 1e-6, "tensor {i} has no reference gradient ({what})");
            assert!(
                max_abs_diff(a, b) < 1e-9,
                "gradient of tensor {i} {what}: {}",
                max_abs_diff(a, b)
            );
        }
    }

    #[test]
    fn inference_without_a_graph_runs_in_one_region_and_gives_the_fork_join_bits() {
        // Batches below the thread count split each product by channels: with a graph
        // the layers fork and join, without one (inference) the block runs in one
        // parallel region (one_region.rs). Same shares, same arithmetic: same bits.
        // Pools wider and narrower than the kernels' thread count, where the region's
        // copies may run one after another.
        for (pool_threads, batch, side) in [(2, 1, (5, 5)), (3, 1, (4, 7)), (1, 1, (6, 3)), (4, 3, (3, 3))] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(pool_threads)
                .build()
                .unwrap();
            pool.install(|| {
                let xs = Var::from_tensor(&random(&[batch, 6, side.0, side.1], 7, -1.0, 1.0)).unwrap();
                let (layers, _) = layers(6, 3, 5, 4, 13);
                let (with_graph, _) = dense_block(&xs, &layers, false, 1e-5, true).unwrap();
                let (in_one_region, _) = dense_block(xs.as_tensor(), &layers, false, 1e-5, false).unwrap();
                let what = format!("{pool_threads} threads, batch {batch}, side {side:?}");
                assert_eq!(
                    with_graph.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                    in_one_region.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                    "{what}"
                );
                let expected = reference(xs.as_tensor(), &layers, false, 1e-5);
                assert!(max_abs_diff(&in_one_region, &expected) < 1e-9, "{what}");
            });
        }
    }

    #[test]
    fn matches_the_concatenating_block_forward_and_backward() {
        // Odd sides, batch 1, channel counts off the vector width, both BatchNorm modes;
        // batch 5 splits images between threads, batch 1 splits each product instead.
        for batch_stats in [true, false] {
            check(5, 3, 2, 5, 3, (7, 6), batch_stats);
            check(1, 5, 3, 4, 2, (5, 5), batch_stats);
            check(2, 1, 4, 3, 1, (3, 4), batch_stats);
        }
        check(3, 2, 2, 2, 2, (1, 1), false); // one pixel: every 3x3 tap but the centre is padding
    }

    #[test]
    fn reports_the_batch_statistics_it_normalised_with() {
        let xs = random(&[3, 2, 4, 5], 1, -1.0, 1.0);
        let (layers, _) = layers(2, 3, 4, 2, 5);
        let (out, stats) = dense_block(&xs, &layers, true, 1e-5, false).unwrap();
        let stats = stats.unwrap();
        // Layer 2 reads the input and layer 1's channels; norm2 sees its own bottleneck.
        let input = out.narrow(1, 0, 5).unwrap();
        let mean: Vec<f64> = input
            .mean_keepdim((0, 2, 3))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let centred = input.broadcast_sub(&input.mean_keepdim((0, 2, 3)).unwrap()).unwrap();
        let var: Vec<f64> = centred
            .sqr()
            .unwrap()
            .mean_keepdim((0, 2, 3))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for c in 0..5 {
            assert!((stats[1].mean1[c] - mean[c]).abs() < 1e-12 && (stats[1].var1[c] - var[c]).abs() < 1e-12);
        }
        assert_eq!(stats[0].mean1, stats[1].mean1[..2].to_vec());
        assert_eq!(stats[1].mean2.len(), 4);
    }

    #[test]
    fn f32_agrees_with_the_reference_within_rounding() {
        let xs = random(&[4, 6, 9, 9], 2, -1.0, 1.0);
        let (layers, _) = layers(6, 4, 8, 3, 9);
        let to_f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let layers32: Vec<LayerTensors> = layers
            .iter()
            .map(|l| {
                let norm = |n: &NormTensors| NormTensors {
                    weight: to_f32(&n.weight),
                    bias: to_f32(&n.bias),
                    running_mean: to_f32(&n.running_mean),
                    running_var: to_f32(&n.running_var),
                };
                LayerTensors {
                    norm1: norm(&l.norm1),
                    conv1: to_f32(&l.conv1),
                    norm2: norm(&l.norm2),
                    conv2: to_f32(&l.conv2),
                }
            })
            .collect();
        for batch_stats in [true, false] {
            let (ours, _) = dense_block(&to_f32(&xs), &layers32, batch_stats, 1e-5, false).unwrap();
            let expected = reference(&xs, &layers, batch_stats, 1e-5);
            // Sums of at most 72 terms of order 1: f32 rounding stays below 1e-4.
            assert!(max_abs_diff(&ours.to_dtype(DType::F64).unwrap(), &expected) < 1e-4);
        }
    }

    #[test]
    fn bad_shapes_and_types_are_errors() {
        let (layers, _) = layers(3, 2, 4, 2, 1);
        assert!(dense_block(&random(&[1, 4, 5, 5], 1, 0.0, 1.0), &layers, false, 1e-5, false).is_err());
        assert!(dense_block(&random(&[3, 5, 5], 1, 0.0, 1.0), &layers, false, 1e-5, false).is_err());
        assert!(dense_block(
            &random(&[1, 3, 5, 5], 1, 0.0, 1.0).to_dtype(DType::F32).unwrap(),
            &layers,
            false,
            1e-5,
            false
        )
        .is_err());
        assert!(dense_block(&random(&[1, 3, 1, 1], 1, 0.0, 1.0), &layers, true, 1e-5, false).is_err());
        assert!(dense_block(&random(&[1, 3, 5, 5], 1, 0.0, 1.0), &[], false, 1e-5, false).is_err());
        let mut wrong = layers.clone();
        wrong[1].conv1 = random(&[4, 4, 1, 1], 1, 0.0, 1.0);
        let message = dense_block(&random(&[1, 3, 5, 5], 1, 0.0, 1.0), &wrong, false, 1e-5, false)
            .unwrap_err()
            .to_string();
        assert!(message.contains("layer 2 conv1.weight"), "{message}");
    }
}

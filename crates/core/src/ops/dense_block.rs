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
use super::norm::NormTensors;
use super::{float_op, simd_fn, Float};

mod backward;
mod one_region;

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

/// Wide rows (`w + 2` long) to plain ones, dropping the discarded columns.
fn narrow_rows<T: Copy>(wide: &[T], w: usize, dst: &mut [T]) {
    for (dst, src) in dst.chunks_exact_mut(w).zip(wide.chunks_exact(w + 2)) {
        dst.copy_from_slice(&src[..w]);
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
mod tests;

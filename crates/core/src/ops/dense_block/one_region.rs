//! Inference at small batches in one parallel region per block.
//!
//! Split by output channels, each dense layer is two products that every thread
//! must see finished before the next starts. As rayon fork-joins that is two
//! wake-ups of sleeping threads per layer, 116 in DenseNet121, and at batch 1
//! they cost about as much as the second thread gains (natively; more in the
//! browser, where a wake-up goes through `Atomics.wait`). Here each thread
//! enters once per block and walks the same list of steps, claiming shares of
//! each step from a counter and spinning until the step is complete.
//!
//! It cannot deadlock however rayon schedules the threads: a thread only ever
//! waits for shares that another thread has claimed, that is, is running (the
//! shares themselves never call into rayon). If one thread ends up running
//! every copy of the region in turn, the first does all the work and the others
//! find it done. Each share is the same arithmetic as in the fork-join path,
//! so both give the same bits.

use std::sync::atomic::{AtomicUsize, Ordering};

use gemm::Parallelism;
use rayon::prelude::*;

use super::{
    conv3x3, lock, matmul, narrow_rows, scale_shift_relu, scale_shift_relu_padded, Affine, Block, Float, Images,
    LayerSlices, Mat, Scratch, Share,
};

/// Per step (conv1 then conv2 of every layer), who took which share and how many are done.
struct Steps {
    shares: usize,
    claimed: Vec<AtomicUsize>,
    done: Vec<AtomicUsize>,
}

impl Steps {
    fn new(steps: usize, shares: usize) -> Self {
        let counters = || (0..steps).map(|_| AtomicUsize::new(0)).collect();
        Self {
            shares,
            claimed: counters(),
            done: counters(),
        }
    }

    /// The next unclaimed share of `step`, if any is left.
    fn claim(&self, step: usize) -> Option<Share> {
        let index = self.claimed[step].fetch_add(1, Ordering::Relaxed);
        (index < self.shares).then_some(Share {
            index,
            count: self.shares,
        })
    }

    fn finish(&self, step: usize) {
        // Release: this share's writes are visible to whoever sees the count.
        self.done[step].fetch_add(1, Ordering::Release);
    }

    /// Returns once every share of `step` is finished.
    fn wait_for(&self, step: usize) {
        let mut spins = 0u32;
        while self.done[step].load(Ordering::Acquire) < self.shares {
            // A share takes microseconds: spin first, then leave the core to others.
            if spins < 1 << 14 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// One layer's BatchNorms, in the kernels' type.
pub(super) struct LayerNorms<T> {
    pub(super) scale_shift1: (Vec<T>, Vec<T>),
    pub(super) scale_shift2: (Vec<T>, Vec<T>),
}

impl<T: Float> LayerNorms<T> {
    pub(super) fn new(norm1: &Affine, norm2: &Affine) -> Self {
        Self {
            scale_shift1: norm1.in_type::<T>(),
            scale_shift2: norm2.in_type::<T>(),
        }
    }
}

/// Runs every layer of the block over `out` (whose first channels hold the block's
/// input) with `threads` threads, each with its own `scratch`.
pub(super) fn forward<T: Float>(
    b: &Block,
    params: &[LayerSlices<T>],
    norms: &[LayerNorms<T>],
    out: &mut [T],
    scratch: &[std::sync::Mutex<Scratch<T>>],
) {
    let (pixels, image_len, bottleneck_len) = (b.pixels(), b.image_len(), b.bottleneck_len());
    let pad = b.padded();
    let threads = scratch.len();
    let mut bottleneck = vec![T::zero(); b.batch * bottleneck_len];
    let steps = Steps::new(2 * params.len(), threads);
    let outputs = Images::new(out, image_len);
    let bottlenecks = Images::new(&mut bottleneck, bottleneck_len);

    (0..threads).into_par_iter().for_each(|thread| {
        let Scratch {
            normed, padded, wide, ..
        } = &mut *lock(&scratch[thread]);
        for (l, (p, norm)) in params.iter().zip(norms).enumerate() {
            let c_in = b.layer_in(l);
            let (conv1_step, conv2_step) = (2 * l, 2 * l + 1);
            if l > 0 {
                steps.wait_for(conv2_step - 2);
            }
            while let Some(share) = steps.claim(conv1_step) {
                let rows = share.of(b.bottleneck);
                for n in 0..b.batch {
                    // SAFETY: the channels below c_in were finished by earlier steps, which
                    // every thread has waited for, and nothing writes them any more.
                    let input = unsafe { outputs.read(n, 0..c_in * pixels) };
                    let (scale, shift) = &norm.scale_shift1;
                    scale_shift_relu(input, (scale, shift), pixels, normed, Parallelism::None);
                    // SAFETY: each (image, share of channels) of this step is claimed by one thread.
                    let dst = unsafe { bottlenecks.part(n, rows.start * pixels..rows.end * pixels) };
                    let (w, x) = (
                        Mat::rows(p.conv1[rows.start * c_in..].as_ptr(), c_in),
                        Mat::rows(normed.as_ptr(), pixels),
                    );
                    matmul(dst, rows.len(), pixels, c_in, w, x, false, Parallelism::None);
                }
                steps.finish(conv1_step);
            }
            steps.wait_for(conv1_step);
            while let Some(share) = steps.claim(conv2_step) {
                let rows = share.of(b.growth);
                let conv2 = &p.conv2[rows.start * b.bottleneck * 9..rows.end * b.bottleneck * 9];
                let wide = &mut wide[..rows.len() * pad.wide()];
                for n in 0..b.batch {
                    // SAFETY: conv1's step is complete and no thread writes bottlenecks until
                    // the next layer's conv1, which waits for this step.
                    let input = unsafe { bottlenecks.read(n, 0..bottleneck_len) };
                    let (scale, shift) = &norm.scale_shift2;
                    scale_shift_relu_padded(input, (scale, shift), pad, padded, Parallelism::None);
                    conv3x3(conv2, b.bottleneck, padded, pad, wide, Parallelism::None);
                    // SAFETY: each (image, share of channels) of this step is claimed by one thread.
                    let dst = unsafe { outputs.part(n, (c_in + rows.start) * pixels..(c_in + rows.end) * pixels) };
                    narrow_rows(wide, b.w, dst);
                }
                steps.finish(conv2_step);
            }
        }
    });
    // The caller reads `out` next: every share of the last step must be written.
    steps.wait_for(2 * params.len() - 1);
}

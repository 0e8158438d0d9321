//! A packed f32 matrix product whose micro-kernel fuses each multiply and add.
//!
//! SIMD128 has no fused multiply-add, so gemm's wasm micro-kernel multiplies, then
//! adds. Relaxed SIMD's `f32x4.relaxed_madd` is one FMA instruction where the CPU has
//! one (every x86-64 since Haswell, every ARM64), and the browser's relaxed-SIMD
//! builds (feature `relaxed-simd`) run the convolutions' products through this
//! module instead of gemm. Native builds keep gemm, whose AVX2 and AVX-512 kernels
//! already fuse; they compile this module with portable lanes only so that the
//! packing, blocking, edges and threading are tested everywhere.
//!
//! The layout is the usual one (Goto/BLIS): a block of `KC` rows of the right
//! operand is packed into panels `NR` columns wide, a block of the left operand into
//! panels `MR` rows tall, both zero-padded to whole panels, and the micro-kernel
//! keeps an `MR`×`NR` tile of the result in registers while it walks `KC`. Four rows
//! by two vectors is eight accumulators: enough independent FMAs to hide their
//! latency, few enough that V8's register allocator (16 vector registers on
//! x86-64) never spills.

use std::ops::Range;

use gemm::Parallelism;
use rayon::prelude::*;

/// Rows of the left operand per micro-tile.
const MR: usize = 4;
/// Columns of the right operand per micro-tile: two vectors of four.
const NR: usize = 8;
/// Depth of one packed block: a right panel (KC·NR floats, 8 KiB) stays in L1 while
/// the kernel runs it against every left panel.
const KC: usize = 256;
/// Rows of the left operand packed at once (KC·MC floats, 128 KiB: L2).
const MC: usize = 128;
/// Columns of the right operand packed at once (KC·NC floats, 256 KiB: L2).
const NC: usize = 256;

/// Four f32 lanes and the four operations the micro-kernel needs.
pub(crate) trait Lanes: Copy {
    /// # Safety
    /// `src` points to four readable floats.
    unsafe fn load(src: *const f32) -> Self;
    /// # Safety
    /// `src` points to a readable float.
    unsafe fn splat(src: *const f32) -> Self;
    /// # Safety
    /// `dst` points to four writable floats.
    unsafe fn store(self, dst: *mut f32);
    fn zero() -> Self;
    /// `acc + a·b`, fused where the lanes allow.
    fn mul_add(a: Self, b: Self, acc: Self) -> Self;
    /// [`micro_kernel`] on these lanes, as a function of its own where the lanes need
    /// a target feature: inlined into code without it (the product's closures, which
    /// do not inherit it), the fused multiply-add would become a call.
    fn tile(kc: usize, a: &[f32], b: &[f32]) -> [[Self; 2]; MR] {
        micro_kernel::<Self>(kc, a, b)
    }
}

/// Plain arrays: what the tests run natively.
#[cfg(test)]
#[derive(Clone, Copy)]
pub(crate) struct Portable([f32; 4]);

#[cfg(test)]
impl Lanes for Portable {
    #[inline(always)]
    unsafe fn load(src: *const f32) -> Self {
        // SAFETY: the caller's.
        Self(unsafe { src.cast::<[f32; 4]>().read_unaligned() })
    }
    #[inline(always)]
    unsafe fn splat(src: *const f32) -> Self {
        // SAFETY: the caller's.
        Self([unsafe { *src }; 4])
    }
    #[inline(always)]
    unsafe fn store(self, dst: *mut f32) {
        // SAFETY: the caller's.
        unsafe { dst.cast::<[f32; 4]>().write_unaligned(self.0) }
    }
    #[inline(always)]
    fn zero() -> Self {
        Self([0.0; 4])
    }
    #[inline(always)]
    fn mul_add(a: Self, b: Self, acc: Self) -> Self {
        Self(std::array::from_fn(|i| acc.0[i] + a.0[i] * b.0[i]))
    }
}

#[cfg(all(target_arch = "wasm32", feature = "relaxed-simd"))]
mod relaxed {
    use core::arch::wasm32::{f32x4_relaxed_madd, f32x4_splat, v128, v128_load, v128_store};

    /// SIMD128 lanes with relaxed SIMD's multiply-add, which only [`relaxed_tile`]
    /// (compiled with the feature) uses.
    #[derive(Clone, Copy)]
    pub(crate) struct Relaxed(v128);

    impl super::Lanes for Relaxed {
        #[inline(always)]
        unsafe fn load(src: *const f32) -> Self {
            // SAFETY: the caller's (four readable floats; v128 loads need no alignment).
            Self(unsafe { v128_load(src.cast()) })
        }
        #[inline(always)]
        unsafe fn splat(src: *const f32) -> Self {
            // SAFETY: the caller's.
            Self(f32x4_splat(unsafe { *src }))
        }
        #[inline(always)]
        unsafe fn store(self, dst: *mut f32) {
            // SAFETY: the caller's (four writable floats; no alignment needed).
            unsafe { v128_store(dst.cast(), self.0) }
        }
        #[inline(always)]
        fn zero() -> Self {
            Self(f32x4_splat(0.0))
        }
        #[inline(always)]
        fn mul_add(a: Self, b: Self, acc: Self) -> Self {
            // Safe on wasm: a browser without relaxed SIMD rejects the whole module
            // when it validates it, before anything runs.
            Self(f32x4_relaxed_madd(a.0, b.0, acc.0))
        }
        #[inline(always)]
        fn tile(kc: usize, a: &[f32], b: &[f32]) -> [[Self; 2]; super::MR] {
            relaxed_tile(kc, a, b)
        }
    }

    #[target_feature(enable = "relaxed-simd")]
    fn relaxed_tile(kc: usize, a: &[f32], b: &[f32]) -> [[Relaxed; 2]; super::MR] {
        super::micro_kernel::<Relaxed>(kc, a, b)
    }
}

#[cfg(all(target_arch = "wasm32", feature = "relaxed-simd"))]
pub(crate) use relaxed::Relaxed;

/// A matrix in memory: its first element and its (row, column) strides in elements.
#[derive(Clone, Copy)]
pub(crate) struct Strided<P> {
    pub(crate) ptr: P,
    pub(crate) row_stride: isize,
    pub(crate) col_stride: isize,
}

// SAFETY: the threads of one product write disjoint columns (or rows) of the
// destination and only read the operands; `matmul`'s caller guarantees that the
// memory outlives the call.
unsafe impl<P> Send for Strided<P> {}
// SAFETY: as for Send.
unsafe impl<P> Sync for Strided<P> {}

impl<P: Copy> Strided<P> {
    fn offset(&self, row: usize, col: usize) -> isize {
        row as isize * self.row_stride + col as isize * self.col_stride
    }
}

/// `dst = lhs·rhs` (or `dst += lhs·rhs` with `accumulate`) for an m×k `lhs` and a
/// k×n `rhs`, across threads when `parallelism` says so.
///
/// # Safety
/// Every element the strides address (m×n of `dst`, m×k of `lhs`, k×n of `rhs`)
/// lies in memory valid for the call, and `dst` overlaps neither operand.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn matmul<L: Lanes>(
    dst: Strided<*mut f32>,
    m: usize,
    n: usize,
    k: usize,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    accumulate: bool,
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let threads = match parallelism {
        Parallelism::None => 1,
        Parallelism::Rayon(0) => rayon::current_num_threads(),
        Parallelism::Rayon(threads) => threads,
    };
    let operands = Operands {
        dst,
        k,
        lhs,
        rhs,
        accumulate,
    };
    let (m_tiles, n_tiles) = (m.div_ceil(MR), n.div_ceil(NR));
    if threads <= 1 || m_tiles.max(n_tiles) < 2 {
        // SAFETY: the caller's.
        return unsafe { product::<L>(&operands, 0..m, 0..n) };
    }
    // Whole tiles per thread, along the dimension with more of them: each thread
    // packs the other operand for itself, which costs little beside its products.
    let (tiles, tile) = if n_tiles >= m_tiles {
        (n_tiles, NR)
    } else {
        (m_tiles, MR)
    };
    let per_share = tiles.div_ceil(threads.min(tiles)) * tile;
    let along_columns = n_tiles >= m_tiles;
    let extent = if along_columns { n } else { m };
    (0..extent.div_ceil(per_share)).into_par_iter().for_each(|share| {
        let part = share * per_share..((share + 1) * per_share).min(extent);
        let (rows, cols) = if along_columns { (0..m, part) } else { (part, 0..n) };
        // SAFETY: the shares' destination elements are disjoint; the rest is the caller's.
        unsafe { product::<L>(&operands, rows, cols) }
    });
}

/// One product's matrices, depth and mode, shared by the threads that split it.
#[derive(Clone, Copy)]
struct Operands {
    dst: Strided<*mut f32>,
    k: usize,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    accumulate: bool,
}

/// The product restricted to `rows` of `lhs` and `dst` and `cols` of `rhs` and `dst`,
/// on this thread.
#[inline(always)]
unsafe fn product<L: Lanes>(operands: &Operands, rows: Range<usize>, cols: Range<usize>) {
    let &Operands { dst, k, accumulate, .. } = operands;
    if k == 0 {
        if !accumulate {
            for row in rows {
                for col in cols.clone() {
                    // SAFETY: an element of the matrices the caller vouches for (`matmul`'s contract).
                    unsafe { *dst.ptr.offset(dst.offset(row, col)) = 0.0 };
                }
            }
        }
        return;
    }
    let kc_max = KC.min(k);
    PACKED.with_borrow_mut(|(packed_rhs, packed_lhs)| {
        // Packing writes every element it reads back, so growing is all they need.
        let rhs_len = kc_max * NC.min(cols.len()).next_multiple_of(NR);
        let lhs_len = kc_max * MC.min(rows.len()).next_multiple_of(MR);
        if packed_rhs.len() < rhs_len {
            packed_rhs.resize(rhs_len, 0.0);
        }
        if packed_lhs.len() < lhs_len {
            packed_lhs.resize(lhs_len, 0.0);
        }
        // SAFETY: the caller's; the buffers hold a block each (grown just above).
        unsafe { blocked::<L>(operands, rows, cols, packed_rhs, packed_lhs) }
    })
}

thread_local! {
    /// Each thread's packed right and left blocks, kept between products: a dense
    /// block makes thousands of small ones, and the browser's allocator takes a lock.
    static PACKED: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// [`product`] with its packing buffers, each large enough for one block.
#[inline(always)]
unsafe fn blocked<L: Lanes>(
    operands: &Operands,
    rows: Range<usize>,
    cols: Range<usize>,
    packed_rhs: &mut [f32],
    packed_lhs: &mut [f32],
) {
    let &Operands {
        dst,
        k,
        lhs,
        rhs,
        accumulate,
    } = operands;
    for jc in cols.clone().step_by(NC) {
        let nc = NC.min(cols.end - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            // SAFETY: rows pc..pc+kc and columns jc..jc+nc lie inside `rhs`.
            unsafe { pack_rhs(packed_rhs, rhs, pc, kc, jc, nc) };
            // The first depth block overwrites unless the caller accumulates.
            let add_to_dst = accumulate || pc > 0;
            for ic in rows.clone().step_by(MC) {
                let mc = MC.min(rows.end - ic);
                // SAFETY: rows ic..ic+mc and columns pc..pc+kc lie inside `lhs`.
                unsafe { pack_lhs(packed_lhs, lhs, ic, mc, pc, kc) };
                for jr in (0..nc).step_by(NR) {
                    let b = &packed_rhs[jr * kc..][..kc * NR];
                    for ir in (0..mc).step_by(MR) {
                        let a = &packed_lhs[ir * kc..][..kc * MR];
                        let tile = L::tile(kc, a, b);
                        let (tile_rows, tile_cols) = (MR.min(mc - ir), NR.min(nc - jr));
                        let at = dst.offset(ic + ir, jc + jr);
                        // SAFETY: the tile's rows and columns lie inside `dst`.
                        unsafe { write_tile(tile, dst, at, tile_rows, tile_cols, add_to_dst) };
                    }
                }
            }
        }
    }
}

/// `rhs[pc.., jc..]` (kc×nc) as panels of NR columns, each kc rows of NR floats,
/// the last padded with zeros.
#[inline(always)]
unsafe fn pack_rhs(packed: &mut [f32], rhs: Strided<*const f32>, pc: usize, kc: usize, jc: usize, nc: usize) {
    for (panel, jr) in (0..nc).step_by(NR).enumerate() {
        let width = NR.min(nc - jr);
        let out = &mut packed[panel * kc * NR..][..kc * NR];
        for (p, row) in out.chunks_exact_mut(NR).enumerate() {
            // SAFETY: the caller's (row pc + p, columns jc + jr.. of `rhs`).
            let src = unsafe { rhs.ptr.offset(rhs.offset(pc + p, jc + jr)) };
            if rhs.col_stride == 1 && width == NR {
                // SAFETY: NR contiguous elements of that row.
                row.copy_from_slice(unsafe { std::slice::from_raw_parts(src, NR) });
            } else {
                for (j, value) in row.iter_mut().enumerate() {
                    *value = if j < width {
                        // SAFETY: column jc + jr + j < jc + nc of that row.
                        unsafe { *src.offset(j as isize * rhs.col_stride) }
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// `lhs[ic.., pc..]` (mc×kc) as panels of MR rows, each kc columns of MR floats,
/// the last padded with zeros.
#[inline(always)]
unsafe fn pack_lhs(packed: &mut [f32], lhs: Strided<*const f32>, ic: usize, mc: usize, pc: usize, kc: usize) {
    for (panel, ir) in (0..mc).step_by(MR).enumerate() {
        let height = MR.min(mc - ir);
        let out = &mut packed[panel * kc * MR..][..kc * MR];
        for (i, row) in (0..MR).map(|i| (i, ic + ir + i)) {
            if i >= height {
                out.iter_mut().skip(i).step_by(MR).for_each(|v| *v = 0.0);
                continue;
            }
            // SAFETY: the caller's (row < ic + mc, columns pc.. of `lhs`).
            let src = unsafe { lhs.ptr.offset(lhs.offset(row, pc)) };
            for (p, value) in out.iter_mut().skip(i).step_by(MR).enumerate() {
                // SAFETY: column pc + p < pc + kc of that row.
                *value = unsafe { *src.offset(p as isize * lhs.col_stride) };
            }
        }
    }
}

/// One MR×NR tile of `a·b` over a packed left panel `a` (kc×MR) and right panel
/// `b` (kc×NR).
#[inline(always)]
fn micro_kernel<L: Lanes>(kc: usize, a: &[f32], b: &[f32]) -> [[L; 2]; MR] {
    assert!(a.len() >= kc * MR && b.len() >= kc * NR);
    let mut acc = [[L::zero(); 2]; MR];
    let (a, b) = (a.as_ptr(), b.as_ptr());
    for p in 0..kc {
        // SAFETY: p < kc and the panels hold kc·MR and kc·NR floats (asserted).
        unsafe {
            let b0 = L::load(b.add(p * NR));
            let b1 = L::load(b.add(p * NR + 4));
            for (i, row) in acc.iter_mut().enumerate() {
                let a_i = L::splat(a.add(p * MR + i));
                row[0] = L::mul_add(a_i, b0, row[0]);
                row[1] = L::mul_add(a_i, b1, row[1]);
            }
        }
    }
    acc
}

/// Writes (or adds) the first `rows`×`cols` of `tile` at `dst + at`.
#[inline(always)]
unsafe fn write_tile<L: Lanes>(
    tile: [[L; 2]; MR],
    dst: Strided<*mut f32>,
    at: isize,
    rows: usize,
    cols: usize,
    add_to_dst: bool,
) {
    for (i, lanes) in tile.iter().enumerate().take(rows) {
        let mut values = [0f32; NR];
        // SAFETY: `values` holds NR = 2·4 floats.
        unsafe {
            lanes[0].store(values.as_mut_ptr());
            lanes[1].store(values.as_mut_ptr().add(4));
        }
        // SAFETY: the caller's (row i < rows of the tile).
        let row = unsafe { dst.ptr.offset(at + i as isize * dst.row_stride) };
        for (j, value) in values.iter().enumerate().take(cols) {
            // SAFETY: column j < cols of that row; no other thread writes it.
            let out = unsafe { &mut *row.offset(j as isize * dst.col_stride) };
            *out = if add_to_dst { *out + value } else { *value };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(len: usize, seed: u64) -> Vec<f32> {
        let values = crate::testing::uniform(&[len], seed, -1.0, 1.0);
        values
            .to_dtype(candle_core::DType::F32)
            .and_then(|v| v.to_vec1())
            .expect("f32 values")
    }

    /// The product by definition, in f64.
    fn reference(m: usize, n: usize, k: usize, lhs: &[f32], rhs: &[f32], start: &[f32]) -> Vec<f64> {
        (0..m * n)
            .map(|at| {
                let (i, j) = (at / n, at % n);
                start[at] as f64
                    + (0..k)
                        .map(|p| lhs[i * k + p] as f64 * rhs[p * n + j] as f64)
                        .sum::<f64>()
            })
            .collect()
    }

    fn strided<P>(ptr: P, cols: usize) -> Strided<P> {
        Strided {
            ptr,
            row_stride: cols as isize,
            col_stride: 1,
        }
    }

    fn run(m: usize, n: usize, k: usize, accumulate: bool, parallelism: Parallelism) {
        let lhs = uniform(m * k, 1);
        let rhs = uniform(k * n, 2);
        let start = uniform(m * n, 3);
        let mut dst = start.clone();
        // SAFETY: the vectors hold m×n, m×k and k×n elements at these strides.
        unsafe {
            matmul::<Portable>(
                strided(dst.as_mut_ptr(), n),
                m,
                n,
                k,
                strided(lhs.as_ptr(), k),
                strided(rhs.as_ptr(), n),
                accumulate,
                parallelism,
            )
        };
        let zeros = vec![0.0; m * n];
        let expected = reference(m, n, k, &lhs, &rhs, if accumulate { &start } else { &zeros });
        for (at, (&got, want)) in dst.iter().zip(&expected).enumerate() {
            assert!(
                (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "{m}x{n}x{k} accumulate={accumulate} {parallelism:?}: element {at} is {got}, expected {want}"
            );
        }
    }

    #[test]
    fn products_of_every_edge_match_the_definition() {
        // Partial micro-tiles in both directions, several depth, row and column
        // blocks, an empty depth, one row, one column.
        for (m, n, k) in [
            (1, 1, 1),
            (4, 8, 3),
            (5, 9, 7),
            (3, 300, 2),
            (130, 17, 260),
            (33, 261, 513),
            (7, 5, 0),
            (1, 40, 9),
            (40, 1, 9),
        ] {
            for accumulate in [false, true] {
                for parallelism in [Parallelism::None, Parallelism::Rayon(3)] {
                    run(m, n, k, accumulate, parallelism);
                }
            }
        }
    }

    #[test]
    fn transposed_operands_and_a_strided_destination_are_read_and_written_where_they_lie() {
        // lhs stored transposed (column-major), rhs with a column stride of 2 and the
        // result into every other column of a wider matrix: the strides the
        // convolutions' weight gradients and taps use.
        let (m, n, k) = (6, 11, 13);
        let lhs_t = uniform(k * m, 4);
        let rhs_wide = uniform(k * n * 2, 5);
        let mut dst = vec![f32::NAN; m * n * 2];
        // SAFETY: m×2n, k×m and k×2n elements, of which the strides address m×n, m×k and k×n.
        unsafe {
            matmul::<Portable>(
                Strided {
                    ptr: dst.as_mut_ptr(),
                    row_stride: 2 * n as isize,
                    col_stride: 2,
                },
                m,
                n,
                k,
                Strided {
                    ptr: lhs_t.as_ptr(),
                    row_stride: 1,
                    col_stride: m as isize,
                },
                Strided {
                    ptr: rhs_wide.as_ptr(),
                    row_stride: 2 * n as isize,
                    col_stride: 2,
                },
                false,
                Parallelism::Rayon(2),
            )
        };
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|p| lhs_t[p * m + i] as f64 * rhs_wide[p * 2 * n + 2 * j] as f64)
                    .sum();
                let got = dst[i * 2 * n + 2 * j];
                assert!((got as f64 - want).abs() < 1e-4, "({i}, {j}): {got} against {want}");
                assert!(
                    dst[i * 2 * n + 2 * j + 1].is_nan(),
                    "({i}, {j}): wrote between the columns"
                );
            }
        }
    }
}

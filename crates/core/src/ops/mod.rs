//! Our own tensor operations, where candle's are missing or wrong for training.

pub mod conv;
pub mod conv_relu_pool;
pub mod dense_block;
pub mod norm;
pub mod pool;
// The relaxed-SIMD browser builds' products; native builds compile it for its tests.
#[cfg(any(test, all(target_arch = "wasm32", feature = "relaxed-simd")))]
pub(crate) mod fused_gemm;

use candle_core::{bail, CpuStorage, DType, Layout, Result, Tensor, WithDType};

/// The element types our kernels run on: gemm's real types.
pub(crate) trait Float: WithDType + std::ops::AddAssign + num_traits::Float + Into<f64> + Send + Sync {}
impl Float for f32 {}
impl Float for f64 {}

/// The error of an op given a storage type it has no kernel for.
pub fn unsupported_dtype(op: &str, dtype: DType) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: unsupported dtype {dtype:?}, only f32 and f64 are supported"
    ))
}

/// Runs `$body` with every storage as a contiguous slice of one float type (f32 or
/// f64, the same for all), and wraps its `Vec` in that type's storage. Mixed or
/// other types, and non-contiguous layouts, are errors naming the op.
macro_rules! float_op {
    ($op:expr, [$(($storage:expr, $layout:expr) => $slice:ident),+ $(,)?], $body:expr) => {{
        let dtypes = [$(candle_core::backend::BackendStorage::dtype($storage)),+];
        if let Some(other) = dtypes.iter().find(|&&dtype| dtype != dtypes[0]) {
            candle_core::bail!("{}: operands have different dtypes {:?} and {:?}", $op, dtypes[0], other);
        }
        match dtypes[0] {
            candle_core::DType::F32 => {
                $(let $slice = $crate::ops::contiguous_slice::<f32>($op, $storage, $layout)?;)+
                candle_core::CpuStorage::F32($body)
            }
            candle_core::DType::F64 => {
                $(let $slice = $crate::ops::contiguous_slice::<f64>($op, $storage, $layout)?;)+
                candle_core::CpuStorage::F64($body)
            }
            other => return Err($crate::ops::unsupported_dtype($op, other)),
        }
    }};
}
pub(crate) use float_op;

/// Defines a function generic over the module's `Float` whose body runs compiled
/// for AVX2 and FMA when the CPU has them, else as built (the portable baseline:
/// SSE2 on x86_64, SIMD128 in the browser, where the build enables it). For our
/// element-wise loops: the products pick their kernels at run time inside `gemm`,
/// but code of ours built for the baseline uses a quarter of an AVX2 core's width.
/// The body is an always-inlined function, so the AVX2 build really contains it.
macro_rules! simd_fn {
    ($(#[$meta:meta])* fn $name:ident<T: Float>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        fn $name<T: Float>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable<T: Float>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2<T: Float>($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` is compiled for (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

/// Σ a·b (or Σ a without `b`) in f64, accumulated in eight independent lanes of `T`
/// so that the loop vectorises: one accumulator is a chain of dependent additions.
#[inline(always)]
pub(crate) fn lane_dot<T: WithDType>(a: &[T], b: Option<&[T]>) -> f64 {
    let mut lanes = [T::zero(); 8];
    let mut tail = T::zero();
    match b {
        Some(b) => {
            for (a8, b8) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
                for ((lane, &a), &b) in lanes.iter_mut().zip(a8).zip(b8) {
                    *lane += a * b;
                }
            }
            let done = a.len() / 8 * 8;
            for (&a, &b) in a[done..].iter().zip(&b[done..]) {
                tail += a * b;
            }
        }
        None => {
            for a8 in a.chunks_exact(8) {
                for (lane, &a) in lanes.iter_mut().zip(a8) {
                    *lane += a;
                }
            }
            for &a in a.chunks_exact(8).remainder() {
                tail += a;
            }
        }
    }
    lanes.iter().map(|l| l.to_f64()).sum::<f64>() + tail.to_f64()
}

/// The range of its storage a contiguous layout covers, or an error naming the op.
pub fn contiguous_range(op: &str, layout: &Layout) -> Result<std::ops::Range<usize>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: expects contiguous tensors")
    };
    Ok(start..end)
}

/// The contiguous data of a CPU storage as `&[T]`, or an error naming the op.
pub fn contiguous_slice<'a, T: WithDType>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    Ok(&T::cpu_storage_as_slice(storage)?[contiguous_range(op, layout)?])
}

use rand_chacha::rand_core::{RngCore, SeedableRng};

/// Inverted dropout with a mask drawn from `seed`.
///
/// candle cannot seed its CPU generator, and training must be reproducible,
/// so the trainer hands every step its own seed.
pub fn dropout(xs: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability {p} is outside [0, 1)");
    }
    if p == 0.0 {
        return Ok(xs.clone());
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let keep_scale = 1.0 / (1.0 - p);
    // 24 random bits give a uniform draw in [0, 1) with f32 precision.
    let mask: Vec<f32> = (0..xs.elem_count())
        .map(|_| {
            let u = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
            if u < p {
                0.0
            } else {
                keep_scale
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
    xs * mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn dropout_is_seeded_and_keeps_the_expectation() {
        let xs = Tensor::ones((100, 100), candle_core::DType::F32, &Device::Cpu).unwrap();
        let a = dropout(&xs, 0.2, 7).unwrap();
        let b = dropout(&xs, 0.2, 7).unwrap();
        let c = dropout(&xs, 0.2, 8).unwrap();
        let a_v: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a_v, b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_ne!(a_v, c.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let zeros = a_v.iter().filter(|v| **v == 0.0).count() as f64 / 1e4;
        assert!((zeros - 0.2).abs() < 0.02, "dropped fraction {zeros}");
        let mean = a_v.iter().map(|v| *v as f64).sum::<f64>() / 1e4;
        assert!((mean - 1.0).abs() < 0.03, "mean {mean}");
        assert!(dropout(&xs, 1.0, 0).is_err());
    }
}

//! What the tests of this crate and of the crates above it share (feature
//! `testing`): seeded random tensors and the largest element-wise difference.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

/// Values uniform in `[lo, hi)` from `seed`, as f64.
pub fn uniform(shape: &[usize], seed: u64, lo: f64, hi: f64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data: Vec<f64> = (0..shape.iter().product::<usize>())
        .map(|_| rng.random_range(lo..hi))
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("as many values as the shape holds")
}

/// The largest absolute value of a float tensor of any shape.
pub fn max_abs(a: &Tensor) -> f64 {
    a.abs()
        .and_then(|a| a.flatten_all())
        .and_then(|a| a.max(0))
        .and_then(|a| a.to_dtype(DType::F64))
        .and_then(|a| a.to_scalar::<f64>())
        .expect("a float tensor with at least one element")
}

/// The largest absolute difference between two float tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    max_abs(&(a - b).expect("same shape and dtype"))
}

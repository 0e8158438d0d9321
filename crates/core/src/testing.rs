//! What the tests of this crate and of the crates above it share (feature
//! `testing`): seeded random tensors, the largest element-wise difference, and
//! the tensors of a freshly initialised model.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};

use crate::models::Model;
use crate::ModelCard;

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

/// The tensors of a model of `card`'s architecture and size with candle's
/// initial weights, as a model file holds them.
pub fn random_weights(card: &ModelCard) -> HashMap<String, Tensor> {
    let varmap = VarMap::new();
    Model::new(
        &card.architecture,
        card.input_size(),
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .expect("the card's architecture builds");
    let tensors = varmap
        .data()
        .lock()
        .expect("nothing else holds the map")
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect();
    tensors
}

use super::*;
use crate::testing::{max_abs, max_abs_diff, uniform as random};
use candle_core::{DType, Var};

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
    let channel_means = |t: &Tensor| t.mean_keepdim((0, 2, 3)).unwrap();
    let as_vec = |t: Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let mean = as_vec(channel_means(&input));
    let centred = input.broadcast_sub(&channel_means(&input)).unwrap();
    let var = as_vec(channel_means(&centred.sqr().unwrap()));
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

//! Throughput and memory of the models' real work, on random inputs:
//! inference, a full training step, and a frozen-backbone (head-only) step.
//! Warm-up runs are discarded and the median of the timed runs is reported.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use fracture_core::models::{Mode, Model};
use fracture_core::{Architecture, ModelCard};
use serde::Serialize;

use crate::fit::{bce_with_logits, FitError};
use crate::optim::Adam;
use crate::params::Params;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchMode {
    /// Forward pass in inference mode.
    Infer,
    /// Forward, backward and an Adam step over every parameter.
    Train,
    /// The head-only step: the base runs forward without a graph.
    Frozen,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub model: String,
    pub mode: BenchMode,
    pub batch: usize,
    pub size: usize,
    pub warmup: usize,
    pub repetitions: usize,
    pub median_seconds: f64,
    pub images_per_second: f64,
    /// Peak resident memory of the whole process (Linux `VmHWM`), if known.
    pub peak_memory_bytes: Option<u64>,
    pub threads: usize,
}

/// Peak resident set size of this process, from `/proc/self/status`.
pub fn peak_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn run(
    architecture: &Architecture,
    mode: BenchMode,
    batch: usize,
    size: usize,
    warmup: usize,
    repetitions: usize,
) -> Result<BenchResult, FitError> {
    if batch == 0 || repetitions == 0 {
        return Err(FitError::Config("--batch and --reps must be at least 1".into()));
    }
    let device = Device::Cpu;
    let card = ModelCard::new(architecture.clone(), size);
    card.validate()?;
    let params = Params::new(0);
    let model = Model::new(architecture, size, params.var_builder(&device))?;
    // Inference on plain tensors, as `detect` and the browser load a model file:
    // on variables the dense blocks would keep what a backward pass needs and take
    // the training path, not the one detection runs.
    let model = match mode {
        BenchMode::Infer => Model::new(
            architecture,
            size,
            VarBuilder::from_tensors(params.tensors(), DType::F32, &device),
        )?,
        _ => model,
    };
    let xs = Tensor::randn(0f32, 1.0, (batch, 3, size, size), &device)?;
    let targets = Tensor::from_vec((0..batch).map(|i| (i % 2) as f32).collect::<Vec<_>>(), batch, &device)?;

    let head_only = mode == BenchMode::Frozen;
    let prefixes: Vec<String> = model.head_prefixes().iter().map(|s| s.to_string()).collect();
    let mut adam = Adam::new(params.trainable(head_only.then_some(prefixes.as_slice())), 1e-4)?;

    let mut step = |seed: u64| -> Result<(), FitError> {
        match mode {
            BenchMode::Infer => {
                model.forward(&xs, Mode::EVAL)?.to_vec1::<f32>()?;
            }
            BenchMode::Train => {
                let loss = bce_with_logits(&model.forward(&xs, Mode::train(seed))?, &targets)?;
                adam.backward_step(&loss)?;
            }
            BenchMode::Frozen => {
                let features = model.frozen_features(&xs)?;
                let loss = bce_with_logits(&model.head(&features, Some(seed))?, &targets)?;
                adam.backward_step(&loss)?;
            }
        }
        Ok(())
    };
    for i in 0..warmup {
        step(i as u64)?;
    }
    let mut times = Vec::with_capacity(repetitions);
    for i in 0..repetitions {
        let started = Instant::now();
        step((warmup + i) as u64)?;
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok(BenchResult {
        model: architecture.display_name(),
        mode,
        batch,
        size,
        warmup,
        repetitions,
        median_seconds: median,
        images_per_second: batch as f64 / median,
        peak_memory_bytes: peak_memory_bytes(),
        threads: rayon::current_num_threads(),
    })
}

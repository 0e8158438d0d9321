//! `fracture bench`: speed and memory of inference and training steps.

use anyhow::Result;

use super::args::BenchArgs;

pub(super) fn bench(args: BenchArgs) -> Result<()> {
    let result = fracture_train::bench::run(
        &args.model.architecture(1),
        args.mode.into(),
        args.batch,
        args.size,
        args.warmup,
        args.reps,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    println!(
        "{} {:?} batch {} at {} px: {:.1} images/s (median of {} runs after {} warm-up, {:.1} ms per batch, {} threads)",
        result.model,
        result.mode,
        result.batch,
        result.size,
        result.images_per_second,
        result.repetitions,
        result.warmup,
        result.median_seconds * 1e3,
        result.threads
    );
    match result.peak_memory_bytes {
        Some(bytes) => println!("peak memory {:.0} MiB", bytes as f64 / (1024.0 * 1024.0)),
        None => println!("peak memory unknown on this platform"),
    }
    Ok(())
}

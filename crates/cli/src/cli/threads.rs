//! One thread budget for rayon and the kernels, from `--threads` or the scheduler.

use anyhow::{bail, Context, Result};

/// `--threads`, else what a scheduler allotted (SLURM_CPUS_PER_TASK, or a CPU
/// limit or mask narrower than the machine, as a container or `taskset` sets);
/// None leaves the defaults, which then agree: every core.
pub(super) fn thread_budget(flag: Option<usize>) -> Result<Option<usize>> {
    if let Some(threads) = flag {
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        return Ok(Some(threads));
    }
    let slurm = std::env::var("SLURM_CPUS_PER_TASK")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n: &usize| n > 0);
    // An explicit RAYON_NUM_THREADS already reaches both rayon and the kernels.
    let user_set = std::env::var_os("RAYON_NUM_THREADS").is_some();
    Ok(slurm.or_else(|| if user_set { None } else { narrower_than_the_machine() }))
}

/// rayon sizes its pool by the cores this process may use (affinity, cgroup
/// quota), but candle's kernels count the machine's physical cores: inside a
/// container limited to 8 of 64 cores they would start 32 threads each.
#[cfg(unix)]
fn narrower_than_the_machine() -> Option<usize> {
    let usable = std::thread::available_parallelism().ok()?.get();
    // SAFETY: sysconf reads a constant of the running system.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    (online > 0 && (usable as i64) < online as i64).then_some(usable)
}

#[cfg(not(unix))]
fn narrower_than_the_machine() -> Option<usize> {
    None
}

/// One budget for rayon's pool and for the kernels (candle and gemm size their
/// splits from RAYON_NUM_THREADS). Runs before any thread exists.
pub(super) fn use_threads(threads: usize) -> Result<()> {
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .with_context(|| format!("cannot start {threads} worker threads"))
}

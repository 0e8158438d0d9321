//! Everything that learns or measures, natively: datasets, augmentation,
//! the training loop, k-fold cross-validation, metrics and reports. The
//! `fracture` binary is a thin shell over [`cli`].

pub mod augment;
pub mod bench;
pub mod calibration;
pub mod cli;
pub mod dataset;
pub mod fit;
pub mod folds;
pub mod import;
pub mod kfold;
pub mod merge;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod report;
pub mod schedule;
pub mod study;
pub mod synthetic;

use std::io::Write;
use std::path::Path;

/// Writes through a temporary file in the same directory and renames it,
/// so an interrupted run never leaves a truncated model or report behind.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    // Temporary files are private (0600); what we write is an ordinary output file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Lets a closed output pipe end the process quietly, as it ends other Unix
/// tools (`fracture detect ... | head`). Rust ignores SIGPIPE, so without this
/// the next `println!` panics. Call it once, first thing in `main`.
pub fn exit_quietly_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Makes glibc keep freed memory in the process for reuse.
///
/// candle allocates a fresh buffer for every tensor op, and glibc hands blocks
/// above 128 KiB straight back to the kernel when they are freed, so every op
/// of a training step page-faults its output in anew: a third of the step
/// went to the kernel zeroing pages. Measured with `fracture bench` at 150 px
/// on 2 threads: the cnn's training step 70 -> 130 img/s, DenseNet121's
/// 6.0 -> 7.5 img/s. Blocks above 32 MiB (glibc's ceiling) are still mapped
/// one by one. Call it once, first thing in `main`.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn written_files_replace_the_old_and_are_world_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        super::write_atomically(&path, b"first").unwrap();
        super::write_atomically(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644, "a model file must be readable by a web server");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file is left");
    }
}

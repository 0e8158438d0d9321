//! Everything that learns or measures, natively: datasets, augmentation,
//! the training loop, k-fold cross-validation, metrics and reports. It never
//! prints: long work reports through [`progress::Progress`], and the
//! `fracture` binary (crates/cli) decides what the user sees.

pub mod augment;
pub mod average;
pub mod bench;
pub mod calibration;
pub mod compare;
pub mod dataset;
pub mod files;
pub mod fingerprint;
pub mod fit;
pub mod folds;
pub mod import;
pub mod kfold;
pub mod merge;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod pickle_guard;
pub mod pretext;
pub mod progress;
pub mod report;
pub mod schedule;
pub mod study;
pub mod synthetic;

use std::io::Write;
use std::path::Path;

/// Writes through a temporary file in the same directory and renames it,
/// so an interrupted run never leaves a truncated model or report behind.
///
/// A symbolic link at `path` keeps pointing where it did: its target is
/// replaced. Anything else that is not a regular file (`/dev/null`, a FIFO
/// with a reader) is written into directly, as a shell redirection would.
/// Temporary files carry the writer's process id; those of writers that no
/// longer run (killed mid-write) are removed by the next write to the path.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let path = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => std::fs::canonicalize(path)?,
        Ok(meta) if meta.is_dir() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "is a directory; expected a file name",
            ))
        }
        Ok(meta) if !meta.is_file() => return write_in_place(path, bytes),
        _ => path.to_path_buf(),
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.fracture-tmp-");
    remove_abandoned_temporaries(dir, &prefix);
    let mut file = tempfile::Builder::new()
        .prefix(&format!("{prefix}{}-", std::process::id()))
        .tempfile_in(dir)?;
    // Temporary files are private (0600); what we write is an ordinary output file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(&path).map_err(|e| e.error)?;
    Ok(())
}

fn write_in_place(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    #[cfg(unix)]
    {
        // A FIFO without a reader fails at once instead of blocking.
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    options.open(path)?.write_all(bytes)
}

/// Removes `PREFIX<pid>-…` files whose writer process has exited.
fn remove_abandoned_temporaries(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !process_is_running(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(unix)]
fn process_is_running(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    alive || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn process_is_running(_pid: u32) -> bool {
    true
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
    use std::path::Path;

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
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file is left"
        );
    }

    #[test]
    fn a_killed_writers_temporary_is_removed_and_links_and_devices_survive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        // What a writer killed mid-write leaves (no process has pid 2^22 + 1 here).
        let abandoned = dir.path().join(".model.safetensors.fracture-tmp-4194305-AbCdEf");
        std::fs::write(&abandoned, b"half").unwrap();
        let other = dir.path().join(".other.json.fracture-tmp-4194305-AbCdEf");
        std::fs::write(&other, b"half").unwrap();
        super::write_atomically(&path, b"whole").unwrap();
        assert!(!abandoned.exists(), "the abandoned temporary is still there");
        assert!(
            other.exists(),
            "another output's temporary is not this write's business"
        );

        #[cfg(unix)]
        {
            let target = dir.path().join("real.json");
            std::fs::write(&target, b"old").unwrap();
            let link = dir.path().join("link.json");
            std::os::unix::fs::symlink(&target, &link).unwrap();
            super::write_atomically(&link, b"new").unwrap();
            assert!(
                std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(),
                "the link was replaced"
            );
            assert_eq!(std::fs::read(&target).unwrap(), b"new");

            super::write_atomically(Path::new("/dev/null"), b"discarded").unwrap();
            assert!(
                !std::fs::metadata("/dev/null").unwrap().is_file(),
                "/dev/null was replaced by a file"
            );
            if Path::new("/dev/full").exists() {
                assert!(
                    super::write_atomically(Path::new("/dev/full"), b"x").is_err(),
                    "a full device must fail"
                );
            }
        }
        assert!(super::write_atomically(dir.path(), b"x").is_err());
    }
}

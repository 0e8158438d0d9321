//! Everything that learns or measures, natively: datasets, augmentation,
//! the training loop, k-fold cross-validation, metrics and reports. The
//! `fracture` binary is a thin shell over [`cli`].

pub mod augment;
pub mod bench;
pub mod cli;
pub mod dataset;
pub mod fit;
pub mod folds;
pub mod import;
pub mod kfold;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod report;
pub mod schedule;
pub mod synthetic;

use std::io::Write;
use std::path::Path;

/// Writes through a temporary file in the same directory and renames it,
/// so an interrupted run never leaves a truncated model or report behind.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

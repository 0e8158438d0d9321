//! `kfold merge`: the shard reports of one run (one per fold, written by
//! `kfold --fold I`, e.g. from a Slurm array or a Kubernetes Indexed Job)
//! made into the report the unsharded run writes.

use std::path::{Path, PathBuf};

use crate::kfold::{self, KfoldReport, RunIdentity, ShardReport};

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("{path}: cannot read it: {message}")]
    Unreadable { path: PathBuf, message: String },
    #[error("{path}: not a kfold shard report (expected the JSON that `fracture kfold --fold I --report` writes): {message}")]
    NotAShard { path: PathBuf, message: String },
    #[error("{path}: belongs to another run than {reference} ({difference})")]
    Foreign {
        path: PathBuf,
        reference: PathBuf,
        difference: String,
    },
    #[error("{path}: fold {fold} is outside the run's 1..={folds}")]
    FoldOutOfRange { path: PathBuf, fold: usize, folds: usize },
    #[error("{path}: a shard of fold {fold} holds predictions of other folds; it was edited or is damaged")]
    MixedFolds { path: PathBuf, fold: usize },
    #[error("fold {fold} is given twice: {first} and {second}")]
    Duplicate {
        fold: usize,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("no shard for fold{} {} of {folds} (given: {given})", if missing.len() > 1 { "s" } else { "" }, list(missing))]
    Missing {
        missing: Vec<usize>,
        folds: usize,
        given: String,
    },
    #[error("no shard reports given")]
    Empty,
}

fn list(folds: &[usize]) -> String {
    folds.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(", ")
}

/// Reads a file written by `kfold --fold I --report`.
pub fn read_shard(path: &Path) -> Result<ShardReport, MergeError> {
    let bytes =
        crate::files::read_regular_file(path, crate::files::MAX_INPUT_BYTES).map_err(|e| MergeError::Unreadable {
            path: path.into(),
            message: e.problem.to_string(),
        })?;
    let not_a_shard = |message: String| MergeError::NotAShard {
        path: path.into(),
        message,
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| not_a_shard(e.to_string()))?;
    match value.get("format").and_then(|f| f.as_str()) {
        Some(ShardReport::FORMAT) => {}
        Some(other) => {
            return Err(not_a_shard(format!(
                "format `{other}`, expected `{}`",
                ShardReport::FORMAT
            )))
        }
        None => return Err(not_a_shard("it has no `format` field".into())),
    }
    serde_json::from_value(value).map_err(|e| not_a_shard(e.to_string()))
}

/// Checks that the shards are one run's, every fold once, and assembles them.
/// The run is the one most shards agree on, so the odd one out is the one named.
/// `seconds` of the result is the folds' training time added up: the shards ran
/// apart, so no wall-clock time covers them all.
pub fn merge(shards: Vec<(PathBuf, ShardReport)>) -> Result<KfoldReport, MergeError> {
    let reference = majority(&shards).ok_or(MergeError::Empty)?;
    let (reference_path, reference_run) = (shards[reference].0.clone(), shards[reference].1.run.clone());
    let folds = reference_run.folds;
    let mut by_fold: Vec<Option<(PathBuf, kfold::FoldShard)>> = vec![None; folds];
    for (path, shard) in shards {
        if let Some(difference) = reference_run.difference(&shard.run) {
            return Err(MergeError::Foreign {
                path,
                reference: reference_path,
                difference,
            });
        }
        let fold = shard.shard.result.fold;
        if fold == 0 || fold > folds {
            return Err(MergeError::FoldOutOfRange { path, fold, folds });
        }
        if shard.shard.predictions.iter().any(|p| p.fold != fold) {
            return Err(MergeError::MixedFolds { path, fold });
        }
        if let Some((first, _)) = &by_fold[fold - 1] {
            return Err(MergeError::Duplicate {
                fold,
                first: first.clone(),
                second: path,
            });
        }
        by_fold[fold - 1] = Some((path, shard.shard));
    }
    let missing: Vec<usize> = (1..=folds).filter(|f| by_fold[f - 1].is_none()).collect();
    if !missing.is_empty() {
        let given = by_fold
            .iter()
            .flatten()
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(MergeError::Missing { missing, folds, given });
    }
    let shards: Vec<kfold::FoldShard> = by_fold.into_iter().flatten().map(|(_, shard)| shard).collect();
    let seconds = shards.iter().map(|s| s.result.seconds).sum();
    Ok(kfold::assemble(&reference_run, shards, seconds))
}

/// Index of a shard whose run the most shards share (the first such on a tie).
fn majority(shards: &[(PathBuf, ShardReport)]) -> Option<usize> {
    let agreeing = |run: &RunIdentity| {
        shards
            .iter()
            .filter(|(_, other)| run.difference(&other.run).is_none())
            .count()
    };
    (0..shards.len()).max_by_key(|&i| (agreeing(&shards[i].1.run), std::cmp::Reverse(i)))
}

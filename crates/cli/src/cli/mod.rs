//! The `fracture` command line: parse, call the library, print.
//!
//! Exit codes: 0 success; 1 the run failed (the message names the file or
//! option at fault); 2 bad command line (clap's own code).

mod args;
mod bars;
mod bench;
mod calibrate;
mod compare;
mod data;
mod detect;
mod kfold;
mod model_file;
mod threads;
mod train;

pub use args::Cli;

use std::path::{Path, PathBuf};

use anyhow::Result;
use sha2::{Digest, Sha256};

use fracture_core::ModelCard;
use fracture_train::dataset::{self, Dataset, ScanOptions};

use args::{Command, DataArgs};
use bars::Bars;

pub fn run(cli: Cli) -> Result<()> {
    if let Some(threads) = threads::thread_budget(cli.threads)? {
        threads::use_threads(threads)?;
    }
    match cli.command {
        Command::Train(args) => train::train(args),
        Command::Kfold(args) => kfold::kfold(args),
        Command::Detect(args) => detect::detect(args),
        Command::Bench(args) => bench::bench(args),
        Command::Synth(args) => data::synth(args),
        Command::Import(args) => model_file::import(args),
        Command::Split(args) => data::split(args),
        Command::Card(args) => model_file::card(args),
        Command::Roc(args) => kfold::roc(args),
        Command::Calibrate(args) => calibrate::calibrate(args),
        Command::Compare(args) => compare::compare(args),
    }
}

fn scan_dataset(data: &DataArgs) -> Result<Dataset> {
    let options = ScanOptions {
        positive: data.positive.clone(),
        study: data.study.clone(),
    };
    let mut dataset = dataset::scan(&data.input, &options)?;
    for (list, keep) in [(&data.patients, true), (&data.exclude_patients, false)] {
        if let Some(list) = list {
            let listed = dataset::read_patient_list(list)?;
            dataset.filter_patients(list, &listed, keep)?;
        }
    }
    Ok(dataset)
}

/// Scans, prints the summary, and decodes every image at the model's size.
fn load_dataset(data: &DataArgs, card: &ModelCard, quiet: bool) -> Result<(Dataset, Vec<image::Rgb32FImage>)> {
    let mut dataset = scan_dataset(data)?;
    let images = dataset.load_images(&card.preprocessing, &Bars::new(quiet));
    eprint!("{}", dataset.summary());
    dataset.check_trainable()?;
    Ok((dataset, images))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!("{stem}{suffix}"))
}

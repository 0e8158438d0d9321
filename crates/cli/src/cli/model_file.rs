//! `fracture card` and `fracture import`: reading and making model files.

use anyhow::{Context, Result};
use candle_core::Device;

use fracture_core::weights::{ModelFile, StorageDType};
use fracture_train::files;

use super::args::{CardCommandArgs, ImportArgs};

pub(super) fn card(args: CardCommandArgs) -> Result<()> {
    let bytes = files::read_regular_file(&args.model, files::MAX_INPUT_BYTES)?;
    let file = ModelFile::from_bytes(&bytes, &Device::Cpu)
        .with_context(|| format!("{} is not a model file", args.model.display()))?;
    let mut card = file.card;
    if args.card.is_empty() && !args.f16 {
        println!("{}", serde_json::to_string_pretty(&card)?);
        return Ok(());
    }
    args.card
        .apply(&mut card)
        .with_context(|| args.model.display().to_string())?;
    // Loading widens to f32; f16 -> f32 -> f16 is exact, so unless asked the weights are unchanged.
    let storage = if args.f16 { StorageDType::F16 } else { file.storage };
    let bytes = ModelFile::to_bytes(&card, &file.tensors, storage)?;
    fracture_train::write_atomically(&args.model, &bytes)
        .with_context(|| format!("cannot write {}", args.model.display()))?;
    let what = if args.f16 {
        "stored the weights as f16 in"
    } else {
        "updated the card of"
    };
    eprintln!("{what} {}", args.model.display());
    Ok(())
}

pub(super) fn import(args: ImportArgs) -> Result<()> {
    files::check_output_path(&args.output)?;
    let source = args.from.display().to_string();
    let bytes = files::read_regular_file(&args.from, 4 * files::MAX_INPUT_BYTES).context("--from")?;
    let imported =
        fracture_train::import::import_torchvision(&bytes, &source).with_context(|| format!("--from {source}"))?;
    let out = imported
        .to_bytes()
        .with_context(|| format!("cannot serialise the weights of {source}"))?;
    fracture_train::write_atomically(&args.output, &out)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!("{}", imported.summary());
    println!("wrote {} ({:.2} MB)", args.output.display(), out.len() as f64 / 1e6);
    Ok(())
}

//! `fracture split` and `fracture synth`: development splits and synthetic data sets.

use anyhow::{bail, Context, Result};

use fracture_train::files;

use super::args::{SplitArgs, SynthArgs, SynthFormat, SynthLayout};
use super::scan_dataset;

pub(super) fn split(args: SplitArgs) -> Result<()> {
    files::check_output_path(&args.output)?;
    let dataset = scan_dataset(&args.data)?;
    eprint!("{}", dataset.summary());
    if !dataset.has_patients {
        bail!(
            "{}: a held-out set needs patient ids (MURA layout)",
            args.data.input.display()
        );
    }
    let total = dataset.samples.len();
    if args.images == 0 || args.images >= total {
        bail!(
            "--images {} must be between 1 and {} (the dataset's size)",
            args.images,
            total - 1
        );
    }
    let labels: Vec<bool> = dataset.samples.iter().map(|s| s.positive).collect();
    let groups: Vec<usize> = dataset.samples.iter().map(|s| s.group).collect();
    let (_, held_out) =
        fracture_train::folds::grouped_split(&labels, &groups, args.images as f64 / total as f64, args.seed)?;
    let patients: std::collections::BTreeSet<&str> = held_out
        .iter()
        .map(|&i| dataset.group_names[groups[i]].as_str())
        .collect();
    let positives = held_out.iter().filter(|&&i| labels[i]).count();
    let mut text = format!(
        "# fracture split -i {} --images {} --seed {}\n# {} patients, {} images ({} abnormal, {} normal)\n",
        args.data.input.display(),
        args.images,
        args.seed,
        patients.len(),
        held_out.len(),
        positives,
        held_out.len() - positives
    );
    for id in &patients {
        text += id;
        text.push('\n');
    }
    fracture_train::write_atomically(&args.output, text.as_bytes())
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    eprintln!(
        "held out {} patients, {} images ({positives} abnormal): wrote {}",
        patients.len(),
        held_out.len(),
        args.output.display()
    );
    Ok(())
}

pub(super) fn synth(args: SynthArgs) -> Result<()> {
    if args.size < 32 {
        bail!("--size must be at least 32");
    }
    let format = match args.format {
        SynthFormat::Png => fracture_train::synthetic::FileFormat::Png,
        SynthFormat::Dcm => fracture_train::synthetic::FileFormat::Dicom,
    };
    let written = match args.layout {
        SynthLayout::Classes => {
            fracture_train::synthetic::write_class_folders_as(&args.output, args.count, args.size, args.seed, format)?
                .len()
        }
        SynthLayout::Mura => {
            fracture_train::synthetic::write_mura_as(&args.output, args.count, args.size, args.seed, format)?.len()
        }
    };
    eprintln!("wrote {written} synthetic images to {}", args.output.display());
    Ok(())
}

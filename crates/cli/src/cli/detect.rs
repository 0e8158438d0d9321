//! `fracture detect`: inputs expanded, decoded in batches, rows printed per image or per study.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;

use fracture_core::Predictor;
use fracture_train::dataset;
use fracture_train::files;

use super::args::{DetectArgs, Format};

/// An image to detect: named on the command line, or found below a directory
/// that was (then `relative` is its path below that directory).
struct InputFile {
    path: PathBuf,
    named: bool,
    relative: PathBuf,
}

/// Image files named on the command line, and those found in directories.
/// A directory entry that cannot be listed is skipped and named; symbolic
/// links to files count as files, links to directories are not followed.
fn expand_inputs(inputs: &[PathBuf]) -> Vec<InputFile> {
    let mut files = Vec::new();
    for input in inputs {
        if !input.is_dir() {
            let relative = input.file_name().map_or_else(|| input.clone(), PathBuf::from);
            files.push(InputFile {
                path: input.clone(),
                named: true,
                relative,
            });
            continue;
        }
        for entry in walkdir::WalkDir::new(input).sort_by_file_name() {
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) => {
                    let at = err.path().unwrap_or(input);
                    eprintln!(
                        "skipped {}: cannot be listed ({})",
                        files::printable_path(at),
                        err.io_error().map_or_else(|| err.to_string(), |e| e.to_string())
                    );
                    continue;
                }
            };
            let path = entry.path();
            let is_image = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| dataset::IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
            let is_file = entry.file_type().is_file()
                || (entry.path_is_symlink() && std::fs::metadata(path).is_ok_and(|m| m.is_file()));
            if is_file && is_image {
                let relative = path
                    .strip_prefix(input)
                    .map_or_else(|_| path.to_path_buf(), Path::to_path_buf);
                files.push(InputFile {
                    path: entry.into_path(),
                    named: false,
                    relative,
                });
            }
        }
    }
    files
}

/// A CSV field, quoted where it holds a separator, a quote or a line break.
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

pub(super) fn detect(args: DetectArgs) -> Result<()> {
    let device = Device::Cpu;
    let bytes = files::read_regular_file(&args.weights, files::MAX_INPUT_BYTES).context("--weights")?;
    let mut predictor =
        Predictor::from_bytes(&bytes, &device).with_context(|| format!("--weights {}", args.weights.display()))?;
    predictor
        .set_operating_point(args.operating_point.into())
        .with_context(|| format!("--operating-point for {}", args.weights.display()))?;
    if let Some(dir) = &args.heatmap {
        if !predictor.model().has_class_activation_map() {
            bail!(
                "--heatmap needs a DenseNet model: {} has no class activation map",
                predictor.card().architecture.display_name()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create --heatmap {}", dir.display()))?;
    }
    let files = expand_inputs(&args.inputs);
    let mut heatmap_names = HeatmapNames::default();
    if files.is_empty() {
        bail!(
            "no image files found in {}",
            args.inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    let mut rows = DetectRows::new(args.format, args.by_study);
    let (mut failed_named, mut succeeded) = (0usize, 0usize);
    for chunk in files.chunks(16) {
        let loaded: Vec<_> = {
            use rayon::prelude::*;
            chunk
                .par_iter()
                .map(|file| {
                    let path = &file.path;
                    // The skip line names the path already.
                    let bytes =
                        files::read_regular_file(path, files::MAX_INPUT_BYTES).map_err(|e| e.problem.to_string())?;
                    let study = if args.by_study {
                        study_of(path, &bytes).map_err(|e| e.to_string())?
                    } else {
                        String::new()
                    };
                    let input = if args.heatmap.is_some() {
                        // The heat map comes from the same forward pass as the probability.
                        predictor
                            .detect(&bytes)
                            .map(Loaded::Detection)
                            .map_err(|e| e.to_string())?
                    } else {
                        fracture_core::preprocess::load(&bytes, &predictor.card().preprocessing)
                            .map(Loaded::Input)
                            .map_err(|e| e.to_string())?
                    };
                    Ok::<_, String>((input, study))
                })
                .collect()
        };
        let inputs: Vec<&image::Rgb32FImage> = loaded
            .iter()
            .filter_map(|r| match r {
                Ok((Loaded::Input(image), _)) => Some(image),
                _ => None,
            })
            .collect();
        let mut probabilities = predictor.probabilities(&inputs)?.into_iter();
        for (file, result) in chunk.iter().zip(&loaded) {
            let path = &file.path;
            let (probability, study) = match result {
                Err(reason) => {
                    eprintln!("skipped {}: {reason}", files::printable_path(path));
                    failed_named += usize::from(file.named);
                    continue;
                }
                Ok((Loaded::Input(_), study)) => (
                    probabilities.next().context("internal: prediction count mismatch")?,
                    study,
                ),
                Ok((Loaded::Detection(detection), study)) => {
                    if let Some(dir) = &args.heatmap {
                        write_heatmap(detection, &dir.join(heatmap_names.name_for(&file.relative)))?;
                    }
                    (detection.prediction.probability, study)
                }
            };
            succeeded += 1;
            rows.image(&predictor, files::printable_path(path), probability, study.clone())?;
        }
    }
    if succeeded == 0 {
        bail!("no image could be read");
    }
    rows.finish(&predictor)?;
    if failed_named > 0 {
        bail!("{failed_named} file(s) named on the command line could not be read");
    }
    Ok(())
}

/// The study an image belongs to: its DICOM StudyInstanceUID, its MURA study
/// folder, or (neither) the image alone.
fn study_of(path: &Path, bytes: &[u8]) -> fracture_core::Result<String> {
    if fracture_core::dicom::is_dicom(bytes) {
        if let Some(uid) = fracture_core::dicom::study_instance_uid(bytes)? {
            return Ok(uid);
        }
    }
    Ok(fracture_train::study::study_key(path))
}

/// Detect's output: a row per image as it comes, or with --by-study a row per
/// study once every image is in.
struct DetectRows {
    format: Format,
    by_study: bool,
    json: Vec<serde_json::Value>,
    /// (study, probability) of each image, for --by-study.
    images: Vec<(String, f64)>,
    out: std::io::StdoutLock<'static>,
}

impl DetectRows {
    fn new(format: Format, by_study: bool) -> Self {
        let mut out = std::io::stdout().lock();
        if format == Format::Csv {
            let header = if by_study {
                "study,images,probability,label"
            } else {
                "path,probability,label"
            };
            // A closed stdout shows up at the first row's write, which reports it.
            let _ = writeln!(out, "{header}");
        }
        Self {
            format,
            by_study,
            json: Vec::new(),
            images: Vec::new(),
            out,
        }
    }

    fn image(&mut self, predictor: &Predictor, path: String, probability: f64, study: String) -> Result<()> {
        if self.by_study {
            self.images.push((study, probability));
            return Ok(());
        }
        let label = predictor.prediction(probability).label;
        match self.format {
            Format::Text => writeln!(self.out, "{path}\t{:.2}%\t{label}", probability * 100.0)?,
            Format::Csv => writeln!(self.out, "{},{probability:.6},{}", csv_field(&path), csv_field(&label))?,
            Format::Json => self
                .json
                .push(serde_json::json!({ "path": path, "probability": probability, "label": label })),
        }
        Ok(())
    }

    fn finish(mut self, predictor: &Predictor) -> Result<()> {
        if self.by_study {
            let (keys, probabilities): (Vec<String>, Vec<f64>) = std::mem::take(&mut self.images).into_iter().unzip();
            for study in fracture_train::study::group(&keys, &probabilities) {
                let (images, probability) = (study.members.len(), study.probability);
                let label = predictor.prediction(probability).label;
                match self.format {
                    Format::Text => writeln!(
                        self.out,
                        "{}\t{images} image(s)\t{:.2}%\t{label}",
                        study.key,
                        probability * 100.0
                    )?,
                    Format::Csv => writeln!(
                        self.out,
                        "{},{images},{probability:.6},{}",
                        csv_field(&study.key),
                        csv_field(&label)
                    )?,
                    Format::Json => self.json.push(serde_json::json!({
                        "study": study.key, "images": images, "probability": probability, "label": label,
                    })),
                }
            }
        }
        if self.format == Format::Json {
            serde_json::to_writer_pretty(&mut self.out, &self.json)?;
            writeln!(self.out)?;
        }
        Ok(())
    }
}

/// A detect input: preprocessed for the batched forward pass, or, with
/// `--heatmap`, already run one by one to get its class activation map.
enum Loaded {
    Input(image::Rgb32FImage),
    Detection(fracture_core::predict::Detection),
}

/// Heat-map file names: the image's path below the directory it was found
/// in (so MURA's many `image1.png` do not overwrite one another), made
/// unique with `-2`, `-3`… where two named files share a name.
#[derive(Default)]
struct HeatmapNames {
    used: std::collections::HashSet<PathBuf>,
}

impl HeatmapNames {
    fn name_for(&mut self, relative: &Path) -> PathBuf {
        let stem = relative
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let folder = relative.parent().unwrap_or(Path::new(""));
        let mut name = folder.join(format!("{stem}.heatmap.png"));
        let mut copy = 1;
        while !self.used.insert(name.clone()) {
            copy += 1;
            name = folder.join(format!("{stem}-{copy}.heatmap.png"));
        }
        name
    }
}

fn write_heatmap(detection: &fracture_core::predict::Detection, out: &Path) -> Result<()> {
    let Some(heatmap) = &detection.heatmap else {
        return Ok(());
    };
    if let Some(folder) = out.parent() {
        std::fs::create_dir_all(folder).with_context(|| format!("cannot create {}", folder.display()))?;
    }
    fracture_core::cam::overlay(&detection.input, heatmap)
        .save(out)
        .with_context(|| format!("cannot write {}", out.display()))
}

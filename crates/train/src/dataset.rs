//! Dataset layouts on disk, read into labelled samples with patient ids.
//!
//! - Class folders, as in the study: `DIR/Fracture/*`, `DIR/Normal/*`.
//! - MURA: `DIR/[train|valid/]patientNNNNN/studyK_{positive,negative}/imageM.png`.
//! - A MURA-v1.1 root with `train_image_paths.csv`, filtered by `--study`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use fracture_core::{card::TrainingSummary, preprocess, Classes, Preprocessing};
use image::Rgb32FImage;
use rayon::prelude::*;

/// File extensions we try to decode; anything else is listed as skipped.
pub const IMAGE_EXTENSIONS: [&str; 7] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff", "dcm"];

const POSITIVE_NAMES: [&str; 5] = ["fracture", "fractured", "positive", "abnormal", "fractures"];

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: no images found (expected class folders such as Fracture/ and Normal/, or the MURA layout patientNNNNN/studyK_positive/)")]
    Empty { path: PathBuf },
    #[error("{path}: {message}")]
    Layout { path: PathBuf, message: String },
    #[error("{path}: only one class has images ({class}); training needs both")]
    SingleClass { path: PathBuf, class: String },
    #[error("{list}: {message}")]
    PatientList { list: PathBuf, message: String },
}

/// Patient ids from a list file: one per line, `#` starts a comment.
pub fn read_patient_list(path: &Path) -> Result<BTreeSet<String>, DatasetError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e))?;
    let ids: BTreeSet<String> = text
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect();
    if ids.is_empty() {
        return Err(DatasetError::PatientList {
            list: path.into(),
            message: "lists no patient".into(),
        });
    }
    Ok(ids)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    ClassFolders,
    Mura,
    MuraCsv,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::ClassFolders => "class folders",
            Layout::Mura => "MURA (patient/study folders)",
            Layout::MuraCsv => "MURA v1.1 root (image-paths CSV)",
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub path: PathBuf,
    pub positive: bool,
    /// Index into [`Dataset::group_names`]: a patient, or the image itself when patients are unknown.
    pub group: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Clone, Debug)]
pub struct Dataset {
    pub root: PathBuf,
    pub layout: Layout,
    pub classes: Classes,
    pub samples: Vec<Sample>,
    pub group_names: Vec<String>,
    /// Whether groups are real patients (MURA) or one per image.
    pub has_patients: bool,
    pub skipped: Vec<Skipped>,
}

#[derive(Clone, Debug, Default)]
pub struct ScanOptions {
    /// The abnormal class folder, when its name is not one we recognise.
    pub positive: Option<String>,
    /// MURA-v1.1 root: which study type to read (e.g. `XR_HUMERUS`).
    pub study: Option<String>,
}

fn io_error(path: &Path, err: impl fmt::Display) -> DatasetError {
    DatasetError::Io {
        path: path.to_path_buf(),
        message: err.to_string(),
    }
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| io_error(dir, e))?
        .map(|entry| entry.map(|e| e.path()).map_err(|e| io_error(dir, e)))
        .collect::<Result<Vec<_>, _>>()?;
    entries.sort();
    Ok(entries)
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Files below `dir` (recursively, sorted): images, and everything else as skipped.
fn collect_files(dir: &Path, skipped: &mut Vec<Skipped>) -> Result<Vec<PathBuf>, DatasetError> {
    let mut images = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        if !entry.file_type().is_file() || is_hidden(entry.path()) {
            continue;
        }
        if has_image_extension(entry.path()) {
            images.push(entry.into_path());
        } else {
            skipped.push(Skipped {
                path: entry.into_path(),
                reason: "not an image file (by extension)".into(),
            });
        }
    }
    Ok(images)
}

fn is_patient_dir(path: &Path) -> bool {
    path.is_dir()
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("patient"))
}

/// `studyK_positive` → Some(true), `studyK_negative` → Some(false).
fn study_label(name: &str) -> Option<bool> {
    let lower = name.to_ascii_lowercase();
    if !lower.starts_with("study") {
        return None;
    }
    if lower.ends_with("_positive") {
        Some(true)
    } else if lower.ends_with("_negative") {
        Some(false)
    } else {
        None
    }
}

pub fn scan(root: &Path, options: &ScanOptions) -> Result<Dataset, DatasetError> {
    if !root.is_dir() {
        return Err(io_error(root, "not a directory"));
    }
    let csv = root.join("train_image_paths.csv");
    if csv.is_file() {
        let study = options.study.as_deref().ok_or_else(|| DatasetError::Layout {
            path: root.to_path_buf(),
            message: "this is a MURA-v1.1 root: choose a study type with --study (e.g. XR_HUMERUS)".into(),
        })?;
        return scan_mura_csv(root, &csv, study);
    }
    let entries = sorted_entries(root)?;
    let mura_base = ["train", "valid"]
        .iter()
        .map(|split| root.join(split))
        .find(|dir| dir.is_dir() && sorted_entries(dir).is_ok_and(|e| e.iter().any(|p| is_patient_dir(p))));
    if entries.iter().any(|p| is_patient_dir(p)) {
        scan_mura(root, root)
    } else if let Some(base) = mura_base {
        scan_mura(root, &base)
    } else {
        scan_class_folders(root, &entries, options)
    }
}

fn scan_class_folders(root: &Path, entries: &[PathBuf], options: &ScanOptions) -> Result<Dataset, DatasetError> {
    let mut skipped = Vec::new();
    let mut classes: Vec<(String, Vec<PathBuf>)> = Vec::new();
    for dir in entries.iter().filter(|p| p.is_dir() && !is_hidden(p)) {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let files = collect_files(dir, &mut skipped)?;
        if !files.is_empty() {
            classes.push((name, files));
        }
    }
    for file in entries.iter().filter(|p| p.is_file() && !is_hidden(p)) {
        skipped.push(Skipped {
            path: file.clone(),
            reason: "outside a class folder".into(),
        });
    }
    match classes.len() {
        0 => {
            return Err(DatasetError::Empty {
                path: root.to_path_buf(),
            })
        }
        1 => {
            return Err(DatasetError::SingleClass {
                path: root.to_path_buf(),
                class: classes[0].0.clone(),
            })
        }
        2 => {}
        n => {
            let names: Vec<&str> = classes.iter().map(|c| c.0.as_str()).collect();
            return Err(DatasetError::Layout {
                path: root.to_path_buf(),
                message: format!("{n} class folders ({}); expected exactly two", names.join(", ")),
            });
        }
    }
    let is_positive = |name: &str| match &options.positive {
        Some(positive) => name.eq_ignore_ascii_case(positive),
        None => POSITIVE_NAMES.contains(&name.to_ascii_lowercase().as_str()),
    };
    let positive_index = match (is_positive(&classes[0].0), is_positive(&classes[1].0)) {
        (true, false) => 0,
        (false, true) => 1,
        _ => {
            return Err(DatasetError::Layout {
                path: root.to_path_buf(),
                message: format!(
                    "cannot tell which of `{}` and `{}` is the abnormal class; name it with --positive",
                    classes[0].0, classes[1].0
                ),
            })
        }
    };
    let names = Classes {
        positive: classes[positive_index].0.clone(),
        negative: classes[1 - positive_index].0.clone(),
    };
    let mut samples = Vec::new();
    let mut group_names = Vec::new();
    for (index, (_, files)) in classes.into_iter().enumerate() {
        for path in files {
            group_names.push(path.display().to_string());
            samples.push(Sample {
                path,
                positive: index == positive_index,
                group: group_names.len() - 1,
            });
        }
    }
    Ok(Dataset {
        root: root.to_path_buf(),
        layout: Layout::ClassFolders,
        classes: names,
        samples,
        group_names,
        has_patients: false,
        skipped,
    })
}

fn mura_classes() -> Classes {
    Classes {
        negative: "normal".into(),
        positive: "abnormal".into(),
    }
}

fn scan_mura(root: &Path, base: &Path) -> Result<Dataset, DatasetError> {
    let mut skipped = Vec::new();
    let mut labelled = Vec::new();
    for patient_dir in sorted_entries(base)?.into_iter().filter(|p| is_patient_dir(p)) {
        let patient = patient_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for study_dir in sorted_entries(&patient_dir)? {
            let name = study_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match study_label(&name) {
                Some(positive) if study_dir.is_dir() => {
                    for path in collect_files(&study_dir, &mut skipped)? {
                        labelled.push((path, positive, patient.clone()));
                    }
                }
                _ if is_hidden(&study_dir) => {}
                _ => skipped.push(Skipped {
                    path: study_dir,
                    reason: "not a studyK_positive / studyK_negative folder".into(),
                }),
            }
        }
    }
    finish_mura(root, Layout::Mura, labelled, skipped)
}

fn scan_mura_csv(root: &Path, csv: &Path, study: &str) -> Result<Dataset, DatasetError> {
    let text = std::fs::read_to_string(csv).map_err(|e| io_error(csv, e))?;
    // Paths in the CSV start with the root's own name (`MURA-v1.1/train/...`).
    let parent = root.parent().unwrap_or(Path::new("."));
    let mut labelled = Vec::new();
    let mut skipped = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let relative = Path::new(line);
        let parts: Vec<&str> = line.split('/').collect();
        if !parts.iter().any(|p| p.eq_ignore_ascii_case(study)) {
            continue;
        }
        let patient = parts.iter().find(|p| p.starts_with("patient"));
        let label = parts.iter().find_map(|p| study_label(p));
        let path = if relative.is_absolute() {
            relative.to_path_buf()
        } else {
            parent.join(relative)
        };
        match (patient, label) {
            (Some(patient), Some(positive)) if path.is_file() => labelled.push((path, positive, patient.to_string())),
            (Some(_), Some(_)) => skipped.push(Skipped {
                path,
                reason: "listed in the CSV but missing on disk".into(),
            }),
            _ => skipped.push(Skipped {
                path,
                reason: "CSV line without patient or study label".into(),
            }),
        }
    }
    if labelled.is_empty() && skipped.is_empty() {
        return Err(DatasetError::Layout {
            path: csv.to_path_buf(),
            message: format!("no image of study type `{study}` is listed"),
        });
    }
    finish_mura(root, Layout::MuraCsv, labelled, skipped)
}

fn finish_mura(
    root: &Path,
    layout: Layout,
    labelled: Vec<(PathBuf, bool, String)>,
    skipped: Vec<Skipped>,
) -> Result<Dataset, DatasetError> {
    if labelled.is_empty() {
        return Err(DatasetError::Empty {
            path: root.to_path_buf(),
        });
    }
    let classes = mura_classes();
    for positive in [true, false] {
        if labelled.iter().all(|(_, p, _)| *p == positive) {
            let class = if positive { &classes.positive } else { &classes.negative };
            return Err(DatasetError::SingleClass {
                path: root.to_path_buf(),
                class: class.clone(),
            });
        }
    }
    let patients: BTreeSet<&String> = labelled.iter().map(|(_, _, p)| p).collect();
    let group_names: Vec<String> = patients.into_iter().cloned().collect();
    let index: BTreeMap<&str, usize> = group_names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let samples = labelled
        .iter()
        .map(|(path, positive, patient)| Sample {
            path: path.clone(),
            positive: *positive,
            group: index[patient.as_str()],
        })
        .collect();
    Ok(Dataset {
        root: root.to_path_buf(),
        layout,
        classes,
        samples,
        group_names,
        has_patients: true,
        skipped,
    })
}

impl Dataset {
    /// Keeps only the patients in `listed` (`keep`), or drops them.
    pub fn filter_patients(&mut self, list: &Path, listed: &BTreeSet<String>, keep: bool) -> Result<(), DatasetError> {
        self.check_listed(list, listed)?;
        let names = &self.group_names;
        self.samples.retain(|s| listed.contains(&names[s.group]) == keep);
        if self.samples.is_empty() {
            return Err(DatasetError::PatientList {
                list: list.into(),
                message: "no image is left after filtering".into(),
            });
        }
        Ok(())
    }

    /// Indices of the samples of the listed patients (all of whom must be present).
    pub fn patient_indices(&self, list: &Path, listed: &BTreeSet<String>) -> Result<Vec<usize>, DatasetError> {
        self.check_listed(list, listed)?;
        let indices: Vec<usize> = (0..self.samples.len())
            .filter(|&i| listed.contains(&self.group_names[self.samples[i].group]))
            .collect();
        if indices.len() == self.samples.len() {
            return Err(DatasetError::PatientList {
                list: list.into(),
                message: "lists every patient: nothing is left to train on".into(),
            });
        }
        Ok(indices)
    }

    /// Every listed patient must be in the dataset, so that a typo or the wrong
    /// directory cannot quietly change which images a run uses.
    fn check_listed(&self, list: &Path, listed: &BTreeSet<String>) -> Result<(), DatasetError> {
        let error = |message: String| DatasetError::PatientList {
            list: list.into(),
            message,
        };
        if !self.has_patients {
            return Err(error(format!(
                "{} has no patient ids (MURA layout needed)",
                self.root.display()
            )));
        }
        let present: BTreeSet<&str> = self
            .samples
            .iter()
            .map(|s| self.group_names[s.group].as_str())
            .collect();
        let missing: Vec<&str> = listed
            .iter()
            .map(String::as_str)
            .filter(|id| !present.contains(id))
            .collect();
        if !missing.is_empty() {
            let shown = missing.iter().take(5).copied().collect::<Vec<_>>().join(", ");
            return Err(error(format!(
                "{} listed patient(s) not in {}: {shown}",
                missing.len(),
                self.root.display()
            )));
        }
        Ok(())
    }

    pub fn positives(&self) -> usize {
        self.samples.iter().filter(|s| s.positive).count()
    }

    pub fn negatives(&self) -> usize {
        self.samples.len() - self.positives()
    }

    pub fn patients(&self) -> Option<usize> {
        self.has_patients
            .then(|| self.samples.iter().map(|s| s.group).collect::<BTreeSet<_>>().len())
    }

    /// The summary printed before training.
    pub fn summary(&self) -> String {
        let mut out = format!("dataset {} ({})\n", self.root.display(), self.layout);
        out += &format!("  {:<10} {:>6} images\n", self.classes.positive, self.positives());
        out += &format!("  {:<10} {:>6} images\n", self.classes.negative, self.negatives());
        match self.patients() {
            Some(n) => out += &format!("  patients   {n:>6}\n"),
            None => out += "  patients   unknown (each image is its own group)\n",
        }
        out += &format!("  skipped    {:>6}\n", self.skipped.len());
        for skip in &self.skipped {
            out += &format!("    {}: {}\n", skip.path.display(), skip.reason);
        }
        out
    }

    /// Identifies the images a run used, wherever the data set is mounted: each
    /// sample's path below the root, its size in bytes, label and group. Two
    /// copies of one data set agree; a different or edited set does not.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for sample in &self.samples {
            let relative = sample.path.strip_prefix(&self.root).unwrap_or(&sample.path);
            let size = std::fs::metadata(&sample.path).map_or(u64::MAX, |m| m.len());
            hasher.update(relative.to_string_lossy().as_bytes());
            hasher.update([0]);
            hasher.update(size.to_le_bytes());
            hasher.update([sample.positive as u8]);
            hasher.update(self.group_names[sample.group].as_bytes());
            hasher.update([0]);
        }
        hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The whole data set, as a k-fold run sees it.
    pub fn training_summary(&self, schedule: serde_json::Value) -> TrainingSummary {
        TrainingSummary {
            source: self.root.display().to_string(),
            layout: self.layout.to_string(),
            images: self.samples.len(),
            positives: self.positives(),
            negatives: self.negatives(),
            patients: self.patients(),
            validation_images: None,
            validation_patients: None,
            skipped: self.skipped.len(),
            terms: None,
            schedule,
        }
    }

    /// A model trained on the samples `train` and validated on `validation`:
    /// the counts are those it learnt from, the held-out ones beside them.
    pub fn split_summary(&self, train: &[usize], validation: &[usize], schedule: serde_json::Value) -> TrainingSummary {
        let patients = |indices: &[usize]| {
            self.has_patients.then(|| {
                indices
                    .iter()
                    .map(|&i| self.samples[i].group)
                    .collect::<BTreeSet<_>>()
                    .len()
            })
        };
        let positives = train.iter().filter(|&&i| self.samples[i].positive).count();
        TrainingSummary {
            images: train.len(),
            positives,
            negatives: train.len() - positives,
            patients: patients(train),
            validation_images: (!validation.is_empty()).then_some(validation.len()),
            validation_patients: (!validation.is_empty()).then(|| patients(validation)).flatten(),
            ..self.training_summary(schedule)
        }
    }

    /// Decodes and resizes every image in parallel. Images that fail are
    /// moved to `skipped` with the reason, and the rest are returned in order.
    pub fn load_images(
        &mut self,
        preprocessing: &Preprocessing,
        progress: &dyn crate::progress::Progress,
    ) -> Vec<Rgb32FImage> {
        progress.start("decoding", "images", self.samples.len() as u64);
        let results: Vec<Result<Rgb32FImage, String>> = self
            .samples
            .par_iter()
            .map(|sample| {
                let result = crate::files::read_regular_file(&sample.path, crate::files::MAX_INPUT_BYTES)
                    .map_err(|e| e.problem.to_string())
                    .and_then(|bytes| preprocess::load(&bytes, preprocessing).map_err(|e| e.to_string()));
                progress.advance(1);
                result
            })
            .collect();
        progress.finish();
        let mut images = Vec::with_capacity(results.len());
        let mut kept = Vec::with_capacity(results.len());
        for (sample, result) in std::mem::take(&mut self.samples).into_iter().zip(results) {
            match result {
                Ok(image) => {
                    images.push(image);
                    kept.push(sample);
                }
                Err(reason) => self.skipped.push(Skipped {
                    path: sample.path,
                    reason,
                }),
            }
        }
        self.samples = kept;
        images
    }

    /// Errors out when loading left fewer than two classes.
    pub fn check_trainable(&self) -> Result<(), DatasetError> {
        if self.samples.is_empty() {
            return Err(DatasetError::Empty {
                path: self.root.clone(),
            });
        }
        if self.positives() == 0 || self.negatives() == 0 {
            let class = if self.positives() == 0 {
                &self.classes.negative
            } else {
                &self.classes.positive
            };
            return Err(DatasetError::SingleClass {
                path: self.root.clone(),
                class: class.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        crate::synthetic::render(32, false, 1).save(path).unwrap();
    }

    #[test]
    fn mura_v1_1_root_is_read_through_its_csv_filtered_by_study() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("MURA-v1.1");
        let listed = [
            "MURA-v1.1/train/XR_HUMERUS/patient00001/study1_positive/image1.png",
            "MURA-v1.1/train/XR_HUMERUS/patient00001/study1_positive/image2.png",
            "MURA-v1.1/train/XR_HUMERUS/patient00002/study1_negative/image1.png",
            "MURA-v1.1/train/XR_SHOULDER/patient00003/study1_positive/image1.png",
        ];
        for path in &listed {
            touch(&dir.path().join(path));
        }
        let missing = "MURA-v1.1/train/XR_HUMERUS/patient00004/study1_negative/image1.png";
        std::fs::write(
            root.join("train_image_paths.csv"),
            format!("{}\n{missing}\n", listed.join("\n")),
        )
        .unwrap();

        let err = scan(&root, &ScanOptions::default()).unwrap_err().to_string();
        assert!(err.contains("--study"), "{err}");

        let options = ScanOptions {
            study: Some("XR_HUMERUS".into()),
            ..Default::default()
        };
        let dataset = scan(&root, &options).unwrap();
        assert_eq!(dataset.layout, Layout::MuraCsv);
        assert_eq!((dataset.positives(), dataset.negatives()), (2, 1));
        assert_eq!(dataset.patients(), Some(2));
        assert_eq!(
            dataset.samples[0].group, dataset.samples[1].group,
            "one patient's images share a group"
        );
        assert_eq!(dataset.skipped.len(), 1);
        assert!(dataset.skipped[0].reason.contains("missing on disk"));
    }

    #[test]
    fn mura_layout_under_a_split_folder_and_class_folder_rules() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("mura/train/patient00007/study1_positive/image1.png"));
        touch(&dir.path().join("mura/train/patient00008/study2_negative/image1.png"));
        let dataset = scan(&dir.path().join("mura"), &ScanOptions::default()).unwrap();
        assert_eq!(dataset.layout, Layout::Mura);
        assert_eq!(dataset.group_names, ["patient00007", "patient00008"]);

        // Unrecognised class names need --positive; three classes are refused.
        let classes = dir.path().join("classes");
        touch(&classes.join("Broken/a.png"));
        touch(&classes.join("Intact/b.png"));
        let err = scan(&classes, &ScanOptions::default()).unwrap_err().to_string();
        assert!(err.contains("--positive"), "{err}");
        let options = ScanOptions {
            positive: Some("broken".into()),
            ..Default::default()
        };
        let dataset = scan(&classes, &options).unwrap();
        assert_eq!(dataset.classes.positive, "Broken");
        assert!(dataset.samples.iter().any(|s| s.positive && s.path.ends_with("a.png")));
        touch(&classes.join("Other/c.png"));
        let err = scan(&classes, &options).unwrap_err().to_string();
        assert!(err.contains("3 class folders"), "{err}");
    }
}

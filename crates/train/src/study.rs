//! Study-level verdicts: MURA labels studies, and a radiologist reads a study
//! (all its views), not one image. A study's probability is the mean of its
//! images' probabilities.

use std::collections::BTreeMap;
use std::path::Path;

/// The study an image belongs to, from its path alone: the MURA study folder
/// (`patientNNNNN/studyK_positive/imageM.png` → `patientNNNNN/studyK_positive`).
/// `None` when the image is not in a folder named `study…`; DICOM files carry
/// their own study (see `fracture_core::dicom::study_instance_uid`).
pub fn mura_study(path: &Path) -> Option<String> {
    let study = path.parent()?;
    let name = study.file_name()?.to_str()?;
    let number = name.strip_prefix("study")?;
    if !number.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    match study.parent().and_then(Path::file_name).and_then(|p| p.to_str()) {
        Some(patient) if patient.starts_with("patient") => Some(format!("{patient}/{name}")),
        _ => Some(study.display().to_string()),
    }
}

/// The study of an image known by its path alone: its MURA study folder, else
/// the image itself (a study of one).
pub fn study_key(path: &Path) -> String {
    mura_study(path).unwrap_or_else(|| path.display().to_string())
}

/// One study's images (indices into the image list) and mean probability.
#[derive(Clone, Debug, PartialEq)]
pub struct Study {
    pub key: String,
    pub members: Vec<usize>,
    pub probability: f64,
}

/// Groups images by study key, in the order each study first appears.
pub fn group(keys: &[String], probabilities: &[f64]) -> Vec<Study> {
    let mut order: Vec<String> = Vec::new();
    let mut members: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, key) in keys.iter().enumerate() {
        let entry = members.entry(key.as_str()).or_default();
        if entry.is_empty() {
            order.push(key.clone());
        }
        entry.push(index);
    }
    order
        .into_iter()
        .map(|key| {
            let members = members.remove(key.as_str()).unwrap_or_default();
            let probability = members.iter().map(|&i| probabilities[i]).sum::<f64>() / members.len().max(1) as f64;
            Study {
                key,
                members,
                probability,
            }
        })
        .collect()
}

/// Each study's mean probability, in the order of `studies`.
pub fn probabilities(studies: &[Study]) -> Vec<f64> {
    studies.iter().map(|s| s.probability).collect()
}

/// A per-image value of each study taken from its first image: a study's
/// images share their label (MURA labels studies) and their patient.
pub fn of_first_image<T: Copy>(studies: &[Study], per_image: &[T]) -> Vec<T> {
    studies.iter().map(|s| per_image[s.members[0]]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mura_study_folders_name_the_study() {
        let key = mura_study(Path::new("data/train/patient00012/study2_positive/image3.png"));
        assert_eq!(key.as_deref(), Some("patient00012/study2_positive"));
        assert_eq!(mura_study(Path::new("data/Fracture/a.png")), None);
        assert_eq!(mura_study(Path::new("study_notes/a.png")), None);
        assert_eq!(mura_study(Path::new("a.png")), None);
    }

    #[test]
    fn a_study_is_the_mean_of_its_images() {
        let keys: Vec<String> = ["b", "a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let studies = group(&keys, &[0.2, 0.9, 0.6, 0.1]);
        assert_eq!(
            studies.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(),
            ["b", "a", "c"]
        );
        assert_eq!(studies[0].members, [0, 2]);
        assert!((studies[0].probability - 0.4).abs() < 1e-12);
        assert_eq!(studies[2].probability, 0.1);
    }
}

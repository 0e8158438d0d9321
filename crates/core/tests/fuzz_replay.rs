//! Replays the fuzz targets' seeds, their minimised corpus and every saved
//! regression (`fuzz/`) on stable, through the same calls the targets make:
//! no input may panic.

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut found = Vec::new();
    for folder in ["seeds", "minimised", "regressions"].map(|kind| fuzz.join(kind).join(target)) {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                found.push((path, bytes));
            }
        }
    }
    found.sort();
    found
}

#[test]
fn decode_image_inputs_decode_or_fail_cleanly() {
    let inputs = inputs("decode_image");
    assert!(inputs.len() >= 8, "the seed corpus is missing");
    let mut seeds_decoded = 0;
    for (path, bytes) in &inputs {
        match fracture_core::preprocess::decode(bytes) {
            Ok(image) => {
                assert!(u64::from(image.width()) * u64::from(image.height()) <= fracture_core::preprocess::MAX_PIXELS);
                seeds_decoded += usize::from(path.starts_with_seeds());
            }
            Err(error) => assert!(!error.to_string().is_empty(), "{}", path.display()),
        }
    }
    // Every seed but the truncated JPEG is a valid image of a supported format.
    assert_eq!(
        seeds_decoded,
        inputs.iter().filter(|(p, _)| p.starts_with_seeds()).count() - 1
    );
}

/// Seeds made to fail one check (`scripts/make_structural_fuzz_seeds.py`),
/// with the message they must fail with.
const REFUSED_MODEL_SEEDS: [(&str, &str); 1] = [(
    "densenet-tiny-extra-tensor.safetensors",
    "unexpected tensor(s): features.extra.weight",
)];

#[test]
fn model_file_inputs_load_or_fail_cleanly() {
    let device = candle_core::Device::Cpu;
    let inputs = inputs("model_file");
    assert!(!inputs.is_empty(), "the seed corpus is missing");
    let mut refused_seen = 0;
    for (path, bytes) in &inputs {
        let built =
            fracture_core::weights::ModelFile::from_bytes(bytes, &device).and_then(|file| file.build_model(&device));
        if !path.starts_with_seeds() {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy();
        match REFUSED_MODEL_SEEDS.iter().find(|(seed, _)| *seed == name) {
            Some((_, message)) => {
                let error = built.err().map(|e| e.to_string()).unwrap_or_default();
                assert!(
                    error.contains(message),
                    "seed {name}: expected `{message}`, got `{error}`"
                );
                refused_seen += 1;
            }
            None => assert!(built.is_ok(), "seed {name} does not build: {:?}", built.err()),
        }
    }
    assert_eq!(refused_seen, REFUSED_MODEL_SEEDS.len(), "a refused seed is missing");
}

#[test]
fn card_inputs_parse_or_fail_cleanly() {
    let inputs = inputs("card");
    assert!(inputs.len() >= 2, "the seed corpus is missing");
    for (path, bytes) in &inputs {
        if let Ok(json) = std::str::from_utf8(bytes) {
            let parsed = fracture_core::ModelCard::from_json(json);
            assert!(
                parsed.is_ok() || !path.starts_with_seeds(),
                "seed {}: {:?}",
                path.display(),
                parsed.err()
            );
        }
    }
}

trait Seeded {
    fn starts_with_seeds(&self) -> bool;
}

impl Seeded for Path {
    fn starts_with_seeds(&self) -> bool {
        self.components().any(|c| c.as_os_str() == "seeds")
    }
}

//! Replays the `pth_import` fuzz target's seeds, minimised corpus and saved
//! regressions (`fuzz/`) on stable: importing any of them may fail, never panic.

use std::path::Path;

/// Seeds made to fail one check (`scripts/make_structural_fuzz_seeds.py`),
/// with the message they must fail with. Seeds named `tiny*` must import.
const REFUSED_SEEDS: [(&str, &str); 6] = [
    ("legacy_format_no_tensors.pth", "no tensors found"),
    ("no_conv0.safetensors", "missing tensor `features.conv0.weight`"),
    ("conv0_not_4d.safetensors", "expected a 4-D convolution weight"),
    (
        "no_dense_blocks.safetensors",
        "no `features.denseblockN.denselayerM` tensors",
    ),
    ("conv2_not_4d.safetensors", "expected a 4-D convolution weight"),
    ("conv2_channels.safetensors", "are not a multiple of the growth rate"),
];

#[test]
fn pth_import_inputs_import_or_fail_cleanly() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let (mut seen, mut refused_seen) = (0, 0);
    for folder in ["seeds", "minimised", "regressions"].map(|kind| fuzz.join(kind).join("pth_import")) {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        let is_seed = folder.ends_with("seeds/pth_import");
        for entry in entries {
            let path = entry.unwrap().path();
            if !path.is_file() {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let imported = fracture_train::import::import_torchvision(&bytes, &path.display().to_string());
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if is_seed && name.starts_with("tiny") {
                assert!(imported.is_ok(), "{}: {:?}", path.display(), imported.err());
            }
            if let Some((_, message)) = REFUSED_SEEDS.iter().find(|(seed, _)| is_seed && *seed == name) {
                let error = imported.err().map(|e| e.to_string()).unwrap_or_default();
                assert!(
                    error.contains(message),
                    "seed {name}: expected `{message}`, got `{error}`"
                );
                refused_seen += 1;
            }
            seen += 1;
        }
    }
    assert!(seen >= 3, "the seed corpus is missing");
    assert_eq!(refused_seen, REFUSED_SEEDS.len(), "a refused seed is missing");
}

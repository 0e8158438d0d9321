//! Replays the `pth_import` fuzz target's seeds, minimised corpus and saved
//! regressions (`fuzz/`) on stable: importing any of them may fail, never panic.

use std::path::Path;

#[test]
fn pth_import_inputs_import_or_fail_cleanly() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut seen = 0;
    for folder in ["seeds", "minimised", "regressions"].map(|kind| fuzz.join(kind).join("pth_import")) {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if !path.is_file() {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let imported = fracture_train::import::import_torchvision(&bytes, &path.display().to_string());
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("tiny"))
            {
                assert!(imported.is_ok(), "{}: {:?}", path.display(), imported.err());
            }
            seen += 1;
        }
    }
    assert!(seen >= 3, "the seed corpus is missing");
}

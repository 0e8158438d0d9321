//! Any text as a model card (the JSON in a model file's metadata).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(json) = std::str::from_utf8(data) {
        let _ = fracture_core::ModelCard::from_json(json);
    }
});

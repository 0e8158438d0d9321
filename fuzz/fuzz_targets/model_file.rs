//! Any bytes as a model file: parsed, checked, and built into a model.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let device = candle_core::Device::Cpu;
    if let Ok(file) = fracture_core::weights::ModelFile::from_bytes(data, &device) {
        let _ = file.build_model(&device);
    }
});

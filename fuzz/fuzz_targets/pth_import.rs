//! Any bytes as a torchvision state dict (`.pth`, both formats, or safetensors).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fracture_train::import::import_torchvision(data, "fuzz input");
});

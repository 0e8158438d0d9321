//! Any bytes through the one decode path (PNG, JPEG, BMP, TIFF, DICOM): an
//! error is fine, a panic, a hang or an allocation past the budget is not.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(image) = fracture_core::preprocess::decode(data) {
        assert!(u64::from(image.width()) * u64::from(image.height()) <= fracture_core::preprocess::MAX_PIXELS);
    }
});

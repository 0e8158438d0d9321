//! Any bytes as a torchvision state dict (`.pth`, both formats, or safetensors).
//!
//! candle's unpickler panics on malformed pickles (it indexes tuples without
//! checking their length); the importer turns that into an error at its
//! `catch_unwind` boundary. libFuzzer's panic hook aborts before any unwind,
//! which would report that handled panic as a crash, so this target swaps the
//! hook for a silent one: a panic the importer does not catch still reaches
//! `fuzz_target!`'s own `catch_unwind`, which aborts.
#![no_main]

use std::sync::Once;

static QUIET_PANICS: Once = Once::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    QUIET_PANICS.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let _ = fracture_train::import::import_torchvision(data, "fuzz input");
});

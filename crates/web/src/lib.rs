//! The browser's entry point: model bytes and image bytes in, a detection
//! (probability, label, heat map, warnings) out. Everything else — the
//! models, decoding, preprocessing, the heat map — is `fracture-core`, the
//! same code `fracture detect` runs natively.

use candle_core::Device;
use fracture_core::cam::{self, Heatmap};
use fracture_core::predict::Detection;
use fracture_core::Predictor;
use fracture_core::{dicom, preprocess};
use image::DynamicImage;
use serde::Serialize;
use serde_bytes::ByteBuf;
use wasm_bindgen::prelude::*;

#[cfg(feature = "threads")]
mod pool;
#[cfg(feature = "threads")]
pub use pool::{run_pool_thread, shared_memory, shared_module, ThreadPool};

#[wasm_bindgen(start)]
pub fn start() {
    // A Rust panic would otherwise surface as an opaque "unreachable" trap.
    console_error_panic_hook::set_once();
}

/// The threads the kernels split their work between: the pool's size in the
/// build with atomics once `ThreadPool::build` ran, 1 in the single-thread build.
#[wasm_bindgen]
pub fn threads() -> usize {
    #[cfg(feature = "threads")]
    return rayon::current_num_threads();
    #[cfg(not(feature = "threads"))]
    1
}

#[derive(Serialize)]
struct BrowserDetection<'a> {
    #[serde(flatten)]
    detection: &'a Detection,
    input_size: u32,
    /// A Uint8Array on the JS side, not an array of numbers.
    input_rgba: ByteBuf,
    /// The input with the heat map blended over it, the same pixels
    /// `fracture detect --heatmap` writes; absent without a heat map.
    overlay_rgba: Option<ByteBuf>,
    /// A DICOM file's StudyInstanceUID, which groups the views of one study.
    study_uid: Option<String>,
}

/// An image at its own resolution, with the heat map stretched over it.
#[derive(Serialize)]
struct FullView {
    width: u32,
    height: u32,
    rgba: ByteBuf,
    overlay_rgba: Option<ByteBuf>,
}

/// The heat map as `detect` returned it to the page, back for [`Detector::full_view`].
#[derive(serde::Deserialize)]
struct PageHeatmap {
    width: usize,
    height: usize,
    values: Vec<f32>,
}

#[wasm_bindgen]
pub struct Detector {
    predictor: Predictor,
}

fn to_js<T: serde::Serialize>(value: &T) -> Result<JsValue, JsError> {
    // Plain objects (not Maps) so the page can read fields directly.
    let serializer = serde_wasm_bindgen::Serializer::json_compatible();
    value.serialize(&serializer).map_err(|e| JsError::new(&e.to_string()))
}

#[wasm_bindgen]
impl Detector {
    /// Loads a model file (safetensors with its card); errors say what is wrong with it.
    #[wasm_bindgen(constructor)]
    pub fn new(model_bytes: &[u8]) -> Result<Detector, JsError> {
        let predictor = Predictor::from_bytes(model_bytes, &Device::Cpu).map_err(|e| JsError::new(&e.to_string()))?;
        Ok(Detector { predictor })
    }

    /// The model card, as a plain object.
    pub fn card(&self) -> Result<JsValue, JsError> {
        to_js(self.predictor.card())
    }

    /// `{ probability, label, positive, heatmap: {width, height, values} | null,
    /// warnings, width, height, input_size, input_rgba, overlay_rgba | null, study_uid | null }`,
    /// where `input_rgba` is what the model saw, for the page to draw (browsers
    /// cannot show TIFF or DICOM), and `overlay_rgba` the same with core's heat map over it.
    pub fn detect(&self, image_bytes: &[u8]) -> Result<JsValue, JsError> {
        let detection = self
            .predictor
            .detect(image_bytes)
            .map_err(|e| JsError::new(&e.to_string()))?;
        // The pixels decoded, so the data set parses: an unreadable UID only loses the grouping.
        let study_uid = if dicom::is_dicom(image_bytes) {
            dicom::study_instance_uid(image_bytes).ok().flatten()
        } else {
            None
        };
        let rgba = DynamicImage::ImageRgb32F(detection.input.clone()).to_rgba8();
        let overlay = detection
            .heatmap
            .as_ref()
            .map(|heatmap| ByteBuf::from(cam::overlay(&detection.input, heatmap).into_raw()));
        to_js(&BrowserDetection {
            input_size: rgba.width(),
            input_rgba: ByteBuf::from(rgba.into_raw()),
            overlay_rgba: overlay,
            study_uid,
            detection: &detection,
        })
    }

    /// `{ width, height, rgba, overlay_rgba | null }`: the image decoded at its own
    /// resolution as the model's input was (so TIFF and DICOM show too), and core's
    /// overlay of `heatmap` (what `detect` returned for it) stretched over the whole
    /// image, as the model's input stretched it.
    pub fn full_view(&self, image_bytes: &[u8], heatmap: JsValue) -> Result<JsValue, JsError> {
        let image = preprocess::decode(image_bytes).map_err(|e| JsError::new(&e.to_string()))?;
        let heatmap: Option<PageHeatmap> =
            serde_wasm_bindgen::from_value(heatmap).map_err(|e| JsError::new(&format!("heat map: {e}")))?;
        let overlay = match heatmap {
            Some(PageHeatmap { width, height, values }) if values.len() == width * height => {
                let heatmap = Heatmap { width, height, values };
                Some(ByteBuf::from(cam::overlay(&image, &heatmap).into_raw()))
            }
            Some(_) => return Err(JsError::new("heat map: its values do not fill width × height")),
            None => None,
        };
        let rgba = DynamicImage::ImageRgb32F(image).to_rgba8();
        to_js(&FullView {
            width: rgba.width(),
            height: rgba.height(),
            rgba: ByteBuf::from(rgba.into_raw()),
            overlay_rgba: overlay,
        })
    }
}

//! The display pipeline of PS3.3 C.11: modality LUT, VOI window, MONOCHROME1 inversion, colour.

use dicom_pixeldata::{
    DecodedPixelData, PhotometricInterpretation, PixelRepresentation, PlanarConfiguration, VoiLutFunction, WindowLevel,
};
use image::Rgb32FImage;

use crate::{Error, Result};

use super::corrupt;

pub(super) fn to_rgb(frame: &DecodedPixelData<'_>) -> Result<Rgb32FImage> {
    let (width, height) = (frame.columns(), frame.rows());
    let samples_per_pixel = usize::from(frame.samples_per_pixel());
    let photometric = frame.photometric_interpretation();
    let values = stored_values(frame)?;
    let rgb = match (photometric, samples_per_pixel) {
        (PhotometricInterpretation::Monochrome1 | PhotometricInterpretation::Monochrome2, 1) => {
            let grey = displayed_grey(frame, &values)?;
            let invert = *photometric == PhotometricInterpretation::Monochrome1;
            grey.into_iter().flat_map(|v| [if invert { 1.0 - v } else { v }; 3]).collect()
        }
        (PhotometricInterpretation::Rgb | PhotometricInterpretation::YbrFull, 3) => colour(frame, &values),
        (other, samples) => {
            return Err(Error::UnsupportedImage(format!(
                "DICOM photometric interpretation {} with {samples} sample(s) per pixel (MONOCHROME1, MONOCHROME2, RGB or YBR_FULL supported)",
                other.as_str()
            )))
        }
    };
    Rgb32FImage::from_raw(width, height, rgb)
        .ok_or_else(|| Error::Decode("DICOM pixel data does not match Rows × Columns".into()))
}

/// The stored sample values of the frame, in file order: only the Bits
/// Stored bits ending at High Bit count (the others may hold overlays or
/// garbage), sign-extended when Pixel Representation says signed.
fn stored_values(frame: &DecodedPixelData<'_>) -> Result<Vec<f32>> {
    let (allocated, stored, high_bit) = (frame.bits_allocated(), frame.bits_stored(), frame.high_bit());
    if stored == 0 || stored > allocated || high_bit >= allocated || high_bit + 1 < stored {
        return Err(Error::Decode(format!(
            "DICOM Bits Stored {stored} and High Bit {high_bit} do not fit in Bits Allocated {allocated}"
        )));
    }
    let shift = u32::from(high_bit + 1 - stored);
    let mask = (1u32 << stored) - 1;
    let sign_bit = 1u32 << (stored - 1);
    let signed = frame.pixel_representation() == PixelRepresentation::Signed;
    let value = |word: u32| {
        let bits = (word >> shift) & mask;
        if signed && bits & sign_bit != 0 {
            (i64::from(bits) - (1i64 << stored)) as f32
        } else {
            bits as f32
        }
    };
    let count = frame.rows() as usize * frame.columns() as usize * usize::from(frame.samples_per_pixel());
    let data = frame.frame_data(0).map_err(|e| corrupt("DICOM pixel data", &e))?;
    let values: Vec<f32> = match allocated {
        8 => data.iter().take(count).map(|&b| value(u32::from(b))).collect(),
        // The pixel data crate hands 16-bit samples over in native byte order.
        16 => data
            .chunks_exact(2)
            .take(count)
            .map(|c| value(u32::from(u16::from_ne_bytes([c[0], c[1]]))))
            .collect(),
        other => {
            return Err(Error::UnsupportedImage(format!(
                "DICOM image with {other} bits allocated per sample"
            )))
        }
    };
    if values.len() != count {
        return Err(Error::Decode(
            "DICOM pixel data is shorter than Rows × Columns × Samples per Pixel".into(),
        ));
    }
    Ok(values)
}

/// Modality LUT then VOI window (or min/max) of a grey frame: 0..=1 where 1
/// is displayed white, before any MONOCHROME1 inversion.
fn displayed_grey(frame: &DecodedPixelData<'_>, values: &[f32]) -> Result<Vec<f32>> {
    let rescale = frame
        .rescale()
        .map_err(|e| corrupt("DICOM rescale", &e))?
        .first()
        .copied();
    let (slope, intercept) = rescale.map_or((1.0, 0.0), |r| (r.slope, r.intercept));
    if !slope.is_finite() || !intercept.is_finite() {
        return Err(Error::Decode(format!(
            "DICOM Rescale Slope {slope} / Intercept {intercept} are not finite numbers"
        )));
    }
    let modality = values.iter().map(|&v| f64::from(v) * slope + intercept);
    let window = frame
        .window()
        .map_err(|e| corrupt("DICOM window", &e))?
        .and_then(|w| w.first().copied());
    // A window that cannot be applied (width 0 or not a number) is treated
    // as absent rather than failing the image: min/max still shows it.
    let window = window.filter(|w| w.center.is_finite() && w.width.is_finite() && w.width > 0.0);
    if let Some(window) = window {
        let function = frame
            .voi_lut_function()
            .map_err(|e| corrupt("DICOM VOI LUT function", &e))?
            .and_then(|f| f.first().copied())
            .unwrap_or(VoiLutFunction::Linear);
        return Ok(modality.map(|x| apply_window(x, window, function) as f32).collect());
    }
    let modality: Vec<f64> = modality.collect();
    let (low, high) = modality
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let range = high - low;
    Ok(modality
        .iter()
        .map(|&v| {
            if range > 0.0 && range.is_finite() {
                ((v - low) / range) as f32
            } else {
                0.0
            }
        })
        .collect())
}

/// The VOI LUT functions of PS3.3 C.11.2.1.2-3, with output 0..=1.
fn apply_window(x: f64, window: WindowLevel, function: VoiLutFunction) -> f64 {
    let (c, w) = (window.center, window.width);
    let y = match function {
        // LINEAR is defined in terms of `w - 1`; below one unit (windows on
        // float-rescaled data) it degenerates, and LINEAR_EXACT is what the
        // producer meant, as dicom-pixeldata also does.
        VoiLutFunction::Linear if w >= 1.0 => {
            if x <= c - 0.5 - (w - 1.0) / 2.0 {
                0.0
            } else if x > c - 0.5 + (w - 1.0) / 2.0 {
                1.0
            } else {
                (x - (c - 0.5)) / (w - 1.0) + 0.5
            }
        }
        VoiLutFunction::Linear | VoiLutFunction::LinearExact => {
            if x <= c - w / 2.0 {
                0.0
            } else if x > c + w / 2.0 {
                1.0
            } else {
                (x - c) / w + 0.5
            }
        }
        VoiLutFunction::Sigmoid => 1.0 / (1.0 + (-4.0 * (x - c) / w).exp()),
    };
    y.clamp(0.0, 1.0)
}

/// RGB or YBR_FULL samples to RGB on 0..=1, by the bit depth.
fn colour(frame: &DecodedPixelData<'_>, values: &[f32]) -> Vec<f32> {
    let pixels = values.len() / 3;
    let bits = i32::from(frame.bits_stored());
    let max = 2f32.powi(bits) - 1.0;
    let half = 2f32.powi(bits - 1);
    // Planar configuration 1 stores the three colour planes one after the other.
    let planar = frame.planar_configuration() == PlanarConfiguration::PixelFirst;
    let ybr = *frame.photometric_interpretation() == PhotometricInterpretation::YbrFull;
    let mut out = Vec::with_capacity(pixels * 3);
    for i in 0..pixels {
        let [a, b, c] = if planar {
            [values[i], values[pixels + i], values[2 * pixels + i]]
        } else {
            [values[3 * i], values[3 * i + 1], values[3 * i + 2]]
        };
        // YBR_FULL to RGB, PS3.3 C.7.6.3.1.2 (full range, chroma centred on half).
        let rgb = if ybr {
            let (cb, cr) = (b - half, c - half);
            [a + 1.402 * cr, a - 0.344_136 * cb - 0.714_136 * cr, a + 1.772 * cb]
        } else {
            [a, b, c]
        };
        out.extend(rgb.map(|v| (v / max).clamp(0.0, 1.0)));
    }
    out
}

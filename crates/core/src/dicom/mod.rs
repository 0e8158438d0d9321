//! DICOM (.dcm) decoding behind [`crate::preprocess::decode`], so training,
//! native detection and the browser read DICOM through the same path as PNG.
//!
//! Radiographs leave hospital systems as DICOM, and their stored samples
//! (10 to 16 bits, sometimes signed, sometimes with white meaning "no
//! signal") are not what a radiologist looks at. To give the model the image
//! a viewer would show, the frame goes through the display pipeline of the
//! standard (PS3.3 C.11), in its order:
//!
//! 1. Modality LUT: Rescale Slope and Intercept turn stored values into
//!    modality units, the scale the window is written in.
//! 2. VOI window: Window Center and Width (the first pair when several are
//!    given: it is the producer's default view) with the standard's `LINEAR`
//!    formula, or `LINEAR_EXACT`/`SIGMOID` when VOI LUT Function says so.
//!    The window is the contrast the image was meant to be read at; a plain
//!    min/max stretch would let a few bright markers or collimator edges
//!    squash the bone into a narrow grey band. Without a window, the frame's
//!    own min/max is the only scale there is, so it is used.
//! 3. MONOCHROME1 (common in CR and DR) means the lowest value is displayed
//!    white, so bone is stored dark: it is inverted, so bone is bright as in
//!    MONOCHROME2 and in every PNG/JPEG radiograph the models learn from.
//!
//! Colour (RGB, YBR_FULL) is scaled by its bit depth; the LUTs above are
//! defined for grey only. Of a multi-frame object only the first frame is
//! read. Grey is repeated over three channels, as for PNG.
//!
//! Only pure-Rust codecs are enabled (uncompressed, deflated, RLE, JPEG
//! baseline/extended/lossless) because the same code runs in wasm32, where C
//! codec libraries cannot be linked. Anything else (JPEG-LS, JPEG 2000, ...)
//! is refused with [`Error::UnsupportedTransferSyntax`], which names it.

mod display;
mod frames;
mod guard;
#[cfg(test)]
mod tests;

use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, FileMetaTable, OpenFileOptions, Tag};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use image::Rgb32FImage;

use crate::{Error, Result};

use display::to_rgb;
use frames::{check_encapsulated_frame, check_image_attributes};
use guard::LengthGuard;

/// A Part 10 file has a 128-byte preamble, then `DICM`.
const MAGIC_OFFSET: usize = 128;
const MAGIC: &[u8; 4] = b"DICM";

/// Largest frame accepted: the same budget as the other formats. It also
/// keeps the frame size arithmetic far from overflowing a 32-bit `usize`
/// (wasm32) inside the pixel data crate.
const MAX_PIXELS: u64 = crate::preprocess::MAX_PIXELS;

/// Most bytes a deflated data set may inflate to: a frame at the pixel
/// budget in 16 bits, plus room for the rest of the data set.
const MAX_INFLATED: usize = (MAX_PIXELS as usize) * 2 + (16 << 20);

/// Whether `bytes` is a DICOM Part 10 file (`DICM` at byte 128). Detection is
/// by content, as for the other formats: `.dcm` names are not reliable.
pub fn is_dicom(bytes: &[u8]) -> bool {
    bytes.get(MAGIC_OFFSET..MAGIC_OFFSET + MAGIC.len()) == Some(MAGIC.as_slice())
}

/// Decodes the first frame of a DICOM Part 10 file into RGB on the 0..=1
/// scale, as the model's input is made from (see the module documentation
/// for the windowing and MONOCHROME1 inversion).
pub fn decode(bytes: &[u8]) -> Result<Rgb32FImage> {
    let object = open(bytes)?;
    let geometry = check_image_attributes(&object)?;
    check_encapsulated_frame(&object, object.meta().transfer_syntax(), geometry)?;
    let frame = object
        .decode_pixel_data_frame(0)
        .map_err(|e| corrupt("DICOM pixel data", &e))?;
    to_rgb(&frame)
}

/// The Study Instance UID (0020,000D) of a DICOM Part 10 file, which groups
/// the views of one study; `None` when the file has none.
pub fn study_instance_uid(bytes: &[u8]) -> Result<Option<String>> {
    let object = open(bytes)?;
    let Some(element) = object.get(tags::STUDY_INSTANCE_UID) else {
        return Ok(None);
    };
    let uid = element.to_str().map_err(|e| corrupt("DICOM Study Instance UID", &e))?;
    // UIDs are padded to an even length with NUL.
    let uid = uid.trim_end_matches('\0').trim();
    Ok((!uid.is_empty()).then(|| uid.to_string()))
}

/// Parses the data set (not the pixels) of a Part 10 file.
fn open(bytes: &[u8]) -> Result<DefaultDicomObject> {
    let body = match bytes.get(MAGIC_OFFSET..) {
        Some(body) if body.starts_with(MAGIC) => body,
        _ => return Err(Error::UnsupportedImage("not a DICOM file (no DICM at byte 128)".into())),
    };
    // Lengths are checked against the file before dicom-rs allocates them
    // (see `LengthGuard`). The file meta group is read on its own first, so
    // that a pixel encoding we cannot decode is reported by name rather than
    // as whatever the data set parser trips over.
    let guard = LengthGuard { data: body };
    let data_set_at = guard.check_meta()?;
    let meta = FileMetaTable::from_reader(body).map_err(|e| corrupt("DICOM file meta information", &e))?;
    check_transfer_syntax(meta.transfer_syntax())?;
    if let Some(at) = data_set_at {
        guard.check_data_set(at, meta.transfer_syntax())?;
    }
    OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(body)
        .map_err(|e| corrupt("DICOM data set", &e))
}

/// Refuses, by name and UID, a transfer syntax whose data set or pixel data
/// this build cannot decode.
fn check_transfer_syntax(uid: &str) -> Result<()> {
    match TransferSyntaxRegistry.get(uid) {
        Some(ts) if ts.can_decode_all() => Ok(()),
        Some(ts) => Err(Error::UnsupportedTransferSyntax {
            name: ts.name().to_string(),
            uid: ts.uid().to_string(),
        }),
        None => Err(Error::UnsupportedTransferSyntax {
            name: "unknown to this reader".into(),
            uid: uid.to_string(),
        }),
    }
}

fn required_u32(object: &DefaultDicomObject, tag: Tag, name: &str) -> Result<u32> {
    let element = object
        .get(tag)
        .ok_or_else(|| Error::Decode(format!("DICOM image lacks the {name} attribute {tag}")))?;
    element
        .to_int::<u32>()
        .map_err(|_| Error::Decode(format!("DICOM attribute {name} {tag} is not a valid number")))
}

/// An error of the DICOM crates with its causes: their top-level messages
/// ("could not read data set token") say little on their own.
fn corrupt(what: &str, error: &dyn std::error::Error) -> Error {
    let mut message = format!("{what}: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    Error::Decode(message)
}

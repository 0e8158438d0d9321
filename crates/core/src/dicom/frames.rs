//! Image attributes and compressed frames checked before decoding: sizes within the pixel
//! budget, and JPEG and RLE frames that agree with the attributes and are complete.

use dicom_core::DicomValue;
use dicom_dictionary_std::{tags, uids};
use dicom_object::DefaultDicomObject;

use crate::{Error, Result};

use super::{required_u32, MAX_PIXELS};

/// The frame layout the file declares, checked to be one this module reads.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    rows: u32,
    columns: u32,
    bits_allocated: u32,
    samples_per_pixel: u32,
}

impl Geometry {
    /// Bytes of one decoded frame: what the codecs write into.
    fn frame_bytes(self) -> usize {
        self.rows as usize
            * self.columns as usize
            * self.samples_per_pixel as usize
            * (self.bits_allocated as usize / 8)
    }
}

/// Checks what the pixel data decoder trusts, before it runs: a frame size it
/// can compute without overflow and allocate without exhausting memory, and
/// a sample layout this module converts.
pub(super) fn check_image_attributes(object: &DefaultDicomObject) -> Result<Geometry> {
    if object.get(tags::PIXEL_DATA).is_none() {
        let other = [tags::FLOAT_PIXEL_DATA, tags::DOUBLE_FLOAT_PIXEL_DATA]
            .iter()
            .any(|&tag| object.get(tag).is_some());
        return Err(Error::UnsupportedImage(if other {
            "DICOM file has floating point pixel data (a parametric map), not an X-ray image".into()
        } else {
            "DICOM file has no pixel data (7FE0,0010): it is not an image (a report or other non-image object?)".into()
        }));
    }
    let rows = required_u32(object, tags::ROWS, "Rows")?;
    let columns = required_u32(object, tags::COLUMNS, "Columns")?;
    if rows == 0 || columns == 0 {
        return Err(Error::Decode(format!(
            "DICOM image is {columns}x{rows}: it has no pixels"
        )));
    }
    if u64::from(rows) * u64::from(columns) > MAX_PIXELS {
        return Err(Error::UnsupportedImage(format!(
            "DICOM image is {columns}x{rows}, larger than the {} megapixels accepted",
            MAX_PIXELS / 1_000_000
        )));
    }
    let bits = required_u32(object, tags::BITS_ALLOCATED, "Bits Allocated")?;
    if bits != 8 && bits != 16 {
        return Err(Error::UnsupportedImage(format!(
            "DICOM image with {bits} bits allocated per sample (8 or 16 supported)"
        )));
    }
    let samples = required_u32(object, tags::SAMPLES_PER_PIXEL, "Samples per Pixel")?;
    if samples != 1 && samples != 3 {
        return Err(Error::UnsupportedImage(format!(
            "DICOM image with {samples} samples per pixel (1 or 3 supported)"
        )));
    }
    Ok(Geometry {
        rows,
        columns,
        bits_allocated: bits,
        samples_per_pixel: samples,
    })
}

/// The JPEG and RLE adapters of dicom-rs 0.10.1 copy the decoded frame into
/// a buffer sized from Rows × Columns without checking, so a damaged file
/// whose compressed frame is larger (or whose RLE header is short) makes them
/// panic, and a panic in the browser kills the worker. The frame's own
/// header is checked against the file's attributes here first, so those
/// files become errors.
pub(super) fn check_encapsulated_frame(
    object: &DefaultDicomObject,
    transfer_syntax: &str,
    geometry: Geometry,
) -> Result<()> {
    let Some(DicomValue::PixelSequence(sequence)) = object.get(tags::PIXEL_DATA).map(|e| e.value()) else {
        return Ok(());
    };
    let fragments = sequence.fragments();
    let first = fragments
        .first()
        .ok_or_else(|| Error::Decode("DICOM encapsulated pixel data has no fragment".into()))?;
    if JPEG_SYNTAXES.contains(&transfer_syntax) {
        // Frame 0's JPEG stream, gathered as the adapter gathers it.
        let frames = object
            .get(tags::NUMBER_OF_FRAMES)
            .and_then(|e| e.to_int::<u32>().ok())
            .unwrap_or(1) as usize;
        let stream: std::borrow::Cow<'_, [u8]> = if fragments.len() == 1 || fragments.len() == frames {
            first.as_slice().into()
        } else {
            let table = sequence.offset_table();
            let start = table.first().copied().unwrap_or(0) as usize;
            let next = table.get(1).map(|&n| n as usize);
            let (mut offset, mut bytes) = (0usize, Vec::new());
            for fragment in fragments {
                if offset >= start {
                    bytes.extend_from_slice(fragment);
                }
                offset += fragment.len() + 8;
                if next.is_some_and(|next| offset >= next) {
                    break;
                }
            }
            bytes.into()
        };
        let header = jpeg_frame_header(&stream)?;
        let bytes_per_sample = if header.precision > 8 { 2 } else { 1 };
        let decoded =
            usize::from(header.width) * usize::from(header.height) * usize::from(header.components) * bytes_per_sample;
        if u32::from(header.width) != geometry.columns
            || u32::from(header.height) != geometry.rows
            || u32::from(header.components) != geometry.samples_per_pixel
            || decoded > geometry.frame_bytes()
        {
            return Err(Error::Decode(format!(
                "DICOM JPEG frame is {}x{} with {} component(s) of {} bits, but the file declares {}x{} with {} sample(s) of {} bits",
                header.width,
                header.height,
                header.components,
                header.precision,
                geometry.columns,
                geometry.rows,
                geometry.samples_per_pixel,
                geometry.bits_allocated
            )));
        }
    } else if transfer_syntax == uids::RLE_LOSSLESS {
        check_rle_frame(first, geometry)?;
    }
    Ok(())
}

/// The frame header (SOF) of a JPEG stream.
struct JpegFrameHeader {
    precision: u8,
    height: u16,
    width: u16,
    components: u8,
}

/// Reads the frame header of a JPEG stream by walking its marker segments.
/// jpeg-decoder 0.3 panics on some frame headers (two components, precision
/// 0 or 1), so those are refused here, before it sees them.
fn jpeg_frame_header(stream: &[u8]) -> Result<JpegFrameHeader> {
    let bad = |why: &str| Error::Decode(format!("DICOM JPEG frame: {why}"));
    if !stream.starts_with(&[0xFF, 0xD8]) {
        return Err(bad("no start of image marker"));
    }
    let mut at = 2;
    loop {
        // A marker is 0xFF (any number of fill bytes) then a code.
        while stream.get(at) == Some(&0xFF) && stream.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        let (Some(&0xFF), Some(&code)) = (stream.get(at), stream.get(at + 1)) else {
            return Err(bad("no frame header"));
        };
        at += 2;
        match code {
            // Markers without a segment: TEM, RSTn.
            0x01 | 0xD0..=0xD7 => continue,
            // Start of scan or end of image before any frame header.
            0xD9 | 0xDA => return Err(bad("no frame header before the scan")),
            _ => {}
        }
        let length = stream
            .get(at..at + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])));
        let segment = length.filter(|&l| l >= 2).and_then(|l| stream.get(at + 2..at + l));
        let Some(segment) = segment else {
            return Err(bad("truncated marker segment"));
        };
        // SOF0-SOF15 except DHT (C4), JPG (C8) and DAC (CC).
        if matches!(code, 0xC0..=0xCF) && !matches!(code, 0xC4 | 0xC8 | 0xCC) {
            let [precision, h1, h0, w1, w0, components, ..] = *segment else {
                return Err(bad("truncated frame header"));
            };
            let header = JpegFrameHeader {
                precision,
                height: u16::from_be_bytes([h1, h0]),
                width: u16::from_be_bytes([w1, w0]),
                components,
            };
            if !matches!(components, 1 | 3) || !(2..=16).contains(&precision) {
                return Err(bad(&format!("{components} component(s) of {precision} bits")));
            }
            return Ok(header);
        }
        at += segment.len() + 2;
    }
}

const JPEG_SYNTAXES: [&str; 4] = [
    uids::JPEG_BASELINE8_BIT,
    uids::JPEG_EXTENDED12_BIT,
    uids::JPEG_LOSSLESS,
    uids::JPEG_LOSSLESS_SV1,
];

/// An RLE frame (PS3.5 G) must have one segment per sample byte, each
/// inside the fragment and decoding to at least Rows × Columns bytes.
fn check_rle_frame(fragment: &[u8], geometry: Geometry) -> Result<()> {
    let bad = |why: &str| Error::Decode(format!("DICOM RLE frame: {why}"));
    let word = |at: usize| {
        fragment
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let count = word(0).ok_or_else(|| bad("no header"))?;
    let needed = geometry.samples_per_pixel as usize * geometry.bits_allocated as usize / 8;
    // The header has room for 15 segment offsets.
    if count < needed || count > 15 {
        return Err(bad(&format!("{count} segments for {needed} sample bytes")));
    }
    let mut offsets = (1..=count)
        .map(|i| word(4 * i))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("short header"))?;
    offsets.push(fragment.len());
    let pixels = geometry.rows as usize * geometry.columns as usize;
    for pair in offsets.windows(2).take(needed) {
        let segment = fragment
            .get(pair[0]..pair[1])
            .ok_or_else(|| bad("segment offsets out of order or out of the fragment"))?;
        if packbits_len(segment) < pixels {
            return Err(bad("a segment decodes to fewer bytes than Rows × Columns"));
        }
    }
    Ok(())
}

/// Bytes a PackBits segment decodes to, counted as the adapter's reader
/// decodes (a literal run cut short by the end yields what is there).
fn packbits_len(segment: &[u8]) -> usize {
    let (mut at, mut consumed, mut out) = (0usize, 0usize, 0usize);
    while consumed < segment.len() {
        let Some(&header) = segment.get(at) else { return out };
        at += 1;
        consumed += 1;
        match header as i8 {
            -128 => {}
            run @ -127..=-1 => {
                if at >= segment.len() {
                    return out;
                }
                out += (1 - isize::from(run)) as usize;
                at += 1;
                consumed += 1;
            }
            literal => {
                let length = literal as usize + 1;
                let available = length.min(segment.len() - at);
                out += available;
                at += available;
                consumed += length;
            }
        }
    }
    out
}

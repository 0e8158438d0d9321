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

use dicom_core::DicomValue;
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, FileMetaTable, OpenFileOptions, Tag};
use dicom_pixeldata::{
    DecodedPixelData, PhotometricInterpretation, PixelDecoder, PixelRepresentation, PlanarConfiguration,
    VoiLutFunction, WindowLevel,
};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use image::Rgb32FImage;

use crate::{Error, Result};

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

/// Walks the element headers before dicom-rs parses them, because its
/// parser allocates (and zeroes) each element's declared length before
/// reading the value: one flipped bit in a length field claims up to 4 GiB,
/// and a wasm32 memory that has grown never shrinks again. A length that
/// runs past the end of the file is refused here instead. The walk only
/// refuses what cannot fit; on any structure it does not follow, it stops
/// checking and leaves the file to the parser, so it never rejects a file
/// the parser would read. Deeply nested sequences are refused too: the parser
/// recurses into them.
struct LengthGuard<'a> {
    /// The file from the `DICM` magic on.
    data: &'a [u8],
}

/// Encoding of the element headers being walked.
#[derive(Clone, Copy)]
struct Encoding {
    explicit_vr: bool,
    big_endian: bool,
}

const EXPLICIT_LITTLE: Encoding = Encoding {
    explicit_vr: true,
    big_endian: false,
};

struct Header {
    tag: Tag,
    /// The VR, explicit or (in implicit VR) from the dictionary.
    vr: Option<[u8; 2]>,
    length: u32,
    value_at: usize,
}

impl Header {
    /// Bytes of the value the parser reads: binary VRs are read as whole
    /// numbers, so a length that is not a multiple of the number's size
    /// leaves the remainder to be read as the next header.
    fn value_len(&self) -> usize {
        let unit = match self.vr.as_ref() {
            Some(b"US" | b"SS" | b"OW") => 2,
            Some(b"AT" | b"FL" | b"OF" | b"SL" | b"UL" | b"OL") => 4,
            Some(b"FD" | b"OD" | b"SV" | b"UV" | b"OV") => 8,
            _ => 1,
        };
        let length = self.length as usize;
        length - length % unit
    }
}

const UNDEFINED_LENGTH: u32 = u32::MAX;
const ITEM: Tag = Tag(0xFFFE, 0xE000);
const ITEM_END: Tag = Tag(0xFFFE, 0xE00D);
const SEQUENCE_END: Tag = Tag(0xFFFE, 0xE0DD);
const MAX_NESTING: usize = 32;

/// Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
const LONG_VRS: [&[u8; 2]; 13] = [
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV",
];
const SHORT_VRS: [&[u8; 2]; 21] = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL", b"SS",
    b"ST", b"TM", b"UI", b"UL", b"US",
];

/// `Ok(None)`: the walk stopped following the structure (nothing refused).
type Walk = Result<Option<usize>>;

impl LengthGuard<'_> {
    /// Checks the file meta group (explicit VR little endian) and returns
    /// where the data set starts. As dicom-object reads it: the group length
    /// element first, then elements (of any group) until that many bytes.
    fn check_meta(&self) -> Walk {
        let Some(first) = self.header(MAGIC.len(), EXPLICIT_LITTLE) else {
            return Ok(None);
        };
        let group_length = self.data.get(first.value_at..first.value_at + 4);
        let (Tag(0x0002, 0x0000), 4, Some(group_length)) = (first.tag, first.length, group_length) else {
            return Ok(None);
        };
        let group_length = u32::from_le_bytes([group_length[0], group_length[1], group_length[2], group_length[3]]);
        let (mut at, mut read) = (first.value_at + 4, 0u32);
        while read < group_length {
            let Some(header) = self.header(at, EXPLICIT_LITTLE) else {
                return Ok(None);
            };
            if header.length == UNDEFINED_LENGTH {
                return Ok(None);
            }
            // The meta reader consumes each value whole, whatever its VR.
            let next = self.skip(&header, header.length as usize)?;
            read = read
                .saturating_add((header.value_at - at) as u32)
                .saturating_add(header.length);
            at = next;
        }
        Ok(Some(at))
    }

    fn check_data_set(&self, at: usize, transfer_syntax: &str) -> Result<()> {
        let Some(ts) = TransferSyntaxRegistry.get(transfer_syntax) else {
            return Ok(());
        };
        // A deflated data set's lengths count inflated bytes: inflate it
        // (within a budget) and check them against that.
        if matches!(ts.codec(), dicom_encoding::Codec::Dataset(_)) {
            let inflated = miniz_oxide::inflate::decompress_to_vec_with_limit(&self.data[at..], MAX_INFLATED).map_err(
                |e| match e.status {
                    miniz_oxide::inflate::TINFLStatus::HasMoreOutput => Error::UnsupportedImage(format!(
                        "deflated DICOM data set inflates to more than {} MiB",
                        MAX_INFLATED >> 20
                    )),
                    _ => Error::Decode(format!("corrupt deflated DICOM data set ({e})")),
                },
            )?;
            let explicit_little = Encoding {
                explicit_vr: true,
                big_endian: false,
            };
            return LengthGuard { data: &inflated }
                .data_set(0, None, explicit_little, 0)
                .map(|_| ());
        }
        let encoding = Encoding {
            explicit_vr: transfer_syntax != uids::IMPLICIT_VR_LITTLE_ENDIAN,
            big_endian: ts.endianness() == dicom_encoding::Endianness::Big,
        };
        self.data_set(at, None, encoding, 0).map(|_| ())
    }

    /// Elements from `at` to `end` (a defined-length item), to an item
    /// delimiter, or to the end of the file.
    fn data_set(&self, mut at: usize, end: Option<usize>, encoding: Encoding, depth: usize) -> Walk {
        loop {
            if at >= end.unwrap_or(self.data.len()) {
                return Ok(Some(at));
            }
            let Some(header) = self.header(at, encoding) else {
                return Ok(None);
            };
            // An item delimiter ends an item; outside one the parser skips
            // it. Other item or delimiter tags are, to the parser, elements
            // like any other (in valid files they never appear here).
            if header.tag == ITEM_END {
                if depth > 0 {
                    return Ok(Some(header.value_at));
                }
                at = header.value_at;
                continue;
            }
            if header.length == UNDEFINED_LENGTH {
                // As the parser: undefined-length pixel data holds fragments,
                // and any other undefined-length element is read as a
                // sequence in the same encoding, whatever its VR.
                let next = if header.tag == tags::PIXEL_DATA {
                    self.fragments(header.value_at, encoding)?
                } else {
                    self.items(header.value_at, None, encoding, depth + 1)?
                };
                let Some(next) = next else { return Ok(None) };
                at = next;
            } else {
                let next = self.skip(&header, header.value_len())?;
                if header.vr == Some(*b"SQ") && self.items(header.value_at, Some(next), encoding, depth + 1)?.is_none()
                {
                    return Ok(None);
                }
                at = next;
            }
        }
    }

    /// The items of a sequence, to `end` or to a sequence delimiter.
    fn items(&self, mut at: usize, end: Option<usize>, encoding: Encoding, depth: usize) -> Walk {
        if depth > MAX_NESTING {
            return Err(Error::Decode(format!(
                "DICOM sequences nested more than {MAX_NESTING} deep"
            )));
        }
        loop {
            if end.is_some_and(|end| at >= end) {
                return Ok(Some(at));
            }
            let Some(header) = self.header(at, encoding) else {
                return Ok(None);
            };
            let next = match header.tag {
                SEQUENCE_END => return Ok(Some(header.value_at)),
                ITEM if header.length == UNDEFINED_LENGTH => self.data_set(header.value_at, None, encoding, depth)?,
                ITEM => {
                    let next = self.skip(&header, header.length as usize)?;
                    self.data_set(header.value_at, Some(next), encoding, depth)?
                        .map(|_| next)
                }
                _ => None,
            };
            let Some(next) = next else { return Ok(None) };
            at = next;
        }
    }

    /// Encapsulated pixel data: items of raw bytes up to a sequence delimiter.
    fn fragments(&self, mut at: usize, encoding: Encoding) -> Walk {
        loop {
            let Some(header) = self.header(at, encoding) else {
                return Ok(None);
            };
            match header.tag {
                SEQUENCE_END => return Ok(Some(header.value_at)),
                ITEM if header.length != UNDEFINED_LENGTH => at = self.skip(&header, header.length as usize)?,
                _ => return Ok(None),
            }
        }
    }

    /// Where the `length` bytes of the element's value end, refusing a value
    /// longer than the file.
    fn skip(&self, header: &Header, length: usize) -> Result<usize> {
        let remaining = self.data.len().saturating_sub(header.value_at);
        if length > remaining {
            return Err(Error::Decode(format!(
                "DICOM element {} claims {length} bytes but the file has {remaining} left: the file is damaged or truncated",
                header.tag
            )));
        }
        Ok(header.value_at + length)
    }

    /// The header at `at`, or `None` when the file ends.
    fn header(&self, at: usize, encoding: Encoding) -> Option<Header> {
        let u16_at = |at: usize| {
            let b = self.data.get(at..at + 2)?;
            Some(if encoding.big_endian {
                u16::from_be_bytes([b[0], b[1]])
            } else {
                u16::from_le_bytes([b[0], b[1]])
            })
        };
        let u32_at = |at: usize| {
            let b = self.data.get(at..at + 4)?;
            let b = [b[0], b[1], b[2], b[3]];
            Some(if encoding.big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            })
        };
        let tag = Tag(u16_at(at)?, u16_at(at + 2)?);
        // Item and delimiter headers never carry a VR.
        if tag.0 == 0xFFFE {
            return Some(Header {
                tag,
                vr: None,
                length: u32_at(at + 4)?,
                value_at: at + 8,
            });
        }
        if !encoding.explicit_vr {
            return Some(Header {
                tag,
                vr: dictionary_vr(tag),
                length: u32_at(at + 4)?,
                value_at: at + 8,
            });
        }
        let vr = self.data.get(at + 4..at + 6)?;
        let vr = [vr[0], vr[1]];
        if SHORT_VRS.contains(&&vr) {
            Some(Header {
                tag,
                vr: Some(vr),
                length: u32::from(u16_at(at + 6)?),
                value_at: at + 8,
            })
        } else {
            // The parser reads a VR it does not know as UN, with the long
            // header form: so does the walk, to check the length it will use.
            let vr = if LONG_VRS.contains(&&vr) { vr } else { *b"UN" };
            Some(Header {
                tag,
                vr: Some(vr),
                length: u32_at(at + 8)?,
                value_at: at + 12,
            })
        }
    }
}

/// In implicit VR the parser takes the VR from the dictionary: it tells a
/// sequence from bytes, and the size of binary numbers. Context-dependent
/// VRs (US or SS, OB or OW) resolve to one of the same number size, or stay
/// unknown.
fn dictionary_vr(tag: Tag) -> Option<[u8; 2]> {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
    match dicom_dictionary_std::StandardDataDictionary.by_tag(tag)?.vr() {
        VirtualVr::Exact(vr) => Some(vr.to_bytes()),
        VirtualVr::Xs | VirtualVr::Lt => Some(*b"US"),
        // Ox, Px and any later addition.
        _ => None,
    }
}

/// The frame layout the file declares, checked to be one this module reads.
#[derive(Clone, Copy, Debug)]
struct Geometry {
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
fn check_image_attributes(object: &DefaultDicomObject) -> Result<Geometry> {
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
fn check_encapsulated_frame(object: &DefaultDicomObject, transfer_syntax: &str, geometry: Geometry) -> Result<()> {
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

fn to_rgb(frame: &DecodedPixelData<'_>) -> Result<Rgb32FImage> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess;
    use dicom_core::value::PixelFragmentSequence;
    use dicom_core::{dicom_value, DataElement, PrimitiveValue, VR};
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

    /// A minimal DX image: the attributes the decoder reads, and pixel data.
    fn image(
        width: u16,
        height: u16,
        photometric: &str,
        bits_stored: u16,
        pixel_data: DataElement<InMemDicomObject>,
    ) -> InMemDicomObject {
        let bits_allocated = if pixel_data.vr() == VR::OW { 16u16 } else { 8 };
        let samples = if photometric == "RGB" { 3u16 } else { 1 };
        InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::SOP_CLASS_UID,
                VR::UI,
                uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
            ),
            DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, "2.25.1234"),
            DataElement::new(tags::MODALITY, VR::CS, "DX"),
            DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(samples)),
            DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, photometric),
            DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(height)),
            DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(width)),
            DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(bits_allocated)),
            DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(bits_stored)),
            DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(bits_stored - 1)),
            DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(0u16)),
            pixel_data,
        ])
    }

    fn words(values: &[u16]) -> DataElement<InMemDicomObject> {
        DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(values.to_vec().into()))
    }

    fn bytes(values: &[u8]) -> DataElement<InMemDicomObject> {
        DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::from(values.to_vec()))
    }

    fn set(object: &mut InMemDicomObject, tag: Tag, vr: VR, value: impl Into<PrimitiveValue>) {
        object.put(DataElement::new(tag, vr, value.into()));
    }

    fn file(object: InMemDicomObject, transfer_syntax: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if TransferSyntaxRegistry.get(transfer_syntax).is_some() {
            let file = object
                .with_meta(FileMetaTableBuilder::new().transfer_syntax(transfer_syntax))
                .unwrap();
            file.write_all(&mut out).unwrap();
        } else {
            // dicom-object refuses to write a syntax it does not know: write
            // the parts by hand, the data set as explicit VR little endian.
            let meta = FileMetaTableBuilder::new()
                .transfer_syntax(transfer_syntax)
                .media_storage_sop_class_uid(uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION)
                .media_storage_sop_instance_uid("2.25.1234")
                .build()
                .unwrap();
            out.extend_from_slice(&[0; MAGIC_OFFSET]);
            out.extend_from_slice(MAGIC);
            meta.write(&mut out).unwrap();
            let explicit = TransferSyntaxRegistry.get(EXPLICIT_LE).unwrap();
            object.write_dataset_with_ts(&mut out, explicit).unwrap();
        }
        out
    }

    /// The red channel, after checking the image is grey.
    fn grey(bytes: &[u8]) -> Vec<f32> {
        let decoded = preprocess::decode(bytes).unwrap();
        decoded
            .pixels()
            .map(|p| {
                assert_eq!(p.0[0], p.0[1]);
                assert_eq!(p.0[0], p.0[2]);
                p.0[0]
            })
            .collect()
    }

    fn assert_close(actual: &[f32], expected: &[f32]) {
        assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
        for (a, e) in actual.iter().zip(expected) {
            assert!((a - e).abs() < 1e-5, "{actual:?} vs {expected:?}");
        }
    }

    /// 16-bit, 12 stored, two windows of which the first is the default.
    fn windowed_monochrome(photometric: &str) -> Vec<u8> {
        let mut object = image(3, 2, photometric, 12, words(&[0, 1000, 1500, 1999, 2000, 4000]));
        set(
            &mut object,
            tags::WINDOW_CENTER,
            VR::DS,
            dicom_value!(Strs, ["1500", "3000"]),
        );
        set(
            &mut object,
            tags::WINDOW_WIDTH,
            VR::DS,
            dicom_value!(Strs, ["1001", "100"]),
        );
        file(object, EXPLICIT_LE)
    }

    // LINEAR with c = 1500, w = 1001: 0 up to 999.5, 1 above 1999.5, and
    // (x - 1499.5) / 1000 + 0.5 in between.
    const WINDOWED: [f32; 6] = [0.0, 0.0005, 0.5005, 0.9995, 1.0, 1.0];

    #[test]
    fn study_instance_uid_is_read_without_its_padding() {
        let mut object = image(3, 2, "MONOCHROME2", 12, words(&[0, 1000, 1500, 1999, 2000, 4000]));
        assert_eq!(study_instance_uid(&file(object.clone(), EXPLICIT_LE)).unwrap(), None);
        set(&mut object, tags::STUDY_INSTANCE_UID, VR::UI, "1.2.840.99.7\0");
        assert_eq!(
            study_instance_uid(&file(object, EXPLICIT_LE)).unwrap().as_deref(),
            Some("1.2.840.99.7")
        );
        assert!(study_instance_uid(b"not dicom").is_err());
    }

    #[test]
    fn monochrome2_16_bit_uses_the_first_window() {
        let bytes = windowed_monochrome("MONOCHROME2");
        assert!(is_dicom(&bytes));
        assert_eq!(preprocess::decode(&bytes).unwrap().dimensions(), (3, 2));
        assert_close(&grey(&bytes), &WINDOWED);
    }

    #[test]
    fn monochrome1_is_inverted_so_bone_is_bright() {
        let expected: Vec<f32> = WINDOWED.iter().map(|v| 1.0 - v).collect();
        assert_close(&grey(&windowed_monochrome("MONOCHROME1")), &expected);
    }

    #[test]
    fn without_a_window_min_and_max_span_the_scale() {
        let object = image(2, 2, "MONOCHROME2", 16, words(&[100, 200, 300, 500]));
        assert_close(&grey(&file(object, EXPLICIT_LE)), &[0.0, 0.25, 0.5, 1.0]);
        // A flat image has no range to stretch: black, not NaN.
        let flat = image(2, 1, "MONOCHROME2", 16, words(&[7, 7]));
        assert_close(&grey(&file(flat, EXPLICIT_LE)), &[0.0, 0.0]);
    }

    #[test]
    fn rescale_slope_and_intercept_come_before_the_window() {
        // Stored 10..160 become 0..300 in modality units; the window
        // (c = 150.5, w = 301) maps exactly 0..300 onto 0..1.
        let mut object = image(4, 1, "MONOCHROME2", 16, words(&[10, 60, 110, 160]));
        set(&mut object, tags::RESCALE_SLOPE, VR::DS, "2");
        set(&mut object, tags::RESCALE_INTERCEPT, VR::DS, "-20");
        set(&mut object, tags::WINDOW_CENTER, VR::DS, "150.5");
        set(&mut object, tags::WINDOW_WIDTH, VR::DS, "301");
        assert_close(&grey(&file(object, EXPLICIT_LE)), &[0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0]);
    }

    #[test]
    fn signed_samples_are_sign_extended_from_bits_stored() {
        // 12-bit signed -1000, 0, 1000; the first written without sign
        // extension into the top 4 bits, as some producers do.
        let minus_1000 = (-1000i16 as u16) & 0x0FFF;
        let mut object = image(3, 1, "MONOCHROME2", 12, words(&[minus_1000, 0, 1000]));
        set(&mut object, tags::PIXEL_REPRESENTATION, VR::US, 1u16);
        set(&mut object, tags::WINDOW_CENTER, VR::DS, "0.5");
        set(&mut object, tags::WINDOW_WIDTH, VR::DS, "2001");
        assert_close(&grey(&file(object, EXPLICIT_LE)), &[0.0, 0.5, 1.0]);
    }

    #[test]
    fn eight_bit_grey_and_rgb_decode() {
        let object = image(2, 2, "MONOCHROME2", 8, bytes(&[0, 64, 128, 255]));
        assert_close(
            &grey(&file(object, EXPLICIT_LE)),
            &[0.0, 64.0 / 255.0, 128.0 / 255.0, 1.0],
        );

        let object = image(2, 1, "RGB", 8, bytes(&[255, 0, 0, 0, 128, 255]));
        let decoded = preprocess::decode(&file(object, EXPLICIT_LE)).unwrap();
        assert_close(decoded.as_raw(), &[1.0, 0.0, 0.0, 0.0, 128.0 / 255.0, 1.0]);
    }

    #[test]
    fn multi_frame_reads_the_first_frame() {
        let mut object = image(2, 1, "MONOCHROME2", 8, bytes(&[10, 20, 200, 100]));
        set(&mut object, tags::NUMBER_OF_FRAMES, VR::IS, "2");
        assert_close(&grey(&file(object, EXPLICIT_LE)), &[0.0, 1.0]);
    }

    /// A JPEG baseline frame (made by the `image` crate) in encapsulated pixel
    /// data: proves the pure-Rust JPEG codec is compiled in.
    fn jpeg_dicom() -> Vec<u8> {
        jpeg_dicom_declaring(16, |_| {})
    }

    /// A 16×16 grey JPEG (after `edit`) in a file declaring `side`×`side`.
    fn jpeg_dicom_declaring(side: u16, edit: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
        let flat = image::DynamicImage::ImageLuma8(image::ImageBuffer::from_pixel(16, 16, image::Luma([128u8])));
        let mut jpeg = std::io::Cursor::new(Vec::new());
        flat.write_to(&mut jpeg, image::ImageFormat::Jpeg).unwrap();
        let mut fragment = jpeg.into_inner();
        edit(&mut fragment);
        if fragment.len() % 2 == 1 {
            fragment.push(0);
        }
        let pixel_data = DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PixelFragmentSequence::new_fragments(vec![fragment]),
        );
        file(
            image(side, side, "MONOCHROME2", 8, pixel_data),
            uids::JPEG_BASELINE8_BIT,
        )
    }

    #[test]
    fn jpeg_baseline_decodes() {
        let values = grey(&jpeg_dicom());
        assert_eq!(values.len(), 256);
        // No window: min/max of a flat JPEG is flat, whatever its level.
        assert!(values.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
    }

    /// The codecs would panic on these (dicom-rs copying a larger frame than
    /// declared; jpeg-decoder on two components).
    #[test]
    fn jpeg_frames_that_disagree_with_the_file_are_errors() {
        let error = preprocess::decode(&jpeg_dicom_declaring(8, |_| {}))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("JPEG frame is 16x16 with 1 component(s) of 8 bits"),
            "{error}"
        );
        let two_components = |jpeg: &mut Vec<u8>| {
            let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
            jpeg[sof + 9] = 2;
        };
        let error = preprocess::decode(&jpeg_dicom_declaring(16, two_components))
            .unwrap_err()
            .to_string();
        assert!(error.contains("2 component(s)"), "{error}");
    }

    /// 8-bit grey as RLE Lossless (PS3.5 G): a 64-byte header with one
    /// segment, then literal PackBits runs.
    fn rle_dicom(width: u16, height: u16, pixels: &[u8]) -> Vec<u8> {
        let mut fragment = Vec::new();
        fragment.extend_from_slice(&1u32.to_le_bytes());
        fragment.extend_from_slice(&64u32.to_le_bytes());
        fragment.resize(64, 0);
        for run in pixels.chunks(128) {
            fragment.push((run.len() - 1) as u8);
            fragment.extend_from_slice(run);
        }
        if fragment.len() % 2 == 1 {
            fragment.push(0x80); // PackBits no-op, as padding
        }
        let pixel_data = DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PixelFragmentSequence::new_fragments(vec![fragment]),
        );
        file(image(width, height, "MONOCHROME2", 8, pixel_data), uids::RLE_LOSSLESS)
    }

    #[test]
    fn rle_and_deflate_decode() {
        let pixels: Vec<u8> = (0..200u32).map(|i| (i % 101) as u8 * 2).collect();
        let expected: Vec<f32> = pixels.iter().map(|&p| f32::from(p) / 200.0).collect();
        assert_close(&grey(&rle_dicom(20, 10, &pixels)), &expected);
        // A segment too short for Rows × Columns is an error (the codec would panic).
        let error = preprocess::decode(&rle_dicom(20, 11, &pixels)).unwrap_err().to_string();
        assert!(error.contains("RLE"), "{error}");

        let object = image(2, 2, "MONOCHROME2", 16, words(&[100, 200, 300, 500]));
        let deflated = file(object, uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN);
        assert_close(&grey(&deflated), &[0.0, 0.25, 0.5, 1.0]);
    }

    fn unsupported(uid: &str) -> Error {
        let pixel_data = DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PixelFragmentSequence::new_fragments(vec![vec![0u8; 16]]),
        );
        preprocess::decode(&file(image(4, 4, "MONOCHROME2", 16, pixel_data), uid)).unwrap_err()
    }

    #[test]
    fn an_undecodable_transfer_syntax_is_named() {
        let error = unsupported(uids::JPEG2000);
        assert!(matches!(error, Error::UnsupportedTransferSyntax { .. }), "{error:?}");
        assert_eq!(
            error.to_string(),
            "unsupported DICOM transfer syntax JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91)"
        );
        let error = unsupported(uids::JPEGLS_LOSSLESS).to_string();
        assert!(
            error.contains("JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)"),
            "{error}"
        );
        let error = unsupported("1.2.3.4.5").to_string();
        assert!(error.contains("(1.2.3.4.5)"), "{error}");
    }

    #[test]
    fn no_pixel_data_is_a_clear_error() {
        let object = InMemDicomObject::from_element_iter([
            DataElement::new(tags::SOP_CLASS_UID, VR::UI, uids::BASIC_TEXT_SR_STORAGE),
            DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, "2.25.99"),
            DataElement::new(tags::MODALITY, VR::CS, "SR"),
        ]);
        let error = preprocess::decode(&file(object, EXPLICIT_LE)).unwrap_err();
        assert!(matches!(error, Error::UnsupportedImage(_)), "{error:?}");
        assert!(error.to_string().contains("no pixel data"), "{error}");
    }

    #[test]
    fn inconsistent_attributes_are_errors() {
        let mut short = image(4, 4, "MONOCHROME2", 16, words(&[1, 2, 3]));
        assert!(preprocess::decode(&file(short.clone(), EXPLICIT_LE)).is_err());
        set(&mut short, tags::BITS_ALLOCATED, VR::US, 32u16);
        assert!(matches!(
            preprocess::decode(&file(short, EXPLICIT_LE)),
            Err(Error::UnsupportedImage(_))
        ));
        let palette = image(2, 1, "PALETTE COLOR", 8, bytes(&[1, 2]));
        let error = preprocess::decode(&file(palette, EXPLICIT_LE)).unwrap_err().to_string();
        assert!(error.contains("PALETTE COLOR"), "{error}");
        let mut huge = image(2, 1, "MONOCHROME2", 8, bytes(&[1, 2]));
        set(&mut huge, tags::ROWS, VR::US, 65535u16);
        set(&mut huge, tags::COLUMNS, VR::US, 65535u16);
        assert!(matches!(
            preprocess::decode(&file(huge, EXPLICIT_LE)),
            Err(Error::UnsupportedImage(_))
        ));
    }

    /// Truncation at every length and every single flipped bit give a result
    /// or an error, never a panic, and quickly: without the length guard a
    /// flipped bit in a length field costs a gigabyte-sized allocation.
    #[test]
    fn damaged_files_never_panic() {
        let started = std::time::Instant::now();
        let pixels: Vec<u8> = (0..64u8).collect();
        for bytes in [
            windowed_monochrome("MONOCHROME1"),
            jpeg_dicom(),
            rle_dicom(8, 8, &pixels),
            {
                let object = image(2, 1, "RGB", 8, bytes(&[255, 0, 0, 0, 128, 255]));
                file(object, EXPLICIT_LE)
            },
        ] {
            for length in 0..bytes.len() {
                let _ = preprocess::decode(&bytes[..length]);
            }
            for at in 0..bytes.len() {
                for bit in 0..8 {
                    let mut damaged = bytes.clone();
                    damaged[at] ^= 1 << bit;
                    let _ = preprocess::decode(&damaged);
                }
            }
        }
        assert!(started.elapsed().as_secs() < 20, "{:?}", started.elapsed());
    }

    #[test]
    fn a_length_past_the_end_is_refused_before_allocating() {
        let mut bytes = windowed_monochrome("MONOCHROME2");
        // The pixel data's 4-byte length is the last header: claim 1.5 GB.
        let pixel_data = bytes.windows(4).rposition(|w| w == [0xE0, 0x7F, 0x10, 0x00]).unwrap();
        bytes[pixel_data + 8..pixel_data + 12].copy_from_slice(&1_500_000_000u32.to_le_bytes());
        let error = preprocess::decode(&bytes).unwrap_err().to_string();
        assert!(error.contains("(7FE0,0010) claims 1500000000 bytes"), "{error}");
    }

    #[test]
    fn a_deflated_data_set_claiming_4_gib_is_refused_before_allocating() {
        let bytes = file(
            image(2, 2, "MONOCHROME2", 16, words(&[100, 200, 300, 500])),
            uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        );
        let data_set_at = MAGIC_OFFSET
            + LengthGuard {
                data: &bytes[MAGIC_OFFSET..],
            }
            .check_meta()
            .unwrap()
            .unwrap();
        // (0008,0016) as UN with a 4-byte length of 4 GiB - 16, then a few bytes.
        let mut inflated = vec![0x08, 0x00, 0x16, 0x00, b'U', b'N', 0, 0];
        inflated.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        inflated.extend_from_slice(&[0; 16]);
        let mut bomb = bytes[..data_set_at].to_vec();
        bomb.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(&inflated, 6));
        let error = preprocess::decode(&bomb).unwrap_err().to_string();
        assert!(error.contains("(0008,0016) claims 4294967280 bytes"), "{error}");

        // A data set that inflates past the budget is refused while inflating.
        let mut huge = bytes[..data_set_at].to_vec();
        huge.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(&vec![0u8; MAX_INFLATED + 1], 1));
        let error = preprocess::decode(&huge).unwrap_err().to_string();
        assert!(error.contains("inflates to more than"), "{error}");
    }

    #[test]
    fn implicit_vr_and_sequences_pass_the_length_guard() {
        let mut object = image(2, 2, "MONOCHROME2", 16, words(&[100, 200, 300, 500]));
        let item = InMemDicomObject::from_element_iter([DataElement::new(tags::CODE_VALUE, VR::SH, "R-10206")]);
        object.put(DataElement::new(
            tags::VIEW_CODE_SEQUENCE,
            VR::SQ,
            dicom_core::DicomValue::new_sequence(vec![item], dicom_core::Length::UNDEFINED),
        ));
        for syntax in [uids::IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_LE] {
            assert_close(&grey(&file(object.clone(), syntax)), &[0.0, 0.25, 0.5, 1.0]);
        }
        // The guard follows the dictionary into an implicit VR sequence item.
        let mut bytes = file(object, uids::IMPLICIT_VR_LITTLE_ENDIAN);
        let code_value = bytes.windows(4).position(|w| w == [0x08, 0x00, 0x00, 0x01]).unwrap();
        bytes[code_value + 4..code_value + 8].copy_from_slice(&1_000_000_000u32.to_le_bytes());
        let error = preprocess::decode(&bytes).unwrap_err().to_string();
        assert!(error.contains("(0008,0100) claims 1000000000 bytes"), "{error}");
    }
}

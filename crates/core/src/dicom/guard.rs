//! The length guard: every element length of a data set checked against the bytes there are
//! (and, for deflated data sets, against the inflation budget) before the parser allocates.

use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::Tag;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::{Error, Result};

use super::{MAGIC, MAX_INFLATED};

/// `Ok(None)`: the walk stopped following the structure (nothing refused).
type Walk = Result<Option<usize>>;

/// Walks the element headers before dicom-rs parses them, because its
/// parser allocates (and zeroes) each element's declared length before
/// reading the value: one flipped bit in a length field claims up to 4 GiB,
/// and a wasm32 memory that has grown never shrinks again. A length that
/// runs past the end of the file is refused here instead. The walk only
/// refuses what cannot fit; on any structure it does not follow, it stops
/// checking and leaves the file to the parser, so it never rejects a file
/// the parser would read. Deeply nested sequences are refused too: the parser
/// recurses into them.
pub(super) struct LengthGuard<'a> {
    /// The file from the `DICM` magic on.
    pub(super) data: &'a [u8],
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

impl LengthGuard<'_> {
    /// Checks the file meta group (explicit VR little endian) and returns
    /// where the data set starts. As dicom-object reads it: the group length
    /// element first, then elements (of any group) until that many bytes.
    pub(super) fn check_meta(&self) -> Walk {
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

    pub(super) fn check_data_set(&self, at: usize, transfer_syntax: &str) -> Result<()> {
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
                at = if header.vr == Some(*b"SQ") {
                    // The parser reads on linearly: a sequence delimiter
                    // inside a defined-length sequence ends it there.
                    let Some(after) = self.items(header.value_at, Some(next), encoding, depth + 1)? else {
                        return Ok(None);
                    };
                    after
                } else {
                    next
                };
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
                // The parser reads on linearly: an item delimiter inside a
                // defined-length item ends the item there, and what follows
                // the delimiter is read as the sequence's next entry. Going
                // on from the declared end instead left those bytes unchecked.
                ITEM => {
                    let end = self.skip(&header, header.length as usize)?;
                    self.data_set(header.value_at, Some(end), encoding, depth)?
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

//! Checks the lengths a pickle claims before candle's unpickler allocates
//! them: a string or bytes opcode claiming 4 GiB in a 200-byte file made it
//! allocate 4 GiB (found by the `pth_import` fuzz target). The walk knows
//! every opcode candle's unpickler reads (a test holds it to that: an opcode
//! candle reads and the walk stops at let a later length through unchecked);
//! it stops at STOP, or at an opcode it does not know, which candle refuses.

use std::io::Read;

/// The most a `.pth` archive's `data.pkl` may hold: a state dict's pickle is
/// kilobytes (the tensors live in other entries).
const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// A length claimed by an opcode that the rest of the pickle cannot hold.
#[derive(Debug, PartialEq)]
pub struct Overlong {
    pub at: usize,
    pub claimed: u64,
    pub left: usize,
}

impl std::fmt::Display for Overlong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "malformed pickle: the item at byte {} claims {} bytes but {} are left",
            self.at, self.claimed, self.left
        )
    }
}

/// What follows an opcode in the pickle.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Argument {
    /// STOP: the pickle ends.
    End,
    /// A fixed number of bytes.
    Fixed(usize),
    /// A little-endian length `width` bytes wide, then (if `payload`) that many bytes.
    Length { width: usize, payload: bool },
    /// GLOBAL: module and name, each to a newline.
    TwoLines,
}

/// The argument of `opcode`, for every opcode `torch.save` writes; None for others.
fn argument(opcode: u8) -> Option<Argument> {
    use Argument::*;
    Some(match opcode {
        b'.' => End,
        // MARK, EMPTY_DICT/LIST/TUPLE, DICT, TUPLE(1-3), NEWTRUE/FALSE, NONE, REDUCE,
        // SETITEM(S), BUILD, APPEND(S), BINPERSID, MEMOIZE, STACK_GLOBAL, NEWOBJ, POP, DUP
        b'(' | b'}' | b']' | b')' | b'd' | b't' | 0x85 | 0x86 | 0x87 | 0x88 | 0x89 | b'N' | b'R' | b'u' | b's'
        | b'b' | b'e' | b'a' | b'Q' | 0x94 | 0x93 | 0x81 | b'0' | b'2' => Fixed(0),
        // PROTO, BINPUT, BINGET, BININT1
        0x80 | b'q' | b'h' | b'K' => Fixed(1),
        b'M' => Fixed(2),
        // LONG_BINPUT, LONG_BINGET, BININT
        b'r' | b'j' | b'J' => Fixed(4),
        b'G' => Fixed(8),
        // FRAME: its length is only a hint, checked as a claim.
        0x95 => Length {
            width: 8,
            payload: false,
        },
        // SHORT_BINUNICODE, SHORT_BINBYTES, SHORT_BINSTRING, LONG1
        0x8c | b'C' | b'U' | 0x8a => Length {
            width: 1,
            payload: true,
        },
        // BINUNICODE, BINBYTES, BINSTRING, LONG4
        b'X' | b'B' | b'T' | 0x8b => Length {
            width: 4,
            payload: true,
        },
        // BINUNICODE8, BINBYTES8
        0x8d | 0x8e => Length {
            width: 8,
            payload: true,
        },
        b'c' => TwoLines,
        _ => return None,
    })
}

/// Walks one pickle from the start of `bytes` to its STOP opcode.
pub fn check_lengths(bytes: &[u8]) -> Result<(), Overlong> {
    let mut at = 0;
    while let Some(&opcode) = bytes.get(at) {
        let start = at;
        at += 1;
        let (width, skips_payload) = match argument(opcode) {
            None | Some(Argument::End) => return Ok(()),
            Some(Argument::Fixed(n)) => {
                at += n;
                continue;
            }
            Some(Argument::TwoLines) => {
                for _ in 0..2 {
                    match bytes[at..].iter().position(|&b| b == b'\n') {
                        Some(end) => at += end + 1,
                        None => {
                            return Err(Overlong {
                                at: start,
                                claimed: 1,
                                left: 0,
                            })
                        }
                    }
                }
                continue;
            }
            Some(Argument::Length { width, payload }) => (width, payload),
        };
        let left = bytes.len().saturating_sub(at);
        let Some(field) = bytes.get(at..at + width) else {
            return Err(Overlong {
                at: start,
                claimed: width as u64,
                left,
            });
        };
        let mut le = [0u8; 8];
        le[..width].copy_from_slice(field);
        let claimed = u64::from_le_bytes(le);
        at += width;
        let left = bytes.len() - at;
        if claimed > left as u64 {
            return Err(Overlong {
                at: start,
                claimed,
                left,
            });
        }
        if skips_payload {
            at += claimed as usize;
        }
    }
    Ok(())
}

/// The `data.pkl` entry of a `torch.save` zip archive, read within a cap;
/// None when the archive has none (candle will say what is wrong).
pub fn zip_pickle(bytes: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| format!("not a readable zip archive ({e})"))?;
    let Some(index) = archive.file_names_raw().position(|name| name.ends_with(b"data.pkl")) else {
        return Ok(None);
    };
    let name = "data.pkl";
    let entry = archive.by_index(index).map_err(|e| format!("{name}: {e}"))?;
    let mut pickle = Vec::new();
    entry
        .take(MAX_PICKLE_BYTES + 1)
        .read_to_end(&mut pickle)
        .map_err(|e| format!("{name}: {e}"))?;
    if pickle.len() as u64 > MAX_PICKLE_BYTES {
        return Err(format!(
            "{name} is larger than {} MiB; a state dict's pickle is kilobytes",
            MAX_PICKLE_BYTES >> 20
        ));
    }
    Ok(Some(pickle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_past_the_end_are_caught_and_honest_pickles_pass() {
        // {'a': 'bc'} as protocol 2: PROTO 2, EMPTY_DICT, BINUNICODE 'a', BINUNICODE 'bc', SETITEM, STOP.
        let honest = b"\x80\x02}X\x01\x00\x00\x00aX\x02\x00\x00\x00bcs.";
        assert_eq!(check_lengths(honest), Ok(()));
        let mut claims_4_gib = honest.to_vec();
        claims_4_gib[4..8].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        let error = check_lengths(&claims_4_gib).unwrap_err();
        assert_eq!((error.at, error.claimed), (3, 0xFFFF_FFF0));
        assert!(check_lengths(b"\x80\x02X\x01\x00").is_err(), "a cut length field");
        assert!(
            check_lengths(b"\x80\x02cmodule").is_err(),
            "a GLOBAL without its newline"
        );
    }

    #[test]
    fn a_claim_after_a_dict_opcode_is_checked() {
        // MARK, DICT, then a BINUNICODE claiming 2 GiB: the pth_import fuzz target's
        // out-of-memory input (fuzz/regressions/pth_import/pickle-after-dict-claims-2-gib.pth),
        // which the walk let through because it stopped at DICT while candle read on.
        let pickle = b"\x80\x02(dX\x00\x00\x00\x80ab.";
        let error = check_lengths(pickle).unwrap_err();
        assert_eq!((error.at, error.claimed), (4, 0x8000_0000));
    }

    #[test]
    fn every_opcode_candle_reads_is_walked() {
        for byte in 0..=u8::MAX {
            if candle_core::pickle::OpCode::try_from(byte).is_ok() {
                assert!(argument(byte).is_some(), "opcode {byte:#04x} ({:?})", byte as char);
            }
        }
    }
}

use super::*;
use crate::preprocess;
use dicom_core::value::PixelFragmentSequence;
use dicom_core::{dicom_value, DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
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

/// Two pixels, red and (0, 128, 255), stored colour by plane (Planar
/// Configuration 1: all R, then all G, then all B).
fn planar_rgb() -> InMemDicomObject {
    let mut object = image(2, 1, "RGB", 8, bytes(&[255, 0, 0, 128, 0, 255]));
    set(&mut object, tags::PLANAR_CONFIGURATION, VR::US, 1u16);
    object
}

/// Mid grey (Y = Cb = Cr = 128), then Y 100 with Cr 200: more red, less green.
fn ybr_full() -> InMemDicomObject {
    let mut object = image(2, 1, "RGB", 8, bytes(&[128, 128, 128, 100, 128, 200]));
    set(&mut object, tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "YBR_FULL");
    object
}

#[test]
fn planar_rgb_and_ybr_full_decode_to_rgb() {
    let decoded = preprocess::decode(&file(planar_rgb(), EXPLICIT_LE)).unwrap();
    assert_close(decoded.as_raw(), &[1.0, 0.0, 0.0, 0.0, 128.0 / 255.0, 1.0]);

    // PS3.3 C.7.6.3.1.2: R = Y + 1.402 (Cr - 128), G = Y - 0.344136 (Cb - 128) - 0.714136 (Cr - 128), B = Y + 1.772 (Cb - 128).
    let decoded = preprocess::decode(&file(ybr_full(), EXPLICIT_LE)).unwrap();
    let grey = 128.0 / 255.0;
    let red = [100.0 + 1.402 * 72.0, 100.0 - 0.714_136 * 72.0, 100.0].map(|v: f32| v / 255.0);
    assert_close(decoded.as_raw(), &[grey, grey, grey, red[0], red[1], red[2]]);
}

/// The window of `windowed_monochrome`, one unit narrower, as LINEAR_EXACT.
fn linear_exact() -> Vec<u8> {
    let mut object = image(3, 2, "MONOCHROME2", 12, words(&[0, 1000, 1500, 1999, 2000, 4000]));
    set(&mut object, tags::WINDOW_CENTER, VR::DS, "1500");
    set(&mut object, tags::WINDOW_WIDTH, VR::DS, "1000");
    set(&mut object, tags::VOILUT_FUNCTION, VR::CS, "LINEAR_EXACT");
    file(object, EXPLICIT_LE)
}

#[test]
fn linear_exact_windows_without_the_half_unit_shift() {
    // 0 up to c - w/2 = 1000, 1 above 2000, (x - 1500) / 1000 + 0.5 between.
    assert_close(&grey(&linear_exact()), &[0.0, 0.0, 0.5, 0.999, 1.0, 1.0]);
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

/// Two 16×16 JPEG frames in three fragments, the first frame split in two,
/// so that only the Basic Offset Table says where the second begins.
fn jpeg_two_frames_with_an_offset_table() -> Vec<u8> {
    let jpeg = |level: u8| {
        let flat = image::DynamicImage::ImageLuma8(image::ImageBuffer::from_pixel(16, 16, image::Luma([level])));
        let mut out = std::io::Cursor::new(Vec::new());
        flat.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        let mut out = out.into_inner();
        if out.len() % 2 == 1 {
            out.push(0);
        }
        out
    };
    // The first fragment holds only the start-of-image marker.
    let first = jpeg(60);
    let fragments = vec![first[..2].to_vec(), first[2..].to_vec(), jpeg(200)];
    let second_frame_at = (fragments[0].len() + 8 + fragments[1].len() + 8) as u32;
    let pixel_data = DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PixelFragmentSequence::new(vec![0, second_frame_at], fragments),
    );
    let mut object = image(16, 16, "MONOCHROME2", 8, pixel_data);
    set(&mut object, tags::NUMBER_OF_FRAMES, VR::IS, "2");
    file(object, uids::JPEG_BASELINE8_BIT)
}

#[test]
fn a_jpeg_frame_split_across_fragments_is_gathered_by_the_offset_table() {
    // The frame header checked against Rows and Columns is in the second
    // fragment, so this decodes only if the fragments are joined as the
    // table says; the flat frame is flat.
    let values = grey(&jpeg_two_frames_with_an_offset_table());
    assert_eq!(values.len(), 256);
    assert!(values.iter().all(|v| *v == values[0]), "{values:?}");
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

/// Found by `cargo xtask fuzz decode_image`: an item delimiter inside a
/// defined-length item. The parser ends the item there and reads on; the
/// guard went on from the item's declared end, found no item there and
/// stopped checking, so a 3.7 GB length after the sequence reached the parser.
#[test]
fn an_item_delimiter_inside_a_defined_length_item_does_not_end_the_guard() {
    let bytes =
        include_bytes!("../../../../fuzz/regressions/decode_image/oom-3cfca98266bb668eba3724ea2402938c372efb8b");
    let error = preprocess::decode(bytes).unwrap_err().to_string();
    assert!(error.contains("(7FE0,5110) claims 3690942290 bytes"), "{error}");
}

/// The other half of that fix: a sequence delimiter inside a defined-length
/// sequence. The parser ends the sequence at the delimiter and reads what
/// follows as the next element, so the guard must check it as one too.
#[test]
fn a_sequence_delimiter_inside_a_defined_length_sequence_does_not_end_the_guard() {
    // Implicit VR, before the pixel data: View Code Sequence (SQ in the
    // dictionary) with a defined length that covers a sequence delimiter and
    // the header of a Code Value claiming `claimed` bytes, then its value.
    let with_stray_delimiter = |claimed: u32, value: &[u8]| {
        let mut bytes = file(
            image(2, 2, "MONOCHROME2", 16, words(&[100, 200, 300, 500])),
            uids::IMPLICIT_VR_LITTLE_ENDIAN,
        );
        let pixel_data = bytes.windows(4).rposition(|w| w == [0xE0, 0x7F, 0x10, 0x00]).unwrap();
        let mut inserted = vec![0x54, 0x00, 0x20, 0x02];
        inserted.extend_from_slice(&(16 + value.len() as u32).to_le_bytes());
        inserted.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        inserted.extend_from_slice(&[0x08, 0x00, 0x00, 0x01]);
        inserted.extend_from_slice(&claimed.to_le_bytes());
        inserted.extend_from_slice(value);
        bytes.splice(pixel_data..pixel_data, inserted);
        bytes
    };
    assert_close(&grey(&with_stray_delimiter(2, b"AB")), &[0.0, 0.25, 0.5, 1.0]);
    let error = preprocess::decode(&with_stray_delimiter(1_000_000_000, b""))
        .unwrap_err()
        .to_string();
    assert!(error.contains("(0008,0100) claims 1000000000 bytes"), "{error}");
}

/// A 2×2 16-bit image with an undefined-length View Code Sequence of one item.
fn image_with_a_sequence() -> InMemDicomObject {
    let mut object = image(2, 2, "MONOCHROME2", 16, words(&[100, 200, 300, 500]));
    let item = InMemDicomObject::from_element_iter([DataElement::new(tags::CODE_VALUE, VR::SH, "R-10206")]);
    object.put(DataElement::new(
        tags::VIEW_CODE_SEQUENCE,
        VR::SQ,
        dicom_core::DicomValue::new_sequence(vec![item], dicom_core::Length::UNDEFINED),
    ));
    object
}

/// Sequences inside items inside sequences, 40 deep: the guard walks them
/// recursively, so it stops at a depth no real header reaches.
#[test]
fn sequences_nested_too_deep_are_refused() {
    let mut inner = InMemDicomObject::from_element_iter([DataElement::new(tags::CODE_VALUE, VR::SH, "R-10206")]);
    for _ in 0..40 {
        inner = InMemDicomObject::from_element_iter([DataElement::new(
            tags::VIEW_CODE_SEQUENCE,
            VR::SQ,
            dicom_core::DicomValue::new_sequence(vec![inner], dicom_core::Length::UNDEFINED),
        )]);
    }
    let mut object = image(2, 2, "MONOCHROME2", 16, words(&[100, 200, 300, 500]));
    for element in inner.into_iter() {
        object.put(element);
    }
    let error = preprocess::decode(&file(object, EXPLICIT_LE)).unwrap_err().to_string();
    assert!(error.contains("nested more than 32 deep"), "{error}");
}

#[test]
fn implicit_vr_and_sequences_pass_the_length_guard() {
    let object = image_with_a_sequence();
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

/// Writes the DICOM seeds of the `decode_image` fuzz target, one for each
/// path through the decoder: run with `cargo test -p fracture-core --lib
/// write_dicom_fuzz_seeds -- --ignored` after changing the decoder, then
/// commit them (the replay test checks that every seed decodes). Mutation
/// alone had never reached deflated, JPEG or RGB data sets from the one
/// uncompressed seed: each needs a transfer syntax UID and a valid layout.
#[test]
#[ignore = "writes fuzz/seeds/decode_image; run by hand"]
fn write_dicom_fuzz_seeds() {
    let gradient: Vec<u16> = (0..64u16).map(|i| i * 61).collect();
    let mut signed_rescaled = image(8, 8, "MONOCHROME2", 12, words(&gradient));
    set(&mut signed_rescaled, tags::PIXEL_REPRESENTATION, VR::US, 1u16);
    set(&mut signed_rescaled, tags::RESCALE_SLOPE, VR::DS, "2");
    set(&mut signed_rescaled, tags::RESCALE_INTERCEPT, VR::DS, "-1024");
    set(&mut signed_rescaled, tags::VOILUT_FUNCTION, VR::CS, "SIGMOID");
    set(&mut signed_rescaled, tags::WINDOW_CENTER, VR::DS, "40");
    set(&mut signed_rescaled, tags::WINDOW_WIDTH, VR::DS, "400");
    set(&mut signed_rescaled, tags::STUDY_INSTANCE_UID, VR::UI, "1.2.840.99.7");

    let mut multi_frame = image(2, 1, "MONOCHROME2", 8, bytes(&[10, 20, 200, 100]));
    set(&mut multi_frame, tags::NUMBER_OF_FRAMES, VR::IS, "2");

    let with_sequence = image_with_a_sequence();

    let rle_pixels: Vec<u8> = (0..64u8).map(|i| i * 4).collect();
    let seeds = [
        ("dicom-monochrome1-windows.dcm", windowed_monochrome("MONOCHROME1")),
        ("dicom-signed-rescaled-sigmoid.dcm", file(signed_rescaled, EXPLICIT_LE)),
        (
            "dicom-rgb.dcm",
            file(image(2, 1, "RGB", 8, bytes(&[255, 0, 0, 0, 128, 255])), EXPLICIT_LE),
        ),
        ("dicom-multi-frame.dcm", file(multi_frame, EXPLICIT_LE)),
        (
            "dicom-implicit-vr-sequence.dcm",
            file(with_sequence.clone(), uids::IMPLICIT_VR_LITTLE_ENDIAN),
        ),
        (
            "dicom-deflated.dcm",
            file(with_sequence, uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN),
        ),
        ("dicom-jpeg-baseline.dcm", jpeg_dicom()),
        (
            "dicom-jpeg-two-frames-offset-table.dcm",
            jpeg_two_frames_with_an_offset_table(),
        ),
        ("dicom-rgb-planar.dcm", file(planar_rgb(), EXPLICIT_LE)),
        ("dicom-ybr-full.dcm", file(ybr_full(), EXPLICIT_LE)),
        ("dicom-linear-exact.dcm", linear_exact()),
        ("dicom-rle.dcm", rle_dicom(8, 8, &rle_pixels)),
    ];
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/decode_image");
    for (name, bytes) in seeds {
        preprocess::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        std::fs::write(folder.join(name), bytes).unwrap();
    }
}

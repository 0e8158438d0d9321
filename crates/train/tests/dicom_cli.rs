//! DICOM end to end through the `fracture` binary: `synth --format dcm`
//! writes a dataset, `train` learns from it and `detect` reads `.dcm` files,
//! all through the one shared decode path; a transfer syntax without a
//! decoder is reported by name and skipped.

use std::path::Path;
use std::process::{Command, Output};

use dicom_core::value::PixelFragmentSequence;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

const JPEG_2000: &str = "unsupported DICOM transfer syntax JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91)";

fn fracture(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fracture")).args(args).output().expect("the fracture binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "expected exit {code}\nstdout:\n{}\nstderr:\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// A well-formed DICOM file whose pixel data is JPEG 2000 (a placeholder
/// code stream: the transfer syntax is refused before any decoding).
fn write_jpeg2000_dicom(to: &Path) {
    let us = |value: u16| PrimitiveValue::from(value);
    let object = InMemDicomObject::from_element_iter([
        DataElement::new(
            tags::SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION),
        ),
        DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from("2.25.7")),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, us(1)),
        DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, PrimitiveValue::from("MONOCHROME2")),
        DataElement::new(tags::ROWS, VR::US, us(48)),
        DataElement::new(tags::COLUMNS, VR::US, us(48)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, us(16)),
        DataElement::new(tags::BITS_STORED, VR::US, us(12)),
        DataElement::new(tags::HIGH_BIT, VR::US, us(11)),
        DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, us(0)),
        DataElement::new(tags::PIXEL_DATA, VR::OB, PixelFragmentSequence::new_fragments(vec![vec![0u8; 32]])),
    ]);
    let file = object.with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::JPEG2000)).expect("meta group");
    let mut bytes = Vec::new();
    file.write_all(&mut bytes).expect("serialise");
    std::fs::write(to, bytes).expect("write the JPEG 2000 file");
}

/// CSV rows of `detect`, checked: `.dcm` paths and probabilities in [0, 1].
fn csv_rows(output: &Output) -> Vec<(String, f64)> {
    let stdout = text(&output.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("path,probability,label"), "{stdout}");
    lines
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(fields.len(), 3, "{line}");
            assert!(fields[0].ends_with(".dcm"), "{line}");
            let probability: f64 = fields[1].parse().unwrap_or_else(|_| panic!("probability in {line}"));
            assert!((0.0..=1.0).contains(&probability), "{line}");
            assert!(!fields[2].is_empty(), "{line}");
            (fields[0].to_string(), probability)
        })
        .collect()
}

#[test]
fn a_dicom_dataset_trains_and_detects_and_unsupported_syntaxes_are_named() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let data = dir.path().join("data");
    let out = fracture(&["synth", "-o", path(&data), "--count", "6", "--size", "48", "--format", "dcm"]);
    assert_exit(&out, 0);
    for class in ["Fracture", "Normal"] {
        let names: Vec<String> = std::fs::read_dir(data.join(class))
            .expect("class folder")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 6, "{names:?}");
        assert!(names.iter().all(|n| n.ends_with(".dcm")), "{names:?}");
    }

    // A file the decoder cannot read is skipped by training, with the reason.
    write_jpeg2000_dicom(&data.join("Normal").join("jpeg2000.dcm"));
    let model = dir.path().join("cnn.safetensors");
    let out = fracture(&[
        "train",
        "-i",
        path(&data),
        "--model",
        "cnn",
        "-o",
        path(&model),
        "--epochs",
        "1",
        "--size",
        "48",
        "--quiet",
    ]);
    assert_exit(&out, 0);
    let report = text(&out.stdout) + &text(&out.stderr);
    assert!(report.contains("jpeg2000.dcm") && report.contains(JPEG_2000), "{report}");
    assert!(model.is_file());

    // A named file and a directory of .dcm files: one row per readable file.
    let fracture_file = data.join("Fracture").join("fracture_00000.dcm");
    let out = fracture(&[
        "detect",
        "--weights",
        path(&model),
        "-i",
        path(&fracture_file),
        path(&data.join("Normal")),
        "--format",
        "csv",
    ]);
    assert_exit(&out, 0);
    let rows = csv_rows(&out);
    assert_eq!(rows.len(), 7, "{rows:?}");
    assert!(rows.iter().all(|(p, _)| !p.ends_with("jpeg2000.dcm")));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("skipped") && stderr.contains("jpeg2000.dcm") && stderr.contains(JPEG_2000), "{stderr}");

    // Named on the command line, the unreadable file fails the run (exit 1),
    // still by name.
    let out = fracture(&[
        "detect",
        "--weights",
        path(&model),
        "-i",
        path(&data.join("Normal").join("jpeg2000.dcm")),
        "--format",
        "csv",
    ]);
    assert_exit(&out, 1);
    assert!(text(&out.stderr).contains(JPEG_2000), "{}", text(&out.stderr));
}

//! `fracture import` against PyTorch: torchvision DenseNet weights written by
//! `scripts/make_parity_fixtures.py` must give torch's own eval-mode outputs.
//!
//! The full densenet121 check needs fixtures made with `--full DIR` (not
//! committed): `FRACTURE_PARITY_DIR=DIR cargo test -p fracture-cli --test import_parity -- --ignored`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_exit, fracture, s};
use fracture_core::models::densenet::DenseNetConfig;
use fracture_core::models::{Mode, Model};
use fracture_core::testing::{max_abs, max_abs_diff};
use fracture_core::weights::ModelFile;
use fracture_core::Architecture;
use fracture_train::import::{import_torchvision, Head, ImportError, Imported, SourceFormat};
use fracture_train::params::Params;
use sha2::{Digest, Sha256};

/// Agreement required on logits (f32 both sides, absolute).
const TOLERANCE: f64 = 1e-4;

/// The same for feature maps, relative to their largest value: densenet121's
/// reach ~70, where f32 rounding in a different summation order alone is ~1e-5.
fn feature_tolerance(torch: &Tensor) -> f64 {
    TOLERANCE * max_abs(torch).max(1.0)
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../train/tests/fixtures/parity")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn import(path: &Path) -> Imported {
    import_torchvision(&read(path), &path.display().to_string())
        .unwrap_or_else(|e| panic!("importing {}: {e}", path.display()))
}

fn torch_outputs(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).expect("io.safetensors loads")
}

/// Inputs in io.safetensors: `input` and, for tiny, `input_67`.
fn input_suffixes(io: &HashMap<String, Tensor>) -> Vec<&'static str> {
    ["", "_67"]
        .into_iter()
        .filter(|s| io.contains_key(&format!("input{s}")))
        .collect()
}

/// Our logits and rectified feature maps against torch's, asserting agreement.
fn check_binary(model: &Model, io: &HashMap<String, Tensor>, label: &str) {
    for suffix in input_suffixes(io) {
        let xs = &io[&format!("input{suffix}")];
        let (torch_logits, torch_features) = (&io[&format!("logits{suffix}")], &io[&format!("features{suffix}")]);
        let logits = model.forward(xs, Mode::EVAL).unwrap();
        let features = model.features(xs, false).unwrap();
        let dl = max_abs_diff(&logits, torch_logits);
        let df = max_abs_diff(&features, torch_features);
        let tf = feature_tolerance(torch_features);
        println!(
            "{label} input{suffix} {:?}: max |ours - torch| logits {dl:.3e}, features {df:.3e} (allowed {tf:.1e}); \
             torch logits {:?}",
            xs.dims(),
            torch_logits.to_vec1::<f32>().unwrap()
        );
        assert!(
            dl <= TOLERANCE,
            "{label} input{suffix}: logits differ from torch by {dl:e}"
        );
        assert!(df <= tf, "{label} input{suffix}: features differ from torch by {df:e}");
    }
}

/// The model file as `detect` would load it: serialised, parsed, built and checked.
fn through_model_file(imported: &Imported) -> Model {
    let bytes = imported.to_bytes().unwrap();
    let file = ModelFile::from_bytes(&bytes, &Device::Cpu).unwrap();
    assert_eq!(file.card, imported.card);
    file.build_model(&Device::Cpu).unwrap()
}

/// A headless import as `train --init` uses it: missing tensors (the head) are drawn fresh.
fn through_init(imported: &Imported) -> Model {
    let params = Params::with_tensors(7, &imported.tensors).unwrap();
    let model = Model::new(&imported.card.architecture, 64, params.var_builder(&Device::Cpu)).unwrap();
    assert!(params.unused_names().is_empty(), "{:?}", params.unused_names());
    model
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn tiny_densenet_matches_torch_from_every_format() {
    let dir = fixtures();
    let io = torch_outputs(&dir);
    for (file, format, legacy) in [
        ("tiny.pth", SourceFormat::PthZip, false),
        ("tiny_legacy.pth", SourceFormat::PthZip, true),
        ("tiny_legacy_format.pth", SourceFormat::PthLegacy, true),
        ("tiny.safetensors", SourceFormat::Safetensors, false),
    ] {
        let path = dir.join(file);
        let imported = import(&path);
        assert_eq!(imported.config, DenseNetConfig::tiny(), "{file}");
        assert_eq!(
            imported.card.architecture,
            Architecture::Densenet(DenseNetConfig::tiny())
        );
        assert_eq!(imported.format, format, "{file}");
        assert_eq!(imported.head, Head::Kept, "{file}");
        assert_eq!(
            imported.renamed_legacy > 0,
            legacy,
            "{file}: renamed {}",
            imported.renamed_legacy
        );
        assert!(imported
            .tensors
            .keys()
            .all(|k| !k.contains("num_batches_tracked") && !k.contains(".norm.1.")));
        let init = imported.card.init.as_ref().expect("the card names its source");
        assert_eq!(init.file, path.display().to_string());
        assert_eq!(init.sha256, sha256_hex(&read(&path)));
        assert!(
            imported.card.notes.iter().any(|n| n.contains("classifier is kept")),
            "{:?}",
            imported.card.notes
        );

        check_binary(&through_model_file(&imported), &io, file);
    }
}

#[test]
fn an_imagenet_head_is_dropped_and_the_backbone_matches_torch() {
    let dir = fixtures();
    let io = torch_outputs(&dir);
    for name in ["tiny_imagenet_head.pth", "tiny_imagenet_head_legacy_format.pth"] {
        let imported = import(&dir.join(name));
        assert_eq!(imported.head, Head::Dropped { outputs: 10 }, "{name}");
        assert_eq!(imported.config, DenseNetConfig::tiny());
        assert!(
            !imported.tensors.contains_key("classifier.weight") && !imported.tensors.contains_key("classifier.bias")
        );
        let notes = &imported.card.notes;
        assert!(
            notes.iter().any(|n| n.contains("10-output classifier was dropped")),
            "{notes:?}"
        );
        assert!(imported.summary().contains("dropped"));

        // Such a file is for --init only: detect's loader names the missing head.
        let file = ModelFile::from_bytes(&imported.to_bytes().unwrap(), &Device::Cpu).unwrap();
        let err = file
            .build_model(&Device::Cpu)
            .err()
            .expect("a headless file does not build")
            .to_string();
        assert!(err.contains("missing tensor `classifier.weight`"), "{err}");

        check_backbone(&through_init(&imported), &io, name);

        // Importing the backbone file again finds no classifier and keeps it that way.
        let again = import_torchvision(&imported.to_bytes().unwrap(), "backbone.safetensors").unwrap();
        assert_eq!(again.head, Head::Absent);
        assert_eq!(again.tensors.len(), imported.tensors.len());
    }
}

/// A headless model's feature maps against torch's ImageNet-head model.
fn check_backbone(model: &Model, io: &HashMap<String, Tensor>, label: &str) {
    for suffix in input_suffixes(io) {
        let torch_features = &io[&format!("imagenet_head_features{suffix}")];
        let features = model.features(&io[&format!("input{suffix}")], false).unwrap();
        let (diff, allowed) = (
            max_abs_diff(&features, torch_features),
            feature_tolerance(torch_features),
        );
        println!("{label} input{suffix}: max |ours - torch| backbone features {diff:.3e} (allowed {allowed:.1e})");
        assert!(
            diff <= allowed,
            "{label}: backbone features differ from torch by {diff:e}"
        );
    }
}

/// tiny.safetensors as a name → tensor map, to break in various ways.
fn tiny_state_dict() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("tiny.safetensors"), &Device::Cpu).unwrap()
}

fn import_err(tensors: &HashMap<String, Tensor>) -> String {
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.clone(), v.clone())), None).unwrap();
    match import_torchvision(&bytes, "broken.safetensors") {
        Ok(_) => panic!("a broken state dict was imported"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_missing_tensor_is_named() {
    for name in [
        "features.denseblock2.denselayer1.norm2.running_var",
        "features.transition1.conv.weight",
        "features.norm5.bias",
        "classifier.weight",
        // The tensors the configuration is read from.
        "features.denseblock1.denselayer1.conv2.weight",
        "features.conv0.weight",
    ] {
        let mut tensors = tiny_state_dict();
        tensors.remove(name).unwrap();
        let err = import_err(&tensors);
        println!("without {name}: {err}");
        assert!(err.contains(&format!("`{name}`")), "{err}");
    }
}

#[test]
fn a_wrong_shape_is_named() {
    for (name, shape) in [
        ("features.norm5.weight", &[7][..]),
        ("features.denseblock1.denselayer2.conv1.weight", &[8, 12, 3, 3][..]),
        ("classifier.weight", &[1, 15][..]),
        ("features.conv0.weight", &[8, 3, 5, 5][..]),
    ] {
        let mut tensors = tiny_state_dict();
        tensors.insert(name.into(), Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap());
        let err = import_err(&tensors);
        println!("{name} as {shape:?}: {err}");
        assert!(err.contains(&format!("`{name}` has shape {shape:?}")), "{err}");
    }
}

#[test]
fn other_files_are_rejected_with_reasons() {
    // A ResNet's state dict is not a DenseNet's.
    let dev = Device::Cpu;
    let resnet: HashMap<String, Tensor> = [
        ("conv1.weight", &[64, 3, 7, 7][..]),
        ("bn1.weight", &[64][..]),
        ("layer1.0.conv1.weight", &[64, 64, 3, 3][..]),
        ("fc.weight", &[1000, 512][..]),
    ]
    .into_iter()
    .map(|(k, s)| (k.to_string(), Tensor::zeros(s, DType::F32, &dev).unwrap()))
    .collect();
    let err = import_err(&resnet);
    assert!(
        err.contains("not a torchvision DenseNet") && err.contains("`features.conv0.weight`"),
        "{err}"
    );

    // An unexpected extra tensor.
    let mut extra = tiny_state_dict();
    extra.insert(
        "features.denseblock1.denselayer1.extra.weight".into(),
        Tensor::zeros(3, DType::F32, &dev).unwrap(),
    );
    let err = import_err(&extra);
    assert!(
        err.contains("unexpected tensor(s): features.denseblock1.denselayer1.extra.weight"),
        "{err}"
    );

    // Garbage and truncated files give errors, never panics.
    let pth = read(&fixtures().join("tiny.pth"));
    let legacy = read(&fixtures().join("tiny_legacy_format.pth"));
    let safetensors = read(&fixtures().join("tiny.safetensors"));
    let malformed = read(&fixtures().join("malformed_pickle.pth"));
    let cases: [(&str, &[u8], &str); 8] = [
        ("empty", b"", "not a PyTorch checkpoint"),
        ("text", b"hello, world", "not a PyTorch checkpoint"),
        ("a plain pickle", b"\x80\x02}q\x00.", "not a PyTorch checkpoint"),
        (
            "truncated .pth",
            &pth[..pth.len() / 2],
            "cannot read the PyTorch checkpoint",
        ),
        ("truncated legacy .pth", &legacy[..legacy.len() - 100], "truncated"),
        (
            "cut legacy pickle",
            &legacy[..300],
            "cannot read the PyTorch checkpoint",
        ),
        (
            "truncated safetensors",
            &safetensors[..safetensors.len() - 10],
            "not a PyTorch checkpoint",
        ),
        // candle's unpickler panics on this one (its panic message is printed); we must not.
        ("malformed pickle", &malformed, "malformed pickle"),
    ];
    for (what, bytes, expected) in cases {
        let err = match import_torchvision(bytes, what) {
            Ok(_) => panic!("{what} was imported"),
            Err(e) => e,
        };
        println!("{what}: {err}");
        assert!(err.to_string().contains(expected), "{what}: {err}");
    }
    assert!(matches!(
        import_torchvision(b"", "empty"),
        Err(ImportError::UnknownFormat(_))
    ));
}

#[test]
fn cli_import_writes_a_loadable_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("imported.safetensors");
    let from = fixtures().join("tiny_legacy.pth");
    let run = fracture(&["import", "--from", s(&from), "-o", s(&out)]);
    assert_exit(&run, 0);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("growth rate 4, blocks [2, 2]") && stdout.contains("classifier kept"),
        "{stdout}"
    );
    let file = ModelFile::from_bytes(&read(&out), &Device::Cpu).unwrap();
    assert_eq!(file.card.architecture, Architecture::Densenet(DenseNetConfig::tiny()));
    assert_eq!(file.card.init.as_ref().unwrap().sha256, sha256_hex(&read(&from)));
    file.build_model(&Device::Cpu).unwrap();

    // A file that is not weights: exit 1, and the message names it.
    let bad = dir.path().join("notes.pth");
    std::fs::write(&bad, b"not a checkpoint").unwrap();
    let run = fracture(&["import", "--from", s(&bad), "-o", s(&out)]);
    assert_exit(&run, 1);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("notes.pth") && stderr.contains("not a PyTorch checkpoint"),
        "{stderr}"
    );
    let missing = dir.path().join("missing.pth");
    let run = fracture(&["import", "--from", s(&missing), "-o", s(&out)]);
    assert_exit(&run, 1);
    assert!(String::from_utf8_lossy(&run.stderr).contains("missing.pth"));

    // A bad command line.
    assert_exit(&fracture(&["import", "--from", s(&from)]), 2);
}

#[test]
fn cli_train_starts_from_a_headless_import() {
    let dir = tempfile::tempdir().unwrap();
    let imported = dir.path().join("backbone.safetensors");
    let from = fixtures().join("tiny_imagenet_head.pth");
    let run = fracture(&["import", "--from", s(&from), "-o", s(&imported)]);
    assert_exit(&run, 0);
    assert!(String::from_utf8_lossy(&run.stdout).contains("10-output classifier dropped"));

    let data = dir.path().join("data");
    assert_exit(&fracture(&["synth", "-o", s(&data), "--count", "6", "--size", "48"]), 0);
    let model = dir.path().join("model.safetensors");
    let run = fracture(&[
        "train",
        "-i",
        s(&data),
        "--model",
        "densenet121",
        "--init",
        s(&imported),
        "-o",
        s(&model),
        "--epochs",
        "1",
        "--fine-tune-epochs",
        "1",
        "--size",
        "48",
        "--quiet",
    ]);
    assert_exit(&run, 0);
    let file = ModelFile::from_bytes(&read(&model), &Device::Cpu).unwrap();
    // The init file's configuration wins over --model's depth, and the card names it.
    assert_eq!(file.card.architecture, Architecture::Densenet(DenseNetConfig::tiny()));
    assert_eq!(file.card.init.as_ref().unwrap().sha256, sha256_hex(&read(&imported)));
    file.build_model(&Device::Cpu).unwrap();
}

/// Full torchvision densenet121 (randomised BatchNorm) at 150×150; see the module docs.
#[test]
#[ignore = "needs `scripts/make_parity_fixtures.py --full DIR` and FRACTURE_PARITY_DIR=DIR"]
fn full_densenet121_matches_torch() {
    let dir = PathBuf::from(std::env::var("FRACTURE_PARITY_DIR").expect("FRACTURE_PARITY_DIR is set"));
    let io = torch_outputs(&dir);
    for file in [
        "densenet121.pth",
        "densenet121_legacy.pth",
        "densenet121_legacy_format.pth",
        "densenet121.safetensors",
    ] {
        let imported = import(&dir.join(file));
        assert_eq!(imported.config, DenseNetConfig::densenet121(), "{file}");
        assert_eq!(imported.head, Head::Kept);
        check_binary(&through_model_file(&imported), &io, file);
    }
    // ImageNet's 1000 classes; the legacy one is laid out as torchvision's published files.
    for file in [
        "densenet121_imagenet_head.pth",
        "densenet121_imagenet_head_legacy_format.pth",
    ] {
        let imported = import(&dir.join(file));
        assert_eq!(imported.head, Head::Dropped { outputs: 1000 }, "{file}");
        check_backbone(&through_init(&imported), &io, file);
    }
}

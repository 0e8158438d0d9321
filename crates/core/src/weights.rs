//! The model file: one safetensors file whose `__metadata__` holds the card.
//!
//! Loading builds the model from plain tensors (no `Var`s, so no graph is
//! kept alive) and checks that every tensor the architecture needs is there
//! with the right shape, and that nothing else is.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;

use crate::card::{ModelCard, CARD_KEY};
use crate::models::Model;
use crate::tracked::{Missing, TrackedWeights};
use crate::{Error, Result};

/// How floating-point weights are stored on disk. They are always computed in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDType {
    F32,
    /// Halves the download; running statistics and every other tensor are still loaded as f32.
    F16,
}

pub struct ModelFile {
    pub card: ModelCard,
    pub tensors: HashMap<String, Tensor>,
    /// How the weights were stored, so that rewriting the file (a new card)
    /// keeps its size.
    pub storage: StorageDType,
    /// The other `__metadata__` entries: a training checkpoint keeps its
    /// position in one, so that it is written and read in one pass.
    pub entries: HashMap<String, String>,
}

impl ModelFile {
    /// Parses a model file. Any float dtype on disk is converted to f32.
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::NotAModelFile(format!("not a safetensors file ({e})")))?;
        let card_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(CARD_KEY))
            .ok_or_else(|| {
                Error::NotAModelFile(format!(
                    "safetensors file without a model card (`{CARD_KEY}` in __metadata__); \
                     torchvision weights must go through `fracture import` first"
                ))
            })?;
        let card = ModelCard::from_json(card_json)?;
        let mut entries = header.metadata().clone().unwrap_or_default();
        entries.remove(CARD_KEY);
        let safetensors = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::NotAModelFile(format!("corrupt safetensors data ({e})")))?;
        let mut tensors = HashMap::new();
        let mut storage = StorageDType::F32;
        for (name, view) in safetensors.tensors() {
            match view.dtype() {
                safetensors::Dtype::F16 => storage = StorageDType::F16,
                safetensors::Dtype::F32 | safetensors::Dtype::BF16 | safetensors::Dtype::F64 => {}
                other => {
                    return Err(Error::NotAModelFile(format!(
                        "tensor `{name}` is {other:?}; every weight of these architectures is a float"
                    )))
                }
            }
            let tensor = candle_core::safetensors::Load::load(&view, device)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| Error::NotAModelFile(format!("tensor `{name}` cannot be read: {e}")))?;
            check_values(&name, &tensor)?;
            tensors.insert(name, tensor);
        }
        Ok(Self {
            card,
            tensors,
            storage,
            entries,
        })
    }

    /// Serialises tensors and card, in a stable (sorted) order.
    pub fn to_bytes(card: &ModelCard, tensors: &HashMap<String, Tensor>, storage: StorageDType) -> Result<Vec<u8>> {
        Self::to_bytes_with_entries(card, tensors, storage, HashMap::new())
    }

    /// [`ModelFile::to_bytes`] with more `__metadata__` entries beside the card.
    pub fn to_bytes_with_entries(
        card: &ModelCard,
        tensors: &HashMap<String, Tensor>,
        storage: StorageDType,
        mut entries: HashMap<String, String>,
    ) -> Result<Vec<u8>> {
        let mut stored = Vec::with_capacity(tensors.len());
        for (name, tensor) in tensors {
            let tensor = match storage {
                StorageDType::F32 => tensor.to_dtype(DType::F32)?,
                StorageDType::F16 => tensor.to_dtype(DType::F16)?,
            };
            stored.push((name.clone(), tensor.contiguous()?));
        }
        stored.sort_by(|a, b| a.0.cmp(&b.0));
        entries.insert(CARD_KEY.to_string(), card.to_json()?);
        safetensors::serialize(stored, Some(entries))
            .map_err(|e| Error::NotAModelFile(format!("cannot serialise weights: {e}")))
    }

    /// Builds the card's architecture from these tensors, rejecting missing,
    /// misshapen or unexpected ones by name.
    pub fn build_model(&self, device: &Device) -> Result<Model> {
        build_checked(&self.card, &self.tensors, device)
    }
}

/// A NaN or infinite weight, or a negative variance, would give every image a
/// meaningless probability; refuse the file instead, naming the tensor.
fn check_values(name: &str, tensor: &Tensor) -> Result<()> {
    let values = tensor.flatten_all()?.to_vec1::<f32>()?;
    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
        return Err(Error::NotAModelFile(format!(
            "tensor `{name}` holds a non-finite value ({bad})"
        )));
    }
    if name.ends_with("running_var") {
        if let Some(bad) = values.iter().find(|v| **v < 0.0) {
            return Err(Error::NotAModelFile(format!(
                "tensor `{name}` holds a negative variance ({bad})"
            )));
        }
    }
    Ok(())
}

/// Builds a model over exactly `tensors`: each one must be used, with the right shape.
pub fn build_checked(card: &ModelCard, tensors: &HashMap<String, Tensor>, device: &Device) -> Result<Model> {
    let mismatch = |message: String| Error::WeightsMismatch {
        architecture: card.architecture.display_name(),
        message,
    };
    let weights: TrackedWeights<Tensor> =
        TrackedWeights::new(tensors, Missing::Refuse).map_err(|e| mismatch(e.to_string()))?;
    let model = Model::new(&card.architecture, card.input_size(), weights.var_builder(device))
        .map_err(|e| mismatch(e.to_string()))?;
    let unexpected = weights.unrequested();
    if !unexpected.is_empty() {
        let shown: Vec<&str> = unexpected.iter().take(5).map(|s| s.as_str()).collect();
        return Err(mismatch(format!(
            "{} unexpected tensor(s): {}",
            unexpected.len(),
            shown.join(", ")
        )));
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::Architecture;
    use crate::models::cnn::CnnConfig;
    use crate::models::densenet::DenseNetConfig;
    use crate::models::Mode;

    fn fresh(arch: Architecture, size: usize) -> (ModelCard, HashMap<String, Tensor>) {
        let card = ModelCard::new(arch, size);
        let tensors = crate::testing::random_weights(&card);
        (card, tensors)
    }

    #[test]
    fn save_and_load_give_identical_outputs() {
        for arch in [
            Architecture::Cnn(CnnConfig::study()),
            Architecture::Densenet(DenseNetConfig::tiny()),
        ] {
            let (card, tensors) = fresh(arch, 40);
            let bytes = ModelFile::to_bytes(&card, &tensors, StorageDType::F32).unwrap();
            let file = ModelFile::from_bytes(&bytes, &Device::Cpu).unwrap();
            assert_eq!(file.card, card);
            let original = build_checked(&card, &tensors, &Device::Cpu).unwrap();
            let loaded = file.build_model(&Device::Cpu).unwrap();
            let xs = Tensor::randn(0f32, 1., (3, 3, 40, 40), &Device::Cpu).unwrap();
            let a: Vec<f32> = original.forward(&xs, Mode::EVAL).unwrap().to_vec1().unwrap();
            let b: Vec<f32> = loaded.forward(&xs, Mode::EVAL).unwrap().to_vec1().unwrap();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn wrong_files_give_errors_that_name_the_tensor() {
        let (card, mut tensors) = fresh(Architecture::Densenet(DenseNetConfig::tiny()), 40);
        let dev = Device::Cpu;

        let mut missing = tensors.clone();
        missing.remove("features.norm5.running_var");
        let err = build_checked(&card, &missing, &dev).err().unwrap().to_string();
        assert!(err.contains("missing tensor `features.norm5.running_var`"), "{err}");

        let mut misshapen = tensors.clone();
        misshapen.insert(
            "classifier.weight".into(),
            Tensor::zeros((1000, 20), DType::F32, &dev).unwrap(),
        );
        let err = build_checked(&card, &misshapen, &dev).err().unwrap().to_string();
        assert!(err.contains("`classifier.weight` has shape [1000, 20]"), "{err}");

        tensors.insert(
            "features.extra.weight".into(),
            Tensor::zeros(3, DType::F32, &dev).unwrap(),
        );
        let err = build_checked(&card, &tensors, &dev).err().unwrap().to_string();
        assert!(err.contains("unexpected tensor(s): features.extra.weight"), "{err}");

        // A cnn card over densenet weights.
        let cnn_card = ModelCard::new(Architecture::Cnn(CnnConfig::study()), 40);
        let err = build_checked(&cnn_card, &tensors, &dev).err().unwrap().to_string();
        assert!(
            err.contains("cnn") && err.contains("missing tensor `conv1.weight`"),
            "{err}"
        );
    }

    #[test]
    fn non_finite_weights_integer_tensors_and_negative_variances_are_refused_by_name() {
        let (card, tensors) = fresh(Architecture::Densenet(DenseNetConfig::tiny()), 40);
        let dev = Device::Cpu;
        let load = |name: &str, replacement: Tensor| {
            let mut changed = tensors.clone();
            changed.insert(name.to_string(), replacement);
            let bytes = ModelFile::to_bytes(&card, &changed, StorageDType::F32).unwrap();
            ModelFile::from_bytes(&bytes, &dev)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let shape = tensors["classifier.weight"].dims().to_vec();
        let mut values = vec![0.1f32; shape.iter().product()];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            values[3] = bad;
            let err = load(
                "classifier.weight",
                Tensor::from_vec(values.clone(), shape.as_slice(), &dev).unwrap(),
            );
            assert!(
                err.contains("`classifier.weight` holds a non-finite value"),
                "{bad}: {err}"
            );
        }
        let variances = tensors["features.norm5.running_var"].dims().to_vec();
        let negative = (Tensor::ones(variances.as_slice(), DType::F32, &dev).unwrap() * -1.0).unwrap();
        let err = load("features.norm5.running_var", negative);
        assert!(
            err.contains("`features.norm5.running_var` holds a negative variance"),
            "{err}"
        );

        // to_bytes keeps the dtype it is given apart from floats, so write the integers by hand.
        let mut integers: Vec<(String, Tensor)> = tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        integers.push((
            "features.norm5.num_batches_tracked".into(),
            Tensor::new(&[3i64], &dev).unwrap(),
        ));
        let metadata = HashMap::from([(CARD_KEY.to_string(), card.to_json().unwrap())]);
        let bytes = safetensors::serialize(integers, Some(metadata)).unwrap();
        let err = ModelFile::from_bytes(&bytes, &dev).err().unwrap().to_string();
        assert!(err.contains("`features.norm5.num_batches_tracked` is I64"), "{err}");
    }

    #[test]
    fn non_model_bytes_are_rejected_without_panic() {
        for bytes in [&b""[..], b"hello", &[0xff; 64][..]] {
            assert!(matches!(
                ModelFile::from_bytes(bytes, &Device::Cpu),
                Err(Error::NotAModelFile(_))
            ));
        }
        // A valid safetensors file without a card.
        let plain = safetensors::serialize([("x", Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap())], None).unwrap();
        let err = ModelFile::from_bytes(&plain, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("without a model card"), "{err}");
    }

    #[test]
    fn f16_storage_halves_the_file_and_loads_as_f32() {
        let (card, tensors) = fresh(Architecture::Densenet(DenseNetConfig::tiny()), 40);
        let full = ModelFile::to_bytes(&card, &tensors, StorageDType::F32).unwrap();
        let half = ModelFile::to_bytes(&card, &tensors, StorageDType::F16).unwrap();
        assert!(half.len() < full.len() * 2 / 3);
        let file = ModelFile::from_bytes(&half, &Device::Cpu).unwrap();
        assert!(file.tensors.values().all(|t| t.dtype() == DType::F32));
        file.build_model(&Device::Cpu).unwrap();
    }
}

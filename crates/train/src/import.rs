//! `fracture import`: torchvision DenseNet weights (a state dict saved as
//! `.pth` or `.safetensors`) into a model file with its card.
//!
//! The state dict alone says which DenseNet it is: the configuration is read
//! from tensor shapes, and the model is then built over exactly those tensors,
//! so a wrong file is rejected with the name of the tensor at fault.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{Cursor, Write};

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
use fracture_core::card::SourceWeights;
use fracture_core::models::densenet::DenseNetConfig;
use fracture_core::weights::{build_checked, ModelFile, StorageDType};
use fracture_core::{Architecture, ModelCard};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The input size written to the card; `train` and `kfold` choose their own with `--size`.
pub const IMPORT_INPUT_SIZE: usize = 150;

#[derive(Debug, Error)]
pub enum ImportError {
    #[error("not a PyTorch checkpoint (.pth) or a safetensors file: {0}")]
    UnknownFormat(String),
    #[error("cannot read the PyTorch checkpoint: {0}")]
    Pth(String),
    #[error("cannot read the safetensors file: {0}")]
    Safetensors(String),
    #[error("not a torchvision DenseNet state dict: {0}")]
    NotDenseNet(String),
    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },
    #[error(transparent)]
    Model(#[from] fracture_core::Error),
    #[error("cannot stage the checkpoint in a temporary file: {0}")]
    Io(#[from] std::io::Error),
}

fn tensor_error(name: &str, message: impl fmt::Display) -> ImportError {
    ImportError::Tensor {
        name: name.to_string(),
        message: message.to_string(),
    }
}

/// How the weights were stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    /// `torch.save` since PyTorch 1.6: a zip archive around a pickle.
    PthZip,
    /// `torch.save` before PyTorch 1.6 (torchvision's DenseNet checkpoints
    /// date from 2017): pickles followed by raw storages.
    PthLegacy,
    Safetensors,
}

impl fmt::Display for SourceFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceFormat::PthZip => "PyTorch .pth",
            SourceFormat::PthLegacy => "PyTorch .pth (pre-1.6 format)",
            SourceFormat::Safetensors => "safetensors",
        })
    }
}

/// What became of the source's classifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// A one-output classifier: kept as the binary head.
    Kept,
    /// Any other classifier (ImageNet's 1000 classes): dropped, the file holds
    /// the backbone only and is meant for `fracture train --init`.
    Dropped { outputs: usize },
    /// The source had no classifier.
    Absent,
}

impl Head {
    pub fn is_kept(self) -> bool {
        self == Head::Kept
    }
}

pub struct Imported {
    /// The architecture, inferred from the tensors' shapes.
    pub config: DenseNetConfig,
    /// The DenseNet card at [`IMPORT_INPUT_SIZE`], with the source file and its sha256 and notes.
    pub card: ModelCard,
    /// f32 tensors under the model's names, ready for [`ModelFile::to_bytes`].
    pub tensors: HashMap<String, Tensor>,
    pub format: SourceFormat,
    pub head: Head,
    /// Legacy names (`denselayerN.norm.1.weight`) renamed to current ones (`norm1`).
    pub renamed_legacy: usize,
    /// `num_batches_tracked` counters, which inference never reads.
    pub dropped_counters: usize,
}

impl Imported {
    /// The model file: tensors in f32 and the card in the metadata.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ImportError> {
        Ok(ModelFile::to_bytes(&self.card, &self.tensors, StorageDType::F32)?)
    }

    /// What was found, in a few lines for the command line.
    pub fn summary(&self) -> String {
        let cfg = &self.config;
        let head = match self.head {
            Head::Kept => "one-output classifier kept as the binary head".to_string(),
            Head::Dropped { outputs } => format!(
                "{outputs}-output classifier dropped: the file holds the backbone only, \
                 for `fracture train --init` (it cannot be used by `detect` on its own)"
            ),
            Head::Absent => "no classifier in the source: the file holds the backbone only, \
                             for `fracture train --init`"
                .to_string(),
        };
        let mut lines = vec![
            format!("format: {}", self.format),
            format!("model: {}", cfg.variant_name()),
            format!(
                "configuration: growth rate {}, blocks {:?}, {} initial features, bottleneck {}x, {} output features",
                cfg.growth_rate,
                cfg.block_config,
                cfg.num_init_features,
                cfg.bn_size,
                cfg.num_features()
            ),
            format!("tensors: {}", self.tensors.len()),
            format!("classifier: {head}"),
        ];
        if self.renamed_legacy > 0 {
            lines.push(format!(
                "renamed {} legacy tensor names (norm.1 -> norm1, ...)",
                self.renamed_legacy
            ));
        }
        if self.dropped_counters > 0 {
            lines.push(format!(
                "dropped {} num_batches_tracked counters",
                self.dropped_counters
            ));
        }
        lines.join("\n")
    }
}

/// Reads torchvision DenseNet weights from the bytes of a `.pth` or
/// `.safetensors` file (told apart by content, not by name). `source_name`
/// is recorded in the card with the bytes' sha256.
pub fn import_torchvision(bytes: &[u8], source_name: &str) -> Result<Imported, ImportError> {
    let (format, state_dict) = read_state_dict(bytes)?;
    let source = SourceWeights {
        file: source_name.to_string(),
        sha256: sha256_hex(bytes),
    };
    import_state_dict(state_dict, format, source)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The zip archive's local file header.
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
/// The first pickle of PyTorch's pre-1.6 format: protocol 2, the magic number
/// 0x1950a86a20f9469cfc6c as a 10-byte LONG1, STOP. Matched as bytes because
/// candle's unpickler cannot hold a number that wide.
const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e";

/// The tensors of a state dict, under their names in the file, in their stored dtypes.
pub fn read_state_dict(bytes: &[u8]) -> Result<(SourceFormat, Vec<(String, Tensor)>), ImportError> {
    // candle's unpickler indexes into tuples without checking their length
    // (and overflows on wide integers in debug builds): a malformed pickle
    // panics inside it. Turn that into an error at this boundary.
    std::panic::catch_unwind(|| read_state_dict_unguarded(bytes))
        .unwrap_or_else(|_| Err(ImportError::Pth("malformed pickle: the unpickler gave up on it".into())))
}

fn read_state_dict_unguarded(bytes: &[u8]) -> Result<(SourceFormat, Vec<(String, Tensor)>), ImportError> {
    if bytes.starts_with(ZIP_MAGIC) {
        return Ok((SourceFormat::PthZip, read_zip_pth(bytes)?));
    }
    if bytes.starts_with(LEGACY_MAGIC) {
        return Ok((SourceFormat::PthLegacy, read_legacy_pth(bytes)?));
    }
    match SafeTensors::deserialize(bytes) {
        Ok(file) => Ok((SourceFormat::Safetensors, read_safetensors(&file)?)),
        Err(e) => Err(ImportError::UnknownFormat(format!(
            "no zip archive or PyTorch header, and as safetensors: {e}"
        ))),
    }
}

fn read_safetensors(file: &SafeTensors) -> Result<Vec<(String, Tensor)>, ImportError> {
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            let tensor = candle_core::safetensors::Load::load(&view, &Device::Cpu)
                .map_err(|e| ImportError::Safetensors(format!("tensor `{name}` cannot be read: {e}")))?;
            Ok((name, tensor))
        })
        .collect()
}

/// Current `torch.save` files, through candle's reader (which wants a path).
fn read_zip_pth(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, ImportError> {
    if let Some(pickle) = crate::pickle_guard::zip_pickle(bytes).map_err(ImportError::Pth)? {
        crate::pickle_guard::check_lengths(&pickle).map_err(|e| ImportError::Pth(e.to_string()))?;
    }
    let mut staged = tempfile::NamedTempFile::new()?;
    staged.write_all(bytes)?;
    staged.flush()?;
    let read = |key| candle_core::pickle::read_all_with_key(staged.path(), key);
    let tensors = read(None).map_err(|e| ImportError::Pth(e.to_string()))?;
    if !tensors.is_empty() {
        return Ok(tensors);
    }
    // A training checkpoint: the state dict is one entry of a larger dict.
    for key in STATE_DICT_KEYS {
        if let Ok(tensors) = read(Some(key)) {
            if !tensors.is_empty() {
                return Ok(tensors);
            }
        }
    }
    Err(no_tensors())
}

/// Where training checkpoints usually keep the state dict.
const STATE_DICT_KEYS: [&str; 2] = ["state_dict", "model"];

fn no_tensors() -> ImportError {
    ImportError::Pth(format!(
        "no tensors found: expected a state dict (`torch.save(model.state_dict(), f)`) or a \
         checkpoint holding one under {}",
        STATE_DICT_KEYS.map(|k| format!("`{k}`")).join(" or ")
    ))
}

fn legacy_error(message: impl fmt::Display) -> ImportError {
    ImportError::Pth(format!(
        "{message} (PyTorch's pre-1.6 format; if the file comes from Python 2 or an old PyTorch, \
         re-save it with a current one: `torch.save(torch.load(\"IN.pth\"), \"OUT.pth\")`)"
    ))
}

fn next_pickle(cursor: &mut Cursor<&[u8]>) -> Result<Object, ImportError> {
    let rest = cursor.get_ref().get(cursor.position() as usize..).unwrap_or_default();
    crate::pickle_guard::check_lengths(rest).map_err(legacy_error)?;
    let mut stack = Stack::empty();
    stack.read_loop(cursor).map_err(legacy_error)?;
    stack.finalize().map_err(legacy_error)
}

/// PyTorch's pre-1.6 format: after the magic number, pickles of the protocol
/// version, the system info and the object (its tensors point at storages by
/// key), a pickled list of storage keys, then each storage in that order as
/// an 8-byte element count followed by its raw elements.
fn read_legacy_pth(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, ImportError> {
    let mut cursor = Cursor::new(&bytes[LEGACY_MAGIC.len()..]);
    let _protocol_version = next_pickle(&mut cursor)?;
    let sys_info = next_pickle(&mut cursor)?;
    if let Object::Dict(entries) = &sys_info {
        let big_endian = entries
            .iter()
            .any(|(k, v)| *k == Object::Unicode("little_endian".into()) && *v == Object::Bool(false));
        if big_endian {
            return Err(legacy_error("written on a big-endian machine"));
        }
    }
    let root = next_pickle(&mut cursor)?;
    let Object::List(keys) = next_pickle(&mut cursor)? else {
        return Err(legacy_error("the list of storage keys is missing"));
    };
    // Every storage of the file is in the data section, also those of
    // entries that are not read (a checkpoint's optimiser state), so their
    // sizes come from every storage reference in the object.
    let mut element_sizes = HashMap::new();
    collect_storages(&root, &mut element_sizes);
    let entries = state_dict_entries(root).ok_or_else(no_tensors)?;

    let mut refs = Vec::new();
    for (name, value) in entries {
        let Object::Unicode(name) = name else { continue };
        match TensorRef::parse(value) {
            Some(Ok(r)) => refs.push((name, r)),
            Some(Err(message)) => return Err(tensor_error(&name, message)),
            // `_metadata` and other non-tensor entries.
            None => {}
        }
    }
    if refs.is_empty() {
        return Err(no_tensors());
    }

    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    let mut position = LEGACY_MAGIC.len() + cursor.position() as usize;
    for key in keys {
        let Object::Unicode(key) = key else {
            return Err(legacy_error("a storage key is not a string"));
        };
        let element_size = *element_sizes
            .get(key.as_str())
            .ok_or_else(|| legacy_error(format!("storage `{key}` has an unknown type")))?;
        let truncated = || legacy_error(format!("the file is truncated in storage `{key}`"));
        let count_bytes = bytes.get(position..position + 8).ok_or_else(truncated)?;
        let count = u64::from_le_bytes(count_bytes.try_into().map_err(|_| truncated())?);
        let len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(element_size))
            .ok_or_else(truncated)?;
        let start = position + 8;
        let data = bytes
            .get(start..start.checked_add(len).ok_or_else(truncated)?)
            .ok_or_else(truncated)?;
        storages.insert(key, data);
        position = start + len;
    }

    refs.into_iter()
        .map(|(name, r)| {
            let storage = storages
                .get(&r.storage)
                .ok_or_else(|| tensor_error(&name, format!("its storage `{}` is not in the file", r.storage)))?;
            let tensor = r.load(storage).map_err(|message| tensor_error(&name, message))?;
            Ok((name, tensor))
        })
        .collect()
}

/// Element sizes of the storages that `object` refers to, by key.
fn collect_storages(object: &Object, sizes: &mut HashMap<String, usize>) {
    match object {
        Object::PersistentLoad(id) => {
            if let Object::Tuple(id) = id.as_ref() {
                if let [Object::Unicode(tag), Object::Class { class_name, .. }, Object::Unicode(key), ..] =
                    id.as_slice()
                {
                    if let (true, Some(size)) = (tag == "storage", storage_element_size(class_name)) {
                        sizes.insert(key.clone(), size);
                    }
                }
            }
        }
        Object::Tuple(items) | Object::List(items) => items.iter().for_each(|o| collect_storages(o, sizes)),
        Object::Dict(entries) => entries.iter().for_each(|(k, v)| {
            collect_storages(k, sizes);
            collect_storages(v, sizes);
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            collect_storages(callable, sizes);
            collect_storages(args, sizes);
        }
        _ => {}
    }
}

fn storage_element_size(class_name: &str) -> Option<usize> {
    Some(match class_name {
        "BoolStorage" | "ByteStorage" | "CharStorage" | "QUInt8Storage" | "QInt8Storage" => 1,
        "ShortStorage" | "HalfStorage" | "BFloat16Storage" => 2,
        "IntStorage" | "FloatStorage" | "QInt32Storage" => 4,
        "LongStorage" | "DoubleStorage" | "ComplexFloatStorage" => 8,
        "ComplexDoubleStorage" => 16,
        _ => return None,
    })
}

/// The state dict's entries: the object itself, or a checkpoint's entry.
fn state_dict_entries(root: Object) -> Option<Vec<(Object, Object)>> {
    let entries = match root {
        Object::Dict(entries) => entries,
        // An OrderedDict whose state could not be merged into it by candle.
        Object::Build { callable, .. } => match *callable {
            Object::Dict(entries) => entries,
            _ => return None,
        },
        _ => return None,
    };
    if entries
        .iter()
        .any(|(_, v)| matches!(TensorRef::parse(v.clone()), Some(Ok(_))))
    {
        return Some(entries);
    }
    entries
        .into_iter()
        .find(|(k, _)| matches!(k, Object::Unicode(k) if STATE_DICT_KEYS.contains(&k.as_str())))
        .and_then(|(_, v)| state_dict_entries(v))
}

/// A tensor of a legacy pickle: a view into a storage.
struct TensorRef {
    storage: String,
    dtype: DType,
    /// In elements.
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorRef {
    /// `None` for objects that are not tensors; an error for tensors this reader cannot load.
    fn parse(value: Object) -> Option<Result<Self, String>> {
        let Object::Reduce { callable, args } = value else {
            return None;
        };
        let Object::Class {
            module_name,
            class_name,
        } = *callable
        else {
            return None;
        };
        let Object::Tuple(mut args) = *args else { return None };
        match (module_name.as_str(), class_name.as_str()) {
            // (storage, offset, size, stride, ...): v2 adds requires_grad and hooks.
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => Some(Self::from_rebuild_args(args)),
            // (data, requires_grad, hooks)
            ("torch._utils", "_rebuild_parameter") if !args.is_empty() => Self::parse(args.swap_remove(0)),
            // (func, type, args, state)
            ("torch._tensor", "_rebuild_from_type_v2") if args.len() >= 3 => {
                let inner_args = args.swap_remove(2);
                let func = args.swap_remove(0);
                Self::parse(Object::Reduce {
                    callable: Box::new(func),
                    args: Box::new(inner_args),
                })
            }
            _ => None,
        }
    }

    fn from_rebuild_args(args: Vec<Object>) -> Result<Self, String> {
        let [storage, offset, size, stride, ..] = args.as_slice() else {
            return Err(format!("unexpected tensor arguments ({} values)", args.len()));
        };
        let Object::PersistentLoad(storage) = storage else {
            return Err("the tensor does not point at a storage".into());
        };
        // ("storage", storage type, key, location, element count[, view])
        let Object::Tuple(storage) = storage.as_ref() else {
            return Err("malformed storage reference".into());
        };
        let [Object::Unicode(tag), Object::Class { class_name, .. }, Object::Unicode(key), _, _, rest @ ..] =
            storage.as_slice()
        else {
            return Err("malformed storage reference".into());
        };
        if tag != "storage" {
            return Err(format!("unknown persistent object `{tag}`"));
        }
        if rest.first().is_some_and(|view| *view != Object::None) {
            return Err("stored as a view into a larger storage, which this reader does not support".into());
        }
        let dtype = match class_name.as_str() {
            "FloatStorage" => DType::F32,
            "DoubleStorage" => DType::F64,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "ByteStorage" => DType::U8,
            other => return Err(format!("unsupported storage type {other}")),
        };
        let int = |o: &Object| match o {
            Object::Int(v) => usize::try_from(*v).ok(),
            Object::Long(v) => usize::try_from(*v).ok(),
            _ => None,
        };
        let ints = |o: &Object| match o {
            Object::Tuple(values) => values.iter().map(int).collect::<Option<Vec<usize>>>(),
            _ => None,
        };
        let (Some(offset), Some(size), Some(stride)) = (int(offset), ints(size), ints(stride)) else {
            return Err("malformed offset, size or stride".into());
        };
        Ok(Self {
            storage: key.clone(),
            dtype,
            offset,
            size,
            stride,
        })
    }

    fn load(&self, storage: &[u8]) -> Result<Tensor, String> {
        if self.size.len() != self.stride.len() {
            return Err(format!("size {:?} and stride {:?} disagree", self.size, self.stride));
        }
        // Row-major strides; dimensions of length 1 may carry any stride.
        let mut expected = 1usize;
        for (&len, &stride) in self.size.iter().zip(&self.stride).rev() {
            if len != 1 && stride != expected {
                return Err(format!(
                    "non-contiguous layout (size {:?}, stride {:?})",
                    self.size, self.stride
                ));
            }
            expected = expected.checked_mul(len).ok_or("size overflows")?;
        }
        let element = self.dtype.size_in_bytes();
        let range = self
            .offset
            .checked_add(expected)
            .and_then(|end| Some(self.offset.checked_mul(element)?..end.checked_mul(element)?))
            .ok_or("size overflows")?;
        let data = storage.get(range).ok_or_else(|| {
            format!(
                "needs elements {}..{} of a storage of {}",
                self.offset,
                self.offset + expected,
                storage.len() / element
            )
        })?;
        Tensor::from_raw_buffer(data, self.dtype, &self.size, &Device::Cpu).map_err(|e| e.to_string())
    }
}

/// torchvision's `_load_state_dict` renaming: before module names could not
/// contain dots, dense layers were saved as `denselayerN.norm.1.weight`,
/// `conv.1`, `norm.2`, `conv.2`; torchvision's published checkpoints still use
/// those names. This is its regular expression
/// `^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$`.
fn current_name(name: &str) -> Option<String> {
    let (rest, param) = name.rsplit_once('.')?;
    if !matches!(param, "weight" | "bias" | "running_mean" | "running_var") {
        return None;
    }
    let (module, index) = rest.rsplit_once('.')?;
    if !matches!(index, "1" | "2") {
        return None;
    }
    let (layer, kind) = module.rsplit_once('.')?;
    if !matches!(kind, "norm" | "relu" | "conv") {
        return None;
    }
    let digits = &layer[layer.rfind("denselayer")? + "denselayer".len()..];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!("{module}{index}.{param}"))
}

const COUNTER_SUFFIX: &str = "num_batches_tracked";
const CLASSIFIER_WEIGHT: &str = "classifier.weight";
const CLASSIFIER_BIAS: &str = "classifier.bias";

/// Imports a state dict already read (by [`read_state_dict`] or otherwise).
pub fn import_state_dict(
    state_dict: Vec<(String, Tensor)>,
    format: SourceFormat,
    source: SourceWeights,
) -> Result<Imported, ImportError> {
    // `nn.DataParallel` saves every name under `module.`.
    let wrapped = !state_dict.is_empty() && state_dict.iter().all(|(name, _)| name.starts_with("module."));
    let mut tensors: HashMap<String, Tensor> = HashMap::with_capacity(state_dict.len());
    let (mut renamed_legacy, mut dropped_counters) = (0, 0);
    for (original, tensor) in state_dict {
        let name = if wrapped {
            original["module.".len()..].to_string()
        } else {
            original.clone()
        };
        if name.ends_with(COUNTER_SUFFIX) {
            dropped_counters += 1;
            continue;
        }
        let name = match current_name(&name) {
            Some(current) => {
                renamed_legacy += 1;
                current
            }
            None => name,
        };
        let tensor = tensor.to_dtype(DType::F32).map_err(|e| tensor_error(&original, e))?;
        if tensors.insert(name.clone(), tensor).is_some() {
            return Err(tensor_error(
                &name,
                "appears twice, under its legacy and its current name",
            ));
        }
    }

    let cfg = infer_config(&tensors)?;
    let head = match tensors.get(CLASSIFIER_WEIGHT).map(|w| w.dims().to_vec()) {
        Some(dims) if dims.len() == 2 && dims[0] != 1 => {
            tensors.remove(CLASSIFIER_WEIGHT);
            tensors.remove(CLASSIFIER_BIAS);
            Head::Dropped { outputs: dims[0] }
        }
        // A misshapen one-output head is reported by the check below, by name.
        Some(_) => Head::Kept,
        None if tensors.contains_key(CLASSIFIER_BIAS) => Head::Kept,
        None => Head::Absent,
    };

    let mut card = ModelCard::new(Architecture::Densenet(cfg.clone()), IMPORT_INPUT_SIZE);
    card.validate()?;
    validate_tensors(&card, &cfg, &tensors, head)?;

    card.notes.push(match head {
        Head::Kept => format!(
            "Imported from torchvision DenseNet weights `{}`; its one-output classifier is kept as the binary head.",
            source.file
        ),
        Head::Dropped { outputs } => format!(
            "Imported from torchvision DenseNet weights `{}`; its {outputs}-output classifier was dropped: \
             this file holds the backbone only, for `fracture train --init`.",
            source.file
        ),
        Head::Absent => format!(
            "Imported from torchvision DenseNet weights `{}`, which have no classifier: \
             this file holds the backbone only, for `fracture train --init`.",
            source.file
        ),
    });
    card.init = Some(source);
    Ok(Imported {
        config: cfg,
        card,
        tensors,
        format,
        head,
        renamed_legacy,
        dropped_counters,
    })
}

/// Builds the model over exactly these tensors. Without a head, a zero
/// one-output classifier stands in for the check and is not kept.
fn validate_tensors(
    card: &ModelCard,
    cfg: &DenseNetConfig,
    tensors: &HashMap<String, Tensor>,
    head: Head,
) -> Result<(), ImportError> {
    if head.is_kept() {
        build_checked(card, tensors, &Device::Cpu)?;
        return Ok(());
    }
    let mut with_head = tensors.clone();
    let features = cfg.num_features();
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu);
    with_head.insert(
        CLASSIFIER_WEIGHT.into(),
        zeros(&[1, features]).map_err(fracture_core::Error::from)?,
    );
    with_head.insert(CLASSIFIER_BIAS.into(), zeros(&[1]).map_err(fracture_core::Error::from)?);
    build_checked(card, &with_head, &Device::Cpu)?;
    Ok(())
}

/// A tensor's dims, or an error saying which tensor was needed and why.
fn dims<'a>(tensors: &'a HashMap<String, Tensor>, name: &str, purpose: &str) -> Result<&'a [usize], ImportError> {
    tensors
        .get(name)
        .map(|t| t.dims())
        .ok_or_else(|| tensor_error(name, format!("missing (needed to infer {purpose})")))
}

/// The configuration, from shapes: `conv0` gives the initial features, the
/// first dense layer's `conv2` the growth rate and bottleneck width, and the
/// `denseblockB.denselayerL` names the depth of each block.
pub fn infer_config(tensors: &HashMap<String, Tensor>) -> Result<DenseNetConfig, ImportError> {
    const CONV0: &str = "features.conv0.weight";
    if !tensors.contains_key(CONV0) {
        let mut names: Vec<&str> = tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        let shown = names
            .iter()
            .take(4)
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ImportError::NotDenseNet(if names.is_empty() {
            format!("it holds no weights (missing tensor `{CONV0}`)")
        } else {
            format!(
                "missing tensor `{CONV0}`; it holds {} tensors such as {shown}",
                names.len()
            )
        }));
    }
    let conv0 = dims(tensors, CONV0, "the initial features")?;
    let [num_init_features, _, _, _] = *conv0 else {
        return Err(tensor_error(
            CONV0,
            format!("has shape {conv0:?}, expected a 4-D convolution weight"),
        ));
    };

    // Deepest dense layer seen in each block.
    let mut depths: BTreeMap<usize, usize> = BTreeMap::new();
    for name in tensors.keys() {
        let parsed = name.strip_prefix("features.denseblock").and_then(|rest| {
            let (block, rest) = rest.split_once('.')?;
            let (layer, _) = rest.strip_prefix("denselayer")?.split_once('.')?;
            Some((block.parse::<usize>().ok()?, layer.parse::<usize>().ok()?))
        });
        if let Some((block, layer)) = parsed {
            let depth = depths.entry(block).or_default();
            *depth = (*depth).max(layer);
        }
    }
    if depths.is_empty() {
        return Err(ImportError::NotDenseNet(
            "no `features.denseblockN.denselayerM` tensors".into(),
        ));
    }
    let mut block_config = Vec::with_capacity(depths.len());
    for (expected, (&block, &depth)) in (1..).zip(&depths) {
        if block != expected || depth == 0 {
            let missing = if block != expected { expected } else { block };
            return Err(tensor_error(
                &format!("features.denseblock{missing}.denselayer1.norm1.weight"),
                "missing: the dense blocks are not numbered 1, 2, ... with layers from 1",
            ));
        }
        block_config.push(depth);
    }

    const CONV2: &str = "features.denseblock1.denselayer1.conv2.weight";
    let conv2 = dims(tensors, CONV2, "the growth rate")?;
    let [growth_rate, bottleneck, _, _] = *conv2 else {
        return Err(tensor_error(
            CONV2,
            format!("has shape {conv2:?}, expected a 4-D convolution weight"),
        ));
    };
    if growth_rate == 0 || bottleneck % growth_rate != 0 {
        return Err(tensor_error(
            CONV2,
            format!("has shape {conv2:?}: its {bottleneck} input channels are not a multiple of the growth rate {growth_rate}"),
        ));
    }
    Ok(DenseNetConfig {
        growth_rate,
        block_config,
        num_init_features,
        bn_size: bottleneck / growth_rate,
        // The project's head (the study's dropout before the classifier), as for every DenseNet.
        head_dropout: DenseNetConfig::densenet121().head_dropout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_names_are_renamed_like_torchvision() {
        assert_eq!(
            current_name("features.denseblock1.denselayer1.norm.1.weight").as_deref(),
            Some("features.denseblock1.denselayer1.norm1.weight")
        );
        assert_eq!(
            current_name("features.denseblock4.denselayer16.conv.2.weight").as_deref(),
            Some("features.denseblock4.denselayer16.conv2.weight")
        );
        assert_eq!(
            current_name("features.denseblock2.denselayer3.norm.2.running_var").as_deref(),
            Some("features.denseblock2.denselayer3.norm2.running_var")
        );
        for unchanged in [
            "features.denseblock1.denselayer1.norm1.weight",
            "features.transition1.norm.weight",
            "features.denseblock1.denselayer1.norm.3.weight",
            "features.denseblock1.denselayer1.norm.1.num_batches_tracked",
            "features.denseblock1.denselayerx.norm.1.weight",
            "classifier.weight",
        ] {
            assert_eq!(current_name(unchanged), None, "{unchanged}");
        }
    }

    #[test]
    fn unknown_bytes_are_errors_not_panics() {
        for bytes in [
            &b""[..],
            b"hello",
            &[0u8; 64][..],
            b"PK\x03\x04 truncated",
            LEGACY_MAGIC,
            &[0x80, 0x02, b'.'],
        ] {
            assert!(read_state_dict(bytes).is_err(), "{bytes:?}");
        }
    }
}

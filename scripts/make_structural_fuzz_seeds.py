#!/usr/bin/env python3
"""Fuzz seeds that reach the checks byte mutation does not.

Coverage of the fuzz corpora (`cargo fuzz coverage`) showed checks of the
`.pth` import and the model file that hours of fuzzing never reached: they sit
behind structure (a pickle inside a zip, tensor shapes in a JSON header) that
random edits break long before they change its meaning. These seeds are the
committed fixtures with that structure changed on purpose. No torch is needed:
the pickles are rewritten with stand-ins for torch's globals.

Usage (from the repository root, after changing the fixtures or the checks):

    python3 scripts/make_structural_fuzz_seeds.py

`crates/train/tests/fuzz_replay.rs` and `crates/core/tests/fuzz_replay.rs`
replay them: seeds named `tiny*` must import, the others must fail with the
message their check gives.
"""

import io
import json
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PTH_SEEDS = ROOT / "fuzz" / "seeds" / "pth_import"
MODEL_SEEDS = ROOT / "fuzz" / "seeds" / "model_file"
LEGACY_MAGIC = bytes.fromhex("80028a0a6cfc9c46f9206aa850192e")


# --- torch's globals, as stand-ins that pickle back to the same names ------

class Call:
    """A call of a torch global kept as it was read, so it pickles back unchanged."""

    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


class StorageRef:
    """A persistent id (a tensor's storage): written back as it was read."""

    def __init__(self, pid):
        self.pid = pid


def fake_module(name):
    """`torch`, `torch._utils`, ... as empty modules, so that pickle finds the stand-ins by name."""
    if name not in sys.modules:
        module = types.ModuleType(name)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(fake_module(parent), child, module)
    return sys.modules[name]


def torch_global(module_name, name):
    module = fake_module(module_name)
    if not hasattr(module, name):
        if name.endswith("Storage"):
            value = type(name, (), {"__module__": module_name})
        else:
            def value(*args):
                return Call(value, args)

            value.__module__, value.__qualname__, value.__name__ = module_name, name, name
        setattr(module, name, value)
    return getattr(module, name)


class Reader(pickle.Unpickler):
    def find_class(self, module, name):
        if module.split(".")[0] == "torch":
            return torch_global(module, name)
        return super().find_class(module, name)

    def persistent_load(self, pid):
        return StorageRef(pid)


class Writer(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, StorageRef) else None


def dump(obj):
    out = io.BytesIO()
    Writer(out, protocol=2).dump(obj)
    return out.getvalue()


# --- the two .pth layouts ---------------------------------------------------

def rewrite_zip_pth(source, target, change):
    """A current (zip) torch.save file with its object changed by `change`."""
    with zipfile.ZipFile(source) as archive:
        entries = [(info, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for info, data in entries:
            if info.filename.endswith("/data.pkl"):
                data = dump(change(Reader(io.BytesIO(data)).load()))
            archive.writestr(info.filename, data)


def rewrite_legacy_pth(source, target, change):
    """A pre-1.6 torch.save file: pickles of the magic number, protocol
    version, system info, object and storage keys, then the storages, which
    stay as they are when only the object's dict changes."""
    data = source.read_bytes()
    assert data.startswith(LEGACY_MAGIC), f"{source} is not in the legacy format"
    stream = io.BytesIO(data)
    Reader(stream).load()  # magic number
    Reader(stream).load()  # protocol version
    Reader(stream).load()  # system info
    object_start = stream.tell()
    root = Reader(stream).load()
    object_end = stream.tell()
    target.write_bytes(data[:object_start] + dump(change(root)) + data[object_end:])


def data_parallel(state_dict):
    """What `nn.DataParallel(model).state_dict()` saves: every name under `module.`."""
    wrapped = type(state_dict)((f"module.{name}", value) for name, value in state_dict.items())
    if hasattr(state_dict, "_metadata"):
        wrapped._metadata = state_dict._metadata
    return wrapped


# --- safetensors ------------------------------------------------------------

def read_safetensors(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    metadata = header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        tensors[name] = (entry["dtype"], entry["shape"], data[8 + length + start : 8 + length + end])
    return metadata, tensors


def write_safetensors(path, metadata, tensors):
    header, blob = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + blob)


def safetensors_variant(source, target, change):
    metadata, tensors = read_safetensors(source)
    write_safetensors(target, metadata, change(dict(tensors)))


def without(predicate):
    return lambda tensors: {n: t for n, t in tensors.items() if not predicate(n)}


def reshaped(name, shape_of):
    def change(tensors):
        dtype, shape, raw = tensors[name]
        tensors[name] = (dtype, shape_of(shape), raw)
        return tensors
    return change


def conv2_channels_not_a_multiple(shape):
    growth, bottleneck, height, width = shape
    # The same elements as (growth * bottleneck) outputs of one input channel:
    # 1 is no multiple of a growth rate above 1.
    return [growth * bottleneck, 1, height, width]


def with_extra_tensor(tensors):
    tensors["features.extra.weight"] = ("F32", [2], struct.pack("<2f", 1.0, 2.0))
    return tensors


def main():
    tiny_pth, tiny_legacy = PTH_SEEDS / "tiny.pth", PTH_SEEDS / "tiny_legacy_format.pth"
    tiny_safetensors = PTH_SEEDS / "tiny.safetensors"
    conv0, conv2 = "features.conv0.weight", "features.denseblock1.denselayer1.conv2.weight"

    # Must import, as their sources do.
    rewrite_zip_pth(tiny_pth, PTH_SEEDS / "tiny_data_parallel.pth", data_parallel)
    rewrite_zip_pth(tiny_pth, PTH_SEEDS / "tiny_checkpoint.pth", lambda sd: {"epoch": 3, "state_dict": sd})
    rewrite_legacy_pth(tiny_legacy, PTH_SEEDS / "tiny_legacy_format_checkpoint.pth", lambda sd: {"epoch": 3, "model": sd})

    # Must be refused, each by its own check.
    rewrite_legacy_pth(tiny_legacy, PTH_SEEDS / "legacy_format_no_tensors.pth", lambda sd: {"epoch": 3})
    safetensors_variant(tiny_safetensors, PTH_SEEDS / "no_conv0.safetensors", without(lambda n: n == conv0))
    safetensors_variant(tiny_safetensors, PTH_SEEDS / "conv0_not_4d.safetensors", reshaped(conv0, lambda s: [s[0], s[1] * s[2] * s[3]]))
    safetensors_variant(
        tiny_safetensors, PTH_SEEDS / "no_dense_blocks.safetensors", without(lambda n: n.startswith("features.denseblock"))
    )
    safetensors_variant(tiny_safetensors, PTH_SEEDS / "conv2_not_4d.safetensors", reshaped(conv2, lambda s: [s[0] * s[1], s[2] * s[3]]))
    safetensors_variant(tiny_safetensors, PTH_SEEDS / "conv2_channels.safetensors", reshaped(conv2, conv2_channels_not_a_multiple))
    safetensors_variant(MODEL_SEEDS / "densenet-tiny.safetensors", MODEL_SEEDS / "densenet-tiny-extra-tensor.safetensors", with_extra_tensor)


if __name__ == "__main__":
    main()

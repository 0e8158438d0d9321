#!/usr/bin/env python3
"""Parity fixtures for `fracture import`: torchvision DenseNet weights and
torch's own eval-mode outputs, which `crates/train/tests/import_parity.rs`
compares ours against.

Usage (CPU is enough; pretrained weights are never downloaded):

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch torchvision safetensors numpy
    /tmp/torchenv/bin/python scripts/make_parity_fixtures.py
        # rewrites crates/train/tests/fixtures/parity/ (tiny DenseNet, committed)
    /tmp/torchenv/bin/python scripts/make_parity_fixtures.py --full /tmp/parity121
        # full densenet121 at 150x150 into /tmp/parity121 (~200 MB, not committed), then
    FRACTURE_PARITY_DIR=/tmp/parity121 cargo test -p fracture-cli --test import_parity -- --ignored

Every file is written with a prefix (`tiny` or `densenet121`):

- `PREFIX.pth`            state dict with a one-output classifier, current names (torch.save, zip)
- `PREFIX_legacy.pth`     the same with the legacy names of torchvision's published
                          checkpoints (`denselayerN.norm.1.weight`, `conv.1`, `norm.2`, `conv.2`)
- `PREFIX_legacy_format.pth`  legacy names, no `num_batches_tracked`, and PyTorch's
                          pre-1.6 (non-zip) serialization, as files saved before 2020
                          (torchvision's DenseNet checkpoints date from 2017)
- `PREFIX.safetensors`    the one-output state dict via safetensors.torch.save_file
- `PREFIX_imagenet_head.pth`  another model whose classifier has many outputs (10 for
                          tiny, ImageNet's 1000 for densenet121): the import drops it
- `PREFIX_imagenet_head_legacy_format.pth`  the same with legacy names and format
- `malformed_pickle.pth`  (tiny only) a zip whose pickle is malformed, for the error tests
- `io.safetensors`        `input`, `logits`, `features`, `imagenet_head_features` (and the
                          same with `_67` for tiny): inputs; torch's eval-mode logits of the
                          one-output model, shape (2,); and the rectified last feature map
                          (ReLU of `model.features`, before pooling) of both models

BatchNorm is randomised (affine parameters, then running statistics measured on
other random batches and perturbed), so the comparison really exercises
inference-mode BatchNorm rather than the identity of a fresh model.
"""

import argparse
import copy
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

SEED = 20240917
TINY = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "crates/train/tests/fixtures/parity"
# The inverse of torchvision's `_load_state_dict` renaming.
CURRENT_NAME = re.compile(r"^(.*denselayer\d+\.(?:norm|conv))([12])\.(weight|bias|running_mean|running_var)$")


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@torch.no_grad()
def randomise_batchnorm(model, calibration_shape):
    """Non-trivial BatchNorm that still keeps activations O(1) through 121 layers."""
    for bn in batch_norms(model):
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.2)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    for _ in range(3):
        model(torch.randn(calibration_shape))
    for bn in batch_norms(model):
        # Away from the calibration statistics, so that using batch statistics
        # (or none) instead of the running ones cannot pass.
        bn.running_mean += 0.1 * torch.randn_like(bn.running_mean) * bn.running_var.sqrt()
        bn.running_var *= torch.empty_like(bn.running_var).uniform_(0.7, 1.4)
        bn.momentum = 0.1
    model.eval()


def legacy_names(state_dict, keep_batch_counts=True):
    renamed = OrderedDict()
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked") and not keep_batch_counts:
            continue
        m = CURRENT_NAME.match(key)
        renamed[f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else key] = value
    renamed._metadata = getattr(state_dict, "_metadata", None)
    return renamed


@torch.no_grad()
def rectified_features(model, x):
    """The backbone's last feature map as the classifier sees it before pooling."""
    return F.relu(model.features(x))


def smooth_images(batch, size):
    """Large-scale structure plus noise: global pooling would average i.i.d.
    noise to nearly the same logit for every image, hiding errors."""
    coarse = F.interpolate(torch.randn(batch, 3, 5, 5), size=(size, size), mode="bilinear", align_corners=False)
    return 1.5 * coarse + 0.3 * torch.randn(batch, 3, size, size)


@torch.no_grad()
def write(out, prefix, binary, imagenet, inputs):
    """inputs: {suffix: tensor}; suffix "" is the main input."""
    out.mkdir(parents=True, exist_ok=True)
    state = binary.state_dict()
    torch.save(state, out / f"{prefix}.pth")
    torch.save(legacy_names(state), out / f"{prefix}_legacy.pth")
    torch.save(
        legacy_names(state, keep_batch_counts=False),
        out / f"{prefix}_legacy_format.pth",
        _use_new_zipfile_serialization=False,
    )
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"{prefix}.safetensors"))
    torch.save(imagenet.state_dict(), out / f"{prefix}_imagenet_head.pth")
    torch.save(
        legacy_names(imagenet.state_dict(), keep_batch_counts=False),
        out / f"{prefix}_imagenet_head_legacy_format.pth",
        _use_new_zipfile_serialization=False,
    )

    io = {}
    for suffix, x in inputs.items():
        io[f"input{suffix}"] = x.contiguous()
        io[f"logits{suffix}"] = binary(x).squeeze(1).contiguous()
        io[f"features{suffix}"] = rectified_features(binary, x).contiguous()
        io[f"imagenet_head_features{suffix}"] = rectified_features(imagenet, x).contiguous()
    save_file(io, str(out / "io.safetensors"))
    for name, value in io.items():
        print(f"{name}: shape {tuple(value.shape)}" + (f" values {value.tolist()}" if value.dim() == 1 else ""))
    print(f"wrote {out}")


def tiny(out):
    torch.manual_seed(SEED)
    binary = torchvision.models.DenseNet(**TINY, num_classes=1)
    randomise_batchnorm(binary, (8, 3, 64, 64))
    imagenet = torchvision.models.DenseNet(**TINY, num_classes=10)
    randomise_batchnorm(imagenet, (8, 3, 64, 64))
    # 67 px: the stem gives 34 and the max-pool 17, so the transition's
    # average pool drops a row and a column (floor mode).
    inputs = {"": smooth_images(2, 64), "_67": smooth_images(2, 67)}
    write(out, "tiny", binary, imagenet, inputs)
    write_malformed(out / "malformed_pickle.pth")


def write_malformed(path):
    """A .pth zip whose pickle calls torch's tensor rebuild with one argument
    instead of six: candle's reader panics on it, the import must not."""
    pickle = b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(K\x00tRs."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle)


def full(out):
    torch.manual_seed(SEED)
    imagenet = torchvision.models.densenet121(weights=None)  # 1000 classes, as published
    randomise_batchnorm(imagenet, (4, 3, 150, 150))
    binary = copy.deepcopy(imagenet)
    binary.classifier = torch.nn.Linear(binary.classifier.in_features, 1)
    binary.eval()
    write(out, "densenet121", binary, imagenet, {"": smooth_images(2, 150)})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", metavar="DIR", type=Path, help="full densenet121 at 150x150 into DIR")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the tiny fixtures go")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.full:
        full(args.full)
    else:
        tiny(args.out)


if __name__ == "__main__":
    main()

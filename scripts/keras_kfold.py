#!/usr/bin/env python3
"""The study's Keras k-fold protocol, on the same data as `fracture kfold`.

What it runs is the original study's DenseNet121 transfer recipe with
`weights=None` by default (ImageNet weights cannot be downloaded here; pass
`--weights imagenet` or a weights file where they can):
  input 150x150x3, Keras' `densenet.preprocess_input`;
  augmentation RandomFlip("horizontal"), RandomRotation(0.1), RandomZoom(0.2),
  RandomBrightness(0.4);
  base DenseNet121(include_top=False), called with training=False (BatchNorm in
  inference mode), global average pooling, Dropout(0.2), Dense(1) logit;
  phase 1: base frozen, Adam 1e-3, 25 epochs; phase 2: base trainable, Adam 1e-5,
  10 epochs; batch 6; binary cross-entropy.
Folds: stratified 10-fold, grouped by patient when the data has patients
(scikit-learn's StratifiedGroupKFold, as `fracture kfold`), shuffled with --seed.

It prints the study's two summary lines and the wall time, for the whole-job
comparison with `fracture kfold --model densenet121` on the same directory:

    python scripts/keras_kfold.py -i DIR [--patients docs/mura-humerus-target-patients.txt]

Needs `pip install tensorflow-cpu scikit-learn pillow`; CI does not run it.
"""

import argparse
import os
import re
import sys
import time
from pathlib import Path

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
POSITIVE_NAMES = {"fracture", "fractured", "fractures", "positive", "abnormal"}
MURA_STUDY = re.compile(r"^study\d+_(positive|negative)$")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", type=Path, required=True, help="class folders or MURA layout")
    p.add_argument("--patients", type=Path, help="use only these patients (one id per line)")
    p.add_argument("--exclude-patients", type=Path, help="leave these patients out")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--head-epochs", type=int, default=25)
    p.add_argument("--fine-tune-epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--weights", default=None, help="None (default), 'imagenet', or a weights file")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return p.parse_args()


def read_list(path):
    if path is None:
        return None
    ids = {line.split("#")[0].strip() for line in path.read_text().splitlines()}
    return ids - {""}


def scan(root, keep, drop):
    """(path, positive, group) for every image: MURA layout or two class folders."""
    samples = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in EXTENSIONS:
            continue
        study = path.parent.name
        match = MURA_STUDY.match(study)
        if match:
            patient = path.parent.parent.name
            if (keep is not None and patient not in keep) or (drop is not None and patient in drop):
                continue
            samples.append((path, match.group(1) == "positive", patient))
        else:
            samples.append((path, path.parent.name.lower() in POSITIVE_NAMES, str(path)))
    if not samples:
        sys.exit(f"{root}: no images found")
    return samples


def main():
    args = parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf
    from PIL import Image
    from sklearn.model_selection import StratifiedGroupKFold

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.keras.utils.set_random_seed(args.seed)
    layers = tf.keras.layers

    samples = scan(args.input, read_list(args.patients), read_list(args.exclude_patients))
    images = np.stack([
        np.asarray(Image.open(p).convert("RGB").resize((args.size, args.size), Image.BILINEAR), dtype=np.float32)
        for p, _, _ in samples
    ])
    labels = np.array([float(pos) for _, pos, _ in samples], dtype=np.float32)
    groups = np.array([g for _, _, g in samples])
    print(f"{len(samples)} images, {int(labels.sum())} positive, {len(set(groups))} groups", file=sys.stderr)

    augment = tf.keras.Sequential([
        layers.RandomFlip("horizontal"), layers.RandomRotation(0.1),
        layers.RandomZoom(0.2), layers.RandomBrightness(0.4),
    ])

    def build():
        base = tf.keras.applications.DenseNet121(
            weights=args.weights, include_top=False, input_shape=(args.size, args.size, 3))
        inputs = tf.keras.Input((args.size, args.size, 3))
        x = augment(inputs)
        x = tf.keras.applications.densenet.preprocess_input(x)
        x = base(x, training=False)
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dropout(0.2)(x)
        outputs = layers.Dense(1)(x)
        return tf.keras.Model(inputs, outputs), base

    folds = StratifiedGroupKFold(n_splits=args.folds, shuffle=True, random_state=args.seed)
    losses, accuracies = [], []
    started = time.perf_counter()
    for fold, (train, test) in enumerate(folds.split(images, labels, groups), start=1):
        model, base = build()
        loss = tf.keras.losses.BinaryCrossentropy(from_logits=True)
        metrics = [tf.keras.metrics.BinaryAccuracy(threshold=0.0)]
        base.trainable = False
        model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss=loss, metrics=metrics)
        model.fit(images[train], labels[train], batch_size=args.batch, epochs=args.head_epochs, verbose=0)
        base.trainable = True
        model.compile(optimizer=tf.keras.optimizers.Adam(1e-5), loss=loss, metrics=metrics)
        model.fit(images[train], labels[train], batch_size=args.batch, epochs=args.fine_tune_epochs, verbose=0)
        fold_loss, fold_accuracy = model.evaluate(images[test], labels[test], verbose=0)
        losses.append(fold_loss)
        accuracies.append(fold_accuracy * 100)
        print(f"fold {fold}: loss {fold_loss:.4f} accuracy {fold_accuracy * 100:.2f}% "
              f"({time.perf_counter() - started:.0f} s so far)", file=sys.stderr)

    print(f"Average Loss: {np.mean(losses):.2f} (+/- {np.std(losses):.2f})")
    print(f"Average Accuracy: {np.mean(accuracies):.2f}% (+/- {np.std(accuracies):.2f}%)")
    print(f"{args.folds} folds, {len(samples)} images, {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The work of `fracture bench`, in PyTorch or TensorFlow, for comparison.

Same models (DenseNet121 with a one-logit head; the study's 1x1 CNN), same input
(random N x 3 x S x S), same steps:
  infer   forward in inference mode;
  train   forward with batch statistics and dropout, binary cross-entropy,
          backward, one Adam step over every parameter;
  frozen  DenseNet's base forward in inference mode without gradients, then a
          training step of the head alone.
Same measurement: `--warmup` untimed steps, then the median of `--reps` timed
steps; peak memory is the process's peak resident set.

Prints one JSON object with the fields of `fracture bench --json`.
Install the framework yourself (CI does not): `pip install torch torchvision`
or `pip install tensorflow-cpu`.

    python scripts/bench_reference.py --framework torch --model densenet121 --mode train --batch 32
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--framework", choices=["torch", "tf"], required=True)
    p.add_argument("--model", choices=["cnn", "densenet121"], default="densenet121")
    p.add_argument("--mode", choices=["infer", "train", "frozen"], default="infer")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count() or 1)))
    args = p.parse_args()
    if args.mode == "frozen" and args.model != "densenet121":
        p.error("--mode frozen applies to densenet121 only")
    return args


def measure(step, warmup, reps):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def torch_step(args):
    import torch
    import torch.nn as nn
    import torchvision

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)

    if args.model == "densenet121":
        model = torchvision.models.densenet121(weights=None)
        model.classifier = nn.Linear(model.classifier.in_features, 1)
        base, head = model.features, model.classifier
    else:
        side = args.size // 2 // 2 // 2
        model = nn.Sequential(
            nn.Conv2d(3, 16, 1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Dropout(0.2), nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Linear(128, 1),
        )
    xs = torch.randn(args.batch, 3, args.size, args.size)
    targets = (torch.arange(args.batch) % 2).float()
    loss_fn = nn.BCEWithLogitsLoss()

    if args.mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode():
                model(xs).numpy()
        return step

    if args.mode == "train":
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-7)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xs).squeeze(1), targets)
            loss.backward()
            opt.step()
        return step

    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(head.parameters(), lr=1e-4, eps=1e-7)
    dropout = nn.Dropout(0.2)

    def step():
        with torch.no_grad():
            features = torch.flatten(nn.functional.adaptive_avg_pool2d(nn.functional.relu(base(xs)), 1), 1)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(head(dropout(features)).squeeze(1), targets)
        loss.backward()
        opt.step()
    return step


def tf_step(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.random.set_seed(0)
    layers = tf.keras.layers
    shape = (args.size, args.size, 3)

    if args.model == "densenet121":
        base = tf.keras.applications.DenseNet121(weights=None, include_top=False, input_shape=shape, pooling="avg")
        head = tf.keras.Sequential([layers.Dropout(0.2), layers.Dense(1)])
        inputs = tf.keras.Input(shape)
        model = tf.keras.Model(inputs, head(base(inputs)))
    else:
        base = head = None
        model = tf.keras.Sequential([
            tf.keras.Input(shape),
            layers.Conv2D(16, 1, padding="same", activation="relu"), layers.MaxPooling2D(),
            layers.Conv2D(32, 1, padding="same", activation="relu"), layers.MaxPooling2D(),
            layers.Conv2D(64, 1, padding="same", activation="relu"), layers.MaxPooling2D(),
            layers.Dropout(0.2), layers.Flatten(), layers.Dense(128, activation="relu"), layers.Dense(1),
        ])
    xs = tf.random.normal((args.batch,) + shape)
    targets = tf.cast(tf.range(args.batch) % 2, tf.float32)[:, None]
    loss_fn = tf.keras.losses.BinaryCrossentropy(from_logits=True)

    if args.mode == "infer":
        infer = tf.function(lambda x: model(x, training=False), jit_compile=False)
        return lambda: infer(xs).numpy()

    trained = model if args.mode == "train" else head
    opt = tf.keras.optimizers.Adam(1e-4)

    @tf.function
    def train_step(x):
        if args.mode == "frozen":
            x = base(x, training=False)
        with tf.GradientTape() as tape:
            loss = loss_fn(targets, trained(x, training=True))
        grads = tape.gradient(loss, trained.trainable_variables)
        opt.apply_gradients(zip(grads, trained.trainable_variables))
        return loss

    return lambda: train_step(xs).numpy()


def main():
    args = parse_args()
    build = torch_step if args.framework == "torch" else tf_step
    try:
        step = build(args)
    except ImportError as err:
        sys.exit(f"{args.framework} is not installed ({err}); install it from PyPI to compare")
    median = measure(step, args.warmup, args.reps)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "framework": args.framework,
        "model": args.model,
        "mode": args.mode,
        "batch": args.batch,
        "size": args.size,
        "warmup": args.warmup,
        "repetitions": args.reps,
        "median_seconds": median,
        "images_per_second": args.batch / median,
        "peak_memory_bytes": peak_kib * 1024,
        "threads": args.threads,
    }))


if __name__ == "__main__":
    main()

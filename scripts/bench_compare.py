#!/usr/bin/env python3
"""Ours against PyTorch and TensorFlow on this machine, in one sitting.

Each work item runs `fracture bench --json` and `scripts/bench_reference.py` for each
installed framework, alternating, for `--rounds` rounds (so that a background load or
a thermal change hits every contender alike); every run is a fresh process, so its
peak memory is its own. The table gives the median images/s over the rounds, the peak
memory, and the ratio of ours to the best peer (> 1: we are faster).

    python scripts/bench_compare.py                 # the issue's work items, 3 rounds
    python scripts/bench_compare.py --quick         # fewer repetitions, to try it out

Frameworks that are not installed are skipped with a note; install them from PyPI
(`pip install torch torchvision tensorflow-cpu`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "scripts" / "bench_reference.py"

# (model, mode, batch): the comparisons.
WORK = [
    ("densenet121", "train", 32),
    ("densenet121", "infer", 1),
    ("densenet121", "frozen", 32),
    ("cnn", "train", 32),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--frameworks", default="torch,tf", help="comma-separated peers to run")
    p.add_argument("--only", help="run only work items whose 'model/mode' contains this text")
    p.add_argument("--quick", action="store_true", help="1 warm-up, 3 repetitions, 1 round")
    p.add_argument("--fracture", type=Path, default=ROOT / "target" / "release" / "fracture",
                   help="our binary (built with `cargo build --release -p fracture-cli` unless --no-build)")
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--python", default=sys.executable, help="the Python that has the peers installed")
    p.add_argument("--json", type=Path, help="also write every run's figures here")
    args = p.parse_args()
    if args.quick:
        args.warmup, args.reps, args.rounds = 1, 3, 1
    return args


def run_json(cmd, env):
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or ["failed"])[-1]
    out = done.stdout
    start = out.find("{")
    if start < 0:
        return None, "no JSON on stdout"
    return json.JSONDecoder().raw_decode(out[start:])[0], None


def available(python, framework):
    module = {"torch": "torchvision", "tf": "tensorflow"}[framework]
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def fmt_memory(runs):
    peaks = [r["peak_memory_bytes"] for r in runs if r.get("peak_memory_bytes")]
    return f"{max(peaks) / 2**30:.2f} GB" if peaks else "n/a"


def main():
    args = parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "fracture-cli"], cwd=ROOT, check=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    peers = []
    for framework in [f for f in args.frameworks.split(",") if f]:
        if available(args.python, framework):
            peers.append(framework)
        else:
            print(f"note: {framework} is not installed for {args.python}; skipped", file=sys.stderr)

    work = [w for w in WORK if not args.only or args.only in f"{w[0]}/{w[1]}"]
    common = ["--size", str(args.size), "--warmup", str(args.warmup), "--reps", str(args.reps)]
    results = {}
    for model, mode, batch in work:
        item = ["--model", model, "--mode", mode, "--batch", str(batch)] + common
        commands = {"ours": [str(args.fracture), "bench", "--json"] + item}
        for peer in peers:
            commands[peer] = [args.python, str(REFERENCE), "--framework", peer, "--threads", str(args.threads)] + item
        runs = {name: [] for name in commands}
        for round_index in range(args.rounds):
            # Alternate the order from round to round.
            names = list(commands)
            if round_index % 2:
                names.reverse()
            for name in names:
                result, error = run_json(commands[name], env)
                if result is None:
                    print(f"{model} {mode} batch {batch}: {name} failed: {error}", file=sys.stderr)
                    continue
                runs[name].append(result)
                print(f"  {model} {mode} batch {batch} round {round_index + 1}: {name} "
                      f"{result['images_per_second']:.1f} img/s", file=sys.stderr)
        results[(model, mode, batch)] = runs

    names = ["ours"] + peers
    header = "| work | " + " | ".join(names) + " | ours / best peer |"
    print(f"\n{args.threads} threads, {args.size} px, median of {args.rounds} round(s) "
          f"of (median of {args.reps} after {args.warmup} warm-up)\n")
    print(header)
    print("|" + " --- |" * (len(names) + 2))
    for (model, mode, batch), runs in results.items():
        cells, speeds = [], {}
        for name in names:
            if not runs.get(name):
                cells.append("-")
                continue
            speed = statistics.median(r["images_per_second"] for r in runs[name])
            speeds[name] = speed
            per_batch_ms = batch / speed * 1000
            figure = f"{per_batch_ms:.0f} ms" if batch == 1 else f"{speed:.1f} img/s"
            cells.append(f"{figure}, {fmt_memory(runs[name])}")
        peer_speeds = [v for k, v in speeds.items() if k != "ours"]
        ratio = f"{speeds['ours'] / max(peer_speeds):.2f}x" if "ours" in speeds and peer_speeds else "-"
        print(f"| {model} {mode}, batch {batch} | " + " | ".join(cells) + f" | {ratio} |")

    if args.json:
        flat = [dict(r, contender=name) for runs in results.values() for name, rs in runs.items() for r in rs]
        args.json.write_text(json.dumps(flat, indent=1))


if __name__ == "__main__":
    main()

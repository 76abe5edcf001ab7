"""Choose a training setting on a validation split held out of the training set, never the test set.

Holds out a fixed 10% of the training images (the same images for every run, whatever the run's
seed), trains on the rest once per setting and seed, and scores each finished model on the
held-out images with the exported ONNX model, as `convnet evaluate` does (TTA and plain). The
test set is never read. Prints a Markdown table per run and a mean per setting, and writes both,
with the command, date and machine, to `--out` (a .md and a .json).

    python bench/choose_on_val.py --preset quick --batch-sizes 512,1024 --seeds 0,1,2
    python bench/choose_on_val.py --preset fast --epochs 6,8 --seeds 0

Timings in its output are for information only: the comparison it exists for is accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, write_results

BENCH = Path(__file__).resolve().parent
DEFAULT_DATA = BENCH.parent / ".." / "shared" / "data" / "cifar10-jpeg"
HOLDOUT_SEED = 12345  # fixes which training images are held out, apart from the runs' seeds


def holdout(train, fraction: float):
    from convnet.data import Split

    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(train))
    n_val = int(len(train) * fraction)
    val, rest = np.sort(order[:n_val]), np.sort(order[n_val:])
    return (Split(train.images[rest], train.labels[rest], train.classes),
            Split(train.images[val], train.labels[val], train.classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--batch-sizes", default="", help="comma-separated; empty: preset default")
    parser.add_argument("--epochs", default="", help="comma-separated; empty: preset default")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=None,
                        help="results path without suffix (default bench/results/"
                             "choose_on_val_PRESET)")
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from convnet import data
    from convnet.train import TrainConfig, train

    def ints(text: str) -> list:
        return [int(v) for v in text.split(",") if v] or [None]

    def floats(text: str) -> list:
        return [float(v) for v in text.split(",") if v] or [None]

    splits = data.load_dataset(args.data)
    fit_part, val_part = holdout(splits["train"], args.val_fraction)
    print(f"training on {len(fit_part)} images, choosing on {len(val_part)} held-out training "
          f"images (the test set is not read)", flush=True)

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch, epochs, seed in itertools.product(ints(args.batch_sizes), floats(args.epochs),
                                                     ints(args.seeds)):
            cfg = TrainConfig(preset=args.preset, batch_size=batch, epochs=epochs, seed=seed,
                              data=str(args.data))
            started = time.time()
            vdir = train(cfg, fit_part, Path(tmp) / f"run{len(runs)}", test_split=val_part,
                         verbose=2)
            m = json.loads((vdir / "metrics.json").read_text())
            c = json.loads((vdir / "config.json").read_text())
            run = {"preset": args.preset, "batch_size": c["batch_size"], "epochs": m["epochs"],
                   "seed": seed, "val_accuracy": m["accuracy"],
                   "val_accuracy_no_tta": m["accuracy_no_tta"],
                   "train_seconds": m["train_seconds"], "wall_seconds": time.time() - started}
            runs.append(run)
            print(f"run {len(runs)}: batch {run['batch_size']}, epochs {run['epochs']}, seed "
                  f"{seed}: val {run['val_accuracy']:.2%} (no TTA "
                  f"{run['val_accuracy_no_tta']:.2%}) in {run['train_seconds']:.0f} s",
                  flush=True)

    lines = ["| preset | batch | epochs | seed | val acc (TTA) | val acc (no TTA) | train s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['preset']} | {r['batch_size']} | {r['epochs']} | {r['seed']} | "
              f"{r['val_accuracy']:.2%} | {r['val_accuracy_no_tta']:.2%} | "
              f"{r['train_seconds']:.0f} |" for r in runs]
    lines += ["", "| batch | epochs | runs | mean val acc (TTA) | lowest | mean (no TTA) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for key, group in itertools.groupby(sorted(runs, key=lambda r: (r["batch_size"], r["epochs"])),
                                        key=lambda r: (r["batch_size"], r["epochs"])):
        group = list(group)
        acc = [r["val_accuracy"] for r in group]
        plain = [r["val_accuracy_no_tta"] for r in group]
        lines.append(f"| {key[0]} | {key[1]} | {len(group)} | {np.mean(acc):.2%} | "
                     f"{min(acc):.2%} | {np.mean(plain):.2%} |")
    table = "\n".join(lines)
    print(table)

    held_out = (f"held out: {len(val_part)} of {len(splits['train'])} training images "
                f"(permutation seed {HOLDOUT_SEED}); the test set is not read")
    write_results(args.out or RESULTS / f"choose_on_val_{args.preset}",
                  "Settings chosen on a validation split (`bench/choose_on_val.py`)", table,
                  {"held_out": held_out, "runs": runs}, notes=(held_out,))

if __name__ == "__main__":
    main()

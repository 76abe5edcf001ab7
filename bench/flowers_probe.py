"""Probes behind the photo defaults: train on the flowers split of bench/flowers.py (80% of
train.tar.gz) with chosen settings and score on its held-out 20%, in one process.

    python bench/flowers_probe.py --run "image_size=64 epochs=20" --run "image_size=96 epochs=20"

Each --run is space-separated TrainConfig fields (image_size decides the decoded size too;
anything left out is the library's default, with augment=photo), and two settings of the
experiment: `keep=CLASS:FRACTION` trains on only that fraction of a class's images (an imbalanced
set; the held-out images stay as they are), `weight_ratio=R` weights the classes when the largest
has R times the images of the smallest (train.IMBALANCE_RATIO; 1 weights any imbalance).
Results are appended to bench/results/flowers_probes.jsonl as each run ends, and
bench/results/flowers_probes.md is rewritten from all of them. Short runs, to compare settings;
the figures that count are bench/flowers.py's, from the plain command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from common import RESULTS, write_results
from flowers import DEFAULT_ARCHIVE, split_archive

LOG = RESULTS / "flowers_probes.jsonl"


def parse(text: str, fields: dict) -> dict:
    settings: dict = {}
    for item in text.split():
        key, _, value = item.partition("=")
        if key in ("keep", "weight_ratio"):
            settings[key] = value
            continue
        if key not in fields:
            raise SystemExit(f"unknown TrainConfig field {key!r}")
        kind = str(fields[key].type)
        if "bool" in kind:
            settings[key] = value.lower() in ("1", "true", "yes")
        elif "int" in kind and "float" not in kind:
            settings[key] = int(value)
        elif "float" in kind:
            settings[key] = float(value)
        else:
            settings[key] = value
    return settings


def render() -> None:
    rows = [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()]
    lines = ["| # | settings | val acc (TTA) | no TTA | balanced | train s | s/epoch |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(rows, 1):
        balanced = f"{r['balanced_accuracy']:.2%}" if "balanced_accuracy" in r else "-"
        lines.append(f"| {i} | `{r['settings']}` | {r['accuracy']:.2%} | "
                     f"{r['accuracy_no_tta']:.2%} | {balanced} | {r['train_seconds']:.0f} | "
                     f"{r['train_seconds'] / r['epochs']:.1f} |")
    write_results(RESULTS / "flowers_probes", "Flowers probes (`bench/flowers_probe.py`)",
                  "\n".join(lines), {"runs": rows},
                  notes=("trained on 80% of train.tar.gz, scored on the held-out 20% "
                         "(bench/flowers.py's split)", "command: the last probe's; each row "
                         "is one `--run`"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[])
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--work", type=Path,
                        default=Path(tempfile.gettempdir()) / "flowers-bench")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from convnet import data
    from convnet import train as training
    from convnet.data import Split
    from convnet.train import TrainConfig, train

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    split_dir = args.work / "split"
    split_archive(args.archive, split_dir)
    for text in args.run:
        settings = {"augment": "photo", **parse(text, fields)}
        size = settings.setdefault("image_size", 64)
        splits = data.load_dataset(split_dir, size=size)
        fit = splits["train"]
        if "keep" in settings:
            name, fraction = settings.pop("keep").split(":")
            members = np.flatnonzero(fit.labels == fit.classes.index(name))
            dropped = members[int(len(members) * float(fraction)):]
            kept = np.setdiff1d(np.arange(len(fit)), dropped)
            fit = Split(fit.images[kept], fit.labels[kept], fit.classes)
        training.IMBALANCE_RATIO = float(settings.pop("weight_ratio", 2.0))
        cfg = TrainConfig(data=str(split_dir), **settings)
        started = time.time()
        version = train(cfg, fit, args.work / "probes", test_split=splits["test"], verbose=2)
        metrics = json.loads((version / "metrics.json").read_text())
        row = {"settings": text, "version": str(version), "accuracy": metrics["accuracy"],
               "balanced_accuracy": metrics["balanced_accuracy"],
               "per_class_recall": metrics["per_class_recall"],
               "accuracy_no_tta": metrics["accuracy_no_tta"], "epochs": metrics["epochs"],
               "batch_size": metrics["batch_size"], "train_seconds": metrics["train_seconds"],
               "wall_seconds": round(time.time() - started, 1), "params": metrics["params"],
               "flops_per_image": metrics["flops_per_image"]}
        print(json.dumps(row), flush=True)
        with open(LOG, "a") as f:
            f.write(json.dumps(row) + "\n")
        render()


if __name__ == "__main__":
    main()

"""Flowers benchmark: the plain `convnet train --data DIR --out OUT` on real photos, scored on a
fixed held-out split of the training archive.

    python bench/flowers.py [--seeds 0,1,2] [--archive ../shared/data/flowers/train.tar.gz]

`train.tar.gz` (2,935 photos of 5 flower classes, long side <= 256 px) is split once into
`train/<class>/` (80%) and `test/<class>/` (a stratified 20%, chosen by HOLDOUT_SEED from each
class's file names in name order) under a work folder outside the repository; the photos are
copied as they are, never re-encoded. Then, once per seed, the command a user would type runs on
that folder with nothing but `--data`, `--out` and `--seed`, each with an empty dataset cache, so
its wall time runs from the command to the published version (decoding, training, ONNX export,
scoring). The accuracy is the published model's on the held-out 20% (its metrics.json: test-time
augmentation on, as `convnet train` scores by default). The held-back test photos (the other 20%
of the original set) are never read: they are not here.

Prints a table as it goes and writes bench/results/flowers.md and .json (command, date, machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, write_results

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEFAULT_ARCHIVE = ROOT / ".." / "shared" / "data" / "flowers" / "train.tar.gz"
HOLDOUT_SEED = 12345  # which photos are held out; apart from the runs' seeds
HOLDOUT = 0.2


def split_archive(archive: Path, dest: Path, fraction: float = HOLDOUT) -> dict[str, dict]:
    """Write dest/train/<class>/* and dest/test/<class>/* from an archive of <class>/<photo>
    folders (any wrapping folders), holding out `fraction` of each class. Returns the counts.
    Reuses dest if a previous call completed it."""
    done = dest / "split.json"
    if done.is_file():
        return json.loads(done.read_text())
    by_class: dict[str, dict[str, bytes]] = {}
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 2 or parts[-1].startswith("."):
                continue
            stream = tar.extractfile(member)
            if stream is not None:
                by_class.setdefault(parts[-2], {})[parts[-1]] = stream.read()
    rng = np.random.default_rng(HOLDOUT_SEED)
    counts: dict[str, dict] = {"train": {}, "test": {}}
    for name in sorted(by_class):
        files = sorted(by_class[name])
        held = set(rng.choice(len(files), round(len(files) * fraction), replace=False).tolist())
        for i, file in enumerate(files):
            split = "test" if i in held else "train"
            target = dest / split / name / file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(by_class[name][file])
            counts[split][name] = counts[split].get(name, 0) + 1
    done.write_text(json.dumps(counts))
    return counts


def latest_version(root: Path) -> Path:
    return root / str(max(int(p.name) for p in root.iterdir() if p.name.isdigit()))


def run_plain(data: Path, out: Path, seed: int, log: Path) -> dict:
    """`convnet train --data DATA --out OUT --seed SEED` with an empty dataset cache; its
    metrics and wall time."""
    cache = Path(tempfile.mkdtemp(prefix="convnet-cache-"))
    command = [str(ROOT / ".venv" / "bin" / "convnet"), "train", "--data", str(data),
               "--out", str(out), "--seed", str(seed)]
    started = time.time()
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "CONVNET_CACHE_DIR": str(cache)})
    wall = time.time() - started
    shutil.rmtree(cache, ignore_errors=True)
    if done.returncode:
        raise SystemExit(f"seed {seed} failed ({done.returncode}); see {log}")
    version = latest_version(out)
    metrics = json.loads((version / "metrics.json").read_text())
    return {"seed": seed, "accuracy": metrics["accuracy"],
            "accuracy_no_tta": metrics["accuracy_no_tta"],
            "balanced_accuracy": metrics.get("balanced_accuracy"),
            "wall_seconds": round(wall, 1), "train_seconds": metrics["train_seconds"],
            "image_size": metrics.get("image_size"), "epochs": metrics["epochs"],
            "batch_size": metrics.get("batch_size"), "preset": metrics["preset"],
            "num_train": metrics["num_train"], "num_test": metrics["num_test"],
            "command": " ".join(["convnet", *command[1:]]), "version": str(version)}


def table(runs: list[dict]) -> str:
    lines = ["| seed | held-out acc (TTA) | no TTA | balanced | wall time | training | image "
             "size | epochs | batch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        minutes, seconds = divmod(round(r["wall_seconds"]), 60)
        lines.append(f"| {r['seed']} | {r['accuracy']:.2%} | {r['accuracy_no_tta']:.2%} | "
                     f"{r['balanced_accuracy']:.2%} | {minutes}:{seconds:02d} | "
                     f"{r['train_seconds']:.0f} s | {r['image_size']} | {r['epochs']} | "
                     f"{r['batch_size']} |")
    if len(runs) > 1:
        acc = [r["accuracy"] for r in runs]
        wall = [r["wall_seconds"] for r in runs]
        lines += ["", f"mean {np.mean(acc):.2%} (lowest {min(acc):.2%}), wall time mean "
                      f"{np.mean(wall) / 60:.1f} min (longest {max(wall) / 60:.1f} min)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "flowers-bench",
                        help="folder for the split and the trained models (outside the repo)")
    parser.add_argument("--out", type=Path, default=RESULTS / "flowers",
                        help="results path without suffix")
    args = parser.parse_args()

    data = args.work / "split"
    counts = split_archive(args.archive, data)
    held = (f"held out: {sum(counts['test'].values())} of "
            f"{sum(counts['train'].values()) + sum(counts['test'].values())} photos of "
            f"{args.archive.name}, 20% of each class (seed {HOLDOUT_SEED}); the command trains "
            f"on the other {sum(counts['train'].values())}")
    print(held, flush=True)
    runs = []
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        out = args.work / f"models-seed{seed}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"seed {seed}: training (log: {args.work / f'seed{seed}.log'}) ...", flush=True)
        run = run_plain(data, out, seed, args.work / f"seed{seed}.log")
        runs.append(run)
        print(f"seed {seed}: {run['accuracy']:.2%} held-out accuracy (no TTA "
              f"{run['accuracy_no_tta']:.2%}) in {run['wall_seconds'] / 60:.1f} min wall, "
              f"{run['image_size']} px, {run['epochs']} epochs at batch {run['batch_size']}",
              flush=True)
        print(table(runs), flush=True)
    write_results(args.out, "Flowers: the plain command on held-out photos (`bench/flowers.py`)",
                  table(runs), {"held_out": held, "counts": counts, "runs": runs},
                  notes=(held, "command per run: `convnet train --data SPLIT --out OUT --seed N`"
                               " with an empty CONVNET_CACHE_DIR"))


if __name__ == "__main__":
    main()

"""Dataset loading with and without the decoded-array cache: python bench/data_cache.py [DATA]

Loads DATA (default: the shared CIFAR-10 JPEG folder, 55,000 images) through
`convnet.data.load_dataset` into an empty cache folder (decoding every image, then writing the
cache), then again from the cache, `--runs` times each, each in a fresh process so that no
in-process state or warm import helps. Prints a table and writes bench/results/data_cache.md/.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import RESULTS, write_results

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg"

# Runs in a child process: one load, timed, with the image count.
CHILD = """
import json, sys, time
from convnet.data import load_dataset
started = time.perf_counter()
splits = load_dataset(sys.argv[1])
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "images": sum(len(s) for s in splits.values())}))
"""


def load_once(data: str, cache: Path) -> dict:
    env = {**os.environ, "CONVNET_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", CHILD, data], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(DEFAULT_DATA))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "data_cache")
    args = parser.parse_args()

    cold, warm = [], []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(load_once(args.data, Path(cache)))
            warm.append(load_once(args.data, Path(cache)))
        print(f"run {run + 1}: decode {cold[-1]['seconds']:.2f} s, cached "
              f"{warm[-1]['seconds']:.3f} s ({cold[-1]['images']} images)", flush=True)
    images = cold[0]["images"]
    rows = [("decode (empty cache)", [r["seconds"] for r in cold]),
            ("from the cache", [r["seconds"] for r in warm])]
    table = "\n".join(
        ["| load | images | median s | runs (s) |", "| --- | --- | --- | --- |"]
        + [f"| {name} | {images:,} | {np.median(s):.3f} | {', '.join(f'{x:.3f}' for x in s)} |"
           for name, s in rows])
    print(table)
    write_results(args.out, "Dataset loading and its cache (`bench/data_cache.py`)", table,
                  {"data": args.data, "cold": cold, "warm": warm},
                  notes=(f"data: {args.data}", "each load in a fresh Python process "
                         "(`convnet.data.load_dataset`), the cache in a new temporary folder "
                         "per run"))


if __name__ == "__main__":
    main()

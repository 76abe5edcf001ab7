"""Peak memory of training on many photos: python bench/photo_memory.py [--images N] [--size S]

Writes a synthetic photo folder (JPEGs of 160x120 to 200x150 px, 5 classes) to a temporary folder,
then in a fresh process: loads it at --size through `convnet.data.load_dataset` (decoding, then the
cache written), loads it again from the cache, computes the normalisation statistics, runs one
epoch of the photo pipeline's batches (random resized crops, batch 64) and trains the fast preset
for a few steps on them; it prints the peak resident memory after each stage (ru_maxrss). Writes
bench/results/photo_memory.md/.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, write_results

CHILD = r"""
import json, resource, sys, time
import numpy as np

def peak():  # MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

stages = []
def mark(name, started):
    stages.append({"stage": name, "peak_mib": round(peak()),
                   "seconds": round(time.time() - started, 1)})
    print(stages[-1], flush=True)

from convnet import data, models
size = int(sys.argv[2])
t = time.time()
splits = data.load_dataset(sys.argv[1], size=size)
mark("decode and write the cache", t)
del splits
t = time.time()
train = data.load_dataset(sys.argv[1], size=size)["train"]
mark("load from the cache", t)
t = time.time()
stats = models.pixel_stats(train.images)
mark("pixel statistics", t)
from convnet.train import Batches, TrainConfig
from convnet.train.recipe import build_model
cfg = TrainConfig(batch_size=64, augment="photo")
batches = Batches(train, cfg, len(train.classes))
t = time.time()
for i in range(batches.steps_per_epoch):
    batches[i]
mark("one epoch of photo batches", t)
t = time.time()
model = build_model(cfg, train.images, len(train.classes), 100, stats)
model.fit(batches.tf_dataset(), epochs=1, steps_per_epoch=5, verbose=0)
mark("fast preset: whitening and 5 training steps", t)
print("RESULT " + json.dumps({"images": len(train), "bytes": int(train.images.nbytes),
                              "stages": stages}))
"""


def write_photos(root: Path, count: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (8, 150, 200, 3), dtype=np.uint8)  # a few textures, reused
    for i in range(count):
        folder = root / "train" / f"class{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        width, height = (200, 150) if i % 2 else (160, 120)
        image = Image.fromarray(base[i % 8, :height, :width])
        image.save(folder / f"{i}.jpg", quality=85)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        print(f"writing {args.images} synthetic photos ...", flush=True)
        write_photos(root, args.images)
        env = {**os.environ, "CONVNET_CACHE_DIR": str(Path(tmp) / "cache"),
               "TF_CPP_MIN_LOG_LEVEL": "2"}
        done = subprocess.run([sys.executable, "-c", CHILD, str(root), str(args.size)], env=env,
                              capture_output=True, text=True)
        print(done.stdout, done.stderr[-2000:] if done.returncode else "", flush=True)
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        result = json.loads(line[len("RESULT "):])
    rows = ["| stage | peak resident memory | seconds |", "| --- | --- | --- |"]
    rows += [f"| {s['stage']} | {s['peak_mib'] / 1024:.2f} GiB | {s['seconds']} |"
             for s in result["stages"]]
    body = (f"{result['images']:,} photos at {args.size}x{args.size}: the decoded images take "
            f"{result['bytes'] / 2**30:.2f} GiB\n\n" + "\n".join(rows))
    print(body)
    write_results(RESULTS / "photo_memory", "Peak memory with many photos "
                  "(`bench/photo_memory.py`)", body, result)


if __name__ == "__main__":
    main()

"""Make the bundled flowers model: python bench/bundle_flowers.py [--from VERSION_DIR]

Trains with the plain command on bench/flowers.py's split of the shared flowers archive (80% of
each class; the other 20% scores it and, half of it, calibrates it), with --seed (default 0),
exactly as `python bench/flowers.py --seeds N` does, then copies the version's serving files (no
model.keras) into src/convnet/bundled/flowers/<next version>/ with the photographers' credits
(LICENSE.txt: the photos are CC-BY 2.0 and the model is made from them). `--from` copies an
already trained version of that command instead of training again. Served with
`make serve MODEL=flowers`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from flowers import DEFAULT_ARCHIVE, latest_version, run_plain, split_archive

from convnet import modeldir

BUNDLE = Path(__file__).resolve().parents[1] / "src" / "convnet" / "bundled" / "flowers"
SERVING_FILES = ("model.onnx", "labels.json", "metrics.json", "config.json", "calibration.json",
                 "reliability.png", "confusion.png", "curves.png", "mistakes.json")


def bundle(version: Path, credits: Path, root: Path = BUNDLE) -> Path:
    """Publish `version`'s serving files, and the credits, as the next version under `root`."""
    staged = modeldir.staging_dir(root)
    try:
        for name in SERVING_FILES:
            if (version / name).is_file():
                shutil.copy2(version / name, staged / name)
        shutil.copy2(credits, staged / "LICENSE.txt")
        data = (f"{credits.parent.name}/train.tar.gz: 80% of each class (bench/flowers.py's "
                "split); the other 20% scored it and, half of it, calibrated it")
        metrics = modeldir.load_metrics(staged)  # the work folder's path means nothing elsewhere
        config = modeldir.read_json(staged / modeldir.CONFIG_FILE)
        metrics.update(data=data, trained_by="bench/flowers.py's plain command, `convnet train "
                       f"--data SPLIT --out OUT --seed {config['seed']}`, 2-core CPU machine")
        modeldir.write_json_atomic(staged / modeldir.METRICS_FILE, metrics)
        modeldir.write_json_atomic(staged / modeldir.CONFIG_FILE, {**config, "data": data})
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return modeldir.publish(root, staged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--from", dest="source", type=Path, default=None,
                        help="a version trained by the plain command on the split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path,
                        default=Path(tempfile.gettempdir()) / "flowers-bench")
    args = parser.parse_args()
    source = args.source
    if source is None:
        split = args.work / "split"
        split_archive(args.archive, split)
        out = args.work / "bundle-run"
        shutil.rmtree(out, ignore_errors=True)
        run = run_plain(split, out, args.seed, args.work / "bundle-run.log")
        source = latest_version(out)
        print(f"trained: {run['accuracy']:.2%} on the held-out 20% in "
              f"{run['wall_seconds'] / 60:.1f} min", flush=True)
    published = bundle(modeldir.resolve_version(source), args.archive.parent / "LICENSE.txt")
    size = sum(p.stat().st_size for p in published.iterdir()) / 2**20
    print(f"bundled {source} as {published} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()

"""Does training with synthetic outliers make "not sure" catch photos of other things?
python bench/outlier_exposure.py [--preset quick] [--fraction 0.125] [--seeds 0]

Trains the preset on the shared CIFAR-10 JPEGs twice per seed with the plain command
(`convnet train --data D --preset P --seed S`), once as is and once with `--outliers F`
(F x batch synthetic outliers with a flat target added to every batch: convnet.outliers), then
scores each model as bench/unsure.py does: CIFAR-10 test images against the shared flower
photos, threshold at 5% of the correct answers of the calibration's fitting half. Reports test
accuracy (TTA) and, for the energy score the server ships, AUROC and photos flagged, before and
after the photos' 32 px JPEG round trip. Writes bench/results/outlier_exposure.md and .json.
About 12 minutes per seed for quick on 2 cores (two trainings and the scoring).
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
from unsure import SHARED, measure

ROOT = Path(__file__).resolve().parents[1]


def train(data: Path, preset: str, seed: int, fraction: float, out: Path,
          extra: list[str]) -> Path:
    command = [str(Path(sys.executable).parent / "convnet"), "train", "--data", str(data),
               "--preset", preset, "--seed", str(seed), "--out", str(out), *extra]
    if fraction:
        command += ["--outliers", str(fraction)]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return max((p for p in out.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "cifar10-jpeg")
    parser.add_argument("--ood", type=Path, default=SHARED / "flowers" / "train.tar.gz")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--fraction", type=float, default=0.125)
    parser.add_argument("--seeds", default="0", help="comma-separated")
    parser.add_argument("--train-args", default="",
                        help="more `convnet train` options for both arms, e.g. "
                             "'--precision bfloat16 --epochs 9'")
    parser.add_argument("--plain", type=Path, default=None,
                        help="an existing version trained by the plain arm's exact command "
                             "(one seed): scored instead of trained again")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the models go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "outlier_exposure")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="outlier-exposure-"))
    rows = []
    table = ["| seed | outliers | test acc (TTA) | energy AUROC | photos flagged | correct "
             "flagged | AUROC after JPEG q75 | flagged after it |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for seed in (int(s) for s in args.seeds.split(",")):
        for fraction in (0.0, args.fraction):
            if fraction == 0 and args.plain is not None:
                vdir = args.plain
            else:
                vdir = train(args.data, args.preset, seed, fraction,
                             work / f"seed{seed}-outliers{fraction:g}", args.train_args.split())
            accuracy = json.loads((vdir / "metrics.json").read_text())["accuracy"]
            scores, _, _ = measure(vdir, args.data, args.ood)
            energy = next(r for r in scores if r["score"] == "energy")
            rows.append({"seed": seed, "outliers": fraction, "accuracy": accuracy,
                         "version": str(vdir), **energy})
            table.append(f"| {seed} | {fraction:g} | {accuracy:.2%} | {energy['auroc']:.3f} | "
                         f"{energy['ood_flagged']:.1%} | {energy['correct_flagged']:.1%} | "
                         f"{energy['auroc_jpeg']:.3f} | {energy['ood_flagged_jpeg']:.1%} |")
            print(table[-1], flush=True)
    text = "\n".join(table)
    print(text)
    notes = (f"preset {args.preset} {args.train_args}, trained on {args.data} (train), scored on "
             "its test split" + (f"; the plain arm is {args.plain}, made by the same command"
                                 if args.plain else ""),
             f"out-of-distribution: {args.ood}",
             "outliers: the fraction of each batch added as synthetic outliers (0 = the plain "
             "command)")
    write_results(args.out, "Outlier exposure with synthetic outliers "
                  "(`bench/outlier_exposure.py`)", text, {"rows": rows}, notes=notes)


if __name__ == "__main__":
    main()

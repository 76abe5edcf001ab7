"""Static int8 quantization of a model version: which settings keep its accuracy, and how much
faster the int8 model runs on one CPU core.

Quantizes the version's model.onnx with each setting in GRID (calibrated on the same few hundred
training images), scores every result on the whole test split (plain, no test-time
augmentation) and gives it a quick speed check, then picks, among the settings within MAX_DROP of
float accuracy and SPEED_TIE of the fastest, the one that gives float's answer most often (a
steadier measure of what 8 bits lost than accuracy, which moves by 0.02 points per image here).
Then it times float and the pick on one core:
single-image latency and batch-64 throughput, float and int8 calls alternating (the machine's
speed drifts; the ratio is the figure to trust).

    .venv/bin/python bench/quantize.py                       # the bundled model, ~10 min
    .venv/bin/python bench/quantize.py --model runs/cifar10 --write   # also model.int8.onnx

--write puts the pick into the version folder (model.int8.onnx, metrics.json's "int8"), only if
it holds the accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
from common import RESULTS, write_results

from convnet import data, modeldir, quantize
from convnet.quantize import QuantConfig

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg"
MAX_DROP = 0.003  # accuracy (fraction) the int8 model may lose against float
# Settings this close to the fastest count as equally fast: the quick check varies by 30% between
# runs of the same graph on a busy machine, while int8 activations (s8s8) run at half the speed.
SPEED_TIE = 0.6
DEFAULT = QuantConfig()
GRID = {  # name -> setting; "naive" is the first try recorded in issue 16
    "naive": QuantConfig(method="minmax", keep_stem=False, keep_head=False, all_ops=True),
    "minmax": QuantConfig(method="minmax", keep_stem=False, keep_head=False),
    "minmax, float stem+head": QuantConfig(method="minmax"),
    "entropy, float stem+head": QuantConfig(method="entropy"),
    "percentile": QuantConfig(keep_stem=False, keep_head=False),
    "percentile, float stem+head": DEFAULT,
    "  + int8 symmetric activations": QuantConfig(symmetric_activations=True),
    "  + per-tensor weights": QuantConfig(per_channel=False),
    "  + no pre-processing": QuantConfig(preprocess=False),
    "  + reduce range": QuantConfig(reduce_range=True),
}


def session(model_bytes: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def probabilities(model_bytes: bytes, images: np.ndarray, threads: int) -> np.ndarray:
    run = session(model_bytes, threads)
    return np.concatenate([run.run(["probabilities"], {"pixels": images[i : i + 500]})[0]
                           for i in range(0, len(images), 500)])


def time_calls(float_model: bytes, int8_model: bytes, pixels: np.ndarray, rounds: int,
               seconds: float) -> dict:
    """One-thread timing of float against int8 on `pixels`. Calls alternate (float, int8, float,
    ...), so each int8 call has a float call made just before it under the same load: the
    speed-up is the median of those pairs' ratios. ms/call: the median call of the quietest of
    `rounds` rounds (about `seconds` per model each), the least disturbed by other work."""
    sessions = {"float": session(float_model, 1), "int8": session(int8_model, 1)}
    feed = {"pixels": pixels}
    for run in sessions.values():
        run.run(None, feed)  # warm-up
    medians: dict[str, list[float]] = {name: [] for name in sessions}
    pairs: list[float] = []
    for _ in range(rounds):
        times: dict[str, list[float]] = {name: [] for name in sessions}
        ends = time.perf_counter() + 2 * seconds
        while time.perf_counter() < ends:
            for name, run in sessions.items():
                started = time.perf_counter()
                run.run(None, feed)
                times[name].append(time.perf_counter() - started)
        pairs += [f / q for f, q in zip(times["float"], times["int8"], strict=True)]
        for name, taken in times.items():
            medians[name].append(statistics.median(taken))
    return {"float_ms": 1000 * min(medians["float"]), "int8_ms": 1000 * min(medians["int8"]),
            "speedup": statistics.median(pairs), "pairs": len(pairs),
            "speedup_quartiles": [float(q) for q in np.percentile(pairs, [25, 75])],
            "round_medians_ms": {k: [1000 * v for v in vs] for k, vs in medians.items()}}


def choose(rows: list[dict], float_accuracy: float) -> dict | None:
    holding = [r for r in rows if r["accuracy"] >= float_accuracy - MAX_DROP - 1e-9]
    if not holding:
        return None
    fastest = max(r["speedup_b64"] for r in holding)
    return max((r for r in holding if r["speedup_b64"] >= SPEED_TIE * fastest),
               key=lambda r: (r["agreement"], r["accuracy"]))  # exact ties: GRID's order


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model root or version (default: bundled)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--calibration-images", type=int, default=quantize.CALIBRATION_IMAGES)
    parser.add_argument("--eval-threads", type=int, default=2,
                        help="ONNX Runtime threads for scoring (timing always uses 1)")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds, float and int8")
    parser.add_argument("--seconds", type=float, default=2.0, help="per session per round")
    parser.add_argument("--write", action="store_true",
                        help="write the pick into the version folder if it holds accuracy")
    parser.add_argument("--out", type=Path, default=RESULTS / "quantize")
    args = parser.parse_args(argv)

    vdir = modeldir.resolve_version(args.model)
    float_bytes = (vdir / modeldir.ONNX_FILE).read_bytes()
    splits = data.load_dataset(args.data)
    train, test = splits["train"], splits["test"]
    calib = train.images[quantize.calibration_sample(train.labels, args.calibration_images)]
    print(f"model {vdir}; {len(calib)} calibration images (train), {len(test)} test images",
          flush=True)

    float_probs = probabilities(float_bytes, test.images, args.eval_threads)
    float_accuracy = float((float_probs.argmax(1) == test.labels).mean())
    print(f"float: accuracy {float_accuracy:.4f}", flush=True)
    batch64 = test.images[:64]
    rows, models = [], {}
    for name, config in GRID.items():
        started = time.perf_counter()
        models[name] = quantize.quantize_model(float_bytes, calib, config)
        took = time.perf_counter() - started
        probs = probabilities(models[name], test.images, args.eval_threads)
        quick = time_calls(float_bytes, models[name], batch64, 3, 1.5)
        rows.append({"name": name.strip(), "config": asdict(config),
                     "describe": config.describe(),
                     "accuracy": float((probs.argmax(1) == test.labels).mean()),
                     "agreement": float((probs.argmax(1) == float_probs.argmax(1)).mean()),
                     "speedup_b64": quick["speedup"], "quantize_s": took,
                     "mb": len(models[name]) / 2**20})
        print(format_row(rows[-1], float_accuracy), flush=True)

    pick = choose(rows, float_accuracy)
    timing = {}
    if pick is not None:
        pick_bytes = models[next(n for n in GRID if n.strip() == pick["name"])]
        for label, pixels in (("batch 1", test.images[:1]), ("batch 64", batch64)):
            timing[label] = time_calls(float_bytes, pick_bytes, pixels, args.rounds,
                                       args.seconds)
            print(f"{label}: float {timing[label]['float_ms']:.2f} ms, int8 "
                  f"{timing[label]['int8_ms']:.2f} ms per call, {timing[label]['speedup']:.2f}x",
                  flush=True)
        if args.write:
            written = quantize.add_int8(
                vdir, calib, QuantConfig(**pick["config"]),
                source=f"{args.data} (train, {len(calib)} images)",
                facts={"accuracy_no_tta": pick["accuracy"], "float_accuracy_no_tta": float_accuracy,
                       "agreement_with_float": pick["agreement"], "test_images": len(test),
                       "measured_by": "bench/quantize.py"})
            print(f"wrote {written}")
    report(args, vdir, float_accuracy, len(test), len(calib), rows, pick, timing)


def format_row(row: dict, float_accuracy: float) -> str:
    drop = 100 * (row["accuracy"] - float_accuracy)
    return (f"| {row['name']} | {row['describe']} | {100 * row['accuracy']:.2f} | {drop:+.2f} | "
            f"{100 * row['agreement']:.1f} | {row['speedup_b64']:.2f}x | {row['mb']:.1f} |")


TABLE_HEAD = ("| setting | in full | accuracy % | vs float (points) | same answer as float % | "
              "batch-64 speed-up, 1 core (quick) | MB |\n|---|---|---:|---:|---:|---:|---:|")


def report(args, vdir, float_accuracy, num_test, num_calib, rows, pick, timing) -> None:
    lines = [f"Float: {100 * float_accuracy:.2f}% on {num_test} test images (no TTA). "
             f"Every int8 model calibrated on the same {num_calib} training images; a row's "
             "speed-up is a quick check (batch 64, one thread, 3 rounds of 1.5 s per model, the "
             "median ratio of alternating calls): enough to rank, not to quote.", "",
             TABLE_HEAD, *(format_row(r, float_accuracy) for r in rows), ""]
    if pick is None:
        lines.append(f"No setting holds accuracy within {100 * MAX_DROP:.1f} points of float.")
    else:
        lines += [f"Chosen: **{pick['name']}** ({pick['describe']}): of the settings within "
                  f"{100 * MAX_DROP:.1f} points of float accuracy and {100 * SPEED_TIE:.0f}% of "
                  "the fastest, the one that gives float's answer most often.", "",
                  "| one core (intra_op_num_threads=1) | float ms/call | int8 ms/call | "
                  "speed-up |", "|---|---:|---:|---:|"]
        for label, t in timing.items():
            images = 64 if label == "batch 64" else 1
            lines.append(f"| {label} ({images * 1000 / t['int8_ms']:.0f} vs "
                         f"{images * 1000 / t['float_ms']:.0f} images/s) | {t['float_ms']:.2f} | "
                         f"{t['int8_ms']:.2f} | {t['speedup']:.2f}x |")
        quartiles = "; ".join(f"{label} {t['speedup_quartiles'][0]:.2f}-"
                              f"{t['speedup_quartiles'][1]:.2f}x over {t['pairs']} pairs"
                              for label, t in timing.items())
        lines += ["", f"Timing: {args.rounds} rounds of about {args.seconds:g} s per model, calls "
                  "alternating float, int8, float, ...; the speed-up is the median ratio of a "
                  f"float call to the int8 call right after it (interquartile range: {quartiles}); "
                  "ms/call is the median call of the quietest round. The machine was shared with "
                  "other work during the run (this script ran under `nice -n 19`), so absolute "
                  "times vary by round; the ratio is the figure to use."]
    write_results(args.out, "int8 quantization", "\n".join(lines),
                  {"model": str(vdir), "float_accuracy": float_accuracy, "test_images": num_test,
                   "calibration_images": num_calib, "max_drop": MAX_DROP, "rows": rows,
                   "chosen": pick, "timing": timing},
                  extra=f"onnxruntime {ort.__version__}")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

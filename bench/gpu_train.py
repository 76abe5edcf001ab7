"""airbench94 (PyTorch) against `convnet train` (Keras 3 on JAX), side by side on one GPU.

    python bench/gpu_train.py --data ../shared/data/cifar10-jpeg --wheels carry/whl --runs 5

Meant for a GPU machine with PyTorch and JAX but no TensorFlow and no network. Steps:
1. keras, namex, optree and airbench are installed from the wheels in --wheels (when not already
   importable) into a private folder that the worker processes put on their path;
2. the JPEG archives are decoded once (convnet's loader) and handed to both trainers: airbench
   reads its own `cifar10/{train,test}.pt` files, convnet an .npz;
3. airbench94, in a fresh process: one cold run, then --runs warm runs, each `train94()` plus
   its test-time-augmented evaluation, wall-clock with CUDA synchronised;
4. convnet's device loop, in a fresh process: the same, for each value of --epochs (a new value's
   first run is a warm-up and is not counted);
5. `convnet train` from the command line in a fresh process, timed from the command to the
   published model (data from the cache, compilation, training, saving, evaluation).
Prints a table and writes every run to --json. `--limit N` trains on N images only (a smoke test
of the script on a CPU: use --skip-airbench there).

The wheels, fetched where there is a network (airbench is a source archive on PyPI: build it):

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d carry/whl \
        keras==3.15.1 namex==0.1.0 optree==0.20.0
    pip download --no-deps -d /tmp/ab airbench==0.1.8
    pip wheel --no-deps -w carry/whl /tmp/ab/airbench-0.1.8.tar.gz

and the data beside them: `mkdir -p carry/data && cp ../shared/data/cifar10-jpeg/*.tar.gz
carry/data/`; `carry/` is ignored by git and travels to the GPU machine as a carried path.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import stream_child

ROOT = Path(__file__).resolve().parents[1]
WHEEL_NAMES = ("keras", "namex", "optree", "airbench")


def install_wheels(wheels: Path, site: Path) -> None:
    missing = [n for n in WHEEL_NAMES if importlib.util.find_spec(n) is None]
    if not missing:
        return
    files = sorted(str(p) for p in wheels.glob("*.whl") if p.name.split("-")[0] in missing)
    if len(files) < len(missing):
        sys.exit(f"{', '.join(missing)} not importable and not all in {wheels}")
    print(f"installing {len(files)} wheels from {wheels} into {site}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--target", str(site), *files], check=True)


def prepare_data(data: Path, work: Path, limit: int | None) -> Path:
    """Decode once; write the npz convnet's worker reads and airbench's .pt files."""
    sys.path.insert(0, str(ROOT / "src"))
    from convnet.data import load_dataset

    started = time.perf_counter()
    splits = load_dataset(data)
    train, test = splits["train"], splits["test"]
    import numpy as np

    x, y = train.images, train.labels
    if limit:  # a random subset: the loader returns the images grouped by class
        keep = np.random.default_rng(0).permutation(len(x))[:limit]
        x, y = x[keep], y[keep]
    arrays = work / "cifar.npz"

    np.savez(arrays, x=x, y=y, tx=test.images, ty=test.labels,
             classes=np.array(train.classes))
    print(f"decoded {len(x)} train + {len(test)} test images in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    return arrays


AIRBENCH_WORKER = """
import json, os, sys, time
import numpy as np, torch
data = np.load(sys.argv[1])
os.makedirs("cifar10", exist_ok=True)
classes = [str(c) for c in data["classes"]]
for name, x, y in (("train", data["x"], data["y"]), ("test", data["tx"], data["ty"])):
    torch.save({"images": torch.tensor(x), "labels": torch.tensor(y.astype("int64")),
                "classes": classes}, f"cifar10/{name}.pt")
import airbench
runs = []
for run in range(int(sys.argv[2]) + 1):
    torch.cuda.synchronize()
    started = time.perf_counter()
    model = airbench.train94(verbose=False)
    test = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    tta = airbench.evaluate(model, test, tta_level=2)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    plain = airbench.evaluate(model, test, tta_level=0)
    runs.append({"run": run, "cold": run == 0, "seconds": seconds, "accuracy": tta,
                 "accuracy_no_tta": plain, "epochs": 9.9})
    print(f"airbench94 run {run}: {seconds:.3f} s, tta {tta:.4f}, plain {plain:.4f}", flush=True)
print("RESULT " + json.dumps({"device": torch.cuda.get_device_name(),
                              "torch": torch.__version__, "runs": runs}))
"""

CONVNET_WORKER = """
import json, sys, time
import numpy as np
import jax, keras
from convnet import device_loop
data = np.load(sys.argv[1])
x, y, tx, ty = data["x"], data["y"], data["tx"], data["ty"]
runs_per, settings, preset = int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
precision = sys.argv[5] if sys.argv[5] != "auto" else device_loop.default_precision()
runs, seed = [], 0
for index, (epochs, scan) in enumerate(settings):
    trainer = device_loop.trainer(preset, len(data["classes"]), 1024, len(x), precision, scan)
    for run in range(runs_per + 1):
        recipe = device_loop.Recipe(epochs=epochs, seed=seed)
        seed += 1
        result = trainer.run(x, y, tx, ty, recipe)
        runs.append({"run": run, "cold": index == 0 and run == 0, "warmup": run == 0,
                     "seconds": result.seconds, "accuracy": result.accuracy,
                     "accuracy_no_tta": result.accuracy_no_tta, "epochs": epochs,
                     "loop": "scan" if trainer.scan else "step"})
        print(f"convnet {preset} {epochs} epochs ({runs[-1]['loop']}) run {run}: "
              f"{result.seconds:.3f} s, "
              f"tta {result.accuracy:.4f}, plain {result.accuracy_no_tta:.4f}", flush=True)
print("RESULT " + json.dumps({"device": str(jax.devices()[0]), "jax": jax.__version__,
                              "keras": keras.__version__, "precision": precision,
                              "runs": runs}))
"""


def run_worker(name: str, code: str, args: list[str], env: dict, cwd: Path,
               timeout: float) -> dict | None:
    print(f"--- {name}", flush=True)
    return stream_child(name, [sys.executable, "-u", "-c", code, *args], env, cwd, timeout)


def run_cli(data: Path, work: Path, env: dict, epochs: float, preset: str, limit: int | None,
            timeout: float) -> dict | None:
    """`convnet train` in a fresh process; returns wall seconds and the published metrics."""
    out = work / "runs"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "convnet", "train", "--data", str(data.resolve()), "--out",
           str(out), "--preset", preset]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    if limit:  # the smoke test trains on a small folder instead
        cmd[5] = str((work / "small").resolve())
    print("--- " + " ".join(cmd[1:]), flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True,
                          timeout=timeout)
    seconds = time.perf_counter() - started
    tail = [x for x in proc.stdout.splitlines() + proc.stderr.splitlines()
            if not x.startswith(("W0000", "I0000"))][-12:]
    print("  " + "\n  ".join(tail), flush=True)
    if proc.returncode:
        return None
    version = max(out.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
    metrics = json.loads((version / "metrics.json").read_text())
    return {"command": " ".join(["convnet", *cmd[3:]]), "seconds": seconds,
            "train_seconds": metrics["train_seconds"], "accuracy": metrics.get("accuracy"),
            "accuracy_no_tta": metrics.get("accuracy_no_tta"), "version": str(version)}


def summarise(label: str, runs: list[dict]) -> dict:
    warm = [r for r in runs if not r.get("warmup") and not r.get("cold")]
    cold = [r["seconds"] for r in runs if r.get("cold")]
    acc = [r["accuracy"] for r in warm]
    return {
        "trainer": label, "epochs": warm[0]["epochs"] if warm else None, "runs": len(warm),
        "cold_s": cold[0] if cold else None,
        "median_s": statistics.median(r["seconds"] for r in warm) if warm else None,
        "min_s": min(r["seconds"] for r in warm) if warm else None,
        "acc_mean": statistics.mean(acc) if acc else None,
        "acc_min": min(acc) if acc else None, "acc_max": max(acc) if acc else None,
        "acc_no_tta_mean": statistics.mean(r["accuracy_no_tta"] for r in warm) if warm else None,
    }


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with train.tar.gz and test.tar.gz (or any convnet dataset)")
    parser.add_argument("--wheels", type=Path, default=ROOT / "carry" / "whl")
    parser.add_argument("--work", type=Path, default=Path("/tmp/convnet-gpu-bench"))
    parser.add_argument("--runs", type=int, default=5, help="warm runs per trainer and setting")
    parser.add_argument("--epochs", type=float, nargs="+", default=[12.0],
                        help="convnet epoch counts to measure")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="convnet's precision (auto: bfloat16 on a GPU)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gpu_train.json")
    parser.add_argument("--copy-model", type=Path, default=None,
                        help="copy the CLI run's model.keras here")
    parser.add_argument("--limit", type=int, default=None, help="train on this many images")
    parser.add_argument("--cli-epochs", type=float, default=None,
                        help="--epochs for the `convnet train` run (default: its own default)")
    parser.add_argument("--also-step", action="store_true",
                        help="also time the first --epochs with one compiled call per step")
    parser.add_argument("--skip-airbench", action="store_true")
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--timeout", type=float, default=400, help="seconds per worker")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    site = args.work / "site"
    install_wheels(args.wheels, site)
    paths = [str(ROOT / "src"), str(site), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p),
           "KERAS_BACKEND": "jax", "CONVNET_CACHE_DIR": str(args.work / "cache"),
           "PYTHONUNBUFFERED": "1"}
    os.environ["CONVNET_CACHE_DIR"] = env["CONVNET_CACHE_DIR"]
    arrays = prepare_data(args.data, args.work, args.limit)
    if args.limit:
        _write_small_folder(arrays, args.work / "small")

    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
                    "summary": []}
    if not args.skip_airbench:
        airbench = run_worker("airbench94", AIRBENCH_WORKER, [str(arrays), str(args.runs)], env,
                              args.work, args.timeout)
        if airbench:
            report["airbench94"] = airbench
            report["summary"].append(summarise("airbench94 (PyTorch, fp16)", airbench["runs"]))
    settings = [(e, None) for e in args.epochs]
    if args.also_step:
        settings.append((args.epochs[0], False))
    ours = run_worker("convnet", CONVNET_WORKER,
                      [str(arrays), str(args.runs), json.dumps(settings), args.preset,
                       args.precision], env,
                      args.work, args.timeout)
    if ours:
        report["convnet"] = ours
        for loop in ("scan", "step"):
            for epochs in args.epochs:
                runs = [r for r in ours["runs"] if r["epochs"] == epochs and r["loop"] == loop]
                if runs:
                    report["summary"].append(summarise(
                        f"convnet {args.preset} (Keras {ours['keras']}, JAX, "
                        f"{ours['precision']}, {loop} loop)", runs))
    if not args.skip_cli:
        cli = run_cli(args.data, args.work, env, args.cli_epochs, args.preset, args.limit,
                      args.timeout)
        report["cli"] = cli
        if cli and args.copy_model:
            args.copy_model.mkdir(parents=True, exist_ok=True)
            for name in ("model.keras", "metrics.json", "labels.json"):
                shutil.copy(Path(cli["version"]) / name, args.copy_model / name)
    report["device"] = (report.get("airbench94") or report.get("convnet") or {}).get("device")

    print(f"\nGPU training, {report['device']}, {report['date']}")
    print("| trainer | epochs | warm runs | cold s | warm median s | warm min s "
          "| test acc TTA mean (min-max) | no TTA mean |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in report["summary"]:
        print(f"| {s['trainer']} | {s['epochs']} | {s['runs']} | {fmt(s['cold_s'], '.2f')} "
              f"| {fmt(s['median_s'], '.3f')} | {fmt(s['min_s'], '.3f')} "
              f"| {fmt(s['acc_mean'], '.2%')} ({fmt(s['acc_min'], '.2%')}-"
              f"{fmt(s['acc_max'], '.2%')}) | {fmt(s['acc_no_tta_mean'], '.2%')} |")
    base = next((s for s in report["summary"] if s["trainer"].startswith("airbench")), None)
    for s in report["summary"]:
        if base and s is not base and s["median_s"]:
            print(f"ratio of warm medians, {s['trainer']} {s['epochs']} epochs / airbench94: "
                  f"{s['median_s'] / base['median_s']:.3f}")
    cli = report.get("cli")
    if cli:
        print(f"`{cli['command']}` (fresh process, to the published model): "
              f"{cli['seconds']:.1f} s wall, {cli['train_seconds']} s training, "
              f"test accuracy {fmt(cli['accuracy'], '.2%')} (TTA, Keras predictor)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")


def _write_small_folder(arrays: Path, folder: Path) -> None:
    """A small image folder of the limited set, for the smoke test's CLI run."""
    import numpy as np
    from PIL import Image

    data = np.load(arrays)
    shutil.rmtree(folder, ignore_errors=True)
    for split, x, y in (("train", data["x"], data["y"]), ("test", data["tx"][:500],
                                                          data["ty"][:500])):
        for i, (image, label) in enumerate(zip(x, y, strict=True)):
            target = folder / split / str(data["classes"][label])
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(target / f"{i}.png")


if __name__ == "__main__":
    main()

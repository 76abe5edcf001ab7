"""Training stacks side by side on this CPU: the same net, recipe and data on TensorFlow, JAX and
PyTorch (Keras 3 backends), each in float32 and in mixed bfloat16, against the cores' peak.

    .venv/bin/python bench/train_stacks.py                  # throughput, all 6 stacks, ~30 min
    .venv/bin/python bench/train_stacks.py --quick          # smoke test: a few steps at batch 256
    .venv/bin/python bench/train_stacks.py --stacks tf-fp32,torch-bf16 --steps 20
    .venv/bin/python bench/train_stacks.py --no-throughput --epochs 8 --stacks tf-fp32,tf-bf16
                                                            # accuracy only: train_stacks_epochs.md

The torch stacks need bench/.venv-torch (git-ignored; PyPI's torch is the CUDA build, about
5.7 GB with its nvidia-* wheels, and imports without a GPU):

    .venv/bin/python -m venv bench/.venv-torch
    bench/.venv-torch/bin/pip install torch==2.14.1 keras==3.15.1 -e .

For each stack, in its own process and one after another (KERAS_BACKEND is set before Keras is
imported; the torch stacks run on bench/.venv-torch/bin/python, a venv without TensorFlow):
the preset's network built and compiled by the real recipe (convnet.train.recipe.build_model:
airbench init, whitening stem, AirbenchSGD with its triangular schedule, label-smoothed
cross-entropy), fed by the real input pipeline (convnet.train.batches.Batches: real CIFAR-10 from
../shared/data/cifar10-jpeg, flip + translate, tf.data on TensorFlow) at the preset's batch size
through model.fit. The whitening stem is frozen, as in all but the first 3 epochs of a run
(WhitenBiasEpochs), and the lookahead callback is left out on every stack (the fit loop runs it on
TensorFlow only), so every stack does the same work. A callback syncs on each step's loss and
stamps the time; after --warmup steps (compilation), --blocks blocks of --steps steps are timed
and the median block gives images/s.

Mixed bfloat16 is Keras's "mixed_bfloat16" dtype policy (bf16 compute, float32 weights;
BatchNormalization computes its statistics in float32), what `convnet train --precision bfloat16`
uses. On torch, Keras 3.15's conv already hands torch.conv2d channels-last tensors
(keras/src/backend/torch/nn.py: _maybe_convert_to_channels_last), so the torch stacks are
Keras-on-torch with channels-last; no separate plain-torch module is needed.

FLOPs: convnet.models.count_flops (forward multiply-adds x 2 over conv and dense layers); one
training step counts 3x forward (forward, gradient of activations, gradient of weights; the frozen
stem's share is small), the usual convention. Achieved GFLOP/s = images/s x 3 x forward FLOPs.
Peak: a 4096 x 4096 matmul in float32 and in bfloat16 on the cores (torch from the torch venv,
and TensorFlow), best of several calls, and the theoretical peak: cores x clock x FLOP/cycle
(Zen 4: two 256-bit FMA pipes per core: 32 float32 FLOP/cycle; VDPBF16PS on both: 64 bfloat16
FLOP/cycle). The clock is the higher of /proc/cpuinfo's (a VM shows the nominal one) and one
measured by timing a chain of dependent adds (needs a C compiler; this machine boosts to ~3.6 GHz
over its nominal 2.6).

--epochs E also trains each stack's real trainer for E epochs with the preset's schedule, by
the command line (`convnet train --epochs E --precision P` with KERAS_BACKEND set and the stack's
venv), and reports the test accuracy with TTA and the training seconds. On JAX that is the device
loop (what `convnet train` chooses on JAX); on torch the fit loop without the lookahead and stem
freezing callbacks (fit_loop.run_fit runs them on TensorFlow only), so its accuracy is not yet that
of the full recipe. --quick shortens only the throughput part (and sets batch
256 for both); for a quick check of --epochs point --data at a small image folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import RESULTS, stream_child, write_results  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg"
TORCH_PYTHON = ROOT / "bench" / ".venv-torch" / "bin" / "python"
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"
# name -> (Keras backend, precision)
STACKS = {
    "tf-fp32": ("tensorflow", "float32"),
    "tf-bf16": ("tensorflow", "bfloat16"),
    "jax-fp32": ("jax", "float32"),
    "jax-bf16": ("jax", "bfloat16"),
    "torch-fp32": ("torch", "float32"),
    "torch-bf16": ("torch", "bfloat16"),
}
# Theoretical FLOP per cycle per core (see the module docstring).
FLOP_PER_CYCLE = {"float32": 32, "bfloat16": 64}
WORKER_TIMEOUT = 3600  # seconds for one stack's throughput run
MATMUL_N = 4096


def python_for(backend: str) -> Path:
    return TORCH_PYTHON if backend == "torch" else MAIN_PYTHON


def stack_env(backend: str) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONUNBUFFERED": "1"}
    if backend == "tensorflow":
        env["TF_ENABLE_ONEDNN_OPTS"] = "1"
    return env


# ---------------------------------------------------------------- workers (child processes)

def worker_throughput(args) -> dict:
    import keras
    import numpy as np

    from convnet import data, models
    from convnet.train.batches import Batches
    from convnet.train.config import PRESET_BATCH, PRESET_EPOCHS, TrainConfig
    from convnet.train.recipe import build_model

    backend, precision = STACKS[args.worker]
    keras.utils.set_random_seed(0)
    train = data.load_dataset(args.data)["train"]
    batch = args.batch or PRESET_BATCH[args.preset]
    cfg = TrainConfig(preset=args.preset, batch_size=batch, precision=precision,
                      epochs=PRESET_EPOCHS[args.preset])
    batches = Batches(train, cfg, len(train.classes))
    run_steps = batches.steps_per_epoch * PRESET_EPOCHS[args.preset]
    model = build_model(cfg, train.images, len(train.classes), run_steps)
    model.get_layer("whiten").trainable = False  # frozen, as after WhitenBiasEpochs

    stamps: list[float] = []

    class Stamp(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None:
                float(np.asarray(loss))  # wait for the step
            stamps.append(time.perf_counter())

    total = args.warmup + args.blocks * args.steps
    feed = batches.tf_dataset() if backend == "tensorflow" else batches
    started = time.perf_counter()
    model.fit(feed, epochs=1, steps_per_epoch=total, shuffle=False, callbacks=[Stamp()],
              verbose=0)
    wall = time.perf_counter() - started
    blocks = []
    for b in range(args.blocks):
        t0 = stamps[args.warmup + b * args.steps - 1]
        t1 = stamps[args.warmup + (b + 1) * args.steps - 1]
        blocks.append(args.steps * batch / (t1 - t0))
    versions = {"keras": keras.__version__}
    if backend == "torch":
        import torch

        versions["torch"] = torch.__version__
        versions["threads"] = torch.get_num_threads()
    elif backend == "jax":
        import jax

        versions["jax"] = jax.__version__
    else:
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    return {"stack": args.worker, "backend": backend, "precision": precision,
            "batch": batch, "warmup_steps": args.warmup, "steps_per_block": args.steps,
            "block_images_per_s": blocks, "images_per_s": statistics.median(blocks),
            "first_steps_s": stamps[args.warmup - 1] - started if args.warmup else None,
            "wall_s": wall, "forward_flops": models.count_flops(model),
            "params": int(model.count_params()), "dtype_policy": model.dtype_policy.name,
            "versions": versions}


def _best_of(fn, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def worker_peak(args) -> dict:
    """GFLOP/s of an N x N matmul on 2 threads, float32 and bfloat16, in this venv's library."""
    n, out = MATMUL_N, {}
    flop = 2 * n**3
    if args.worker == "peak-torch":
        import torch

        torch.set_num_threads(os.cpu_count() or 2)
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            a = torch.randn(n, n).to(dtype)
            b = torch.randn(n, n).to(dtype)
            out[name] = flop / _best_of(lambda a=a, b=b: torch.matmul(a, b), args.calls) / 1e9
        out["library"] = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    else:
        import tensorflow as tf

        for name, dtype in (("float32", tf.float32), ("bfloat16", tf.bfloat16)):
            a = tf.cast(tf.random.normal((n, n)), dtype)
            b = tf.cast(tf.random.normal((n, n)), dtype)

            def mm(a=a, b=b):
                return tf.linalg.matmul(a, b).numpy()

            out[name] = flop / _best_of(mm, args.calls) / 1e9
        out["library"] = f"tensorflow {tf.__version__} (oneDNN)"
    return out


# ---------------------------------------------------------------- the parent

def run_child(name: str, python: Path, argv: list[str], env: dict, timeout: float) -> dict | None:
    print(f"--- {name}: {python.relative_to(ROOT)} {' '.join(argv)}", flush=True)
    return stream_child(name, [str(python), "-u", str(Path(__file__).resolve()), *argv], env,
                        ROOT, timeout)


def clock_ghz() -> float | None:
    try:
        mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)",
                                            Path("/proc/cpuinfo").read_text(), re.M)]
    except OSError:
        return None
    return max(mhz) / 1000 if mhz else None


CLOCK_C = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
  struct timespec a, b; unsigned long n = 500000000UL, x = 0;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (unsigned long i = 0; i < n; i++)
    __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
  clock_gettime(CLOCK_MONOTONIC, &b);
  printf("%.4f\n", 4.0 * n / ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9) / 1e9);
  return (int)(x & 0);
}
"""


def measured_clock_ghz(runs: int = 5) -> float | None:
    """The core clock while busy: a chain of dependent integer adds (1 cycle each on x86), timed,
    best of `runs`; None without a C compiler. A VM's /proc/cpuinfo shows the nominal clock only,
    and the cores may boost above it."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc or platform.machine() not in ("x86_64", "AMD64"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "clock.c", Path(tmp) / "clock"
        src.write_text(CLOCK_C)
        if subprocess.run([cc, "-O2", "-o", str(exe), str(src)], capture_output=True).returncode:
            return None
        return max(float(subprocess.run([str(exe)], capture_output=True, text=True,
                                        check=True).stdout) for _ in range(runs))


def train_cli(stack: str, args, out_root: Path) -> dict | None:
    """The real trainer: `convnet train` for --epochs with the stack's backend and precision."""
    backend, precision = STACKS[stack]
    convnet = python_for(backend).parent / "convnet"
    out = out_root / stack
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(convnet), "train", "--data", str(args.data), "--out", str(out), "--preset",
           args.preset, "--epochs", f"{args.epochs:g}", "--precision", precision,
           "--seed", str(args.seed)]
    if args.batch:
        cmd += ["--batch-size", str(args.batch)]
    print(f"--- {stack}: KERAS_BACKEND={backend} {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=stack_env(backend), cwd=ROOT, capture_output=True, text=True,
                          timeout=args.epochs * 3600)
    seconds = time.perf_counter() - started
    lines = [x for x in (proc.stdout + proc.stderr).splitlines()
             if x.strip() and not x.startswith(("W0000", "I0000", "WARNING: All log"))]
    print("  " + "\n  ".join(lines[-8:]), flush=True)
    if proc.returncode:
        print(f"  {stack}: exited with {proc.returncode}", flush=True)
        return None
    version = max((p for p in out.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    metrics = json.loads((version / "metrics.json").read_text())
    return {"stack": stack, "wall_s": seconds, "train_seconds": metrics["train_seconds"],
            "epochs": metrics["epochs"], "batch_size": metrics["batch_size"],
            "accuracy": metrics.get("accuracy"), "accuracy_no_tta": metrics.get("accuracy_no_tta"),
            "version": str(version)}


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stacks", default=",".join(STACKS),
                   help=f"comma list of: {', '.join(STACKS)}")
    p.add_argument("--preset", default="fast", choices=["fast", "quick"])
    p.add_argument("--batch", type=int, default=None, help="default: the preset's fit batch")
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=3, help="timed blocks (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--calls", type=int, default=5, help="matmul calls per peak measurement")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 warm-up steps, blocks of 2 steps, batch 256, results "
                        "to /tmp unless --out")
    p.add_argument("--epochs", type=float, default=None,
                   help="also train each stack this many epochs with `convnet train`")
    p.add_argument("--no-throughput", action="store_true",
                   help="skip the throughput runs (with --epochs: accuracy only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "train_stacks",
                   help="model folders of --epochs")
    p.add_argument("--out", type=Path, default=None,
                   help="results file stem (default bench/results/train_stacks)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        fn = worker_peak if args.worker.startswith("peak-") else worker_throughput
        print("RESULT " + json.dumps(fn(args)), flush=True)
        return

    if args.quick:
        args.warmup, args.steps, args.calls = 2, 2, 2
        args.batch = args.batch or 256
    name = "train_stacks_epochs" if args.no_throughput else "train_stacks"
    out = args.out or (Path("/tmp") / f"{name}_quick" if args.quick else RESULTS / name)
    if args.no_throughput and not args.epochs:
        p.error("--no-throughput leaves nothing to do without --epochs")
    if args.warmup < 1 or args.steps < 1 or args.blocks < 1:
        p.error("--warmup, --steps and --blocks must be at least 1")
    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    unknown = [s for s in stacks if s not in STACKS]
    if unknown:
        p.error(f"unknown stacks {unknown}: choose from {', '.join(STACKS)}")
    if any(STACKS[s][0] == "torch" for s in stacks) and not TORCH_PYTHON.exists():
        p.error(f"{TORCH_PYTHON} is missing: python -m venv bench/.venv-torch && "
                "bench/.venv-torch/bin/pip install torch keras==3.15.1 -e .")
    # Decode the JPEGs once into convnet's cache, so no stack's process pays for it.
    sys.path.insert(0, str(ROOT / "src"))
    from convnet import data
    from convnet.cpu import computes_bf16, cpu_flags

    if computes_bf16(cpu_flags()) is False and any(STACKS[s][1] == "bfloat16" for s in stacks):
        print("note: this CPU has no bfloat16 instructions; bfloat16 runs emulated", flush=True)

    data.load_dataset(args.data)

    peaks = {}
    for name, python in (("peak-torch", TORCH_PYTHON), ("peak-tf", MAIN_PYTHON)):
        if python.exists():
            env = stack_env("torch" if name == "peak-torch" else "tensorflow")
            got = run_child(name, python, ["--worker", name, "--calls", str(args.calls)], env,
                            WORKER_TIMEOUT)
            if got:
                peaks[name] = got
    measured = {dt: max((v[dt] for v in peaks.values()), default=None)
                for dt in FLOP_PER_CYCLE}
    nominal, busy = clock_ghz(), measured_clock_ghz()
    ghz, cores = max((g for g in (nominal, busy) if g), default=None), os.cpu_count() or 1
    theory = {dt: ghz * f * cores if ghz else None for dt, f in FLOP_PER_CYCLE.items()}

    rows = []
    for stack in [] if args.no_throughput else stacks:
        backend, _ = STACKS[stack]
        argv = ["--worker", stack, "--preset", args.preset, "--steps", str(args.steps),
                "--blocks", str(args.blocks), "--warmup", str(args.warmup),
                "--data", str(args.data)]
        if args.batch:
            argv += ["--batch", str(args.batch)]
        got = run_child(stack, python_for(backend), argv, stack_env(backend), WORKER_TIMEOUT)
        if got is None:
            rows.append({"stack": stack, "failed": True})
            continue
        train_flops = 3 * got["forward_flops"]
        got["train_flops_per_image"] = train_flops
        got["gflops_per_s"] = got["images_per_s"] * train_flops / 1e9
        peak = measured[got["precision"]]
        got["of_measured_peak"] = got["gflops_per_s"] / peak if peak else None
        top = theory[got["precision"]]
        got["of_theoretical_peak"] = got["gflops_per_s"] / top if top else None
        rows.append(got)
        print(f"  {stack}: {got['images_per_s']:.0f} images/s "
              f"(blocks {', '.join(f'{b:.0f}' for b in got['block_images_per_s'])}), "
              f"{got['gflops_per_s']:.1f} GFLOP/s", flush=True)

    trained = []
    if args.epochs:
        for stack in stacks:
            got = train_cli(stack, args, args.runs)
            trained.append(got or {"stack": stack, "failed": True})

    ok = [r for r in rows if not r.get("failed")]
    fwd = ok[0]["forward_flops"] if ok else None
    lines = [] if args.no_throughput else ["## Training throughput", "",
             f"Preset `{args.preset}`, batch {ok[0]['batch'] if ok else args.batch}, "
             f"forward {fmt(fwd and fwd / 1e6, ',.1f')} MFLOP per image, training counted as "
             f"3x forward ({fmt(fwd and 3 * fwd / 1e6, ',.1f')} MFLOP per image). "
             f"{args.warmup} warm-up steps, then the median of {args.blocks} blocks of "
             f"{args.steps} steps.", "",
             "| stack | images/s | blocks | GFLOP/s | of measured peak | of theoretical peak |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['stack']} | failed | | | | |")
            continue
        lines.append(
            f"| {r['stack']} | {r['images_per_s']:.0f} | "
            f"{' / '.join(f'{b:.0f}' for b in r['block_images_per_s'])} | "
            f"{r['gflops_per_s']:.1f} | {fmt(r['of_measured_peak'], '.0%')} | "
            f"{fmt(r['of_theoretical_peak'], '.0%')} |")
    lines += [*([""] if lines else []), "## The cores' peak", "",
              f"{cores} cores at {fmt(ghz, '.3f')} GHz: the higher of /proc/cpuinfo's "
              f"{fmt(nominal, '.3f')} GHz and {fmt(busy, '.3f')} GHz measured (a chain of "
              "dependent adds, best of 5).", "",
              "| data type | theoretical GFLOP/s | FLOP/cycle/core | measured matmul GFLOP/s |",
              "| --- | ---: | ---: | --- |"]
    for dt, f in FLOP_PER_CYCLE.items():
        each = "; ".join(f"{v[dt]:.1f} ({v['library']})" for v in peaks.values())
        lines.append(f"| {dt} | {fmt(theory[dt], '.1f')} | {f} | {each or 'n/a'} |")
    if args.epochs:
        lines += ["", f"## Accuracy after {args.epochs:g} epochs (`convnet train`, seed "
                      f"{args.seed})", "",
                  "| stack | test accuracy (TTA) | plain | training s | wall s |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for t in trained:
            if t.get("failed"):
                lines.append(f"| {t['stack']} | failed | | | |")
                continue
            lines.append(f"| {t['stack']} | {fmt(t['accuracy'], '.2%')} | "
                         f"{fmt(t['accuracy_no_tta'], '.2%')} | {t['train_seconds']:.0f} | "
                         f"{t['wall_s']:.0f} |")
    body = "\n".join(lines)
    print("\n" + body, flush=True)
    notes = ("Each stack in its own process, one after another; torch stacks from "
             "bench/.venv-torch (no TensorFlow there).",
             "Real recipe (build_model) and pipeline (Batches) through model.fit; stem frozen, "
             "no lookahead callback on any stack.")
    if args.quick:
        notes += ("SMOKE TEST (--quick): too few steps for the figures to mean anything.",)
    write_results(out, "Training stacks on the CPU", body,
                  {"args": {k: str(v) for k, v in vars(args).items()}, "throughput": rows,
                   "peak_measured": peaks, "peak_theoretical_gflops": theory,
                   "clock_ghz": ghz, "clock_ghz_cpuinfo": nominal,
                   "clock_ghz_measured": busy, "cores": cores, "trained": trained}, notes=notes)
    print(f"wrote {out}.md and .json", flush=True)


if __name__ == "__main__":
    main()

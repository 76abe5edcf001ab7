"""Tabulate finished training runs: python bench/train_table.py [--out PATH --command CMD] DIR...

Each DIR is a model version folder; an optional `wall_seconds` file beside metrics.json (written
by the benchmark scripts) gives the wall time from the command to the exported model. Prints a
Markdown table; with --out, also writes it with the command, date and machine (bench/common.py).
"""

import argparse
import json
from pathlib import Path

from common import write_results

HEAD = ("| machine | backend | preset | optimizer | precision | seed | batch | epochs "
        "| low-res epochs | train s | wall s | test acc (TTA) | test acc (no TTA) |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def run_facts(vdir: Path) -> dict:
    m = json.loads((vdir / "metrics.json").read_text())
    wall = vdir / "wall_seconds"
    cfg_file = vdir / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    hw = m.get("hardware", {})
    return {"dir": str(vdir), "machine": f"{hw.get('cpu', '?')}, {hw.get('cpu_count', '?')} cores",
            "backend": m["backend"], "preset": m["preset"],
            # runs from before the optimizer was a choice trained with SGD (Adam: tutorial)
            "optimizer": cfg.get("optimizer", "adam" if m["preset"] == "tutorial" else "sgd"),
            "precision": cfg.get("precision"), "seed": cfg.get("seed"),
            "batch_size": cfg.get("batch_size"), "epochs": m["epochs"],
            "progressive": cfg.get("progressive"),  # [side, epochs] of progressive resizing
            "train_seconds": m["train_seconds"],
            "wall_seconds": float(wall.read_text()) if wall.is_file()
            else m.get("total_seconds", float("nan")),
            "accuracy": m["accuracy"], "accuracy_no_tta": m["accuracy_no_tta"]}


def low_res(progressive) -> str:
    """"5 at 24 px" for progressive resizing's [24, 5]; "-" for none."""
    return f"{progressive[1]} at {progressive[0]} px" if progressive else "-"


def row(r: dict) -> str:
    return (f"| {r['machine']} | {r['backend']} | {r['preset']} | {r['optimizer']} | "
            f"{r['precision']} | {r['seed']} | "
            f"{r['batch_size']} | {r['epochs']} | {low_res(r['progressive'])} | "
            f"{r['train_seconds']:.0f} | "
            f"{r['wall_seconds']:.0f} | {r['accuracy'] * 100:.2f}% | "
            f"{r['accuracy_no_tta'] * 100:.2f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="results path without suffix (.md and .json)")
    parser.add_argument("--command", help="the benchmark command to record (default: this one)")
    parser.add_argument("--title", default="CPU training (`bench/cpu_train.sh`)")
    args = parser.parse_args()
    runs = [run_facts(d) for d in args.dirs]
    table = "\n".join([HEAD, *(row(r) for r in runs)])
    print(table)
    if args.out:
        notes = ("wall s: from the command to the published version, starting from an empty "
                 "dataset cache (JPEG decoding, training, ONNX export, scoring)",)
        if args.command:
            notes = (f"benchmark command: `{args.command}`", *notes)
        write_results(args.out, args.title, table, {"runs": runs}, notes=notes)


if __name__ == "__main__":
    main()

"""Print a Markdown table of finished training runs: python bench/train_table.py VERSION_DIR...

Each argument is a model version folder; an optional `wall_seconds` file beside metrics.json
(written by the benchmark scripts) gives the wall time from the command to the exported model.
"""

import json
import sys
from pathlib import Path


def row(vdir: Path) -> str:
    m = json.loads((vdir / "metrics.json").read_text())
    wall = vdir / "wall_seconds"
    wall_s = float(wall.read_text()) if wall.is_file() else m.get("total_seconds", float("nan"))
    cfg_file = vdir / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    hw = m.get("hardware", {})
    machine = f"{hw.get('cpu', '?')}, {hw.get('cpu_count', '?')} cores"
    return (f"| {machine} | {m['backend']} | {m['preset']} | {cfg.get('seed', '?')} | "
            f"{cfg.get('batch_size', '?')} | {m['epochs']} | "
            f"{m['train_seconds']:.0f} | {wall_s:.0f} | {m['accuracy'] * 100:.2f}% | "
            f"{m['accuracy_no_tta'] * 100:.2f}% |")


def main(argv: list[str]) -> None:
    print("| machine | backend | preset | seed | batch | epochs | train s | wall s "
          "| test acc (TTA) | test acc (no TTA) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for arg in argv:
        print(row(Path(arg)))


if __name__ == "__main__":
    main(sys.argv[1:])

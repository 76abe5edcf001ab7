"""How well `convnet audit` finds planted problems: python bench/audit.py [--data ARCHIVE]

Copies a real image set (default: the shared flowers photos; any train/<class>/<image> tar
archive, e.g. ../shared/data/cifar10-jpeg/train.tar.gz with --subset 2000), splits it 80/20 into
train/ and test/, plants problems in the copy, audits it and scores each kind:

- exact: a training image saved again as PNG under a new name (same pixels, other bytes);
- near (jpeg / resize / crop): re-encoded at JPEG quality 50; shrunk to 60% of each side;
  cropped by 5% of each side around the centre; cropped by 8% at the top and left (off-centre);
- leakage: a training image copied into test/ (half byte for byte, half re-encoded at q70);
- flipped labels: 2% of the training images moved to another class's folder;
- unreadable: truncated JPEGs, empty files, text named .jpg;
- tiny (shrunk to 24x18) and greyscale: images replaced in place.

Precision counts the findings that involve a planted file (a copy paired with a twin its source
already had counts as right; a copy of a greyscale or 32 px original that is itself greyscale or
tiny is left out); a finding among the original files only (the set's own duplicates, black and
white photos, ...) is listed apart, under "in the original data".
For flipped labels every flagged image counts, so precision is a lower bound: some flagged
original labels may well be wrong. --time-only audits --data unmodified and records the time of
each stage (the 50,000-image CIFAR-10 run: --data ../shared/data/cifar10-jpeg/train.tar.gz
--time-only --model bundled). Writes bench/results/audit.md and .json.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, write_results
from PIL import Image

from convnet import modeldir
from convnet.audit import AuditConfig, audit

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
PLANT = {"exact": 20, "near-jpeg": 20, "near-resize": 20, "near-crop": 20,
         "near-offcentre-crop": 20, "leakage": 20, "unreadable": 12, "tiny": 10,
         "grayscale": 10}
FLIP_SHARE = 0.02  # of the training images, moved to another class


def extract(archive: Path, out: Path, subset: int | None, seed: int) -> list[Path]:
    """Write the archive's class images under out/train or out/test (80/20 per class)."""
    rng = np.random.default_rng(seed)
    with tarfile.open(archive) as tar:
        members = [m for m in tar if m.isfile() and len(Path(m.name).parts) >= 2
                   and not Path(m.name).name.startswith(".")]
        if subset:
            members = [members[i] for i in sorted(rng.choice(len(members), subset, False))]
        by_class: dict[str, list[tarfile.TarInfo]] = {}
        for m in members:
            by_class.setdefault(Path(m.name).parts[-2], []).append(m)
        train = []
        for cls, items in sorted(by_class.items()):
            order = rng.permutation(len(items))
            for rank, k in enumerate(order):
                split = "test" if rank < len(items) // 5 else "train"
                path = out / split / cls / Path(items[k].name).name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(tar.extractfile(items[k]).read())
                if split == "train":
                    train.append(path)
    return sorted(train)


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def copy_bytes(kind: str, image: Image.Image) -> bytes:
    """The planted copy of `image` for one kind of duplicate, encoded."""
    w, h = image.size
    if kind == "exact":
        return encode(image, "PNG")
    if kind == "near-jpeg":
        return encode(image, quality=50)
    if kind == "near-resize":
        return encode(image.resize((w * 3 // 5, h * 3 // 5), Image.Resampling.LANCZOS),
                      quality=90)
    if kind == "near-crop":
        return encode(image.crop((w // 20, h // 20, w - w // 20, h - h // 20)), quality=90)
    return encode(image.crop((w * 2 // 25, h * 2 // 25, w, h)), quality=90)  # off-centre


def plant(root: Path, train: list[Path], seed: int) -> dict:
    """Plant every kind of problem; return what was planted, by dataset-relative name."""
    rng = np.random.default_rng(seed + 1)
    pool = [train[i] for i in rng.permutation(len(train))]
    take = iter(pool)
    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    planted: dict = {"pairs": {}, "leakage": [], "unreadable": [], "tiny": [], "grayscale": [],
                     "flipped": []}
    for kind in ("exact", "near-jpeg", "near-resize", "near-crop", "near-offcentre-crop"):
        planted["pairs"][kind] = []
        for _ in range(PLANT[kind]):
            source = next(take)
            image = Image.open(source).convert("RGB")
            copy = source.with_name(f"{source.stem}-{kind}" + (".png" if kind == "exact"
                                                                else ".jpg"))
            data = copy_bytes(kind, image)
            copy.write_bytes(data)
            planted["pairs"][kind].append((rel(source), rel(copy)))
    for k in range(PLANT["leakage"]):
        source = next(take)
        target = root / "test" / source.parent.name / f"{source.stem}-leaked.jpg"
        if k % 2:
            target.write_bytes(encode(Image.open(source).convert("RGB"), quality=70))
        else:
            shutil.copy(source, target)
        planted["leakage"].append((rel(source), rel(target)))
    for k in range(PLANT["unreadable"]):
        source = next(take)
        data = source.read_bytes()
        source.write_bytes([data[: len(data) // 2], b"", b"not an image\n"][k % 3])
        planted["unreadable"].append(rel(source))
    for kind in ("tiny", "grayscale"):
        for _ in range(PLANT[kind]):
            source = next(take)
            image = Image.open(source).convert("RGB")
            image = image.resize((24, 18)) if kind == "tiny" else image.convert("L")
            source.write_bytes(encode(image, quality=95))
            planted[kind].append(rel(source))
    classes = sorted(p.name for p in (root / "train").iterdir())
    for _ in range(round(FLIP_SHARE * len(train))):
        source = next(take)
        other = rng.choice([c for c in classes if c != source.parent.name])
        target = root / "train" / other / source.name
        source.rename(target)
        planted["flipped"].append(rel(target))
    return planted


def score(found: dict, planted: dict) -> tuple[list[dict], dict]:
    """Rows of (kind, planted, found, precision, recall) and the findings among originals."""
    planted_files = {f for pairs in planted["pairs"].values() for pair in pairs for f in pair[1:]}
    planted_files |= {t for _, t in planted["leakage"]} | set(planted["unreadable"]) \
        | set(planted["tiny"]) | set(planted["grayscale"]) | set(planted["flipped"])
    copies = {copy: (kind, source) for kind, pairs in planted["pairs"].items()
              for source, copy in pairs}
    dup_copies = set(copies) | {t for _, t in planted["leakage"]}
    originals: dict[str, list] = {}
    rows = []

    def row(kind, n_planted, hits, involving):
        rows.append({"kind": kind, "planted": n_planted, "found": hits, "reported": involving,
                     "precision": hits / involving if involving else None,
                     "recall": hits / n_planted if n_planted else None})

    pairs = [(frozenset(g["files"]), "exact") for g in found["exact_duplicates"]] + \
        [(frozenset(p["files"]), "near") for p in found["near_duplicates"]]
    twins: dict[str, set[str]] = {}  # an original -> itself and the originals found like it
    for files, _ in pairs:
        if not files & planted_files:
            for f in files:
                twins.setdefault(f, {f}).update(files)

    def right(files: frozenset, copy: str, source: str) -> bool:
        """A pair of a planted copy with its source, or with one of the source's twins."""
        return copy in files and bool((files - {copy}) & twins.get(source, {source}))

    for kind, planted_pairs in planted["pairs"].items():
        hits = sum(any(frozenset(pair) <= files for files, _ in pairs) for pair in planted_pairs)
        involving = [files for files, _ in pairs
                     if any(copies.get(f, ("",))[0] == kind for f in files)]
        wrong = sum(not any(right(files, c, s) for s, c in planted_pairs) for files in involving)
        row(kind, len(planted_pairs), hits, hits + wrong)
    for files, how in pairs:
        if not files & planted_files:
            originals.setdefault(f"{how}_duplicates", []).append(sorted(files))
    leaks = {(x["train"], x["test"]) for x in found["leakage"]}
    planted_leaks = set(planted["leakage"])
    leak_hits = len(leaks & planted_leaks)
    leak_wrong = sum(1 for t in leaks - planted_leaks if set(t) & planted_files
                     and not any(right(frozenset(t), c, s) for s, c in planted_leaks))
    row("leakage", len(planted_leaks), leak_hits, leak_hits + leak_wrong)
    originals["leakage"] = sorted(t for t in leaks if not set(t) & planted_files)
    for kind, key in (("unreadable", "unreadable"), ("tiny", "tiny"),
                      ("grayscale", "grayscale"), ("flipped labels", "label_issues")):
        names = {x["name"] for x in found[key]}
        truth = set(planted["flipped" if key == "label_issues" else key])
        if key == "label_issues":
            if not found["label_check"]["skipped"]:  # else nothing to score
                row(kind, len(truth), len(names & truth), len(names))
        else:  # a copy of a grey original is grey, a 60% copy of a 32 px image tiny
            moved = set(planted["flipped"])  # originals in another folder, grey or not
            row(kind, len(truth), len(names & truth),
                len((names & planted_files) - dup_copies - moved))
            originals[key] = sorted(names - planted_files)
    return rows, originals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "flowers" / "train.tar.gz",
                        help="a tar archive of train/<class>/<image>")
    parser.add_argument("--subset", type=int, default=None, help="images drawn from --data")
    parser.add_argument("--model", default=None,
                        help="model directory for the label check, or 'bundled'")
    parser.add_argument("--labels", choices=["auto", "pixels", "off"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-only", action="store_true",
                        help="audit --data unmodified and record the time of each stage")
    parser.add_argument("--out", type=Path, default=RESULTS / "audit")
    args = parser.parse_args()
    model = modeldir.bundled_model_root() if args.model == "bundled" else args.model
    cfg = AuditConfig(label_features=args.labels)
    versions = f"model {model or 'none'}, label features {args.labels}"

    if args.time_only:
        with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
            data = args.data
            if args.subset:  # a smaller copy, unmodified
                data = Path(tmp) / "data"
                extract(args.data, data, args.subset, args.seed)
            started = time.perf_counter()
            found, _ = audit(data, model, cfg)
            total = time.perf_counter() - started
        text = "\n".join(["| images | scan s | duplicates s | labels s | total s |",
                          "| --- | --- | --- | --- | --- |",
                          f"| {found['images']} | {found['seconds']['scan']:.1f} | "
                          f"{found['seconds']['duplicates']:.1f} | "
                          f"{found['seconds']['labels']:.1f} | {total:.1f} |",
                          "", "findings: " + ", ".join(f"{k} {v}" for k, v in
                                                        found["summary"].items())])
        print(text)
        write_results(args.out.with_name(args.out.name + "_timing"),
                      "Audit: time on an unmodified set (`bench/audit.py --time-only`)", text,
                      {"seconds": found["seconds"], "total": total, "summary": found["summary"],
                       "label_check": found["label_check"]},
                      notes=(f"data: {args.data}" + (f", {args.subset} images drawn"
                                                     if args.subset else ""), versions))
        return

    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        root = Path(tmp) / "data"
        train = extract(args.data, root, args.subset, args.seed)
        planted = plant(root, train, args.seed)
        started = time.perf_counter()
        found, _ = audit(root, model, cfg)
        total = time.perf_counter() - started
    rows, originals = score(found, planted)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    table = ["| kind | planted | found | reported | precision | recall |",
             "| --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['kind']} | {r['planted']} | {r['found']} | {r['reported']} | "
              f"{fmt(r['precision'])} | {fmt(r['recall'])} |" for r in rows]
    check = found["label_check"]
    lines = [*table, "",
             f"{found['images']} readable images audited in {total:.1f} s "
             f"({', '.join(f'{k} {v:.1f} s' for k, v in found['seconds'].items())}); "
             f"label check: {check['skipped'] or check['features']}"
             + (f", k-fold accuracy {check['accuracy']:.3f}" if check["accuracy"] else ""),
             "", "In the original data (no planted file involved):"]
    lines += [f"- {kind}: {len(items)}" + "".join(f"\n  - {item}" for item in items[:20])
              for kind, items in originals.items()]
    text = "\n".join(lines)
    print(text)
    write_results(args.out, "Audit: planted problems found (`bench/audit.py`)", text,
                  {"rows": rows, "originals": originals, "seconds": found["seconds"],
                   "label_check": check, "planted": {k: v for k, v in planted.items()}},
                  notes=(f"data: {args.data}" + (f", {args.subset} images drawn" if args.subset
                                                  else ""), versions,
                         "reported: findings involving a planted file, a copy paired with its "
                         "source's own twin counted right (all flagged images for flipped "
                         "labels)"))


if __name__ == "__main__":
    main()

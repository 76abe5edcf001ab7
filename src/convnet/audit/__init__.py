"""`convnet audit`: what is wrong with a dataset before a model learns it.

    audit(path, model_dir=None) -> dict of findings, each key one kind of problem:
      unreadable        files training would skip: empty, truncated, not an image, broken links
      tiny              shorter side under TINY_SIDE pixels
      grayscale         no colour (all three channels alike) in an RGB data set
      odd_size          shorter side under half or over twice the median
      class_counts      images per class and split, and the largest/smallest ratio
      exact_duplicates  the same pixels after decoding, any split
      near_duplicates   re-encoded, resized or lightly cropped copies (perceptual hash)
      leakage           a test image that is a copy of a training image (exact or near)
      label_issues      likely mislabelled images (k-fold probabilities + cleanlab)

Duplicates are found by perceptual hash (imagehash's pHash, whole image and centred crops),
not by a model's embeddings: no model is needed, copies are told from mere look-alikes, and
8 bytes an image keep the all-pairs search at 50,000 images to seconds (`duplicates`). Labels
are judged by cleanlab on out-of-sample (k-fold) probabilities from the model's features, and
skipped without a model: pixels alone flag good labels by the hundred (`labels`).

Every finding names its file (path inside the dataset, or CIFAR batch and row). The stages:
`scan` reads every image once, `duplicates` compares hashes, `labels` scores labels, `report`
writes the HTML page. Needs the `audit` extra (cleanlab, imagehash).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convnet.audit.duplicates import NEAR_BITS, find_duplicates
from convnet.audit.scan import Scan, scan_dataset

log = logging.getLogger(__name__)

TINY_SIDE = 32  # pixels: a shorter side below CIFAR-10's is too small to learn from
ODD_FACTOR = 2.0  # shorter side this many times above or below the median is odd
IMBALANCE_RATIO = 2.0  # largest / smallest class at or above this is reported imbalanced
FINDINGS = ("unreadable", "tiny", "grayscale", "odd_size", "exact_duplicates",
            "near_duplicates", "leakage", "label_issues")


@dataclass
class AuditConfig:
    near_bits: int = NEAR_BITS  # Hamming distance (of 64 bits) for a near-duplicate
    # Features for the mislabel check: "auto" the model's when there is one, else none (the
    # check is skipped: pixels alone flag a third of a photo set, bench/audit.py); "pixels" to
    # run it anyway on pixels and colours; "off".
    label_features: str = "auto"
    max_label_issues: int | None = None  # None: every image cleanlab flags


def audit(path: str | os.PathLike, model_dir: str | os.PathLike | None = None,
          cfg: AuditConfig | None = None) -> tuple[dict, Scan]:
    """Scan the dataset at `path` and return (findings, scan); `model_dir`, a model root or
    version folder, makes the label check use its features."""
    cfg = cfg or AuditConfig()
    version_dir, size = None, None
    if model_dir is not None:
        from convnet import modeldir
        from convnet.serve.model import load_model

        version_dir = modeldir.resolve_version(model_dir)
        size = load_model(version_dir).input_size  # validates the model as the server does
    started = time.perf_counter()
    scan = scan_dataset(path, size=size)
    seconds = {"scan": time.perf_counter() - started}
    findings: dict = {"dataset": str(path), "images": len(scan),
                      "image_size": int(scan.images[0].shape[0]) if len(scan) else None}
    findings.update(_quality(scan))
    if len(scan):
        hashes = np.array(scan.hashes, dtype=np.uint64)
        dups = find_duplicates(scan.digests, hashes, scan.splits, cfg.near_bits)
    else:
        dups = {"exact": [], "near": [], "leakage": []}
    seconds["duplicates"] = time.perf_counter() - started - seconds["scan"]
    findings["exact_duplicates"] = [_group(scan, g) for g in dups["exact"]]
    findings["near_duplicates"] = [{**_group(scan, [i, j]), "bits": d}
                                   for i, j, d in dups["near"]]
    findings["leakage"] = [{"train": scan.names[i], "test": scan.names[j], "bits": d,
                            "kind": "exact" if d == 0 and scan.digests[i] == scan.digests[j]
                            else "near"} for i, j, d in dups["leakage"]]
    findings.update(_label_findings(scan, version_dir, cfg))
    seconds["labels"] = time.perf_counter() - started - sum(seconds.values())
    findings["summary"] = {k: len(findings[k]) for k in FINDINGS}
    findings["seconds"] = {k: round(v, 2) for k, v in seconds.items()}  # wall clock per stage
    return findings, scan


def _group(scan: Scan, indices: list[int]) -> dict:
    return {"files": [scan.names[i] for i in indices],
            "splits": [scan.splits[i] for i in indices],
            "classes": [scan.classes[scan.labels[i]] for i in indices]}


def _quality(scan: Scan) -> dict:
    def entry(i: int, **extra) -> dict:
        return {"name": scan.names[i], "split": scan.splits[i],
                "width": scan.sizes[i][0], "height": scan.sizes[i][1], **extra}

    short = np.array([min(s) for s in scan.sizes]) if len(scan) else np.zeros(0)
    median = float(np.median(short)) if len(short) else 0.0
    counts: dict[str, dict[str, int]] = {}
    for split, label in zip(scan.splits, scan.labels, strict=True):
        per = counts.setdefault(split, dict.fromkeys(scan.classes, 0))
        per[scan.classes[label]] += 1
    imbalance = {split: (max(c.values()) / min(c.values()) if min(c.values()) else None)
                 for split, c in counts.items()}
    return {
        "class_counts": {"counts": counts,
                         "ratio": imbalance,  # largest / smallest class; None: an empty class
                         "imbalanced": sorted(s for s, r in imbalance.items()
                                              if r is None or r >= IMBALANCE_RATIO)},
        "unreadable": scan.unreadable,
        "tiny": [entry(int(i)) for i in np.flatnonzero(short < TINY_SIDE)],
        "grayscale": [entry(i) for i in range(len(scan)) if scan.gray[i]],
        "odd_size": [entry(int(i), median_short_side=median) for i in np.flatnonzero(
            (short < median / ODD_FACTOR) | (short > median * ODD_FACTOR))],
    }


def _label_findings(scan: Scan, version_dir: Path | None, cfg: AuditConfig) -> dict:
    check: dict = {"features": None, "folds": None, "accuracy": None, "skipped": None}
    if cfg.label_features == "off":
        check["skipped"] = "not asked for"
    elif cfg.label_features == "auto" and version_dir is None:
        check["skipped"] = ("needs a model's features (--model DIR): on pixels alone the check "
                            "flags far more good labels than bad ones")
    elif len(scan) == 0:
        check["skipped"] = "no readable images"
    if check["skipped"]:
        return {"label_issues": [], "label_check": check}
    from convnet.audit import labels as lab

    images = scan.image_array()
    if version_dir is not None and cfg.label_features != "pixels":
        features = lab.model_features(version_dir, images)
        check["features"] = f"model {version_dir}"
    else:
        features = lab.pixel_features(images)
        check["features"] = "pixels (16x16) and colour histogram; pass --model for a better check"
    label_array = np.array(scan.labels, dtype=np.int64)
    result = lab.find_label_issues(features, label_array)
    check.update(accuracy=result["accuracy"], skipped=result["skipped"], folds=lab.FOLDS)
    issues = []
    probs = result["probabilities"]
    for i in result["indices"][:cfg.max_label_issues]:
        suggested = int(probs[i].argmax())
        issues.append({"name": scan.names[i], "split": scan.splits[i],
                       "label": scan.classes[scan.labels[i]],
                       "suggested": scan.classes[suggested],
                       "label_probability": round(float(probs[i, scan.labels[i]]), 4),
                       "suggested_probability": round(float(probs[i, suggested]), 4),
                       "quality": round(float(result["quality"][i]), 4)})
    return {"label_issues": issues, "label_check": check}


def summary_lines(findings: dict, shown: int = 5) -> list[str]:
    """A terminal summary: counts per kind and the first few names of each."""
    lines = [f"{findings['dataset']}: {findings['images']} readable images"]
    cc = findings["class_counts"]
    for split, per in cc["counts"].items():
        ratio = cc["ratio"][split]
        lines.append(f"  {split}: " + ", ".join(f"{c} {n}" for c, n in per.items())
                     + (f" (largest/smallest {ratio:.1f})" if ratio else " (an empty class)"))
    for kind in FINDINGS:
        items = findings[kind]
        lines.append(f"{kind.replace('_', ' ')}: {len(items)}")
        for item in items[:shown]:
            lines.append(f"  {_describe(kind, item)}")
        if len(items) > shown:
            lines.append(f"  ... {len(items) - shown} more (--json or --out for all)")
    check = findings["label_check"]
    if check["skipped"]:
        lines.append(f"label check skipped: {check['skipped']}")
    elif check["accuracy"] is not None:
        lines.append(f"label check: {check['features']}, k-fold accuracy "
                     f"{check['accuracy']:.3f}")
    return lines


def _describe(kind: str, item: dict) -> str:
    if kind == "unreadable":
        return f"{item['name']}: {item['reason']}"
    if kind in ("tiny", "grayscale", "odd_size"):
        return f"{item['name']} ({item['width']}x{item['height']})"
    if kind == "leakage":
        return f"{item['train']} = {item['test']} ({item['kind']}, {item['bits']} bits)"
    if kind == "label_issues":
        return (f"{item['name']}: labelled {item['label']} ({item['label_probability']:.2f}), "
                f"looks like {item['suggested']} ({item['suggested_probability']:.2f})")
    return " = ".join(item["files"]) + (f" ({item['bits']} bits)" if "bits" in item else "")

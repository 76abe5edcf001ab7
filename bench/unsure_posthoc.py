"""Scores for "not sure" that need no retraining, tried against the bundled CIFAR-10 model:
python bench/unsure_posthoc.py

bench/unsure.py compares the scores the server could ship (energy is the best, AUROC 0.918 against
the flower photos). This script asks whether anything computed from the frozen network does
better, each scored like bench/unsure.py (CIFAR-10 test images vs. the flower photos, threshold at
5% of correct test answers, and again after a 32x32 JPEG q75 round trip of the photos):

- ReAct: energy after clipping the penultimate features at a percentile of their training values;
- statistics of each layer: Gaussian (Mahalanobis) distance of every GELU output's per-channel
  mean and log-spread, fitted on the training images (layer 0 is the whitening stem);
- outlier exposure without real outliers: a logistic regression on the deep features (energy,
  penultimate features, last four layers' statistics), training images against synthetic
  outliers made from other training images (jigsaw-shuffled 8 and 16 px tiles, zoomed 8-14 px
  crops, 50/50 blends, four-image mosaics, rotations, colour permutations or negatives, smooth
  random fields, uniform noise), first with all kinds together, then with each kind alone.

Writes bench/results/unsure_posthoc.md and .json. About 5 minutes on 2 cores (feature
extraction of the 50,000 training images dominates).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from common import RESULTS, write_results
from onnx import helper, numpy_helper
from PIL import Image
from unsure import SHARED, jpeg_round_trip, read_images, score_row

from convnet import modeldir
from convnet.calibration import logsumexp
from convnet.data import load_dataset

KINDS = ("jigsaw 8 px", "jigsaw 16 px", "zoom", "blend", "mosaic", "rotation", "colour",
         "smooth field", "noise")


class Features:
    """Logits, penultimate features and every GELU output's per-channel mean and log-spread."""

    def __init__(self, model_path: Path):
        model = onnx.load(model_path)
        graph = model.graph
        self.gelus = [n.output[0] for n in graph.node
                      if n.op_type == "Mul" and n.name.endswith("Gelu/mul_3")]
        head = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")][-1]
        scale = next(n for n in graph.node if head.output[0] in n.input)
        weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.head = weights[head.input[1]] * weights[scale.input[1]]  # logits = pen @ head
        self.penultimate = head.input[0]
        for name in [*self.gelus, self.penultimate]:
            graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        self.session = ort.InferenceSession(model.SerializeToString(),
                                            providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        parts = []
        for i in range(0, len(images), 500):
            out = dict(zip(self.names, self.session.run(
                None, {self.session.get_inputs()[0].name: images[i : i + 500]}), strict=True))
            row = {"logits": out["logits"], "pen": out[self.penultimate].reshape(
                len(out["logits"]), -1)}
            for k, name in enumerate(self.gelus):
                t = out[name]
                if t.shape[2] == t.shape[3] != t.shape[1]:  # NCHW
                    t = t.transpose(0, 2, 3, 1)
                row[f"mean{k}"] = t.mean((1, 2))
                row[f"spread{k}"] = np.log(t.std((1, 2)) + 1e-3)
            parts.append(row)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def synthetic(kind: str, pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n synthetic outliers of one kind, made from the 32x32 images in pool."""
    def pick():
        return pool[rng.choice(len(pool), n, replace=False)]

    if kind.startswith("jigsaw"):
        tile = 8 if "8" in kind else 16
        k = 32 // tile
        x = pick().reshape(n, k, tile, k, tile, 3).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(n, k * k, tile, tile, 3)
        x = np.stack([im[rng.permutation(k * k)] for im in x]).reshape(n, k, k, tile, tile, 3)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, 32, 32, 3)
    if kind == "zoom":
        out = []
        for im in pick():
            s = int(rng.integers(8, 15))
            a, b = rng.integers(0, 33 - s, 2)
            out.append(np.asarray(Image.fromarray(im[a:a + s, b:b + s]).resize(
                (32, 32), Image.BICUBIC)))
        return np.stack(out)
    if kind == "blend":
        return ((pick().astype(np.float32) + pick()) / 2).astype(np.uint8)
    if kind == "mosaic":
        x = pick()
        for rows, cols in ((slice(0, 16), slice(16, 32)), (slice(16, 32), slice(0, 16)),
                           (slice(16, 32), slice(16, 32))):
            x[:, rows, cols] = pick()[:, rows, cols]
        return x
    if kind == "rotation":
        return np.stack([np.rot90(im, int(rng.integers(1, 4))) for im in pick()])
    if kind == "colour":
        return np.stack([im[..., rng.permutation(3)] if rng.random() < 0.5 else 255 - im
                         for im in pick()])
    if kind == "smooth field":
        return np.stack([np.asarray(Image.fromarray(
            rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).resize((32, 32), Image.BICUBIC))
            for s in rng.choice([2, 4, 8], n)])
    if kind == "noise":
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    raise ValueError(kind)


def energy(logits: np.ndarray) -> np.ndarray:
    return -logsumexp(logits)


def gaussian_score(train: dict, keys: list[str]):
    x = np.concatenate([train[k] for k in keys], 1)
    mean = x.mean(0)
    precision = np.linalg.inv(np.cov(x - mean, rowvar=False) + 1e-4 * np.eye(x.shape[1]))

    def score(d):
        z = np.concatenate([d[k] for k in keys], 1) - mean
        return np.einsum("ij,jk,ik->i", z, precision, z)
    return score


def detector(train: dict, outliers: list[dict], keys: list[str]):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def vector(d):
        return np.concatenate([energy(d["logits"])[:, None], *(d[k] for k in keys)], 1)

    inside = vector(train)
    outside = np.concatenate([vector(o) for o in outliers])
    x = np.concatenate([inside, outside])
    y = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    weight = np.r_[np.ones(len(inside)), np.full(len(outside), len(inside) / len(outside))]
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(x), y,
                                                         sample_weight=weight)
    return lambda d: model.decision_function(scaler.transform(vector(d)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "cifar10-jpeg")
    parser.add_argument("--ood", type=Path, default=SHARED / "flowers" / "train.tar.gz")
    parser.add_argument("--per-kind", type=int, default=4000,
                        help="synthetic outliers of each kind")
    parser.add_argument("--out", type=Path, default=RESULTS / "unsure_posthoc")
    args = parser.parse_args()

    vdir = modeldir.resolve_version(None)
    features = Features(vdir / modeldir.ONNX_FILE)
    splits = load_dataset(args.data, size=32)
    rng = np.random.default_rng(0)
    pool, keep = splits["train"].images[1::2], splits["train"].images[::2]
    photos, _ = read_images(args.ood, 32)
    print(f"features of {len(keep)} training images, 5,000 test images, {len(photos)} photos "
          f"(and their JPEG round trip), {len(KINDS)} x {args.per_kind} synthetic outliers",
          flush=True)
    train, test = features(keep), features(splits["test"].images)
    ood, ood_jpeg = features(photos), features(jpeg_round_trip(photos))
    made = {kind: features(synthetic(kind, pool, args.per_kind, rng)) for kind in KINDS}
    correct = test["logits"].argmax(1) == splits["test"].labels

    clipped = {}
    for p in (0.9, 0.95, 0.99):
        clip = np.quantile(train["pen"], p)
        clipped[p] = (lambda d, c=clip: energy(np.minimum(d["pen"], c) @ features.head))
    layers = len(features.gelus)
    deep = ["pen"] + [f"{s}{k}" for k in range(layers - 4, layers) for s in ("mean", "spread")]
    scores = {"energy (shipped)": lambda d: energy(d["logits"]),
              **{f"ReAct, clip at training p{round(p * 100)}": f for p, f in clipped.items()},
              **{f"layer {k} statistics (Gaussian)": gaussian_score(
                  train, [f"mean{k}", f"spread{k}"]) for k in range(layers)},
              "synthetic outlier exposure, all kinds": detector(train, list(made.values()), deep),
              **{f"synthetic outlier exposure, {kind} only": detector(train, [made[kind]], deep)
                 for kind in KINDS}}
    rows = []
    table = ["| score | AUROC | photos flagged | correct answers flagged | AUROC after JPEG q75 "
             "| flagged after it |", "| --- | --- | --- | --- | --- | --- |"]
    for name, score in scores.items():
        s_test, s_ood, s_jpeg = score(test), score(ood), score(ood_jpeg)
        threshold = np.quantile(s_test[correct], 0.95)
        row, line = score_row(name, s_test, s_test[correct], s_ood, s_jpeg, threshold)
        rows.append(row)
        table.append(line)
        print(line, flush=True)
    notes = (f"model: {modeldir.model_name(vdir)} version {modeldir.version_number(vdir)}",
             "in-distribution: the 5,000 test images (threshold at 5% of the correct ones, "
             "so the 'correct answers flagged' column is 5% by construction)",
             f"out-of-distribution: {len(photos)} photos from {args.ood.name}, at 32x32",
             f"fitted on: every other training image ({len(keep)}); synthetic outliers from "
             "the others")
    write_results(args.out, "Unsure without retraining: post-hoc scores and synthetic outlier "
                  "exposure (`bench/unsure_posthoc.py`)", "\n".join(table), {"rows": rows},
                  notes=notes)


if __name__ == "__main__":
    main()

"""How well "not sure" separates images of none of the classes: python bench/unsure.py

For a calibrated model (default: the bundled CIFAR-10 model's highest version), scores
in-distribution images its calibration did not see (the test images of --data outside the
calibration's fitting half, rebuilt from calibration.json's seed and fraction) against images of
none of its classes (--ood; default: the shared flowers photos), with several scores. The other
way round, a flowers model against CIFAR-10 images:

    python bench/unsure.py --model DIR --data /tmp/flowers-bench/split \
        --ood ../shared/data/cifar10-jpeg/test.tar.gz --out bench/results/unsure_flowers

Scores:

- energy (-logsumexp of the logits): the rule the model ships with;
- max_probability (of the calibrated softmax);
- max_logit; Mahalanobis distance and cosine k-NN (k=10) on the penultimate features, with
  class statistics from every --every'th training image;
- stem statistics: Mahalanobis distance of the first convolution's per-channel mean and spread.

For each: AUROC (out-of-distribution vs all in-distribution images), the share of
out-of-distribution images flagged, and the share of correctly classified in-distribution images
flagged, at the threshold that flags 5% of the correct answers of the fitting half. Each score is
also run on the photos after a 32x32 JPEG round trip at quality 75, as the CIFAR-10 images were
made (for a flowers model it only tells how much compression moves the score): a score that
falls there reacts to compression artefacts, not to content, and would flag
a sharp photo of a cat just as surely. Writes bench/results/unsure.md and .json.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from common import RESULTS, write_results
from PIL import Image

from convnet import calibrate, calibration, modeldir
from convnet.data import load_dataset
from convnet.evaluate import load_predictor
from convnet.imaging import decode_image

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
FLAG_RATE = 0.05


def read_images(path: Path, size: int):
    """uint8 (N, S, S, 3) and class names of the JPEG/PNG files in a tar archive."""
    images, names = [], []
    with tarfile.open(path) as archive:
        members = [m for m in archive if m.isfile()
                   and m.name.lower().endswith((".jpg", ".jpeg", ".png"))]
        for m in members:
            images.append(decode_image(archive.extractfile(m).read(), size=size))
            names.append(m.name.split("/")[-2])
    return np.stack(images), names


def jpeg_round_trip(images: np.ndarray, quality: int = 75) -> np.ndarray:
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        out.append(decode_image(buffer.getvalue(), size=image.shape[0]))
    return np.stack(out)


def feature_session(model_bytes: bytes):
    """A session whose outputs are probabilities, logits, penultimate features, stem output."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    softmax = next(n for n in graph.node if graph.output[0].name in n.output)
    head = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")][-1]
    stem = next(n for n in graph.node if n.op_type == "Conv")
    names = [softmax.input[0], head.input[0], stem.output[0]]
    for name in names:
        graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = [graph.output[0].name, *names]

    def run(images: np.ndarray):
        parts = [session.run(wanted, {session.get_inputs()[0].name: images[i : i + 256]})
                 for i in range(0, len(images), 256)]
        probs, logits, feats, stem_out = (np.concatenate([p[k] for p in parts])
                                          for k in range(4))
        spatial = (1, 2) if stem_out.shape[-1] < stem_out.shape[1] else (2, 3)  # NHWC or NCHW
        stats = np.concatenate([stem_out.mean(spatial), stem_out.std(spatial)], axis=1)
        return {"probs": probs, "logits": logits, "features": feats.reshape(len(feats), -1),
                "stem": stats}

    return run


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(an outside score > an inside score), ties counted half (Mann-Whitney U / n1 n2)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([inside, outside]))
    n_in, n_out = len(inside), len(outside)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def gaussian(reference: np.ndarray):
    mean = reference.mean(0)
    centred = reference - mean
    precision = np.linalg.pinv(centred.T @ centred / len(reference) + 1e-6 * np.eye(len(mean)))
    return lambda x: np.einsum("ij,jk,ik->i", x - mean, precision, x - mean)


def scorers(train: dict, train_labels: np.ndarray, temperature: float):
    classes = np.unique(train_labels)
    class_means = np.stack([train["features"][train_labels == c].mean(0) for c in classes])
    centred = train["features"] - class_means[np.searchsorted(classes, train_labels)]
    precision = np.linalg.pinv(centred.T @ centred / len(centred)
                               + 1e-6 * np.eye(centred.shape[1]))
    bank = train["features"] / np.linalg.norm(train["features"], axis=1, keepdims=True)
    stem = gaussian(train["stem"])

    def mahalanobis(o):
        d = [np.einsum("ij,jk,ik->i", o["features"] - m, precision, o["features"] - m)
             for m in class_means]
        return np.min(d, axis=0)

    def knn(o, k=10):
        q = o["features"] / np.linalg.norm(o["features"], axis=1, keepdims=True)
        return -np.sort(q @ bank.T, axis=1)[:, -k]

    return {
        "energy": lambda o: calibration.unsure_scores("energy", o["probs"], o["logits"]),
        "max_probability": lambda o: -calibration.softmax(o["logits"], temperature).max(1),
        "max_logit": lambda o: -o["logits"].max(1),
        "mahalanobis (features)": mahalanobis,
        "k-NN (features)": knn,
        "stem statistics": lambda o: stem(o["stem"]),
    }


def score_row(name: str, inside: np.ndarray, inside_correct: np.ndarray, ood: np.ndarray,
              ood_jpeg: np.ndarray, threshold: float) -> tuple[dict, str]:
    """One score's figures (in-distribution scores, those of its correct answers, the other
    images' before and after the JPEG round trip) and its table line."""
    row = {"score": name, "auroc": auroc(inside, ood),
           "ood_flagged": float(np.mean(ood > threshold)),
           "correct_flagged": float(np.mean(inside_correct > threshold)),
           "auroc_jpeg": auroc(inside, ood_jpeg),
           "ood_flagged_jpeg": float(np.mean(ood_jpeg > threshold))}
    return row, (f"| {name} | {row['auroc']:.3f} | {row['ood_flagged']:.1%} | "
                 f"{row['correct_flagged']:.1%} | {row['auroc_jpeg']:.3f} | "
                 f"{row['ood_flagged_jpeg']:.1%} |")


def measure(model: str | Path | None, data: Path, ood: Path, every: int = 5):
    """The scores' rows for one calibrated model (see the module's docstring), its table lines
    and the facts behind them."""
    vdir = modeldir.resolve_version(model)
    record = json.loads((vdir / calibration.CALIBRATION_FILE).read_text())
    classes = modeldir.load_labels(vdir)
    run = feature_session((vdir / modeldir.ONNX_FILE).read_bytes())
    size = load_predictor(vdir).input_size
    splits = load_dataset(data, size=size)  # in the order `convnet calibrate` saw them
    if splits["test"].classes != classes:
        raise SystemExit(f"{data}'s classes are not the model's: {classes}")
    test_x, test_y = splits["test"].images, splits["test"].labels
    train_x, train_y = splits["train"].images[::every], splits["train"].labels[::every]
    ood_x, _ = read_images(ood, size)
    print(f"{len(test_x)} in-distribution test images, {len(train_x)} training images for "
          f"class statistics, {len(ood_x)} out-of-distribution photos", flush=True)

    fit_idx, report_idx = calibrate.split_for_fitting(test_y, record["fit_fraction"],
                                                      record["seed"])
    test, train = run(test_x), run(train_x)
    ood_out, ood_jpeg = run(ood_x), run(jpeg_round_trip(ood_x))
    # The calibrated graph's logits output is the raw one: energy reads it as the server does.
    correct = test["probs"].argmax(1) == test_y
    rows, table = [], ["| score | AUROC | other images flagged | correct answers flagged | "
                       f"AUROC after JPEG q75 at {size} px | flagged after it |",
                       "| --- | --- | --- | --- | --- | --- |"]
    for name, score in scorers(train, train_y, record["temperature"]).items():
        s_test, s_ood, s_jpeg = score(test), score(ood_out), score(ood_jpeg)
        threshold = np.quantile(s_test[fit_idx][correct[fit_idx]], 1 - FLAG_RATE)
        report = s_test[report_idx]
        row, line = score_row(name, report, report[correct[report_idx]], s_ood, s_jpeg,
                              threshold)
        rows.append(row)
        table.append(line)
        print(line, flush=True)
    notes = (f"model: {modeldir.model_name(vdir)} version {modeldir.version_number(vdir)} "
             f"(temperature {record['temperature']:.4f})",
             f"in-distribution: {len(report_idx)} test images outside the calibration's fitting "
             f"half; thresholds from the {len(fit_idx)} of that half",
             f"out-of-distribution: {len(ood_x)} images from {ood.name}")
    return rows, table, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="calibrated model (default: bundled)")
    parser.add_argument("--data", type=Path, default=SHARED / "cifar10-jpeg",
                        help="the model's own data, with train and test splits (any format "
                             "convnet reads)")
    parser.add_argument("--every", type=int, default=5,
                        help="class statistics from every N-th training image")
    parser.add_argument("--ood", type=Path, default=SHARED / "flowers" / "train.tar.gz",
                        help="images of none of the classes (a tar archive)")
    parser.add_argument("--out", type=Path, default=RESULTS / "unsure")
    args = parser.parse_args()

    rows, table, notes = measure(args.model, args.data, args.ood, args.every)
    text = "\n".join(table)
    print(text)
    write_results(args.out, "Unsure: separating images of none of the classes "
                  "(`bench/unsure.py`)", text, {"rows": rows}, notes=notes)


if __name__ == "__main__":
    main()

"""Honest probabilities and "not sure": temperature scaling, calibration error, and the rule that
flags an image as unlike anything the model was trained on.

Both are fitted after training on images the weights never saw (`convnet.calibrate`) and stored
in the model directory: the temperature inside model.onnx (so every consumer, TF Serving's
included, gets calibrated probabilities) and the unsure rule in calibration.json:

    {"temperature": 0.55,                      # logits were divided by this before the softmax
     "ece": {"before": 0.18, "after": 0.015},  # 15 bins, on images not used to fit either
     "unsure": {"score": "energy",             # how unfamiliar an image looks: -logsumexp(logits)
                "output": "logits",            # the graph output the score is computed from
                "flag_rate": 0.05,             # share of correct validation answers flagged
                "threshold": -7.1,             # scores above this are "unsure"
                "reference": [...]}}           # quantiles 0, 0.01, ..., 1 of the score over the
                                               # correct validation answers

`confidence` is 1 minus the score's quantile among those correct validation answers: 0.5 means
"as familiar as a typical correct answer", 0.02 "less familiar than 98% of them". An image is
unsure when its confidence falls below `flag_rate`.

This module needs numpy only (the server imports it); fitting uses scipy, imported when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

CALIBRATION_FILE = "calibration.json"
RELIABILITY_FILE = "reliability.png"
ECE_BINS = 15
SCORES = ("energy", "max_probability")  # what an unsure rule may score by


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def logsumexp(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    top = x.max(axis=1)
    return top + np.log(np.exp(x - top[:, None]).sum(axis=1))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS):
    """Per equal-width confidence bin: (count, mean confidence, accuracy); empty bins give 0s."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # (lo, hi] bins
    count = np.bincount(which, minlength=bins)
    safe = np.maximum(count, 1)
    return (count, np.bincount(which, confidence, bins) / safe,
            np.bincount(which, correct, bins) / safe)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their size."""
    count, confidence, accuracy = reliability_bins(probs, labels, bins)
    return float(np.sum(count * np.abs(accuracy - confidence)) / max(len(labels), 1))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimises the negative log-likelihood of softmax(logits / T). The NLL is
    convex in 1/T, so a bounded scalar search finds the optimum."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, np.float64)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        return float(np.mean(logsumexp(z) - z[rows, labels]))

    result = minimize_scalar(nll, bounds=(np.log(0.01), np.log(100.0)), method="bounded",
                             options={"xatol": 1e-6})
    return float(np.exp(result.x))


def unsure_scores(score: str, probs: np.ndarray, logits: np.ndarray | None) -> np.ndarray:
    """Higher = less like the training data. energy needs the raw logits."""
    if score == "energy":
        if logits is None:
            raise ValueError("the energy score needs the model's logits")
        return -logsumexp(logits)
    if score == "max_probability":
        return -np.asarray(probs, np.float64).max(axis=1)
    raise ValueError(f"unknown unsure score {score!r}: one of {', '.join(SCORES)}")


@dataclass(frozen=True)
class UnsureRule:
    score: str  # one of SCORES
    output: str | None  # graph output the score needs (logits), None for probabilities only
    flag_rate: float  # share of correct validation answers that the rule flags
    reference: tuple[float, ...]  # quantiles 0..1 of the score over correct validation answers

    @classmethod
    def fit(cls, score: str, scores_of_correct: np.ndarray, flag_rate: float = 0.05,
            output: str | None = None) -> UnsureRule:
        if not 0 < flag_rate < 1:
            raise ValueError(f"flag_rate must be between 0 and 1, got {flag_rate}")
        if len(scores_of_correct) < 20:
            raise ValueError(f"{len(scores_of_correct)} correct validation answers are too few "
                             "to set an unsure threshold (at least 20)")
        reference = np.quantile(scores_of_correct, np.linspace(0, 1, 101))
        return cls(score, output, flag_rate, tuple(float(v) for v in reference))

    # Computed once per rule rather than per request: the server asks for them on every answer.
    @cached_property
    def _levels(self) -> np.ndarray:
        """The quantile level of each reference value: 0, 0.01, ..., 1."""
        return np.linspace(0, 1, len(self.reference))

    @cached_property
    def _reference(self) -> np.ndarray:
        return np.asarray(self.reference, dtype=np.float64)

    @cached_property
    def threshold(self) -> float:
        """Scores above this are unsure: the (1 - flag_rate) quantile of the reference."""
        return float(np.interp(1 - self.flag_rate, self._levels, self._reference))

    def confidence(self, scores: np.ndarray) -> np.ndarray:
        """1 - the quantile of each score among the correct validation answers, in [0, 1]."""
        return 1.0 - np.interp(scores, self._reference, self._levels)

    def unsure(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def to_json(self) -> dict:
        return {"score": self.score, "output": self.output, "flag_rate": self.flag_rate,
                "threshold": self.threshold, "reference": list(self.reference)}

    @classmethod
    def from_json(cls, data: dict) -> UnsureRule:
        """Raises ValueError with the reason for anything malformed."""
        if not isinstance(data, dict):
            raise ValueError("unsure must be an object")
        score, output = data.get("score"), data.get("output")
        if score not in SCORES:
            raise ValueError(f"unsure.score {score!r} is not one of {', '.join(SCORES)}")
        if output is not None and not isinstance(output, str):
            raise ValueError("unsure.output must be a string or null")
        if score == "energy" and output is None:
            raise ValueError("unsure.score energy needs unsure.output (the logits output)")
        rate, reference = data.get("flag_rate"), data.get("reference")
        if not isinstance(rate, int | float) or not 0 < rate < 1:
            raise ValueError("unsure.flag_rate must be a number between 0 and 1")
        if (not isinstance(reference, list) or len(reference) < 2
                or not all(isinstance(v, int | float) for v in reference)
                or np.any(np.diff(reference) < 0)):
            raise ValueError("unsure.reference must be a rising list of numbers")
        return cls(score, output, float(rate), tuple(float(v) for v in reference))


def plot_reliability(labels: np.ndarray, curves: dict[str, np.ndarray], path: Path,
                     title: str = "") -> None:
    """A reliability diagram: accuracy against confidence per bin, one line per set of
    probabilities in `curves` (e.g. before and after temperature scaling), with the ECE of each
    in the legend and the bin sizes below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfect calibration")
    width = 1 / ECE_BINS
    for i, (name, probs) in enumerate(curves.items()):
        count, confidence, accuracy = reliability_bins(probs, labels)
        used = count > 0
        ece = expected_calibration_error(probs, labels)
        top.plot(confidence[used], accuracy[used], marker="o", label=f"{name} (ECE {ece:.3f})")
        centres = (np.arange(ECE_BINS) + 0.5) * width
        bottom.bar(centres + (i - 0.5) * width / 2, count, width=width / 2, label=name)
    top.set_ylabel("accuracy")
    top.set_title(title or "reliability")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""How faithful and how costly are the served explanations? python bench/explain.py [--images 500]

A deletion test (Petsiuk et al., RISE, 2018) on a fixed random sample of test images from DATA
(default: the shared CIFAR-10 JPEG test set) with MODEL (default: the bundled model): each image's
pixels are blanked, in steps of 1/16 of the image, most salient first, and the probability of the
class the model first answered is read after every step. The area under that curve (fraction
blanked 0..1 against probability) is low when the map finds the pixels the answer rests on; the
same with a random order is the baseline: random pixels (scattered, as the issue asks) and random
cells of the served map's grid (the same granularity as the map's own order, so the comparison is
not between compact and scattered blanking). Pixels are blanked two ways: black (Petsiuk et al.'s
choice; different from occlusion's own fill, so a method is not rewarded for matching its own
perturbation) and the image's mean colour (occlusion's fill, closer to the training images).
Two controls: "centre" ranks pixels by their distance from the middle, no model involved (what a
map must beat to show more than "objects sit in the middle"), and the served map read backwards,
least salient first, which should keep the probability up.

`--compare` adds the alternatives that were measured before choosing the served one: coarser
and finer occlusion squares, occlusion filled with black, and RISE (Petsiuk et al.: random
low-resolution masks, the map is the mask average weighted by the probability they leave); with
`--images 100` it takes about as long as the default run (writes explain_compare.md/.json).

Cost: the wall time of one image's explanation (occlusion maps + overlay PNG) on a one-thread ONNX
Runtime session, as a server worker runs it, against one plain prediction of one image; median
over --cost-images images. Prints a table; writes bench/results/explain.md/.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import RESULTS, write_results
from PIL import Image

from convnet import explain
from convnet.data import load_dataset
from convnet.modeldir import resolve_version
from convnet.serve.model import load_model

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg"
STEPS = 16  # the deletion curve has STEPS + 1 points: 0, 1/16, ..., all pixels blanked
G, P = explain.GRID, explain.PATCH
SERVED = f"occlusion {G}x{G}, {P}x{P} squares (served)"
# name -> ("occlusion", grid, patch, fill) or ("rise", masks); --compare adds ALTERNATIVES
METHODS = {SERVED: ("occlusion", G, P, "mean colour")}
ALTERNATIVES = {
    "occlusion 8x8, 1x1 squares": ("occlusion", 8, 1, "mean colour"),
    "occlusion 8x8, 3x3 squares": ("occlusion", 8, 3, "mean colour"),
    "occlusion 16x16, 4x4 squares": ("occlusion", 16, 4, "mean colour"),
    "occlusion 8x8, 2x2 squares filled black": ("occlusion", 8, 2, "black"),
    "RISE, 128 masks": ("rise", 128),
    "RISE, 256 masks": ("rise", 256),
}
RISE_CELLS, RISE_KEEP = 4, 0.5  # RISE's masks: 4x4 random cells, each kept with p = 0.5


def deletion_curves(predict, images, targets, orders, blank) -> np.ndarray:
    """(N, STEPS + 1) probability of targets[n] as pixels are blanked in orders[n] (a
    permutation of the S*S pixel indices), `blank` (N, 3) uint8 the fill per image."""
    n, size = len(images), images.shape[1]
    cuts = np.round(np.linspace(0, size * size, STEPS + 1)).astype(int)
    rank = np.empty_like(orders)
    rank[np.arange(n)[:, None], orders] = np.arange(size * size)  # pixel -> its turn
    rank = rank.reshape(n, size, size)
    curves = np.empty((n, len(cuts)), np.float32)
    for step, cut in enumerate(cuts):
        blanked = np.where((rank < cut)[..., None], blank[:, None, None, :], images)
        probs = np.concatenate([predict(blanked[i:i + 256]) for i in range(0, n, 256)])
        curves[:, step] = probs[np.arange(n), targets]
    return curves


def auc(curves: np.ndarray) -> np.ndarray:
    """Per image, the trapezoid area under the curve over x = 0..1."""
    return ((curves[:, 1:] + curves[:, :-1]) / 2).mean(1)


def rise_maps(predict, images, targets, masks: int, rng) -> np.ndarray:
    """(N, S, S) RISE saliency: sum of p(target | masked image) x mask / sum of masks, the masks
    bilinearly upsampled random RISE_CELLS^2 grids, shifted at random; hidden pixels take the
    image's mean colour."""
    n, size = len(images), images.shape[1]
    cell = -(-size // RISE_CELLS)
    out = np.empty((n, size, size), np.float32)
    fills = explain.mean_colours(images).astype(np.float32)
    for i in range(n):
        grids = (rng.random((masks, RISE_CELLS, RISE_CELLS)) < RISE_KEEP).astype(np.float32)
        big = (RISE_CELLS + 1) * cell
        shifts = rng.integers(0, cell, (masks, 2))
        keep = np.stack([np.asarray(Image.fromarray(g).resize((big, big), Image.BILINEAR))
                         [dy:dy + size, dx:dx + size] for g, (dy, dx) in zip(grids, shifts,
                                                                              strict=True)])
        copies = images[i] * keep[..., None] + fills[i] * (1 - keep[..., None])
        scores = predict(copies.round().astype(np.uint8))[:, targets[i]]
        out[i] = np.tensordot(scores, keep, 1) / np.maximum(keep.sum(0), 1e-6)
    return out


def saliency_order(maps: np.ndarray, size: int, rng) -> np.ndarray:
    """(N, S*S) pixel indices, most salient first; ties (pixels of one cell) in random order."""
    orders = []
    for heat in maps:
        pixels = explain.to_pixels(heat, size).ravel()
        shuffled = rng.permutation(pixels.size)
        orders.append(shuffled[np.argsort(-pixels[shuffled], kind="stable")])
    return np.stack(orders)


def centre_maps(n: int, size: int) -> np.ndarray:
    """(N, S, S) as a map with one cell per pixel: nearer the middle = more salient."""
    yx = np.arange(size) - (size - 1) / 2
    distance = np.hypot(yx[:, None], yx[None, :])
    return np.broadcast_to(-distance, (n, size, size))


def time_one(fn, repeats: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def cost(model, images: np.ndarray) -> dict:
    """Median seconds per image: a plain prediction, and an explanation (maps + PNG)."""
    plain, explained = [], []
    def predict(pixels):
        return model.split(model.predict(pixels))[0]

    predict(images[:1])  # warm up
    for image in images:
        batch = image[None]

        def explain_one(batch=batch):
            probs = predict(batch)
            heat = explain.occlusion_maps(predict, batch, probs.argmax(1), probs)
            explain.overlay_png(batch[0], heat[0])

        plain.append(time_one(lambda batch=batch: predict(batch), 5))
        explained.append(time_one(explain_one))
    return {"plain_s": float(np.median(plain)), "explain_s": float(np.median(explained))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA / "test.tar.gz"))
    parser.add_argument("--model", default=None, help="Model root or version; default bundled.")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--cost-images", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime threads for the deletion test (0: one per core).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true",
                        help="Also measure the alternatives (see above).")
    parser.add_argument("--out", type=Path, default=None,
                        help="Default: bench/results/explain (explain_compare with --compare).")
    args = parser.parse_args()
    out = args.out or RESULTS / ("explain_compare" if args.compare else "explain")
    methods = {**METHODS, **(ALTERNATIVES if args.compare else {})}

    version = resolve_version(args.model)
    bulk = load_model(version, inference_threads=args.threads)

    def predict(pixels):  # probabilities only, whatever else a calibrated model appends
        return bulk.split(bulk.predict(pixels))[0]

    split = next(iter(load_dataset(args.data, size=bulk.input_size).values()))
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(len(split.images), args.images, replace=False))
    images, size = split.images[chosen], bulk.input_size
    probs = predict(images)
    targets = probs.argmax(1)
    blanks = {"black": np.zeros((len(images), 3), np.uint8),
              "mean colour": explain.mean_colours(images)}

    n = len(images)
    orders = {"random pixels": np.stack([rng.permutation(size * size) for _ in images]),
              f"random cells of the {explain.GRID}x{explain.GRID} grid":
                  saliency_order(rng.standard_normal((n, explain.GRID, explain.GRID)), size, rng),
              "centre first (no model)": saliency_order(centre_maps(n, size), size, rng)}
    runs, seconds = {}, {}
    for name, spec in methods.items():
        started = time.perf_counter()
        if spec[0] == "rise":
            maps, runs[name] = rise_maps(predict, images, targets, spec[1], rng), spec[1]
        else:
            _, grid, patch, fill = spec
            maps = explain.occlusion_maps(predict, images, targets, probs, grid=grid,
                                          patch=patch, fill=blanks[fill])
            runs[name] = (grid - patch + 1) ** 2
        seconds[name] = (time.perf_counter() - started) / n
        orders[name] = saliency_order(maps, size, rng)
        if name == SERVED:
            orders["served map, least salient first (control)"] = saliency_order(-maps, size,
                                                                                   rng)
        print(f"{name}: maps in {seconds[name] * 1000:.1f} ms per image", flush=True)

    results, areas = {}, {}
    for name, order in orders.items():
        results[name] = {"runs_per_image": runs.get(name, 0),
                         "seconds_per_image_bulk": seconds.get(name, 0.0)}
        for blank, fill in blanks.items():
            areas[name, blank] = auc(deletion_curves(predict, images, targets, order, fill))
            # Paired with random pixels on the same images: the SE of the difference is far
            # smaller than either AUC's own, since the images' difficulty cancels.
            diff = areas[name, blank] - areas["random pixels", blank]
            results[name][blank] = {
                "auc": float(areas[name, blank].mean()),
                "auc_sem": float(areas[name, blank].std(ddof=1) / np.sqrt(n)),
                "minus_random_pixels": float(diff.mean()),
                "minus_random_pixels_sem": float(diff.std(ddof=1) / np.sqrt(n))}
        print(f"{name}: deletion AUC black {results[name]['black']['auc']:.4f}, "
              f"mean colour {results[name]['mean colour']['auc']:.4f}", flush=True)

    served = load_model(version, inference_threads=1)
    timing = cost(served, images[:args.cost_images])
    rows = ["| pixel order | model runs / image | deletion AUC, black | minus random pixels "
            "| deletion AUC, mean colour | minus random pixels |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        count = r["runs_per_image"] or "-"  # the orders that run no model
        cells = [f"{r[b]['auc']:.4f} ± {r[b]['auc_sem']:.4f} | "
                 f"{r[b]['minus_random_pixels']:+.4f} ± {r[b]['minus_random_pixels_sem']:.4f}"
                 for b in blanks]
        rows.append(f"| {name} | {count} | {' | '.join(cells)} |")
    body = "\n".join([
        *rows, "",
        f"Probability of the answered class before any blanking: {probs.max(1).mean():.4f} "
        f"(mean over the {len(images)} images). Lower AUC = the probability falls sooner = "
        "the order found what the answer rests on. ± is the standard error of the mean; "
        "\"minus random pixels\" is paired: the same images, blanked in the two orders.", "",
        f"Cost, one image on a one-thread session (median of {args.cost_images}): plain "
        f"prediction {timing['plain_s'] * 1000:.1f} ms, explanation ({runs[SERVED]} blanked "
        f"copies in one batch, plus the overlay PNG) {timing['explain_s'] * 1000:.1f} ms, "
        f"{timing['explain_s'] / timing['plain_s']:.0f}x.",
    ])
    print(body)
    write_results(out, "Explanations: deletion test and cost (`bench/explain.py`)", body,
                  {"data": args.data, "model": str(version), "images": int(len(images)),
                   "steps": STEPS, "methods": results, "cost": timing,
                   "mean_top_probability": float(probs.max(1).mean()),
                   "compare": args.compare},
                  notes=(f"data: {args.data}, {len(images)} images drawn with seed {args.seed}",
                         f"model: {version}"))


if __name__ == "__main__":
    main()

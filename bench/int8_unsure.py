"""Does the unsure rule, set on float logits, hold on the int8 model? python bench/int8_unsure.py

Runs a version's model.onnx and model.int8.onnx (default: the bundled CIFAR-10 model) over its
test images and over photos of none of its classes (default: the shared flowers), and prints,
for each set, the share each flags as unsure, how often the two flags agree, how often the
answers agree and the largest probability difference. Writes bench/results/int8_unsure.md/.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import RESULTS, write_results
from unsure import SHARED, read_images

from convnet import modeldir
from convnet.data import load_dataset
from convnet.serve.model import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="version with both models (default: bundled)")
    parser.add_argument("--data", type=Path, default=SHARED / "cifar10-jpeg")
    parser.add_argument("--ood", type=Path, default=SHARED / "flowers" / "train.tar.gz")
    parser.add_argument("--out", type=Path, default=RESULTS / "int8_unsure")
    args = parser.parse_args()

    vdir = modeldir.resolve_version(args.model)
    models = {p: load_model(vdir, precision=p) for p in ("float", "int8")}
    size = models["float"].input_size
    sets = {"test images": load_dataset(args.data, size=size)["test"].images,
            f"{args.ood.name} (none of the classes)": read_images(args.ood, size)[0]}
    rows, table = [], ["| images | count | unsure, float | unsure, int8 | same flag | "
                       "same answer | largest probability difference |",
                       "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, images in sets.items():
        out = {}
        for precision, model in models.items():
            if model.unsure is None:
                raise SystemExit(f"{vdir} has no unsure rule (calibrate it first)")
            probs, scores = model.split(model.predict(images))
            out[precision] = (probs, model.unsure.unsure(scores))
        (pf, uf), (pi, ui) = out["float"], out["int8"]
        row = {"images": name, "count": len(images), "unsure_float": float(uf.mean()),
               "unsure_int8": float(ui.mean()), "same_flag": float(np.mean(uf == ui)),
               "same_answer": float(np.mean(pf.argmax(1) == pi.argmax(1))),
               "max_probability_diff": float(np.abs(pf - pi).max())}
        rows.append(row)
        table.append(f"| {name} | {len(images)} | {row['unsure_float']:.1%} | "
                     f"{row['unsure_int8']:.1%} | {row['same_flag']:.2%} | "
                     f"{row['same_answer']:.2%} | {row['max_probability_diff']:.3f} |")
    text = "\n".join(table)
    print(text)
    write_results(args.out, "int8 and the unsure rule (`bench/int8_unsure.py`)", text,
                  {"rows": rows}, notes=(f"model: {modeldir.model_name(vdir)} version "
                                         f"{modeldir.version_number(vdir)}",))


if __name__ == "__main__":
    main()

"""The baseline for bench/serve_load.py: how a typical tutorial serves a Keras classifier.

Flask's development server, the Keras model restored from model.keras once at start-up, PIL to
decode each upload, and `model.predict` on a batch of one per request. Deliberately not tuned:
it is the "before" that our server is measured against.

    python bench/baseline_server.py runs/cifar10/1 --port 5000
    curl -F file=@cat.jpg http://127.0.0.1:5000/predict
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter

import keras  # noqa: E402  (after the environment above)
import numpy as np  # noqa: E402
from flask import Flask, jsonify, request  # noqa: E402
from PIL import Image  # noqa: E402

import convnet.models  # noqa: E402, F401  (registers the custom activation for loading)


def create_app(version_dir: Path) -> Flask:
    app = Flask(__name__)
    model = keras.models.load_model(version_dir / "model.keras", compile=False)
    labels = json.loads((version_dir / "labels.json").read_text())

    @app.route("/predict", methods=["POST"])
    def predict():
        if "file" not in request.files:
            return jsonify(error="no file"), 400
        image = Image.open(request.files["file"].stream).convert("RGB").resize((32, 32))
        batch = np.expand_dims(np.array(image, dtype=np.uint8), axis=0)  # (1, 32, 32, 3)
        probs = model.predict(batch, verbose=0)[0]
        best = int(np.argmax(probs))
        return jsonify(label=labels[best], probability=float(probs[best]))

    @app.route("/healthz")
    def healthz():
        return jsonify(status="ok")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a version folder with model.keras, labels.json")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    create_app(args.model).run(host=args.host, port=args.port)  # threaded, as Flask's default


if __name__ == "__main__":
    main()

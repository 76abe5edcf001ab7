"""Small synthetic datasets written in the real on-disk formats, for the data and training tests.

Images are learnable on purpose: each class has its own mean colour plus noise, so a one-epoch
training run must beat chance.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]


def make_images(n: int, num_classes: int = 10, seed: int = 0):
    """(n, 32, 32, 3) uint8 images and their labels, one colour per class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    # The palette is fixed whatever the seed, so train and test splits share class colours.
    palette = np.random.default_rng(1234).integers(30, 225, (num_classes, 3))
    noise = rng.normal(0, 20, (n, 32, 32, 3))
    images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_cifar_batches(folder: Path, per_batch: int = 20, seed: int = 0) -> Path:
    """data_batch_1..5, test_batch and batches.meta as the CIFAR-10 python release lays them."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        images, labels = make_images(per_batch, seed=seed + i)
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(x) for x in labels],
            b"data": images.transpose(0, 3, 1, 2).reshape(per_batch, 3072),
            b"filenames": [f"img_{j}.png".encode() for j in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": per_batch}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def tar_folder(folder: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return archive


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def write_image_folder(root: Path, splits=("train", "test"), per_class: int = 4,
                       num_classes: int = 3, fmt: str = "PNG", seed: int = 0) -> Path:
    """root/<split>/<class>/<n>.<ext> with `per_class` images per class."""
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    for s, split in enumerate(splits):
        images, labels = make_images(per_class * num_classes, num_classes, seed=seed + s)
        for k, (image, label) in enumerate(zip(images, labels, strict=True)):
            path = root / split / CLASSES[label] / f"{k}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(image, fmt))
    return root


def make_photo(label: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A (height, width, 3) uint8 "photo" of class `label`: the class colour as a disc in the
    centre on a noisy background, so the centre square holds the class and crops keep it."""
    palette = np.random.default_rng(1234).integers(30, 225, (10, 3))
    ys, xs = np.mgrid[:height, :width]
    disc = (ys - height / 2) ** 2 + (xs - width / 2) ** 2 < (min(width, height) * 0.4) ** 2
    image = rng.normal(128, 30, (height, width, 3))
    image[disc] = palette[label] + rng.normal(0, 15, (int(disc.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_photo_folder(root: Path, splits=("train", "test"), per_class: int = 4,
                       num_classes: int = 3, sizes=((96, 72), (80, 100), (128, 96)),
                       fmt: str = "JPEG", seed: int = 0) -> Path:
    """root/<split>/<class>/<n>.jpg: photos of the sizes given (width, height), in turn."""
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(num_classes):
            folder = root / split / CLASSES[c]
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                width, height = sizes[k % len(sizes)]
                (folder / f"{k}.{ext}").write_bytes(encode(make_photo(c, width, height, rng),
                                                           fmt))
    return root

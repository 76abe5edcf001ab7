"""The audit's one pass over a dataset's raw files: what each image is, before any judgement.

Every format `convnet.data` reads is walked here (image folders and their tar archives through
the loader's own `_class_files`, CIFAR-10 batches through `load_cifar_batches`), so a finding
names the very file, or batch and row, that training would read. Each readable image is decoded
twice: once by `imaging.decode_image` at S x S, exactly as training and serving see it (and
refused exactly as they refuse it), and once whole, for its size, colour, exact digest and
perceptual hashes. Unreadable files are kept with the loader's reason instead of being skipped.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from convnet import data
from convnet.imaging import ImageError, decode_image

CIFAR_BATCH_ROWS = 10_000  # images per CIFAR-10 python batch file
CROPS = (1.0, 0.9, 0.8)  # centre squares hashed per image: whole, 90% and 80% of each side
GRAY_SPREAD = 12  # max - min over R, G, B (0..255) at the 99th percentile pixel: greyscale below


@dataclass
class Scan:
    """What the audit knows about each readable image, row i of every array being image i."""

    classes: list[str]
    names: list[str] = field(default_factory=list)  # path in the dataset, or "data_batch_2[17]"
    splits: list[str] = field(default_factory=list)  # "train" or "test"
    labels: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height), pixels
    gray: list[bool] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)  # sha256 of the decoded pixels
    hashes: list[list[int]] = field(default_factory=list)  # 64-bit pHash per CROPS entry
    images: list[np.ndarray] = field(default_factory=list)  # (S, S, 3) uint8 each
    unreadable: list[dict] = field(default_factory=list)  # {"name", "split", "reason"}

    def __len__(self) -> int:
        return len(self.names)

    def add(self, name: str, split: str, label: int, whole: Image.Image,
            small: np.ndarray) -> None:
        """Record one decoded image: `whole` its full-size RGB picture, `small` (S, S, 3)."""
        pixels = np.asarray(whole)
        self.names.append(name)
        self.splits.append(split)
        self.labels.append(label)
        self.sizes.append(whole.size)
        self.digests.append(hashlib.sha256(
            f"{pixels.shape}".encode() + pixels.tobytes()).digest())
        gray = whole.convert("L")  # what pHash reads: converted once, not once per crop
        self.hashes.append([_phash(_centre(gray, keep)) for keep in CROPS])
        spread = small.max(axis=2).astype(np.int16) - small.min(axis=2)
        self.gray.append(bool(np.percentile(spread, 99) <= GRAY_SPREAD))
        self.images.append(small)

    def image_array(self) -> np.ndarray:
        """All images, (N, S, S, 3) uint8."""
        return np.stack(self.images) if self.images else np.zeros((0, 1, 1, 3), np.uint8)


def _centre(image: Image.Image, keep: float) -> Image.Image:
    if keep == 1.0:
        return image
    width, height = image.size
    dx, dy = round(width * (1 - keep) / 2), round(height * (1 - keep) / 2)
    return image.crop((dx, dy, width - dx, height - dy))


def _phash(image: Image.Image) -> int:
    """imagehash's DCT perceptual hash (8 x 8 = 64 bits) as one integer."""
    import imagehash

    bits = imagehash.phash(image).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def scan_dataset(path: str | os.PathLike, size: int | None = None) -> Scan:
    """Walk every image of the dataset at `path`; `size` is S for the decoded copies (default:
    32 for thumbnail-sized sets, 64 for photos). Raise DataError if it holds no image at all."""
    path = Path(path)
    if not path.exists():
        raise data.DataError(f"dataset {path} does not exist")
    if data._is_cifar(path):
        return _scan_cifar(path, size or data.CIFAR_SIZE)
    sources = [path]
    if path.is_dir():
        archives = [path / f"{s}.tar.gz" for s in data.SPLITS]
        sources = [a for a in archives if a.is_file()] or [path]
    scan = Scan(classes=[])
    folder_of: list[str] = []  # each image's class folder; indices once all are known
    seen: set[str] = set()
    train_classes: set[str] = set()
    for source in sources:
        for folder, parts, read in data._class_files(source, set()):
            name, split, raw = "/".join(parts), data._split_of(folder), read()
            seen.add(folder[-1])
            if split == "train":
                train_classes.add(folder[-1])
            try:
                size = size or _default_size(raw)
                small = decode_image(raw, size=size or data.CIFAR_SIZE)
                with Image.open(io.BytesIO(raw)) as img:
                    whole = ImageOps.exif_transpose(img).convert("RGB")
            except ImageError as exc:
                scan.unreadable.append({"name": name, "split": split, "reason": str(exc)})
                continue
            except Exception as exc:  # decode_image accepted it, the full decode did not
                scan.unreadable.append({"name": name, "split": split, "reason": f"{exc}"})
                continue
            scan.add(name, split, -1, whole, small)
            folder_of.append(folder[-1])
        if source.is_dir():
            scan.unreadable += _dangling_links(source)
    if not seen and not scan.unreadable:
        raise data.DataError(f"{path}: no images found in class folders (expected "
                             "train/<class>/<image>, test/<class>/<image> or <class>/<image>, "
                             "or CIFAR-10 batches)")
    scan.classes = sorted(train_classes or seen)
    scan.classes += sorted(seen - set(scan.classes))  # classes only in test/ come last
    index = {c: i for i, c in enumerate(scan.classes)}
    scan.labels = [index[c] for c in folder_of]
    return scan


def _default_size(raw: bytes) -> int | None:
    """32 for CIFAR-sized images, 64 for photos, judged from the first readable header (None
    until there is one)."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            return data.CIFAR_SIZE if min(img.size) <= data.CIFAR_SIZE * 5 // 4 else 64
    except Exception:
        return None


def _dangling_links(root: Path) -> list[dict]:
    """Symbolic links in class folders whose target is missing: the loader cannot see them at
    all, so the audit names them."""
    out = []
    for link in sorted(root.rglob("*")):
        parts = link.relative_to(root).parts
        if link.is_symlink() and not link.exists() and not any(p.startswith(".") for p in parts):
            folder = parts[:-1]
            out.append({"name": "/".join(parts), "split": data._split_of(folder) if folder
                        else "train", "reason": f"broken symbolic link to {os.readlink(link)}"})
    return out


def _scan_cifar(path: Path, size: int) -> Scan:
    splits = data.load_cifar_batches(path, size=data.CIFAR_SIZE)
    scan = Scan(splits["train"].classes)
    for split, batches in (("train", data.CIFAR_TRAIN_BATCHES), ("test", (data.CIFAR_TEST_BATCH,))):
        part = splits[split]
        rows = len(part) // len(batches) or CIFAR_BATCH_ROWS
        small = data.resize_images(part.images, size)
        for i, (image, label) in enumerate(zip(part.images, part.labels, strict=True)):
            batch = min(i // rows, len(batches) - 1)
            name = f"{batches[batch]}[{i - batch * rows}]"  # file and row, as the batch holds it
            scan.add(name, split, int(label), Image.fromarray(image), small[i])
    return scan

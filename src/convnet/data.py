"""Datasets: every format becomes uint8 images (N, 32, 32, 3), int64 labels (N,) and class names.

Formats, told apart by `load_dataset(path)`:
- CIFAR-10 python batches: a folder holding data_batch_1..5, test_batch and batches.meta, or the
  official cifar-10-python.tar.gz itself. Batches are pickles, so they are decoded with an
  unpickler that admits only the few numpy types those files hold: a plain `pickle.load` of an
  untrusted file runs whatever code it contains.
- Image folders: a directory, .tar or .tar.gz whose top level holds train/ and/or test/, each with
  one folder per class (or the class folders directly, read as the train split). Images go
  through `imaging.decode_image`, the same function the server uses. Class folders in
  alphabetical order give the label indices. Files that are not images are skipped with a
  warning; an empty class folder is an error.
- A folder holding train.tar.gz and/or test.tar.gz of that kind (the shared CIFAR-10 JPEG set).

Decoded arrays are cached (`CONVNET_CACHE_DIR`, default ~/.cache/convnet) keyed by the source's
path, size and mtime, and written atomically, so a second load of the 55,000 shared CIFAR-10
images takes a fraction of a second (bench/data_cache.py).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convnet.imaging import ImageError, decode_image

log = logging.getLogger(__name__)

CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
CIFAR_META = "batches.meta"
CACHE_FORMAT = 1  # bump when the decoded output of a loader changes
SPLITS = ("train", "test")


class DataError(ValueError):
    """A dataset that cannot be read, with the file and the reason."""


@dataclass
class Split:
    images: np.ndarray  # (N, 32, 32, 3) uint8
    labels: np.ndarray  # (N,) int64 class indices
    classes: list[str]

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise DataError(
                f"{len(self.images)} images but {len(self.labels)} labels: counts must match"
            )

    def __len__(self) -> int:
        return len(self.labels)


# --- CIFAR-10 python batches -------------------------------------------------------------------

_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def _unpickle(raw: bytes, source: str) -> dict:
    try:
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"{source}: not a CIFAR-10 batch pickle ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a dict, found {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _decode_batch(raw: bytes, source: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(raw, source)
    data, labels = batch.get("data"), batch.get("labels", batch.get("fine_labels"))
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(f"{source}: missing 'data' array or 'labels' list")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{source}: 'data' must be uint8 (N, 3072), found {data.dtype} {data.shape}"
        )
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: 'labels' must be a list of integers")
    if len(labels) != len(data):
        raise DataError(f"{source}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{source}: labels outside 0..{num_classes - 1}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are channel-planar
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _cifar_from_files(read, source: str) -> dict[str, Split]:
    """`read(name)` returns a batch file's bytes or None when absent."""
    meta_raw = read(CIFAR_META)
    if meta_raw is None:
        raise DataError(f"{source}: missing {CIFAR_META}")
    meta = _unpickle(meta_raw, f"{source}/{CIFAR_META}")
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise DataError(f"{source}/{CIFAR_META}: missing 'label_names'")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def load(files):
        missing = [f for f in files if read(f) is None]
        if missing:
            raise DataError(f"{source}: missing batch files {', '.join(missing)}")
        parts = [_decode_batch(read(f), f"{source}/{f}", len(classes)) for f in files]
        return Split(np.concatenate([p[0] for p in parts]),
                     np.concatenate([p[1] for p in parts]), classes)

    return {"train": load(CIFAR_TRAIN_BATCHES), "test": load([CIFAR_TEST_BATCH])}


def load_cifar_batches(path: str | os.PathLike) -> dict[str, Split]:
    """The CIFAR-10 python batches from a folder or the official tarball."""
    path = Path(path)
    if path.is_dir():
        return _cifar_from_files(
            lambda n: (path / n).read_bytes() if (path / n).is_file() else None, str(path)
        )
    members = {}
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile() and Path(m.name).name in (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH,
                                                         CIFAR_META):
                    members[Path(m.name).name] = _read_member(tar, m)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: truncated or corrupt archive ({exc})") from None
    return _cifar_from_files(members.get, str(path))


# --- image folders ------------------------------------------------------------------------------


def _split_of(class_dir: tuple[str, ...]) -> str:
    """The split a class folder belongs to: its parent's name if train/test, else train."""
    return class_dir[-2] if len(class_dir) >= 2 and class_dir[-2] in SPLITS else "train"


def _iter_folder(root: Path):
    for f in sorted(root.rglob("*")):
        if f.is_file():
            yield f.relative_to(root).parts, f.read_bytes
        elif f.is_dir():
            yield f.relative_to(root).parts + ("",), None


def _iter_tar(path: Path):
    try:
        with tarfile.open(path, mode="r|*") as tar:  # streaming: one pass, no seeks
            for m in tar:
                parts = tuple(p for p in Path(m.name).parts if p not in (".", ""))
                if m.isdir():
                    yield parts + ("",), None
                elif m.isfile():
                    data = _read_member(tar, m)
                    yield parts, lambda d=data: d
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: truncated or corrupt archive ({exc})") from None


def load_image_folder(path: str | os.PathLike) -> dict[str, Split]:
    """Image-folder dataset from a directory or a (compressed) tar archive. A wrapping top
    folder (`name/train/cat/1.jpg`) is fine: a class is the folder an image sits in."""
    path = Path(path)
    entries = _iter_folder(path) if path.is_dir() else _iter_tar(path)
    by_folder: dict[tuple[str, ...], list[np.ndarray]] = {}
    folders: set[tuple[str, ...]] = set()
    skipped = 0
    for parts, read in entries:
        if any(p.startswith(".") for p in parts if p):
            continue  # hidden files and folders (.DS_Store, ._x.jpg)
        if read is None:
            folders.add(parts[:-1])
            continue
        folder = parts[:-1]
        if not folder or folder[-1] in SPLITS:
            continue  # loose files outside any class folder
        try:
            image = decode_image(read())
        except ImageError as exc:
            skipped += 1
            log.warning("skipping %s/%s: %s", path, "/".join(parts), exc)
            continue
        by_folder.setdefault(folder, []).append(image)
    if skipped:
        log.warning("%s: skipped %d files that are not readable images", path, skipped)
    # A folder with no images beside class folders that have some is an empty class.
    containers = {f[:-1] for f in by_folder}
    for f in folders:
        if f and f[:-1] in containers and f[-1] not in SPLITS:
            by_folder.setdefault(f, [])
    if not any(by_folder.values()):
        raise DataError(f"{path}: no images found in class folders (expected "
                        "train/<class>/<image>, test/<class>/<image> or <class>/<image>)")

    found: dict[str, dict[str, list[np.ndarray]]] = {}
    for folder, images in by_folder.items():
        found.setdefault(_split_of(folder), {}).setdefault(folder[-1], []).extend(images)
    classes = sorted(found.get("train", found.get("test", {})))
    splits = {}
    for split, by_class in sorted(found.items(), key=lambda kv: kv[0] != "train"):
        unknown = sorted(set(by_class) - set(classes))
        if unknown:
            raise DataError(f"{path}: {split}/ has classes missing from train/: {unknown}")
        empty = sorted(c for c, imgs in by_class.items() if not imgs)
        if empty:
            raise DataError(f"{path}: empty class folder(s) in {split}/: {', '.join(empty)}")
        images = [img for c in classes for img in by_class.get(c, [])]
        labels = [i for i, c in enumerate(classes) for _ in by_class.get(c, [])]
        splits[split] = Split(np.stack(images), np.asarray(labels, np.int64), classes)
    return splits


# --- dispatch and cache -------------------------------------------------------------------------


def _is_cifar_tarball(path: Path) -> bool:
    try:
        with tarfile.open(path) as tar:
            first = tar.next()
            return first is not None and "cifar-10-batches-py" in first.name
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: truncated or corrupt archive ({exc})") from None


def _load_uncached(path: Path) -> dict[str, Split]:
    if path.is_dir():
        if (path / CIFAR_META).exists() or (path / CIFAR_TEST_BATCH).exists():
            return load_cifar_batches(path)
        archives = [path / f"{s}.tar.gz" for s in ("train", "test")]
        if any(a.is_file() for a in archives):
            splits = {}
            for a in archives:
                if a.is_file():
                    splits.update(load_image_folder(a))
            return splits
        return load_image_folder(path)
    if _is_cifar_tarball(path):
        return load_cifar_batches(path)
    return load_image_folder(path)


def cache_dir() -> Path:
    return Path(os.environ.get("CONVNET_CACHE_DIR", Path.home() / ".cache" / "convnet"))


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    stream = tar.extractfile(member)
    if stream is None:  # isfile() was checked, so only a corrupt header gets here
        raise tarfile.ReadError(f"{member.name} has no data")
    return stream.read()


def _cache_key(path: Path) -> str:
    stats: list[object] = [path.resolve()]
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        stats.append((str(f), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(repr((CACHE_FORMAT, stats)).encode()).hexdigest()[:24]


def _save_cache(file: Path, splits: dict[str, Split]) -> None:
    arrays: dict[str, np.ndarray] = {
        "classes": np.asarray(next(iter(splits.values())).classes)}
    for name, s in splits.items():
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = s.images, s.labels
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # uncompressed: a plain read
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def _read_cache(file: Path) -> dict[str, Split] | None:
    try:
        with np.load(file, allow_pickle=False) as z:
            classes = [str(c) for c in z["classes"]]
            names = [k[: -len("_images")] for k in z.files if k.endswith("_images")]
            return {n: Split(z[f"{n}_images"], z[f"{n}_labels"], classes) for n in names}
    except Exception as exc:  # a damaged cache is rebuilt, never trusted
        log.warning("ignoring unreadable cache %s: %s", file, exc)
        return None


def load_dataset(path: str | os.PathLike, *, cache: bool = True) -> dict[str, Split]:
    """Load any supported dataset as {"train": Split, "test": Split} (either may be absent)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset {path} does not exist")
    file = cache_dir() / f"{_cache_key(path)}.npz" if cache else None
    if file is not None and file.exists():
        splits = _read_cache(file)
        if splits is not None:
            return splits
    splits = _load_uncached(path)
    if file is not None:
        try:
            _save_cache(file, splits)
        except OSError as exc:
            log.warning("could not write dataset cache %s: %s", file, exc)
    return splits

"""Datasets: every format becomes uint8 images (N, S, S, 3), int64 labels (N,) and class names.

S is the model's input side, `load_dataset(path, size=S)` (default 32). Formats, told apart by
`load_dataset`:
- CIFAR-10 python batches: a folder holding data_batch_1..5, test_batch and batches.meta, or the
  official cifar-10-python.tar.gz itself. Batches are pickles, so they are decoded with an
  unpickler that admits only the few numpy types those files hold: a plain `pickle.load` of an
  untrusted file runs whatever code it contains.
- Image folders: a directory, .tar or .tar.gz whose top level holds train/ and/or test/, each with
  one folder per class (or the class folders directly, read as the train split). Images go
  through `imaging.decode_image(..., size=S)`, the same function the server uses (centre
  square, Lanczos). Class folders in alphabetical order give the label indices. Files that are
  not readable images are skipped with a warning naming each; a class folder with no readable
  image is an error, one with fewer than MIN_PER_CLASS images a warning.
- A folder holding train.tar.gz and/or test.tar.gz of that kind (the shared CIFAR-10 JPEG set).

CIFAR-10 batches hold 32x32 images; at another S each is resized as decode_image resizes.

Decoded arrays are cached (`CONVNET_CACHE_DIR`, default ~/.cache/convnet) keyed by the source's
path, size and mtime and by S, and written atomically, so a second load of the 55,000 shared
CIFAR-10 images takes a fraction of a second (bench/data_cache.py). Memory: the decoded images
once, plus one class's worth while loading (50,000 photos at S = 128 take 2.5 GB).

`survey(path)` reads only the images' headers: how many there are per class and how large, what
training needs to choose S and its schedule before anything is decoded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import tarfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from convnet.imaging import ImageError, decode_image

log = logging.getLogger(__name__)

CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
CIFAR_META = "batches.meta"
CACHE_FORMAT = 2  # bump when the decoded output of a loader changes
SURVEY_FORMAT = 2  # and this when a survey's contents change
SPLITS = ("train", "test")
CIFAR_SIZE = 32  # side of the images in CIFAR-10 batches
MIN_PER_CLASS = 5  # fewer training images in a class than this gets a warning
NAMED_SKIPS = 20  # skipped files named one by one in the log; the rest are counted
IMAGE_BLOCK = 256  # decoded images per allocation while loading a folder
PANORAMA_KEEPS = 1 / 3  # warn when the centre square keeps less of an image than this (3:1)


class DataError(ValueError):
    """A dataset that cannot be read, with the file and the reason."""


@dataclass
class Split:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int64 class indices
    classes: list[str]

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise DataError(
                f"{len(self.images)} images but {len(self.labels)} labels: counts must match"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> dict[str, int]:
        """Images per class, in class order."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Square uint8 images (N, s, s, 3) at (N, size, size, 3), Lanczos as decode_image resizes
    (the identity when s == size)."""
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(Image.fromarray(image).resize((size, size),
                                                          Image.Resampling.LANCZOS))
    return out


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


def _cifar_from_files(read, source: str, size: int = CIFAR_SIZE) -> dict[str, Split]:
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
        return Split(resize_images(np.concatenate([p[0] for p in parts]), size),
                     np.concatenate([p[1] for p in parts]), classes)

    return {"train": load(CIFAR_TRAIN_BATCHES), "test": load([CIFAR_TEST_BATCH])}


def load_cifar_batches(path: str | os.PathLike, size: int = CIFAR_SIZE) -> dict[str, Split]:
    """The CIFAR-10 python batches from a folder or the official tarball, at size x size."""
    path = Path(path)
    if path.is_dir():
        return _cifar_from_files(
            lambda n: (path / n).read_bytes() if (path / n).is_file() else None, str(path), size
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
    return _cifar_from_files(members.get, str(path), size)


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


def _class_files(path: Path, folders: set[tuple[str, ...]]):
    """(class folder, path parts, read) for every file in a class folder of an image-folder
    dataset, in name order; every folder seen is added to `folders`. Hidden files and folders
    (.DS_Store, ._x.jpg) and loose files outside any class folder are left out."""
    for parts, read in _iter_folder(path) if path.is_dir() else _iter_tar(path):
        if any(p.startswith(".") for p in parts if p):
            continue
        if read is None:
            folders.add(parts[:-1])
            continue
        folder = parts[:-1]
        if folder and folder[-1] not in SPLITS:
            yield folder, parts, read


def _crop_warning(data: bytes) -> str | None:
    """Why the centre square is a poor view of this image (a panorama), or None. Reads the
    header only."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:  # decode_image has already judged the file readable
        return None
    kept = min(width, height) / max(width, height)
    if kept >= PANORAMA_KEEPS:
        return None
    return (f"{width}x{height}: only its centre square ({kept:.0%} of the image) is used; "
            "crop it to the subject for better training")


class _Images:
    """One class folder's decoded images while loading, copied into blocks of IMAGE_BLOCK: a
    few large allocations, which go back to the system as they are freed, where one small array
    per image would stay in the heap (50,000 photos at 128 px peaked at 5.3 GB that way, twice
    the images; bench/photo_memory.py)."""

    def __init__(self, size: int):
        self.size = size
        self.blocks: list[np.ndarray] = []
        self.used: list[int] = []  # images in each block

    def append(self, image: np.ndarray) -> None:
        if not self.blocks or self.used[-1] == IMAGE_BLOCK:
            self.blocks.append(np.empty((IMAGE_BLOCK, self.size, self.size, 3), np.uint8))
            self.used.append(0)
        self.blocks[-1][self.used[-1]] = image
        self.used[-1] += 1

    def extend(self, other: _Images) -> None:
        self.blocks += other.blocks
        self.used += other.used

    def __len__(self) -> int:
        return sum(self.used)

    def drain(self):
        """The images, a block at a time, each block released once it has been handed out."""
        while self.blocks:
            block, used = self.blocks.pop(0), self.used.pop(0)
            yield block[:used]


def _stack(per_class: list[_Images], size: int) -> np.ndarray:
    """One (N, size, size, 3) array of the classes' images, in order, freeing each block as it
    is copied: the images are held about once, not twice."""
    out = np.empty((sum(len(c) for c in per_class), size, size, 3), np.uint8)
    i = 0
    for images in per_class:
        for part in images.drain():
            out[i:i + len(part)] = part
            i += len(part)
    return out


def load_image_folder(path: str | os.PathLike, size: int = CIFAR_SIZE) -> dict[str, Split]:
    """Image-folder dataset from a directory or a (compressed) tar archive, each image decoded
    to size x size. A wrapping top folder (`name/train/cat/1.jpg`) is fine: a class is the
    folder an image sits in."""
    path = Path(path)
    by_folder: dict[tuple[str, ...], _Images] = {}
    folders: set[tuple[str, ...]] = set()
    skipped = cropped = 0
    for folder, parts, read in _class_files(path, folders):
        # a folder of unreadable files is a class too
        images = by_folder.setdefault(folder, _Images(size))
        raw = read()
        try:
            images.append(decode_image(raw, size=size))
        except ImageError as exc:
            skipped += 1
            if skipped <= NAMED_SKIPS:
                log.warning("skipping %s/%s: %s", path, "/".join(parts), exc)
            continue
        if (why := _crop_warning(raw)) is not None:
            cropped += 1
            if cropped <= NAMED_SKIPS:
                log.warning("%s/%s is %s", path, "/".join(parts), why)
    if skipped:
        log.warning("%s: skipped %d files that are not readable images%s", path, skipped,
                    f" ({skipped - NAMED_SKIPS} not named above)" if skipped > NAMED_SKIPS else "")
    if cropped > NAMED_SKIPS:
        log.warning("%s: %d panoramas in all (%d not named above)", path, cropped,
                    cropped - NAMED_SKIPS)
    # A folder with no images beside class folders that have some is an empty class.
    containers = {f[:-1] for f in by_folder}
    for f in folders:
        if f and f[:-1] in containers and f[-1] not in SPLITS:
            by_folder.setdefault(f, _Images(size))
    if not any(by_folder.values()):
        raise DataError(f"{path}: no images found in class folders (expected "
                        "train/<class>/<image>, test/<class>/<image> or <class>/<image>)")

    found: dict[str, dict[str, _Images]] = {}
    for folder, images in by_folder.items():
        found.setdefault(_split_of(folder), {}).setdefault(folder[-1], _Images(size)).extend(
            images)
    del by_folder, images  # `found` holds the blocks now; _stack frees them as it copies
    classes = sorted(found.get("train", found.get("test", {})))
    splits = {}
    for split, by_class in sorted(found.items(), key=lambda kv: kv[0] != "train"):
        unknown = sorted(set(by_class) - set(classes))
        if unknown:
            raise DataError(f"{path}: {split}/ has classes missing from train/: {unknown}")
        empty = sorted(c for c, imgs in by_class.items() if not imgs)
        if empty:
            raise DataError(f"{path}: empty class folder(s) in {split}/, no readable image: "
                            f"{', '.join(empty)}")
        per_class = [by_class.get(c) or _Images(size) for c in classes]
        labels = np.repeat(np.arange(len(classes)), [len(c) for c in per_class])
        splits[split] = Split(_stack(per_class, size), labels.astype(np.int64), classes)
    few = {c: n for c, n in splits["train"].class_counts().items()
           if n < MIN_PER_CLASS} if "train" in splits else {}
    if few:
        log.warning("%s: classes with fewer than %d images, too few to learn well: %s", path,
                    MIN_PER_CLASS, ", ".join(f"{c} ({n})" for c, n in few.items()))
    return splits


# --- survey -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Survey:
    """What choosing the input size and schedule needs, read from headers before decoding."""

    format: str  # "cifar-batches" or "image-folder"
    num_classes: int
    num_images: int  # in the training split (the test split when there is none)
    short_side: int  # median shorter side of those images, pixels (before any resizing)
    sizes: dict[str, int] = field(default_factory=dict)  # shorter side -> images, folders only

    @property
    def photos(self) -> bool:
        """Larger than CIFAR's 32x32: photographs rather than thumbnails."""
        return self.short_side > CIFAR_SIZE * 5 // 4


def _survey_folder(path: Path) -> Survey:
    by_split: dict[str, list[int]] = {}
    classes: dict[str, set[str]] = {}
    for folder, _, read in _class_files(path, set()):
        classes.setdefault(_split_of(folder), set()).add(folder[-1])
        try:
            with Image.open(io.BytesIO(read())) as img:
                side = min(img.size)
        except Exception:  # unreadable: the loader names it
            continue
        by_split.setdefault(_split_of(folder), []).append(side)
    split = "train" if by_split.get("train") else "test"
    sides = by_split.get(split, [])
    if not sides:
        raise DataError(f"{path}: no images found in class folders (expected "
                        "train/<class>/<image>, test/<class>/<image> or <class>/<image>)")
    values, counts = np.unique(sides, return_counts=True)
    return Survey("image-folder", len(classes[split]), len(sides), int(np.median(sides)),
                  {str(v): int(c) for v, c in zip(values, counts, strict=True)})


def _survey_uncached(path: Path) -> Survey:
    if _is_cifar(path):
        train = load_cifar_batches(path)["train"]
        return Survey("cifar-batches", len(train.classes), len(train), CIFAR_SIZE)
    if path.is_dir():
        archives = [a for a in (path / "train.tar.gz", path / "test.tar.gz") if a.is_file()]
        if archives:
            return _survey_folder(archives[0])
    return _survey_folder(path)


def survey(path: str | os.PathLike, *, cache: bool = True) -> Survey:
    """Count the training images and measure their sizes from headers only (cached beside the
    decoded arrays): what `load_dataset`'s size and the schedule are chosen from."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset {path} does not exist")
    file = cache_dir() / f"{_cache_key(path, f'survey{SURVEY_FORMAT}')}.json" if cache else None
    if file is not None and file.exists():
        try:
            return Survey(**json.loads(file.read_text()))
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            log.warning("ignoring unreadable cache %s: %s", file, exc)
    found = _survey_uncached(path)
    if file is not None:
        try:
            _write_atomic(file, json.dumps(asdict(found)).encode())
        except OSError as exc:
            log.warning("could not write dataset cache %s: %s", file, exc)
    return found


# --- dispatch and cache -------------------------------------------------------------------------


def _is_cifar_tarball(path: Path) -> bool:
    try:
        with tarfile.open(path) as tar:
            first = tar.next()
            return first is not None and "cifar-10-batches-py" in first.name
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: truncated or corrupt archive ({exc})") from None


def _is_cifar(path: Path) -> bool:
    if path.is_dir():
        return (path / CIFAR_META).exists() or (path / CIFAR_TEST_BATCH).exists()
    return _is_cifar_tarball(path)


def _load_uncached(path: Path, size: int = CIFAR_SIZE) -> dict[str, Split]:
    if _is_cifar(path):
        return load_cifar_batches(path, size)
    if path.is_dir():
        archives = [path / f"{s}.tar.gz" for s in ("train", "test")]
        if any(a.is_file() for a in archives):
            splits = {}
            for a in archives:
                if a.is_file():
                    splits.update(load_image_folder(a, size))
            return splits
    return load_image_folder(path, size)


def cache_dir() -> Path:
    return Path(os.environ.get("CONVNET_CACHE_DIR", Path.home() / ".cache" / "convnet"))


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    stream = tar.extractfile(member)
    if stream is None:  # isfile() was checked, so only a corrupt header gets here
        raise tarfile.ReadError(f"{member.name} has no data")
    return stream.read()


def _cache_key(path: Path, *what: object) -> str:
    """Names a cache file by the source (path, and size and mtime of every file in it) and
    `what` was derived from it."""
    stats: list[object] = [path.resolve(), *what]
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        stats.append((str(f), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:24]


def _save_cache(file: Path, splits: dict[str, Split]) -> None:
    arrays: dict[str, np.ndarray] = {
        "classes": np.asarray(next(iter(splits.values())).classes)}
    for name, s in splits.items():
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = s.images, s.labels
    _write_atomic(file, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]  # plain read


def _write_atomic(file: Path, content) -> None:
    """Write bytes, or call `content(f)` on the open file, under a temporary name in the same
    folder and rename it into place, so a reader never sees half a file."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if isinstance(content, bytes):
                f.write(content)
            else:
                content(f)
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


def load_dataset(path: str | os.PathLike, *, size: int = CIFAR_SIZE,
                 cache: bool = True) -> dict[str, Split]:
    """Load any supported dataset as {"train": Split, "test": Split} (either may be absent),
    images (N, size, size, 3) uint8."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset {path} does not exist")
    if size < 1:
        raise DataError(f"image size must be a positive number of pixels, got {size}")
    file = cache_dir() / f"{_cache_key(path, CACHE_FORMAT, size)}.npz" if cache else None
    if file is not None and file.exists():
        splits = _read_cache(file)
        if splits is not None:
            return splits
    splits = _load_uncached(path, size)
    if file is not None:
        try:
            _save_cache(file, splits)
        except OSError as exc:
            log.warning("could not write dataset cache %s: %s", file, exc)
    return splits

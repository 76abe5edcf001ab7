"""The versioned model directory: the only place training, export, evaluation and serving meet.

Layout (TensorFlow Serving's): ``ROOT/<integer version>/`` holding

    model.onnx     the network, input "pixels" uint8 (N, S, S, 3), output "probabilities" (N, C)
    model.int8.onnx  optional, the same network with int8 weights (`convnet export --quantize`)
    model.keras    the Keras model (absent from the bundled model, which ships ONNX only)
    labels.json    ["airplane", "automobile", ...], index = class id
    metrics.json   test accuracy, per-class accuracy, training time, hardware, ...
    config.json    the training configuration that produced it

S, the side of the square images the model takes, is the network's own: the input's height and
width are fixed integers in the graph. Consumers read it from there (`image_size`), and every
`image_size` that config.json and metrics.json record must agree with it. Models from before
the size was recorded (the bundled CIFAR-10 model, S = 32) record none.

A version is written into a hidden staging folder and renamed into place, so a reader (a server
polling for new versions) sees either nothing or a complete version, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"  # optional: the same network quantized (convnet.quantize)
PRECISION_FILES = {"float": ONNX_FILE, "int8": INT8_FILE}  # what `convnet serve --precision` loads
PRECISIONS = ("auto", *PRECISION_FILES)  # auto: the int8 file where a version has one
KERAS_FILE = "model.keras"
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"


class ModelDirError(ValueError):
    """A model directory that cannot be used, with the reason."""


BUNDLED_DEFAULT = "cifar10"  # what the server loads when given no model


def bundled_model_root(name: str = BUNDLED_DEFAULT) -> Path:
    """A model shipped inside the package (ONNX, labels, metrics): `cifar10` or `flowers`."""
    return Path(str(resources.files("convnet") / "bundled" / name))


def bundled_names() -> list[str]:
    return sorted(p.name for p in Path(str(resources.files("convnet") / "bundled")).iterdir()
                  if p.is_dir() and not p.name.startswith((".", "_")))


def locate(path: str | os.PathLike | None) -> Path:
    """The model root or version folder `path` names: None is the bundled CIFAR-10 model, and a
    bare name that is no file here but a bundled model's (`flowers`) is that model."""
    if path is None:
        return bundled_model_root()
    given = Path(path)
    if not given.exists() and len(given.parts) == 1 and given.name in bundled_names():
        return bundled_model_root(given.name)
    return given


def list_versions(root: str | os.PathLike) -> list[int]:
    """Integer version folders under `root`, ascending. Hidden staging folders are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def is_version_dir(path: Path) -> bool:
    return (path / ONNX_FILE).is_file() or (path / KERAS_FILE).is_file()


def resolve_version(path: str | os.PathLike | None) -> Path:
    """Return the version folder for `path`: a version folder itself, or a root whose highest
    version is taken. None means the bundled CIFAR-10 model, a bare bundled name that model."""
    path = locate(path)
    if not path.exists():
        raise ModelDirError(f"model directory {path} does not exist (bundled models, served "
                            f"by name: {', '.join(bundled_names())})")
    if is_version_dir(path):
        return path
    versions = list_versions(path)
    if not versions:
        raise ModelDirError(
            f"{path} holds no model: expected {ONNX_FILE} in it or integer version folders "
            f"(e.g. {path}/1/{ONNX_FILE})"
        )
    return path / str(versions[-1])


def model_name(version_dir: Path) -> str:
    """The served name: the root folder's name (`cifar10` for the bundled model)."""
    version_dir = Path(version_dir).resolve()
    return version_dir.parent.name if version_dir.name.isdigit() else version_dir.name


def version_number(version_dir: Path) -> int:
    name = Path(version_dir).resolve().name
    return int(name) if name.isdigit() else 1


def read_json(path: Path, default=None):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        if default is not None:
            return default
        raise ModelDirError(f"{path} is missing") from None
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{path} is not valid JSON: {exc}") from None


def load_labels(version_dir: Path) -> list[str]:
    labels = read_json(Path(version_dir) / LABELS_FILE)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ModelDirError(f"{version_dir / LABELS_FILE} must be a non-empty list of strings")
    return labels


def load_metrics(version_dir: Path) -> dict:
    return read_json(Path(version_dir) / METRICS_FILE, default={})


def load_config(version_dir: Path) -> dict:
    return read_json(Path(version_dir) / CONFIG_FILE, default={})


def image_size(input_shape, records: Mapping[str, object], model_file: str = ONNX_FILE) -> int:
    """S for a model whose input shape is `input_shape` ([N, S, S, 3] as ONNX Runtime or Keras
    report it: the batch may be symbolic, the sides may not), checked against the `image_size`
    each of `records` (file name -> its parsed JSON, e.g. config.json's) holds, if any.

    Raises ModelDirError with a reason that names no path, so a server may show it to clients.
    """
    shape = list(input_shape)
    if len(shape) != 4 or shape[3] != 3:
        raise ModelDirError(f"{model_file} takes input shape {shape}, expected [N, S, S, 3]")
    height, width = shape[1], shape[2]
    if not all(isinstance(side, int) and side > 0 for side in (height, width)):
        raise ModelDirError(f"{model_file} takes input shape {shape}: its height and width must "
                            "be fixed integers, [N, S, S, 3]")
    if height != width:
        raise ModelDirError(f"{model_file} takes {height}x{width} images: expected square ones, "
                            "[N, S, S, 3]")
    for name, record in records.items():
        if not isinstance(record, dict):
            raise ModelDirError(f"{name} must hold a JSON object")
        recorded = record.get("image_size")
        if recorded is None:
            continue
        if not isinstance(recorded, int) or isinstance(recorded, bool):
            raise ModelDirError(f"{name}: image_size must be an integer, not {recorded!r}")
        if recorded != height:
            raise ModelDirError(f"{name} says image_size {recorded}, but {model_file} takes "
                                f"{height}x{height} images")
    return height


def version_image_size(version_dir: Path, input_shape, model_file: str = ONNX_FILE) -> int:
    """`image_size` for the model in `version_dir`, checked against its config.json and
    metrics.json; here the error names the folder."""
    version_dir = Path(version_dir)
    records = {CONFIG_FILE: load_config(version_dir), METRICS_FILE: load_metrics(version_dir)}
    try:
        return image_size(input_shape, records, model_file)
    except ModelDirError as exc:
        raise ModelDirError(f"{version_dir}: {exc}") from None


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the file from a server run as another user
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def staging_dir(root: str | os.PathLike) -> Path:
    """A hidden folder under `root` to fill before `publish`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    staged.chmod(0o755)
    return staged


def publish(root: str | os.PathLike, staged: Path) -> Path:
    """Rename a filled staging folder to the next free version number; return its path.
    Older versions are never touched."""
    root = Path(root)
    while True:
        versions = list_versions(root)
        target = root / str((versions[-1] if versions else 0) + 1)
        try:
            os.rename(staged, target)  # fails if target appeared meanwhile
            return target
        except OSError:
            if not target.exists():
                shutil.rmtree(staged, ignore_errors=True)
                raise

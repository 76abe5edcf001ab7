"""`convnet feedback export`: the feedback store -> an image-folder dataset that `convnet train
--extra DIR` (or `--data`) reads:

    DIR/<class>/<id>.<ext>    the image as it was received (ext from its sniffed format)
    DIR/manifest.json         per item: file, label, what the model said, model name and
                              version, when; and when and from where the export was made

File names come from the row id and the sniffed format, never from anything a client sent.
The dataset is written into a hidden sibling folder and renamed into place, so DIR is always a
whole export; an earlier export at DIR is replaced (any other folder there is refused).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from convnet.feedback.store import FeedbackStore, StoreUnavailable

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/bmp": "bmp",
              "image/webp": "webp"}
RESERVED = {"", ".", "..", "train", "test"}  # names an image-folder dataset reads as structure


class ExportError(ValueError):
    """The export cannot be made: no database, an unreachable one, or a folder in the way."""


def safe_class_folder(label: str) -> bool:
    """Whether `label` can be a class folder's name as it is (one path component, not hidden)."""
    return (label not in RESERVED and not label.startswith(".")
            and not any(c in label for c in "/\\\0"))


def export_dataset(setting: str, out: str | os.PathLike) -> dict:
    """Write every stored item under `out` (see the module docstring); the manifest."""
    out = Path(out)
    store = FeedbackStore(setting, max_items=0)
    if store.dialect == "sqlite" and not Path(store.url.removeprefix("sqlite:///")).is_file():
        raise ExportError(f"no feedback database at {setting}")
    if out.exists() and not (out / MANIFEST).is_file():
        raise ExportError(f"{out} exists and is not an earlier export (no {MANIFEST}): "
                          "choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = _write_items(store, staging, setting)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        store.close()
    return manifest


def _write_items(store: FeedbackStore, folder: Path, setting: str) -> dict:
    items, skipped = [], 0
    try:
        for row in store.items():
            if not safe_class_folder(row.label):
                skipped += 1
                log.warning("skipping item %d: its label %r cannot be a folder name", row.id,
                            row.label)
                continue
            name = f"{row.id}.{EXTENSIONS.get(row.media_type, 'bin')}"
            (folder / row.label).mkdir(exist_ok=True)
            (folder / row.label / name).write_bytes(row.image)
            items.append({
                "id": row.id, "file": f"{row.label}/{name}", "label": row.label,
                "predicted": row.predicted, "model": row.model_name,
                "model_version": row.model_version, "source": row.source,
                "created_at": row.created_at.isoformat(), "sha256": row.sha256,
                "note": row.note,
            })
    except StoreUnavailable as exc:
        raise ExportError(f"cannot read the feedback store: {exc}") from None
    return {
        "exported_at": datetime.now(UTC).isoformat(),
        "source": "sqlite" if store.dialect == "sqlite" else store.dialect,  # no password here
        "classes": sorted({item["label"] for item in items}),
        "count": len(items),
        "skipped": skipped,
        "items": items,
    }


def _swap_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    retired = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, retired)
    os.rename(staging, out)
    shutil.rmtree(retired, ignore_errors=True)

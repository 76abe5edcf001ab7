"""`convnet train --extra DIR`: images from another dataset (a feedback export, usually) added to
the base dataset's training split, under the base's class indices.

Every class of the extra dataset must be one of the base's; the extra may have fewer (a feedback
export holds only the classes people corrected). Its test split, if any, is ignored: the base's
test set keeps scoring every version the same way.
"""

from __future__ import annotations

import os

import numpy as np

from convnet.data import DataError, Split, load_dataset


def merge_extra(splits: dict[str, Split], extra: str | os.PathLike, size: int) -> Split:
    """The base's train split with `extra`'s training images appended, decoded at `size`.
    Not cached: an export changes whenever feedback arrives."""
    base = splits["train"]
    loaded = load_dataset(extra, size=size, cache=False)
    found = loaded.get("train")
    if found is None:
        raise DataError(f"{extra}: no training images to add")
    unknown = sorted(set(found.classes) - set(base.classes))
    if unknown:
        raise DataError(f"{extra}: classes {unknown} are not classes of the base dataset, "
                        f"which has {base.classes}")
    to_base = np.array([base.classes.index(c) for c in found.classes], dtype=np.int64)
    return Split(np.concatenate([base.images, found.images]),
                 np.concatenate([base.labels, to_base[found.labels]]), base.classes)

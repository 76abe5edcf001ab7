import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from synthetic import CLASSES, make_images, tar_folder, write_cifar_batches, write_image_folder

from convnet import data
from convnet.data import DataError, load_dataset

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg"


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVNET_CACHE_DIR", str(tmp_path / "cache"))


def test_cifar_batches_folder(tmp_path):
    folder = write_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=20)
    splits = load_dataset(folder)
    assert splits["train"].images.shape == (100, 32, 32, 3)
    assert splits["train"].images.dtype == np.uint8
    assert splits["test"].images.shape == (20, 32, 32, 3)
    assert splits["train"].classes == CLASSES
    # Rows are channel-planar in the files; the loader must give back the original pixels.
    expected, labels = make_images(20, seed=0)
    np.testing.assert_array_equal(splits["train"].images[:20], expected)
    np.testing.assert_array_equal(splits["train"].labels[:20], labels)


def test_cifar_tarball(tmp_path):
    folder = write_cifar_batches(tmp_path / "src", per_batch=10)
    archive = tar_folder(folder, tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py")
    splits = load_dataset(archive)
    assert len(splits["train"]) == 50 and len(splits["test"]) == 10


def test_missing_batch_file_is_named(tmp_path):
    folder = write_cifar_batches(tmp_path / "c")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset(folder)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize(
    "payload, message",
    [
        (pickle.dumps(_Evil(), protocol=2), "forbidden global"),
        (b"not a pickle at all", "not a CIFAR-10 batch pickle"),
        (pickle.dumps([1, 2, 3], protocol=2), "expected a dict"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "2 images but 1"),
        (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), "3072"),
        (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [42]}), "labels outside"),
        (pickle.dumps({b"labels": [0]}), "missing 'data'"),
    ],
)
def test_bad_batch_pickles(tmp_path, payload, message):
    folder = write_cifar_batches(tmp_path / "c")
    (folder / "data_batch_2").write_bytes(payload)
    with pytest.raises(DataError, match=message) as err:
        load_dataset(folder)
    assert "data_batch_2" in str(err.value)


def test_truncated_archive(tmp_path):
    folder = write_cifar_batches(tmp_path / "src", per_batch=50)
    archive = tar_folder(folder, tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py")
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset(archive)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_folder(tmp_path, fmt):
    root = write_image_folder(tmp_path / "ds", per_class=4, num_classes=3, fmt=fmt)
    splits = load_dataset(root)
    assert set(splits) == {"train", "test"}
    assert splits["train"].images.shape == (12, 32, 32, 3)
    assert splits["train"].classes == CLASSES[:3]
    assert sorted(np.bincount(splits["test"].labels)) == [4, 4, 4]


def test_image_folder_archive_and_flat_layout(tmp_path):
    root = write_image_folder(tmp_path / "ds", splits=("train",), per_class=2)
    flat = tmp_path / "flat.tar.gz"
    tar_folder(root / "train", flat, "animals")  # class folders directly under the top
    splits = load_dataset(flat)
    assert list(splits) == ["train"] and len(splits["train"]) == 6


def test_plain_tar_image_folder_reads_as_the_gzipped_one(tmp_path):
    import tarfile

    root = write_image_folder(tmp_path / "ds", per_class=3, num_classes=3)
    with tarfile.open(tmp_path / "plain.tar", "w") as tar:  # no compression
        tar.add(root, arcname="shapes")
    plain = load_dataset(tmp_path / "plain.tar", cache=False)
    gzipped = load_dataset(tar_folder(root, tmp_path / "g.tar.gz", "shapes"), cache=False)
    assert set(plain) == {"train", "test"}
    for name in plain:
        np.testing.assert_array_equal(plain[name].images, gzipped[name].images)
        np.testing.assert_array_equal(plain[name].labels, gzipped[name].labels)
        assert plain[name].classes == CLASSES[:3]


def test_any_size_and_mode_becomes_rgb_32(tmp_path):
    from PIL import Image

    cls = tmp_path / "ds" / "train" / "cat"
    cls.mkdir(parents=True)
    Image.new("L", (100, 60), 128).save(cls / "gray.png")
    Image.new("RGBA", (7, 7), (255, 0, 0, 0)).save(cls / "clear.png")  # transparent -> white
    Image.new("P", (40, 40)).save(cls / "palette.gif")
    splits = load_dataset(tmp_path / "ds")
    assert splits["train"].images.shape == (3, 32, 32, 3)
    assert (splits["train"].images[0] == 255).all()  # clear.png sorts first


def test_non_image_file_is_skipped_with_warning(tmp_path, caplog):
    root = write_image_folder(tmp_path / "ds", splits=("train",), per_class=2)
    (root / "train" / "bird" / "notes.txt").write_text("hello")
    splits = load_dataset(root)
    assert len(splits["train"]) == 6
    assert "notes.txt" in caplog.text


def test_empty_class_is_an_error(tmp_path):
    root = write_image_folder(tmp_path / "ds", splits=("train",), per_class=2)
    (root / "train" / "zebra").mkdir()
    with pytest.raises(DataError, match="empty class folder.*zebra"):
        load_dataset(root)


def test_test_split_with_unknown_class(tmp_path):
    root = write_image_folder(tmp_path / "ds", per_class=2)
    shutil.copytree(root / "test" / "bird", root / "test" / "unicorn")
    with pytest.raises(DataError, match="unicorn"):
        load_dataset(root)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_split_rejects_mismatched_counts():
    with pytest.raises(DataError, match="3 images but 2 labels"):
        data.Split(np.zeros((3, 32, 32, 3), np.uint8), np.zeros(2, np.int64), ["a", "b"])


def test_cache_is_used_and_written_atomically(tmp_path, monkeypatch):
    folder = write_cifar_batches(tmp_path / "c", per_batch=10)
    first = load_dataset(folder)
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and not cached[0].name.startswith(".")

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data, "_load_uncached", boom)
    second = load_dataset(folder)
    np.testing.assert_array_equal(first["train"].images, second["train"].images)


def test_damaged_cache_is_rebuilt(tmp_path):
    folder = write_cifar_batches(tmp_path / "c", per_batch=10)
    load_dataset(folder)
    (cache_file,) = (tmp_path / "cache").iterdir()
    cache_file.write_bytes(b"garbage")
    assert len(load_dataset(folder)["train"]) == 50


def test_changed_source_invalidates_cache(tmp_path):
    folder = write_cifar_batches(tmp_path / "c", per_batch=10)
    load_dataset(folder)
    time.sleep(0.01)
    write_cifar_batches(folder, per_batch=12)
    assert len(load_dataset(folder)["train"]) == 60


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/cifar10-jpeg is absent")
def test_shared_cifar10_jpeg(monkeypatch):
    splits = load_dataset(SHARED)
    assert splits["train"].images.shape == (50000, 32, 32, 3)
    assert splits["test"].images.shape == (5000, 32, 32, 3)
    assert splits["train"].classes == CLASSES
    assert np.bincount(splits["test"].labels).tolist() == [500] * 10
    monkeypatch.setattr(data, "_load_uncached", None)  # the second load must come from cache
    np.testing.assert_array_equal(load_dataset(SHARED)["test"].images, splits["test"].images)

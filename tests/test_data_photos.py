"""Photo folders (convnet.data at S = 64-128 px): sizes, the cache per size, the survey, and each
kind of bad input a folder of real photos brings, in synthetic folders."""

import io
import logging

import numpy as np
import pytest
from PIL import Image
from synthetic import CLASSES, encode, make_photo, tar_folder, write_photo_folder

from convnet import data
from convnet.data import DataError, load_dataset


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVNET_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def photos(tmp_path):
    return write_photo_folder(tmp_path / "photos", splits=("train",), per_class=3)


def add(folder, name: str, content: bytes):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)
    return folder / name


@pytest.mark.parametrize("size", [64, 96, 128])
def test_photos_decode_at_the_size_asked_for(photos, size):
    splits = load_dataset(photos, size=size)
    assert splits["train"].images.shape == (9, size, size, 3)
    assert splits["train"].class_counts() == {c: 3 for c in CLASSES[:3]}


def test_each_size_has_its_own_cache(photos, tmp_path, monkeypatch):
    small, large = load_dataset(photos, size=64), load_dataset(photos, size=96)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    monkeypatch.setattr(data, "_load_uncached", None)  # both now come from the cache
    np.testing.assert_array_equal(load_dataset(photos, size=64)["train"].images,
                                  small["train"].images)
    assert load_dataset(photos, size=96)["train"].images.shape[1] == 96
    assert large["train"].images.shape[1] == 96


def test_the_default_size_is_still_32(photos):
    assert load_dataset(photos)["train"].images.shape[1:] == (32, 32, 3)


def test_cifar_batches_at_another_size_are_resized(tmp_path):
    from synthetic import write_cifar_batches

    folder = write_cifar_batches(tmp_path / "c", per_batch=4)
    at32, at64 = load_dataset(folder)["train"], load_dataset(folder, size=64)["train"]
    assert at64.images.shape == (20, 64, 64, 3)
    # Lanczos up, then box down: close to the original
    down = at64.images.reshape(20, 32, 2, 32, 2, 3).mean((2, 4))
    assert np.abs(down - at32.images).mean() < 4


def test_survey_reads_counts_and_sizes_from_headers(photos, tmp_path, monkeypatch):
    found = data.survey(photos)
    assert (found.format, found.num_classes, found.num_images) == ("image-folder", 3, 9)
    assert found.short_side == 80 and found.photos  # heights 72, 100, 96 and widths: 72/80/96
    archive = tar_folder(photos, tmp_path / "p.tar.gz", "wrap")
    assert data.survey(archive) == found
    monkeypatch.setattr(data, "_survey_uncached", None)  # cached
    assert data.survey(photos) == found


def test_survey_of_cifar_batches(tmp_path):
    from synthetic import write_cifar_batches

    found = data.survey(write_cifar_batches(tmp_path / "c", per_batch=4))
    assert (found.format, found.num_images, found.short_side) == ("cifar-batches", 20, 32)
    assert not found.photos


# --- bad input: each gets a clear, named treatment ---------------------------------------------


def test_a_corrupt_photo_is_skipped_and_named(photos, caplog):
    whole = encode(make_photo(0, 96, 96, np.random.default_rng(0)), "JPEG")
    add(photos / "train" / "airplane", "broken.jpg", whole[: len(whole) // 3])
    with caplog.at_level(logging.WARNING, "convnet"):
        splits = load_dataset(photos, size=64)
    assert len(splits["train"]) == 9
    assert "airplane/broken.jpg" in caplog.text and "skipped 1 files" in caplog.text


def test_a_cmyk_jpeg_becomes_rgb(photos):
    cmyk = Image.new("CMYK", (120, 90), (0, 255, 255, 0))  # full magenta + yellow: red
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG", quality=95)
    add(photos / "train" / "airplane", "0-cmyk.jpg", buf.getvalue())
    splits = load_dataset(photos, size=64)
    first = splits["train"].images[0]  # 0-cmyk.jpg sorts first in the first class
    assert np.allclose(first.reshape(-1, 3).mean(0), (255, 0, 0), atol=8)


def test_a_16_bit_png_keeps_its_tones(photos):
    # mid-grey in 16 bits is 32768: it must come out near 128, not clipped to white
    grey = Image.fromarray(np.full((80, 100), 32768, np.uint16))
    buf = io.BytesIO()
    grey.save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I;16")
    add(photos / "train" / "airplane", "0-deep.png", buf.getvalue())
    first = load_dataset(photos, size=64)["train"].images[0]
    assert np.allclose(first, 128, atol=2)


def test_a_panorama_keeps_its_centre_square_and_is_named(photos, caplog):
    wide = make_photo(0, 1200, 200, np.random.default_rng(1))  # 6:1
    add(photos / "train" / "airplane", "pano.jpg", encode(wide, "JPEG"))
    with caplog.at_level(logging.WARNING, "convnet"):
        splits = load_dataset(photos, size=64)
    assert len(splits["train"]) == 10
    assert "pano.jpg is 1200x200" in caplog.text and "centre square (17%" in caplog.text


def test_a_photo_over_the_pixel_limit_is_skipped_and_named(photos, caplog):
    buf = io.BytesIO()
    Image.new("1", (10_000, 4_100)).save(buf, "PNG")  # 41 Mpx, a few kB: refused by its header
    add(photos / "train" / "bird", "huge.png", buf.getvalue())
    with caplog.at_level(logging.WARNING, "convnet"):
        splits = load_dataset(photos, size=64)
    assert len(splits["train"]) == 9
    assert "bird/huge.png" in caplog.text and "too large" in caplog.text


def test_exif_rotation_is_applied(photos):
    stored = np.zeros((64, 96, 3), np.uint8)  # landscape as stored: left red, right blue
    stored[:, :48] = (255, 0, 0)
    stored[:, 48:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown rotated 90 degrees clockwise (portrait)
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", quality=95, exif=exif)
    add(photos / "train" / "airplane", "0-rotated.jpg", buf.getvalue())
    first = load_dataset(photos, size=64)["train"].images[0]
    # upright, the stored left edge is the top: red above, blue below
    assert first[:24, :, 0].mean() > 200 and first[:24, :, 2].mean() < 50
    assert first[-24:, :, 2].mean() > 200 and first[-24:, :, 0].mean() < 50


def test_a_class_with_one_photo_is_named_in_a_warning(photos, caplog):
    add(photos / "train" / "zebra", "only.jpg",
        encode(make_photo(4, 90, 90, np.random.default_rng(2)), "JPEG"))
    with caplog.at_level(logging.WARNING, "convnet"):
        splits = load_dataset(photos, size=64)
    assert splits["train"].class_counts()["zebra"] == 1
    assert "fewer than 5 images" in caplog.text and "zebra (1)" in caplog.text


def test_a_class_with_no_photos_is_an_error(photos):
    (photos / "train" / "zebra").mkdir()
    with pytest.raises(DataError, match="empty class folder.*zebra"):
        load_dataset(photos, size=64)


def test_a_class_of_unreadable_files_is_an_error_naming_it(photos, tmp_path):
    add(photos / "train" / "zebra", "a.jpg", b"not a photo")
    archive = tar_folder(photos, tmp_path / "p.tar.gz", "wrap")  # no folder entries needed
    for source in (photos, archive):
        with pytest.raises(DataError, match="no readable image: zebra"):
            load_dataset(source, size=64, cache=False)

"""`convnet audit`: every kind of finding on small planted datasets, the JSON and HTML outputs,
and inputs that are not datasets. The images are smooth random patterns tinted by class, so
distinct images are far apart in perceptual hash and the classes are told apart by colour."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from synthetic import write_cifar_batches

from convnet.audit import FINDINGS, AuditConfig, audit
from convnet.audit.duplicates import near_pairs
from convnet.audit.report import write_report
from convnet.cli import main

CLASSES = ("apple", "grass", "sky")
TINTS = np.array([[220, 40, 40], [40, 200, 60], [50, 80, 230]])


def pattern(rng: np.random.Generator, label: int, width: int = 96, height: int = 72,
            gray: bool = False) -> Image.Image:
    """A smooth random picture: a 6 x 6 grid of random values blown up, tinted by class."""
    grid = rng.uniform(0, 1, (6, 6, 1 if gray else 3))
    base = np.asarray(Image.fromarray((grid * 255).astype(np.uint8).squeeze()).resize(
        (width, height), Image.Resampling.BICUBIC), dtype=np.float64)
    if gray:
        return Image.fromarray(base.astype(np.uint8)).convert("RGB")
    return Image.fromarray(np.clip(0.5 * base + 0.5 * TINTS[label], 0, 255).astype(np.uint8))


def save(image: Image.Image, path: Path, fmt: str = "JPEG", **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **options)
    return path


def planted_folder(root: Path, per_class: int = 12) -> Path:
    """train/ and test/ with one planted example of every finding but mislabels (and one
    of those too: a sky-blue picture filed under apple)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for label, name in enumerate(CLASSES):
            for k in range(n):
                save(pattern(rng, label), root / split / name / f"{k}.jpg", quality=95)
    train = root / "train"
    original = Image.open(train / "apple" / "0.jpg").convert("RGB")
    save(original, train / "apple" / "same-pixels.png", "PNG")  # exact: same decoded pixels
    small = original.resize((77, 58), Image.Resampling.LANCZOS)
    save(small, train / "apple" / "resized.jpg", quality=70)  # near: resized, re-encoded
    shutil.copy(train / "grass" / "1.jpg", root / "test" / "grass" / "leaked.jpg")  # leakage
    save(pattern(rng, 1, 20, 16), train / "grass" / "tiny.png", "PNG")
    save(pattern(rng, 2, gray=True), train / "sky" / "gray.jpg", quality=95)
    save(pattern(rng, 2, 400, 300), train / "sky" / "huge.jpg", quality=95)
    save(pattern(rng, 2), train / "apple" / "mislabelled.jpg", quality=95)  # a sky picture
    data = (train / "sky" / "0.jpg").read_bytes()
    (train / "sky" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (train / "grass" / "empty.jpg").write_bytes(b"")
    (train / "grass" / "notes.jpg").write_bytes(b"not an image at all")
    return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return planted_folder(tmp_path_factory.mktemp("planted") / "data")


@pytest.fixture(scope="module")
def findings(planted):
    return audit(planted, cfg=AuditConfig(label_features="pixels"))


def names(items: list[dict], key: str = "name") -> set[str]:
    return {item[key] for item in items}


def test_each_planted_problem_is_named(findings):
    found, _ = findings
    assert names(found["unreadable"]) == {"train/sky/truncated.jpg", "train/grass/empty.jpg",
                                          "train/grass/notes.jpg"}
    reasons = {i["name"]: i["reason"] for i in found["unreadable"]}
    assert "empty" in reasons["train/grass/empty.jpg"]
    assert "truncated" in reasons["train/sky/truncated.jpg"]
    assert names(found["tiny"]) == {"train/grass/tiny.png"}
    assert names(found["grayscale"]) == {"train/sky/gray.jpg"}
    assert "train/sky/huge.jpg" in names(found["odd_size"])
    exact = [set(g["files"]) for g in found["exact_duplicates"]]
    assert sorted(exact, key=sorted) == [{"test/grass/leaked.jpg", "train/grass/1.jpg"},
                                         {"train/apple/0.jpg", "train/apple/same-pixels.png"}]
    near = [set(p["files"]) for p in found["near_duplicates"]]
    assert {"train/apple/0.jpg", "train/apple/resized.jpg"} in near
    assert [(x["train"], x["test"], x["kind"]) for x in found["leakage"]] == [
        ("train/grass/1.jpg", "test/grass/leaked.jpg", "exact")]
    assert found["class_counts"]["counts"]["test"] == {"apple": 6, "grass": 7, "sky": 6}


def test_the_mislabelled_image_ranks_first(findings):
    found, _ = findings
    issues = found["label_issues"]
    assert issues and issues[0]["name"] == "train/apple/mislabelled.jpg"
    assert issues[0]["suggested"] == "sky"
    assert found["label_check"]["accuracy"] > 0.9


def test_a_model_s_features_find_it_too(planted, model_root):
    # The tiny model's "penultimate layer" is each image's mean colour: enough here.
    found, scan = audit(planted, model_root)
    assert found["label_issues"][0]["name"] == "train/apple/mislabelled.jpg"
    assert found["image_size"] == 32 and scan.images[0].shape == (32, 32, 3)
    assert found["label_check"]["features"].startswith("model")


def test_without_a_model_the_label_check_says_it_needs_one(planted):
    found, _ = audit(planted)
    assert found["label_issues"] == [] and "--model" in found["label_check"]["skipped"]


def test_a_tarball_reads_like_its_folder(planted, tmp_path):
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(planted, arcname="data")
    found, _ = audit(archive, cfg=AuditConfig(label_features="off"))
    assert names(found["tiny"]) == {"data/train/grass/tiny.png"}
    assert len(found["leakage"]) == 1


def test_cifar_batches_are_named_by_batch_and_row(tmp_path):
    folder = write_cifar_batches(tmp_path / "cifar", per_batch=20)
    test = pickle.loads((folder / "test_batch").read_bytes())
    train = pickle.loads((folder / "data_batch_2").read_bytes())
    test[b"data"][5] = train[b"data"][7]
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    found, _ = audit(folder, cfg=AuditConfig(label_features="off"))
    assert [(x["train"], x["test"]) for x in found["leakage"]] == [
        ("data_batch_2[7]", "test_batch[5]")]
    assert found["images"] == 120 and found["unreadable"] == []


def test_json_has_a_key_per_finding(planted):
    result = CliRunner().invoke(main, ["audit", "--data", str(planted), "--json",
                                       "--labels", "off"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert set(FINDINGS) | {"class_counts", "label_check", "summary"} <= set(found)
    assert found["summary"]["unreadable"] == 3


def test_the_html_report_stands_alone(findings, tmp_path):
    found, scan = findings
    page = write_report(tmp_path / "report", found, scan)
    text = page.read_text()
    for kind in FINDINGS:
        assert f"id='{kind}'" in text
    thumbs = sorted((tmp_path / "report" / "thumbs").glob("*.png"))
    assert thumbs and all(f"thumbs/{t.name}" in text for t in thumbs)
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert "train/apple/mislabelled.jpg" in text
    assert Image.open(io.BytesIO(thumbs[0].read_bytes())).size == (64, 64)
    assert json.loads((tmp_path / "report" / "findings.json").read_text())["images"] == \
        found["images"]
    assert not list((tmp_path / "report").rglob("*.tmp"))


def test_the_command_prints_a_summary_and_writes_the_report(planted, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["audit", "--data", str(planted), "--labels", "off",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "unreadable: 3" in result.output and "train/grass/empty.jpg" in result.output
    assert (out / "index.html").is_file()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "no images found"),
    (lambda p: p.write_text("hello"), "corrupt archive"),
])
def test_a_path_that_is_not_a_dataset_is_refused(tmp_path, make, message):
    path = tmp_path / "thing"
    make(path)
    result = CliRunner().invoke(main, ["audit", "--data", str(path)])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


def test_a_class_folder_of_symlinks(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "data"
    for label, name in enumerate(CLASSES[:2]):
        for k in range(3):
            save(pattern(rng, label), root / name / f"{k}.jpg")
    links = root / "links"
    links.mkdir()
    (links / "a.jpg").symlink_to(root / "apple" / "0.jpg")  # the same file under two classes
    (links / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    found, _ = audit(root, cfg=AuditConfig(label_features="off"))
    assert [set(g["files"]) for g in found["exact_duplicates"]] == [
        {"apple/0.jpg", "links/a.jpg"}]
    assert found["exact_duplicates"][0]["classes"] == ["apple", "links"]
    assert [(u["name"], u["reason"].split(" to ")[0]) for u in found["unreadable"]] == [
        ("links/gone.jpg", "broken symbolic link")]


def test_near_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, (300, 3), dtype=np.uint64)
    hashes[10, 0] = hashes[20, 1] ^ np.uint64(0b1011)  # 3 bits from a crop of image 20
    hashes[30, 2] = hashes[299, 0] ^ np.uint64(1)  # a crop of 30 is 1 bit from image 299

    def bits(a, b):
        return bin(int(a) ^ int(b)).count("1")
    brute = {(i, j, min([bits(hashes[i, 0], hashes[j, c]) for c in range(3)]
                        + [bits(hashes[i, c], hashes[j, 0]) for c in range(3)]))
             for i in range(300) for j in range(i + 1, 300)}
    expected = sorted(p for p in brute if p[2] <= 12)
    assert sorted(near_pairs(hashes, 12)) == expected
    assert (10, 20, 3) in expected and (30, 299, 1) in expected

"""The feedback store (SQLite and a real PostgreSQL), its export and `train --extra`'s merge."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import image_bytes
from postgres_server import fresh_database, postgres_server

from convnet.cli import main
from convnet.data import DataError, Split
from convnet.feedback import store as store_module
from convnet.feedback.export import MANIFEST, ExportError, export_dataset, safe_class_folder
from convnet.feedback.merge import merge_extra
from convnet.feedback.store import FeedbackStore, NewFeedback, StoreFull, StoreUnavailable


@pytest.fixture(scope="session")
def pg_server():
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_setting(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "feedback.sqlite3")
    return fresh_database(request.getfixturevalue("pg_server"))


def item(label="cat", color=(255, 0, 0), **fields) -> NewFeedback:
    return NewFeedback(label=label, image=image_bytes(color), media_type="image/png",
                       model_name="cifar10", model_version=1, **fields)


def test_items_round_trip_with_their_image_and_facts(db_setting):
    store = FeedbackStore(db_setting, max_items=10)
    first = store.add(item("cat", predicted="dog", note="ears"))
    second = store.add(item("bird", color=(0, 0, 255), source="page"))
    assert second > first and store.count() == 2
    rows = list(store.items(batch=1))  # batches of one: the paging is exercised too
    assert [r.label for r in rows] == ["cat", "bird"]
    assert rows[0].image == image_bytes((255, 0, 0)) and rows[0].predicted == "dog"
    assert rows[0].note == "ears" and rows[1].source == "page" and len(rows[0].sha256) == 64
    store.close()


def test_the_cap_is_exact_under_concurrent_writers(db_setting):
    cap, writers = 5, 12
    stores = [FeedbackStore(db_setting, max_items=cap) for _ in range(3)]  # as 3 workers
    stores[0].count()  # migrate first; concurrent first use is the next test's
    outcomes: list[str] = []

    def write(k: int) -> None:
        try:
            stores[k % 3].add(item())
            outcomes.append("stored")
        except StoreFull:
            outcomes.append("full")

    threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["full"] * (writers - cap) + ["stored"] * cap
    assert stores[1].count() == cap


FIRST_USE = """
import os, sys, time
from pathlib import Path
from convnet.feedback.store import FeedbackStore
store = FeedbackStore(sys.argv[1], max_items=10)
barrier = Path(sys.argv[2])
(barrier / str(os.getpid())).touch()
while len(list(barrier.iterdir())) < int(sys.argv[3]):  # all start migrating together
    time.sleep(0.005)
print(store.count())
"""


def test_processes_opened_together_migrate_once(db_setting, tmp_path):
    barrier, count = tmp_path / "barrier", 2
    barrier.mkdir()
    processes = [subprocess.Popen([sys.executable, "-c", FIRST_USE, db_setting, str(barrier),
                                   str(count)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(count)]
    results = [p.communicate(timeout=60) for p in processes]
    assert [out.split() for out, _ in results] == [["0"]] * count, results
    from sqlalchemy import text

    with FeedbackStore(db_setting, max_items=1).engine().connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).all() == [
            ("0002",)]


def test_sqlite_runs_in_wal_mode(tmp_path):
    path = tmp_path / "f.sqlite3"
    FeedbackStore(str(path), max_items=1).add(item())
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_locked_sqlite_file_is_unavailable_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "f.sqlite3"
    store = FeedbackStore(str(path), max_items=10)
    store.add(item())
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    with pytest.raises(StoreUnavailable, match="locked"):
        store.add(item("dog"))
    holder.execute("ROLLBACK")
    assert [r.label for r in store.items()] == ["cat"]


def test_an_unreachable_postgresql_is_unavailable():
    from conftest import free_port

    store = FeedbackStore(f"postgresql://postgres@127.0.0.1:{free_port()}/x", max_items=1)
    with pytest.raises(StoreUnavailable):
        store.add(item())
    with pytest.raises(StoreUnavailable):  # and again: a later call retries the connection
        store.count()


KILL_SCRIPT = """
import io, os, signal, sys
sys.path.insert(0, sys.argv[3])
from conftest import write_version, image_bytes
from pathlib import Path
from convnet.serve import create_app
write_version(Path(sys.argv[2]), 1)
client = create_app({"MODEL_DIR": sys.argv[2], "RELOAD_INTERVAL": 0,
                     "FEEDBACK_DB": sys.argv[1]}).test_client()
answer = client.post("/api/v1/feedback", data={"file": (io.BytesIO(image_bytes()), "a.png"),
                                               "label": "cat"})
print(answer.status_code, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no clean shutdown, no checkpoint, no close
"""


def test_an_acknowledged_write_survives_kill_9(tmp_path, request):
    db = tmp_path / "f.sqlite3"
    result = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(db), str(tmp_path / "m"),
                             str(request.config.rootpath / "tests")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL and result.stdout.split() == ["201"]
    assert [r.label for r in FeedbackStore(str(db), max_items=1).items()] == ["cat"]


def test_export_writes_an_image_folder_and_a_manifest(db_setting, tmp_path):
    store = FeedbackStore(db_setting, max_items=10)
    store.add(item("cat", predicted="dog"))
    store.add(item("bird", color=(0, 0, 255)))
    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["feedback", "export", "--db", db_setting, "--out",
                                       str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 2 images in 2 classes" in result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "bird/2.png", "cat/1.png"]
    manifest = json.loads((out / MANIFEST).read_text())
    first = manifest["items"][0]
    assert first["model"] == "cifar10" and first["model_version"] == 1
    assert first["predicted"] == "dog" and first["created_at"]
    assert "postgres@" not in json.dumps(manifest)  # no URL, so no password, in the manifest

    store.add(item("dog"))  # a second export replaces the first whole
    export_dataset(db_setting, out)
    assert json.loads((out / MANIFEST).read_text())["count"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_refuses_a_folder_that_is_not_an_export_and_a_missing_database(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    db = tmp_path / "f.sqlite3"
    FeedbackStore(str(db), max_items=1).add(item())
    with pytest.raises(ExportError, match="not an earlier export"):
        export_dataset(str(db), tmp_path / "mine")
    assert (tmp_path / "mine" / "precious.txt").exists()
    result = CliRunner().invoke(main, ["feedback", "export", "--db", str(tmp_path / "no.db"),
                                       "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no feedback database" in result.output


def _split(labels, classes) -> Split:
    labels = np.array(labels, dtype=np.int64)
    return Split(np.zeros((len(labels), 8, 8, 3), np.uint8), labels, classes)


def test_merge_adds_the_extra_images_under_the_base_class_indices(tmp_path):
    for name in ("bird", "bird2"):
        (tmp_path / "extra" / "bird").mkdir(parents=True, exist_ok=True)
        (tmp_path / "extra" / "bird" / f"{name}.png").write_bytes(image_bytes((0, 0, 255)))
    (tmp_path / "extra" / MANIFEST).write_text("{}")  # a loose file: not an image of a class
    base = {"train": _split([0, 1, 2], ["airplane", "automobile", "bird"])}
    merged = merge_extra(base, tmp_path / "extra", size=8)
    assert merged.classes == ["airplane", "automobile", "bird"]
    assert merged.labels.tolist() == [0, 1, 2, 2, 2]
    assert merged.images.shape == (5, 8, 8, 3) and merged.images[-1, 0, 0].tolist() == [0, 0, 255]


def test_merge_refuses_classes_the_base_does_not_have(tmp_path):
    (tmp_path / "extra" / "zebra").mkdir(parents=True)
    (tmp_path / "extra" / "zebra" / "1.png").write_bytes(image_bytes())
    base = {"train": _split([0, 1], ["airplane", "bird"])}
    with pytest.raises(DataError, match=r"\['zebra'\] are not classes of the base"):
        merge_extra(base, tmp_path / "extra", size=8)


@pytest.mark.parametrize(("label", "safe"), [
    ("cat", True), ("sea lion", True), ("../x", False), ("a/b", False), ("..", False),
    (".hidden", False), ("train", False), ("a\\b", False)])
def test_only_labels_that_are_one_plain_folder_name_are_exported_as_folders(label, safe):
    assert safe_class_folder(label) is safe

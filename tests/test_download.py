"""Tests for convnet.download against a real HTTP server on 127.0.0.1 with Range support."""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from convnet.download import CIFAR10_FILENAME, DownloadError, download, download_cifar10

PATH = "/data.tar.gz"


@dataclass
class ServerState:
    body: bytes
    ignore_range: bool = False
    drops: int = 0  # how many responses to cut off halfway through the body
    stalls: int = 0  # how many responses to freeze halfway through the body
    errors: list[int] = field(default_factory=list)  # statuses to answer before the real thing
    ranges: list[str | None] = field(default_factory=list)  # Range header of every request


class RangeHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        state: ServerState = self.server.state
        requested = self.headers.get("Range")
        state.ranges.append(requested)
        if self.path != PATH:
            self.send_error(404)
            return
        if state.errors:
            self.send_error(state.errors.pop(0))
            return
        body, start, status = state.body, 0, 200
        if requested and not state.ignore_range:
            start = int(requested.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        chunk = body[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(chunk)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if state.drops:
            state.drops -= 1
            self.wfile.write(chunk[: len(chunk) // 2])
            self.close_connection = True  # the client sees EOF short of Content-Length
            return
        if state.stalls:
            state.stalls -= 1
            self.wfile.write(chunk[: len(chunk) // 2])
            self.wfile.flush()
            time.sleep(1.0)  # longer than the client's timeout; the client has hung up by now
            return
        self.wfile.write(chunk)

    def log_message(self, format, *args):
        pass  # keep pytest output clean


@pytest.fixture
def tarball(tmp_path):
    """A small gzip'd tar of random files (~200 KiB, several socket reads)."""
    rng = random.Random(0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for i in range(3):
            data = rng.randbytes(70_000)
            info = tarfile.TarInfo(f"batch_{i}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def server(tarball):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.daemon_threads = True
    httpd.state = ServerState(body=tarball)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}{PATH}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def sleeps():
    """Records backoff delays instead of waiting them out."""
    return []


def fetch(server, dest, sleeps, **kw):
    kw.setdefault("md5", hashlib.md5(server.state.body).hexdigest())
    kw.setdefault("progress", False)
    return download(server.url, dest, sleep=sleeps.append, **kw)


def test_plain_download_is_verified_and_renamed(server, tmp_path, sleeps):
    path = fetch(server, tmp_path / "data", sleeps, progress=True)
    assert path == tmp_path / "data" / "data.tar.gz"
    assert path.read_bytes() == server.state.body
    assert os.listdir(path.parent) == ["data.tar.gz"]
    assert server.state.ranges == [None]
    assert sleeps == []


def test_existing_part_is_resumed_with_range(server, tmp_path, sleeps):
    half = len(server.state.body) // 2
    (tmp_path / "data.tar.gz.part").write_bytes(server.state.body[:half])
    path = fetch(server, tmp_path, sleeps)
    assert server.state.ranges == [f"bytes={half}-"]
    assert path.read_bytes() == server.state.body
    assert not (tmp_path / "data.tar.gz.part").exists()


def test_dropped_connections_are_retried_and_resumed(server, tmp_path, sleeps):
    server.state.drops = 2
    size = len(server.state.body)
    path = fetch(server, tmp_path, sleeps)
    first = size // 2
    second = first + (size - first) // 2
    assert server.state.ranges == [None, f"bytes={first}-", f"bytes={second}-"]
    assert sleeps == [0.5, 1.0]
    assert path.read_bytes() == server.state.body


def test_stalled_response_times_out_and_resumes(server, tmp_path, sleeps):
    server.state.stalls = 1
    path = fetch(server, tmp_path, sleeps, timeout=0.2)
    assert len(server.state.ranges) == 2 and server.state.ranges[1] is not None
    assert path.read_bytes() == server.state.body


def test_server_errors_are_retried(server, tmp_path, sleeps):
    server.state.errors = [503, 500]
    path = fetch(server, tmp_path, sleeps)
    assert sleeps == [0.5, 1.0]
    assert path.read_bytes() == server.state.body


def test_retries_run_out(server, tmp_path, sleeps):
    server.state.errors = [503] * 10
    with pytest.raises(DownloadError, match="gave up after 3 tries"):
        fetch(server, tmp_path, sleeps, retries=2)
    assert sleeps == [0.5, 1.0]
    assert not (tmp_path / "data.tar.gz").exists()


def test_md5_mismatch_removes_everything(server, tmp_path, sleeps):
    wrong = "0" * 32
    with pytest.raises(DownloadError) as excinfo:
        fetch(server, tmp_path, sleeps, md5=wrong)
    message = str(excinfo.value)
    assert wrong in message and hashlib.md5(server.state.body).hexdigest() in message
    assert server.url in message
    assert os.listdir(tmp_path) == []


def test_not_found_fails_at_once(server, tmp_path, sleeps):
    started = time.monotonic()
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url + ".missing", tmp_path, progress=False, sleep=sleeps.append)
    assert time.monotonic() - started < 2
    assert len(server.state.ranges) == 1
    assert sleeps == []
    assert os.listdir(tmp_path) == []


def test_valid_existing_file_makes_no_request(server, tmp_path, sleeps):
    (tmp_path / "data.tar.gz").write_bytes(server.state.body)
    path = fetch(server, tmp_path, sleeps)
    assert path == tmp_path / "data.tar.gz"
    assert server.state.ranges == []


def test_corrupt_existing_file_is_replaced(server, tmp_path, sleeps):
    (tmp_path / "data.tar.gz").write_bytes(b"not the archive")
    path = fetch(server, tmp_path, sleeps)
    assert path.read_bytes() == server.state.body
    assert server.state.ranges == [None]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path, sleeps):
    server.state.ignore_range = True
    (tmp_path / "data.tar.gz.part").write_bytes(server.state.body[:1000])
    path = fetch(server, tmp_path, sleeps)
    assert server.state.ranges == ["bytes=1000-"]
    assert path.read_bytes() == server.state.body


def test_complete_part_is_kept_on_416(server, tmp_path, sleeps):
    (tmp_path / "data.tar.gz.part").write_bytes(server.state.body)
    path = fetch(server, tmp_path, sleeps)
    assert server.state.ranges == [f"bytes={len(server.state.body)}-"]
    assert path.read_bytes() == server.state.body


def test_oversized_part_is_restarted_on_416(server, tmp_path, sleeps):
    (tmp_path / "data.tar.gz.part").write_bytes(server.state.body + b"stale tail")
    path = fetch(server, tmp_path, sleeps)
    assert server.state.ranges == [f"bytes={len(server.state.body) + 10}-", None]
    assert path.read_bytes() == server.state.body


def test_download_cifar10_uses_the_cifar_filename(server, tmp_path, sleeps):
    md5 = hashlib.md5(server.state.body).hexdigest()
    path = download_cifar10(tmp_path, url=server.url, md5=md5, progress=False, sleep=sleeps.append)
    assert path == tmp_path / CIFAR10_FILENAME
    assert path.read_bytes() == server.state.body


def test_cli_download_and_checksum_failure(server, tmp_path):
    from click.testing import CliRunner

    from convnet.cli import main

    good = hashlib.md5(server.state.body).hexdigest()
    result = CliRunner().invoke(main, ["download", "--dest", str(tmp_path / "a"),
                                       "--url", server.url, "--md5", good])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "cifar-10-python.tar.gz").read_bytes() == server.state.body
    # Without --md5 the official archive's checksum applies, which this file cannot match.
    result = CliRunner().invoke(main, ["download", "--dest", str(tmp_path / "b"),
                                       "--url", server.url])
    assert result.exit_code == 2
    assert "MD5" in result.output and "c58f30108f718f92721af3b95e74349a" in result.output
    assert not list((tmp_path / "b").iterdir())


def test_progress_stays_out_of_a_log(server, tmp_path, sleeps, capsys):
    # pytest's captured stderr is no terminal, as a CI log or nohup.out is not
    fetch(server, tmp_path / "data", sleeps, progress=True)
    assert capsys.readouterr().err == ""

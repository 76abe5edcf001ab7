"""Fetch a file over HTTP with resume, retries and an MD5 check; CIFAR-10 is the usual one.

Bytes go to ``<dest_dir>/<filename>.part`` and are renamed onto the final name only after their MD5
matches, so a file under the final name is always complete. An interrupted download resumes from the
``.part`` with an HTTP Range request, on the next try or on the next run.

    python -c "from convnet.download import download_cifar10; download_cifar10('data')"
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FILENAME = "cifar-10-python.tar.gz"

CHUNK_BYTES = 1 << 16  # per read from the socket
BACKOFF_BASE_S = 0.5  # first wait between tries; doubles each try
BACKOFF_MAX_S = 8.0

# Failures worth another try: the network, not the request. HTTPError is a URLError, so 4xx is
# sorted out before these are consulted.
RETRYABLE = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)

log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A download that failed for good: an HTTP 4xx, retries used up, or a checksum mismatch."""


def compute_md5(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read in 1 MiB blocks so a large archive never sits in memory."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def download(
    url: str,
    dest_dir: str | os.PathLike,
    *,
    filename: str | None = None,
    md5: str | None = None,
    retries: int = 5,
    timeout: float = 30,
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Download `url` into `dest_dir` and return the path of the complete, verified file.

    `timeout` is seconds per socket operation; `retries` counts tries after the first one.
    With `md5` None, any existing file is trusted and the result is not checked.
    """
    filename = filename or Path(urlsplit(url).path).name
    if not filename:
        raise ValueError(f"{url} names no file; pass filename=")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / filename
    md5 = md5.lower() if md5 else None
    if final.exists() and (md5 is None or compute_md5(final) == md5):
        log.info("%s is already there", final)
        return final
    part = final.with_name(final.name + ".part")

    for attempt in range(retries + 1):
        try:
            _fetch_into(part, url, md5=md5, timeout=timeout, progress=progress)
            break
        except urllib.error.HTTPError as e:
            e.close()  # it holds the socket open otherwise
            if e.code < 500:  # the request itself is wrong; asking again will not help
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
            error: Exception = e
        except RETRYABLE as e:
            error = e
        if attempt == retries:
            raise DownloadError(f"{url}: gave up after {retries + 1} tries: {error}") from error
        delay = min(BACKOFF_BASE_S * 2**attempt, BACKOFF_MAX_S)
        log.warning("%s: %s; retrying in %.1f s", url, error, delay)
        sleep(delay)

    if md5 is not None:
        actual = compute_md5(part)
        if actual != md5:
            # A resumed file that went wrong would go wrong again: start clean next time.
            part.unlink()
            raise DownloadError(f"{url}: MD5 mismatch, expected {md5}, got {actual}")
    _fsync(part)
    os.replace(part, final)
    _fsync(dest_dir)  # make the rename itself survive a crash
    return final


def download_cifar10(
    dest_dir: str | os.PathLike, *, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, **kw
) -> Path:
    """Download the CIFAR-10 python archive (about 163 MiB) into `dest_dir`."""
    kw.setdefault("filename", CIFAR10_FILENAME)
    return download(url, dest_dir, md5=md5, **kw)


def _fetch_into(part: Path, url: str, *, md5: str | None, timeout: float, progress: bool) -> None:
    """One try: append the rest of `url` to `part`, raising on any short or failed transfer."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        # 416: nothing lies past `offset`. Either the part is complete or it is longer than the
        # file (a stale part from another version); only the first is worth keeping.
        size = e.headers.get("Content-Range", "").rpartition("/")[2]
        e.close()
        if size == str(offset) or (md5 is not None and compute_md5(part) == md5):
            return
        part.unlink()
        offset = 0
        response = _open(url, offset, timeout)

    with response:
        if response.status != 206:
            offset = 0  # the server ignored Range and sends the whole file
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        received = 0
        with (
            open(part, "ab" if offset else "wb") as f,
            tqdm(
                total=None if expected is None else offset + expected,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                # None: only on a terminal; in a log every redraw would be another line
                disable=None if progress else True,
            ) as bar,
        ):
            while chunk := response.read(CHUNK_BYTES):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    # http.client returns a short body without complaint when the peer closes early.
    if expected is not None and received < expected:
        raise http.client.IncompleteRead(b"", expected - received)


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

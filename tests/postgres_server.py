"""A throwaway PostgreSQL server for the tests: Debian's `postgresql` package (make system-deps),
initdb'd into a temporary folder and started with pg_ctl on a free port, as the `postgres` user
when the tests run as root (PostgreSQL refuses to run as root). Skips with the reason where it
cannot start."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

START_TIMEOUT_S = 30


def _as_server_user(user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--"] if user else []


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yield its URL (trust authentication, user postgres); stop it after."""
    pytest.importorskip("psycopg", reason="the `postgres` extra (psycopg) is not installed")
    initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    found = shutil.which("initdb")
    if not initdbs and not found:
        pytest.skip("PostgreSQL is not installed: `make system-deps` (Debian's postgresql)")
    bindir = Path(initdbs[-1] if initdbs else found).parent  # type: ignore[arg-type]
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        if not shutil.which("runuser"):
            pytest.skip("running as root and `runuser` is missing: cannot start PostgreSQL")
        user = "postgres"
    base = Path(tempfile.mkdtemp(prefix="convnet-pg-"))  # not under pytest's root-only tmp
    if user:
        shutil.chown(base, user)
    data, port = base / "data", free_port()
    prefix = _as_server_user(user)
    try:
        subprocess.run([*prefix, bindir / "initdb", "-D", data, "-A", "trust", "-U", "postgres",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=60)
        subprocess.run([*prefix, bindir / "pg_ctl", "-D", data, "-l", base / "log.txt", "-w",
                        "-t", str(START_TIMEOUT_S), "-o",
                        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
                        "start"], check=True, capture_output=True, timeout=START_TIMEOUT_S + 10)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        log = (base / "log.txt").read_text(errors="replace") if (base / "log.txt").exists() else ""
        out = getattr(exc, "stderr", b"") or b""
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {exc}\n{out.decode(errors='replace')}\n{log}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"],
                       capture_output=True, timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new, empty database on the server; its URL."""
    import psycopg

    name = f"convnet_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')  # our own name, no input in it
    return server_url.rsplit("/", 1)[0] + f"/{name}"

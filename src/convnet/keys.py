"""API keys: the file of key hashes that `convnet keys create/list/revoke` edit and the server
reads (CONVNET_API_KEYS_FILE; see convnet.serve.auth).

The file is JSON, `{"keys": [{"name", "sha256", "created", "rate_limit"}, ...]}`, mode 0600, and
never holds a key itself: `create_key` returns the new key once, for the caller to hand on. Every
change is written to a temporary file beside it and renamed over it, so the server, which re-reads
the file when it changes, sees the old list or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

KEY_PREFIX = "cnk_"  # makes a leaked key easy to recognise (secret scanners, logs)
KEY_BYTES = 32  # 256 random bits per key
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # names go into access logs
FILE_MODE = 0o600


class KeysFileError(ValueError):
    """A keys file that cannot be read or does not hold a list of keys; a bad name or limit."""


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    name: str
    sha256: str  # hex digest of the key
    created: str  # ISO 8601, UTC
    rate_limit: str | None = None  # e.g. "100/minute"; None: the server's RATE_LIMIT


def hash_key(key: str) -> str:
    """The hex SHA-256 of `key`.

    Unsalted and fast on purpose: salting and slow hashes (bcrypt, scrypt) protect passwords,
    which people choose from a small space an attacker can enumerate. These keys are 256 random
    bits from `secrets`, so a stolen file of hashes gives nothing to enumerate or to look up, and
    one SHA-256 per request costs about a microsecond.
    """
    return hashlib.sha256(key.encode("latin-1", "replace")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def read_keys(path: str | os.PathLike) -> list[KeyRecord]:
    """The keys listed in `path`; KeysFileError if it is missing, unreadable or malformed."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeysFileError(f"cannot read the API keys file {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeysFileError(f"the API keys file {path} is not JSON: {exc}") from None
    entries = payload.get("keys") if isinstance(payload, dict) else None
    if not isinstance(entries, list):
        raise KeysFileError(f'the API keys file {path} must hold {{"keys": [...]}}')
    records = []
    for i, entry in enumerate(entries):
        try:
            records.append(KeyRecord(name=str(entry["name"]), sha256=str(entry["sha256"]),
                                     created=str(entry.get("created", "")),
                                     rate_limit=entry.get("rate_limit") or None))
        except (TypeError, KeyError):
            raise KeysFileError(f"{path}: keys[{i}] needs a name and a sha256") from None
    return records


def _write_keys(path: Path, records: list[KeyRecord]) -> None:
    """Replace `path` with `records`: a 0600 temporary file beside it, fsynced, renamed over it."""
    text = json.dumps({"keys": [dataclasses.asdict(r) for r in records]}, indent=2) + "\n"
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[list[KeyRecord]]:
    """The file's records, with an exclusive lock held (on PATH.lock) until the block ends, so two
    commands changing the file at once cannot lose each other's change."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        yield read_keys(path) if path.exists() else []
    finally:
        os.close(lock_fd)  # releases the lock


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise KeysFileError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
    return name


def check_rate_limit(text: str) -> str:
    """`text` if it is a limit Flask-Limiter reads ("100/minute", "10 per second; 500/hour")."""
    from limits import parse_many

    try:
        parse_many(text)
    except ValueError:
        raise KeysFileError(f"rate limit {text!r}: expected e.g. '100/minute' or "
                            "'10/second; 1000/hour'") from None
    return text


def create_key(path: str | os.PathLike, name: str | None = None,
               rate_limit: str | None = None) -> tuple[str, KeyRecord]:
    """Add a new key to `path` (created if missing); returns (the key, its record). The key is
    not stored anywhere: this is the only time it exists outside its holder's hands."""
    path = Path(path)
    if rate_limit:
        check_rate_limit(rate_limit)
    with _locked(path) as records:
        taken = {r.name for r in records}
        if name is None:
            name = next(f"key-{n}" for n in range(1, len(records) + 2) if f"key-{n}" not in taken)
        elif check_name(name) in taken:
            raise KeysFileError(f"{path} already has a key named {name!r}; revoke it first")
        key = new_key()
        created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        record = KeyRecord(name, hash_key(key), created, rate_limit or None)
        _write_keys(path, [*records, record])
    return key, record


def revoke_key(path: str | os.PathLike, name: str) -> KeyRecord:
    """Remove the key named `name` from `path`; KeysFileError if there is none."""
    path = Path(path)
    with _locked(path) as records:
        found = [r for r in records if r.name == name]
        if not found:
            raise KeysFileError(f"{path} has no key named {name!r}")
        _write_keys(path, [r for r in records if r.name != name])
    return found[0]

"""The model currently served, and the background thread that swaps in newer versions.

A model root (`ROOT/<version>/model.onnx`, TF Serving's layout) is polled every few seconds. A new,
higher version is loaded completely and test-run next to the serving one, then swapped in by a
single reference assignment: a request holds the `LoadedModel` it started with, so none fails or
mixes versions during a swap. A version that cannot serve is refused with its reason (logged, kept
for /readyz and /metrics) and the old one keeps serving.

Under the version policies `all` and `specific` (convnet.serve.models_config) a holder keeps
several versions loaded, each added as it appears and never unloaded; `current` is then the
highest of them.

What clients may see (`Refusal.reason`, `load_error`) names the version and a short reason, never
a path on this machine or a library's own error text; the log gets those (`Refusal.detail`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from convnet.modeldir import ModelDirError, list_versions, locate, resolve_version
from convnet.serve.model import LoadedModel, LoadError, load_model
from convnet.serve.models_config import LATEST, VersionPolicy

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int], ...]  # (file name, size in bytes, mtime in ns) per file


@dataclass(frozen=True)
class Refusal:
    version: int
    reason: str  # short, for clients
    detail: str  # paths and causes, for the log
    fingerprint: Fingerprint = field(repr=False)
    at: float = field(default_factory=time.time)  # Unix seconds


def fingerprint(version_dir: Path) -> Fingerprint:
    """Cheap identity of a folder's contents: a version still being copied in changes it."""
    try:
        entries = [(e.name, e.stat()) for e in os.scandir(version_dir) if e.is_file()]
    except OSError:
        return ()
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in entries))


class Poller:
    """A daemon thread calling `poll` every `interval` seconds until stop(); a poll that raises
    is logged and the thread goes on, or reloading would stop silently. interval 0: no thread."""

    def __init__(self, poll: Callable[[], object], interval: float, name: str):
        self.poll, self.interval, self.name = poll, interval, name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (idempotent; a no-op when the interval is 0)."""
        if self.interval <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # the thread must outlive any surprise
                log.exception("%s: poll failed", self.name)


class ModelHolder:
    """Owns the served `LoadedModel`.

    model_dir: a model root (versions are watched), one version folder (served as is, never
    reloaded), or None for the bundled model's root. name: what the loaded models are called
    (None: the root folder's name). policy: which versions are loaded (latest: one at a time).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike | None,
        *,
        name: str | None = None,
        policy: VersionPolicy = LATEST,
        reload_interval: float = 2.0,  # seconds between polls; 0 disables reloading
        inference_threads: int = 1,
        precision: str = "auto",  # "int8"/"float": that file; "auto": int8 where present
        on_load: Callable[[LoadedModel], None] | None = None,
        on_refuse: Callable[[Refusal], None] | None = None,
    ):
        self.model_dir = locate(model_dir)
        self.name = name
        self.policy = policy
        self.inference_threads = inference_threads
        self.precision = precision
        self._on_load = on_load or (lambda model: None)
        self._on_refuse = on_refuse or (lambda refusal: None)
        self._current: LoadedModel | None = None
        # version -> model, every one loaded now; replaced, never mutated (requests read it)
        self._loaded: dict[int, LoadedModel] = {}
        self.load_error: str | None = None  # why nothing is served, while nothing is; public
        # version -> why it is not served. Replaced, never mutated, so request threads can
        # iterate it while the reload thread records a refusal.
        self.refusals: dict[int, Refusal] = {}
        self._pending: dict[int, Fingerprint] = {}  # versions seen once, waiting to settle
        self._poll_lock = threading.Lock()
        self._poller = Poller(self.poll, reload_interval, "convnet-model-reload")

    @property
    def current(self) -> LoadedModel | None:
        """The version answering requests that name none: the highest loaded."""
        return self._current

    @property
    def loaded(self) -> dict[int, LoadedModel]:
        """Every version loaded now, by number (one under the latest policy)."""
        return self._loaded

    def slot(self, model: LoadedModel) -> object:
        """What a newly loaded `model` takes the place of, for batchers and metrics: under the
        latest policy the previous version's, else a place of its own."""
        return (id(self),) if self.policy.kind == "latest" else (id(self), model.version)

    @property
    def watched_root(self) -> Path | None:
        """The folder polled for new versions, or None when one version was pinned."""
        try:
            resolved = resolve_version(self.model_dir)
        except ModelDirError:
            return self.model_dir  # nothing there yet: wait for a first version to appear
        return None if resolved == self.model_dir else self.model_dir

    def load_initial(self) -> None:
        """Load the highest version that works, refusing the broken ones above it (under `all`
        and `specific`: every version the policy selects, refusing the broken ones)."""
        root = self.watched_root
        if root is None:
            self._try_load(self.model_dir)
            return
        for version in reversed(list_versions(root)):
            if self.policy.kind != "latest":
                if self.policy.wants(version):
                    self._try_load(root / str(version))
            elif self._try_load(root / str(version)):
                return
        if self._current is None and self.load_error is None:
            wanted = ("" if self.policy.kind == "latest"
                      else f" that version_policy {self.policy.describe()} loads")
            self.load_error = f"the model root holds no model version{wanted} yet"
            log.warning("%s holds no model version%s yet; waiting for one", root, wanted)

    def _try_load(self, version_dir: Path, version_fingerprint: Fingerprint = ()) -> bool:
        started = time.perf_counter()
        try:
            model = load_model(version_dir, inference_threads=self.inference_threads,
                               precision=self.precision)
            if self.name is not None and model.name != self.name:
                model = dataclasses.replace(model, name=self.name)
        except Exception as exc:  # unreadable files, bad encodings...: all mean "do not serve"
            if isinstance(exc, LoadError):
                reason, detail = exc.reason, str(exc)
            else:
                reason, detail = "its files cannot be loaded", f"{version_dir}: {exc!r}"
            self._refuse(version_dir, reason, detail,
                         version_fingerprint or fingerprint(version_dir))
            return False
        previous = self._current
        if self.policy.kind == "latest":
            self._loaded = {model.version: model}
            self._current = model  # the swap: one reference assignment, atomic under the GIL
        else:
            self._loaded = {**self._loaded, model.version: model}
            self._current = self._loaded[max(self._loaded)]
            previous = None  # nothing is replaced: every version stays
        self.load_error = None
        log.info(
            "serving %s version %d (%s) from %s (loaded in %.0f ms%s)",
            model.name, model.version, model.precision, version_dir,
            (time.perf_counter() - started) * 1000,
            f", replacing version {previous.version}" if previous else "",
        )
        self._on_load(model)
        return True

    def _refuse(self, version_dir: Path, reason: str, detail: str,
                version_fingerprint: Fingerprint) -> None:
        version = int(version_dir.name) if version_dir.name.isdigit() else 0
        refusal = Refusal(version, reason, detail, version_fingerprint)
        self.refusals = {**self.refusals, version: refusal}
        if self._current is None:
            self.load_error = f"version {version} was refused: {reason}"
        log.error(
            "refused model version %d: %s%s", version, detail,
            f" (still serving version {self._current.version})" if self._current else "",
        )
        self._on_refuse(refusal)

    def poll(self) -> None:
        """Check the root once; load the highest new version whose files have stopped changing.

        A version is only loaded once two polls in a row see the same files, so a folder copied in
        without an atomic rename is not read half-written. A refused version is retried only if
        its files change. Under `all` and `specific`, every wanted version not loaded yet.
        """
        root = self.watched_root
        if root is None:
            return
        if self.policy.kind != "latest":
            with self._poll_lock:
                for version in list_versions(root):
                    if self.policy.wants(version) and version not in self._loaded:
                        self._consider(root / str(version), version)
            return
        with self._poll_lock:
            floor = self._current.version if self._current else 0
            for version in reversed(list_versions(root)):
                if version <= floor:
                    break
                # a newer version loaded or still settling: stop; refused: try older ones
                if self._consider(root / str(version), version) in ("loaded", "waiting"):
                    return

    def _consider(self, version_dir: Path, version: int) -> str:
        """Load `version` once its files have settled, unless refused as they are: "loaded",
        "waiting" (first sight, or still changing) or "refused" (now or before, as it is)."""
        seen = fingerprint(version_dir)
        refused = self.refusals.get(version)
        if refused and refused.fingerprint == seen:
            return "refused"
        if self._pending.get(version) != seen:
            self._pending[version] = seen
            return "waiting"
        del self._pending[version]
        if not self._try_load(version_dir, seen):
            return "refused"
        self.refusals = {v: r for v, r in self.refusals.items() if v != version}
        return "loaded"

    def start(self) -> None:
        """Start the polling thread (idempotent; a no-op when reloading is disabled)."""
        self._poller.start()

    def stop(self) -> None:
        self._poller.stop()

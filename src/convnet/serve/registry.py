"""The models one server serves: a `ModelHolder` per model of the config (each hot-reloading its
own root), the labels that name their versions, and the thread that re-reads the config file.

The config (convnet.serve.models_config) is read at start and, when it came from a file, polled
every RELOAD_INTERVAL seconds: a file whose modification time or size changed is read again. A
new config is put together next to the serving one (holders whose base path and version policy
are unchanged are kept as they are, the others are loaded anew) and swapped in by one reference
assignment, only if every label points at a version that is loaded. Otherwise, as for a syntax
error, the old config keeps serving and the log says why (also in `config_error`, for /readyz).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from convnet.serve.holder import ModelHolder, Poller, Refusal
from convnet.serve.model import LoadedModel
from convnet.serve.models_config import ConfigError, ModelsConfig, ModelSpec, read_config

log = logging.getLogger(__name__)

Stamp = tuple[int, int] | None  # (mtime in ns, size in bytes) of the config file; None: missing


@dataclass(frozen=True)
class Served:
    """One consistent view of what is served: requests take it once and keep it."""

    config: ModelsConfig
    holders: dict[str, ModelHolder]  # by name, in the config's order; the first is the default

    @property
    def names(self) -> list[str]:
        return list(self.holders)

    @property
    def default(self) -> ModelHolder:
        return next(iter(self.holders.values()))

    def labels(self, name: str) -> dict[str, int]:
        return next((dict(s.labels) for s in self.config.models if s.name == name), {})


def _stamp(path: Path) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def check_labels(config: ModelsConfig, holders: dict[str, ModelHolder]) -> None:
    """ConfigError, naming the label's line, for a label whose version is not loaded."""
    for spec in config.models:
        holder = holders[spec.name]
        for label, version in spec.labels.items():
            if version in holder.loaded:
                continue
            refusal = holder.refusals.get(version)
            why = (f"was refused: {refusal.reason}" if refusal is not None
                   else "is not loaded (no such version folder)")
            raise ConfigError(
                f"{config.where(spec.label_lines.get(label, spec.line))}: label {label!r} of "
                f"model {spec.name!r} points at version {version}, which {why}")


class ModelRegistry:
    """Owns the holders. on_load(model, slot, primary), on_unload(slot): a version was loaded
    into / left its slot (ModelHolder.slot); primary: it is the default model's newest."""

    def __init__(
        self,
        config: ModelsConfig,
        *,
        reload_interval: float = 2.0,  # seconds between polls of the config file; 0 = off
        holder_options: dict | None = None,  # reload_interval, inference_threads, precision
        on_load: Callable[[LoadedModel, object, bool], None] | None = None,
        on_refuse: Callable[[Refusal], None] | None = None,
        on_unload: Callable[[object], None] | None = None,
    ):
        self.initial_config = config
        self.holder_options = holder_options or {}
        self._on_load = on_load or (lambda model, slot, primary: None)
        self._on_refuse = on_refuse
        self._on_unload = on_unload or (lambda slot: None)
        self._served: Served | None = None
        self._primary = config.models[0].name  # whose loads set convnet_model_version
        self._stamp: Stamp = None
        self.config_error: str | None = None  # why the last reload was refused; None if none
        self._poller = Poller(self.poll_config, reload_interval, "convnet-config-reload")

    @property
    def served(self) -> Served:
        if self._served is None:
            raise RuntimeError("ModelRegistry.load_initial() was not called")
        return self._served

    def _holder(self, spec: ModelSpec) -> ModelHolder:
        holder: ModelHolder

        def loaded(model: LoadedModel) -> None:
            primary = spec.name == self._primary and model is holder.current
            self._on_load(model, holder.slot(model), primary)

        holder = ModelHolder(spec.base_path, name=spec.name, policy=spec.policy,
                             on_load=loaded, on_refuse=self._on_refuse, **self.holder_options)
        return holder

    def _retire(self, holder: ModelHolder) -> None:
        holder.stop()
        for model in holder.loaded.values():
            self._on_unload(holder.slot(model))

    def _build(self, config: ModelsConfig) -> tuple[Served, list[ModelHolder]]:
        """The served view for `config`, reusing the holders of the same root and policy; and
        the holders made for it. Raises ConfigError (having retired those) if a label fails."""
        old = self._served.holders if self._served is not None else {}
        old_specs = {s.name: s for s in self._served.config.models} if self._served else {}
        holders: dict[str, ModelHolder] = {}
        created: list[ModelHolder] = []
        previous_primary, self._primary = self._primary, config.models[0].name
        try:
            for spec in config.models:
                before = old_specs.get(spec.name)
                if (before is not None and before.base_path == spec.base_path
                        and before.policy == spec.policy):
                    holders[spec.name] = old[spec.name]
                    continue
                holder = self._holder(spec)
                created.append(holder)
                holder.load_initial()
                holders[spec.name] = holder
            check_labels(config, holders)
        except BaseException:
            self._primary = previous_primary
            for holder in created:
                self._retire(holder)
            raise
        return Served(config, holders), created

    def load_initial(self) -> None:
        """Load every model of the initial config. Raises ConfigError if a label points at a
        version that is not loaded: the server must not start so."""
        if self.initial_config.path is not None:
            self._stamp = _stamp(self.initial_config.path)
        self._served, _ = self._build(self.initial_config)

    def poll_config(self) -> bool:
        """Re-read the config file if it changed; whether a new config was swapped in."""
        path = self.served.config.path
        if path is None:
            return False
        stamp = _stamp(path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            served, created = self._build(read_config(path))
        except ConfigError as exc:
            self.config_error = str(exc)
            log.error("model config not reloaded, the old one keeps serving: %s", exc)
            return False
        old, self._served = self.served, served  # the swap: one reference assignment
        self.config_error = None
        for name, holder in old.holders.items():
            if served.holders.get(name) is not holder:
                self._retire(holder)
        for holder in created:
            holder.start()
        log.info("model config %s reloaded: serving %s", path, ", ".join(served.names))
        return True

    def start(self) -> None:
        """Start every holder's polling thread, and this one's for the config file."""
        for holder in self.served.holders.values():
            holder.start()
        if self.served.config.path is not None:
            self._poller.start()

    def stop(self) -> None:
        self._poller.stop()
        if self._served is not None:
            for holder in self._served.holders.values():
                holder.stop()

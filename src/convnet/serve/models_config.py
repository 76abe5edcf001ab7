"""The model config file: which models one server serves, which of their versions, and labels.

In the spirit of TF Serving's `model_config_list`, in YAML (MODEL_CONFIG, `convnet serve
--model-config PATH`):

    models:
      - name: cifar10              # the NAME in /v1/models/NAME, /v2/models/NAME, ?model=NAME
        base_path: runs/cifar10    # a model root; relative to this file's folder, or a bundled
                                   # model's name (cifar10, flowers)
        version_policy: {specific: [1, 2]}   # latest (the default), all, or {specific: [...]}
        labels: {stable: 1, canary: 2}       # /v1/models/cifar10/labels/canary:predict
      - name: flowers
        base_path: flowers

The first model is the default one (the page's, and /api/v1/predict's without ?model=). Every
mistake is a `ConfigError` whose message starts `FILE:LINE:`; nothing here loads a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml  # type: ignore[import-untyped]  # no stubs without types-PyYAML
from yaml.constructor import ConstructorError, SafeConstructor  # type: ignore[import-untyped]

from convnet.modeldir import bundled_model_root, bundled_names, is_version_dir, locate, model_name

# URL-safe: a name or label sits in a path segment, before ":predict" or "/versions/".
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
POLICIES = ("latest", "all", "specific")
MODEL_KEYS = ("name", "base_path", "version_policy", "labels")


class ConfigError(ValueError):
    """A model config that cannot be used; str() is one line, `FILE:LINE: problem`."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions under a model root are loaded: the newest that works (latest), every one
    (all), or those listed (specific)."""

    kind: str = "latest"
    versions: tuple[int, ...] = ()  # for "specific" only, ascending

    def wants(self, version: int) -> bool:
        return self.kind == "all" or (self.kind == "specific" and version in self.versions)

    def describe(self) -> str:
        return (f"specific {list(self.versions)}" if self.kind == "specific" else self.kind)


LATEST = VersionPolicy()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    base_path: Path  # a model root (or one version folder, served as it is)
    policy: VersionPolicy = LATEST
    labels: dict[str, int] = field(default_factory=dict)  # label -> version
    line: int = 0  # where the entry starts in the file (1-based; 0: not from a file)
    label_lines: dict[str, int] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ModelsConfig:
    models: tuple[ModelSpec, ...]
    path: Path | None = None  # the file it was read from; None for the single-model settings

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.models]

    def where(self, line: int) -> str:
        """`FILE:LINE` for messages."""
        return f"{self.path}:{line}" if self.path is not None else "MODEL_DIR"


def single_model(model_dir: str | None) -> ModelsConfig:
    """The simple case, MODEL_DIR / --model: one model, named after its root folder."""
    path = locate(model_dir)
    return ModelsConfig((ModelSpec(model_name(path), path),))


def _fail(path: Path, node: yaml.Node, problem: str) -> ConfigError:
    return ConfigError(f"{path}:{node.start_mark.line + 1}: {problem}")


def _mapping(path: Path, node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A YAML mapping as {key: (key node, value node)}, refusing non-string and repeated keys."""
    if not isinstance(node, yaml.MappingNode):
        raise _fail(path, node, f"{what} must be a mapping (key: value lines)")
    found: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag != "tag:yaml.org,2002:str":
            raise _fail(path, key, f"{what}: keys must be plain words")
        if key.value in found:
            raise _fail(path, key, f"{what}: {key.value!r} is given twice")
        found[key.value] = (key, value)
    return found


def _scalar(path: Path, node: yaml.Node, what: str):
    if not isinstance(node, yaml.ScalarNode):
        raise _fail(path, node, f"{what} must be a single value")
    try:
        return SafeConstructor().construct_object(node)
    except ConstructorError as exc:
        raise _fail(path, node, f"{what}: {exc.problem}") from None


def _version(path: Path, node: yaml.Node, what: str) -> int:
    value = _scalar(path, node, what)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _fail(path, node, f"{what} must be a version number (an integer from 1), "
                                f"not {value!r}")
    return value


def _name(path: Path, node: yaml.Node, what: str) -> str:
    value = _scalar(path, node, what)
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise _fail(path, node, f"{what} {value!r} must be 1-64 letters, digits, '.', '_' or "
                                "'-', starting with a letter or digit")
    return value


def _policy(path: Path, node: yaml.Node) -> VersionPolicy:
    hint = "expected latest, all, or {specific: [1, 2, ...]}"
    if isinstance(node, yaml.ScalarNode):
        value = _scalar(path, node, "version_policy")
        if value in ("latest", "all"):
            return VersionPolicy(value)
        raise _fail(path, node, f"version_policy {value!r} is unknown: {hint}")
    entries = _mapping(path, node, "version_policy")
    if list(entries) != ["specific"]:
        raise _fail(path, node, f"version_policy has {sorted(entries)}: {hint}")
    listed = entries["specific"][1]
    if not isinstance(listed, yaml.SequenceNode) or not listed.value:
        raise _fail(path, listed, "version_policy specific must list at least one version, "
                                  "e.g. {specific: [1, 2]}")
    versions = [_version(path, item, "version_policy specific") for item in listed.value]
    if len(set(versions)) != len(versions):
        raise _fail(path, listed, "version_policy specific lists a version twice")
    return VersionPolicy("specific", tuple(sorted(versions)))


def _base_path(path: Path, node: yaml.Node) -> Path:
    """Relative to the config file's folder; a bare bundled name (`flowers`) is that model."""
    value = _scalar(path, node, "base_path")
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, node, "base_path must be a folder (a model root)")
    given = Path(value).expanduser()
    found = given if given.is_absolute() else path.parent / given
    if not found.exists() and len(given.parts) == 1 and given.name in bundled_names():
        found = bundled_model_root(given.name)
    if not found.is_dir():
        raise _fail(path, node, f"base_path {value!r}: no folder {found} (bundled models, by "
                                f"name: {', '.join(bundled_names())})")
    return found


def _model(path: Path, node: yaml.Node, position: int) -> ModelSpec:
    entries = _mapping(path, node, f"models[{position}]")
    for key, (key_node, _) in entries.items():
        if key not in MODEL_KEYS:
            raise _fail(path, key_node, f"unknown key {key!r} in a model (known: "
                                        f"{', '.join(MODEL_KEYS)})")
    for required in ("name", "base_path"):
        if required not in entries:
            raise _fail(path, node, f"models[{position}] has no {required}")
    name = _name(path, entries["name"][1], "name")
    base_path = _base_path(path, entries["base_path"][1])
    policy = _policy(path, entries["version_policy"][1]) if "version_policy" in entries \
        else LATEST
    if policy != LATEST and is_version_dir(base_path):
        raise _fail(path, entries["version_policy"][1], f"model {name!r}: base_path is one "
                    "version folder; version_policy needs a model root")
    labels: dict[str, int] = {}
    label_lines: dict[str, int] = {}
    if "labels" in entries:
        for label, (key_node, value_node) in _mapping(path, entries["labels"][1],
                                                      "labels").items():
            _name(path, key_node, "label")
            version = _version(path, value_node, f"label {label!r}")
            if policy.kind == "latest":
                raise _fail(path, key_node, f"label {label!r} of model {name!r}: labels need "
                            "version_policy all or {specific: [...]} (under latest the next "
                            "version would unload the labelled one)")
            if policy.kind == "specific" and version not in policy.versions:
                raise _fail(path, value_node, f"label {label!r} points at version {version}, "
                            f"which version_policy {policy.describe()} does not load")
            labels[label] = version
            label_lines[label] = key_node.start_mark.line + 1
    return ModelSpec(name, base_path, policy, labels, node.start_mark.line + 1, label_lines)


def parse_config(text: str, path: Path) -> ModelsConfig:
    """The config in `text` (read from `path`, which relative base paths start from)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if exc.context == "while scanning a simple key" and exc.context_mark is not None:
            mark = exc.context_mark  # the key missing its ':', not the line after it
        line = mark.line + 1 if mark is not None else 1
        raise ConfigError(f"{path}:{line}: YAML syntax: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}:1: YAML: {exc}") from None
    if root is None:
        raise ConfigError(f"{path}:1: the file is empty: expected models: [...]")
    top = _mapping(path, root, "the file")
    for key, (key_node, _) in top.items():
        if key != "models":
            raise _fail(path, key_node, f"unknown key {key!r} at the top (known: models)")
    if "models" not in top:
        raise _fail(path, root, "no models: expected models: [{name: ..., base_path: ...}]")
    listed = top["models"][1]
    if not isinstance(listed, yaml.SequenceNode) or not listed.value:
        raise _fail(path, listed, "models must be a list of at least one model")
    specs: list[ModelSpec] = []
    for position, item in enumerate(listed.value):
        spec = _model(path, item, position)
        if spec.name in (s.name for s in specs):
            raise _fail(path, item, f"model name {spec.name!r} is used twice")
        specs.append(spec)
    return ModelsConfig(tuple(specs), path)


def read_config(path: str | Path) -> ModelsConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}:0: cannot read the model config: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    return parse_config(text, path)

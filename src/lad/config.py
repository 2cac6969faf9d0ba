"""Typed configuration: dataclasses are the source of truth, YAML presets hold experiments.

* ``from_dict(cls, data)`` builds a (nested) dataclass and rejects unknown keys.
* ``apply_overrides(cfg, ["train.lr=1e-4", ...])`` applies ``--set`` overrides with type checking.
* ``load_preset(cls, kind, name)`` reads ``src/lad/configs/{kind}-{name}.yaml`` (or a YAML path).
* ``resolve_config(cls, kind, preset, layers=..., overrides=...)``: the one merge order of every kind
  (train, prepare, priors, features, downstream-*): the preset, then partial layers in order (a training
  variant, a ``--config`` file, explicit command-line options), then ``--set`` overrides, which always win.
* ``load_layer(path)`` reads a partial config file (YAML mapping) for ``layers``.
* ``save_config(cfg, path)`` writes the fully resolved config (YAML) into a run folder.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lad.utils.atomic import write_text

T = TypeVar("T")

__all__ = ["ConfigError", "from_dict", "to_dict", "apply_overrides", "load_preset", "resolve_config", "load_layer", "merge_layer",
           "parse_overrides", "save_config", "load_config", "preset_names", "PRESET_DIR"]

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """An invalid configuration value, unknown key or unknown preset."""


def to_dict(cfg: Any) -> dict:
    """A plain (YAML/JSON-serialisable) dict of a dataclass config."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return conv(cfg)


# integer settings that count work: at least 1 in every config (training steps, batch sizes)
_COUNTS = ("steps", "batch_size", "sw_batch_size")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, _where=where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if where.rpartition(".")[2] in _COUNTS and f < 1:  # zero steps or batches would train nothing
            raise ConfigError(f"{where} must be a whole number >= 1, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(out):  # NaN and inf parse as floats, but no setting means them
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict, _where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise ``ConfigError``."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(f'{_where}.{k}'.lstrip('.') for k in unknown)}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{_where}.{k}".lstrip(".")) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{_where or cls.__name__}: {e}") from None


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """``["a.b=v", ...]`` -> ``[("a.b", value), ...]`` with each value parsed as YAML (``1e-4`` a float, ``false`` a bool)."""
    out = []
    for item in overrides or []:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: the value {raw!r} is not valid YAML (quote strings with ':' or '#')") from None
        out.append((key.strip(), value))
    return out


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node, dict) or p not in node or not isinstance(node[p], dict):
            raise ConfigError(f"--set {key}: unknown key {p!r}")
        node = node[p]
    if parts[-1] not in node:
        raise ConfigError(f"--set {key}: unknown key {parts[-1]!r}; known: {sorted(node)}")
    node[parts[-1]] = value


def apply_overrides(cfg: T, overrides: list[str] | None) -> T:
    """Return a copy of ``cfg`` with ``key.sub=value`` overrides applied (values parsed as YAML)."""
    data = to_dict(cfg)
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    return from_dict(type(cfg), data)


def merge_layer(cls: type, data: dict, layer: dict | None, *, source: str, _where: str = "") -> dict:
    """``data`` (a plain dict of ``cls``) with the partial mapping ``layer`` merged in: nested sections are merged
    key by key, every other value replaced. Unknown keys raise ``ConfigError`` naming ``source``."""
    if not layer:
        return data
    if not isinstance(layer, dict):
        raise ConfigError(f"{source}: {_where or 'the config'} must be a mapping of keys to values, got {layer!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(layer) - names
    if unknown:
        raise ConfigError(f"{source}: unknown config key(s) {sorted(f'{_where}.{k}'.lstrip('.') for k in unknown)}; "
                          f"known: {sorted(names)}")
    out = dict(data)
    for k, v in layer.items():
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_layer(hints[k], out[k], v, source=source, _where=f"{_where}.{k}".lstrip("."))
        else:
            out[k] = v
    return out


def load_layer(path: str | Path) -> dict:
    """A partial config file (a YAML mapping of some keys, e.g. another run's ``RUN/config.yaml``) for ``layers``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values, got {type(data).__name__}")
    return data


def resolve_config(cls: type[T], kind: str, preset: str, *, layers: typing.Sequence[tuple[str, dict | None]] = (),
                   overrides: list[str] | None = None) -> T:
    """The one merge order of every config kind: preset < ``layers`` (``(source, partial mapping)``, in order) <
    ``--set`` ``overrides``. Unknown keys in any layer or override raise ``ConfigError`` naming where they came from;
    the values are type-checked once, on the merged result."""
    data = to_dict(load_preset(cls, kind, preset))
    for source, layer in layers:
        data = merge_layer(cls, data, layer, source=source)
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    return from_dict(cls, data)


def preset_names(kind: str) -> list[str]:
    """Names of the shipped presets of one kind (``train``, ``prepare``, ...)."""
    return sorted(p.stem[len(kind) + 1 :] for p in PRESET_DIR.glob(f"{kind}-*.yaml"))


def load_preset(cls: type[T], kind: str, name: str) -> T:
    """Load preset ``name`` of ``kind`` (a shipped name, or a path to a YAML file) into ``cls``."""
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = PRESET_DIR / f"{kind}-{name}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown {kind} preset {name!r}; available: {preset_names(kind)} or a YAML file path")
    return load_config(cls, path)


def load_config(cls: type[T], path: str | Path) -> T:
    """Read a YAML config file into dataclass ``cls``."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))

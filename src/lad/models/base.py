"""Save/load of trained parts as a folder holding ``config.json`` + ``model.safetensors``.

Following diffusers: a model records the keyword arguments it was built with
(``@register_to_config`` on ``__init__``), ``save_pretrained(dir)`` writes them with the weights,
and ``Model.from_pretrained(dir)`` rebuilds it. Nothing is pickled.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lad.utils.atomic import atomic_dir

__all__ = ["register_to_config", "PretrainedMixin", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def register_to_config(init):
    """Decorate ``__init__`` so the call's keyword arguments are kept in ``self.config``."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = inspect.signature(init).bind(self, *args, **kwargs)
        bound.apply_defaults()
        config = {k: v for k, v in bound.arguments.items() if k != "self"}
        init(self, *args, **kwargs)
        # set after init: nn.Module.__init__ must run first
        object.__setattr__(self, "config", _jsonable(config))

    return wrapper


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    raise TypeError(f"config value {v!r} ({type(v).__name__}) is not JSON-serialisable")


def _tupled(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_tupled(x) for x in v)
    if isinstance(v, dict):
        return {k: _tupled(x) for k, x in v.items()}
    return v


class PretrainedMixin:
    """Adds ``save_pretrained`` / ``from_pretrained`` to an ``nn.Module`` using ``@register_to_config``."""

    config: dict

    def save_pretrained(self, path: str | Path, extra: dict | None = None) -> None:
        """Write ``config.json`` (+ ``_class`` and ``extra``) and ``model.safetensors`` atomically."""
        config = {"_class": type(self).__name__, **self.config, **({"_extra": extra} if extra else {})}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}  # type: ignore[attr-defined]
        with atomic_dir(path) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            save_file(state, str(tmp / WEIGHTS_NAME))

    @classmethod
    def load_config_file(cls, path: str | Path) -> dict:
        path = Path(path)
        cfg_file = path / CONFIG_NAME
        if not cfg_file.exists():
            raise FileNotFoundError(f"{path}: not a saved {cls.__name__} folder (no {CONFIG_NAME})")
        try:
            return json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: corrupt config ({e})") from None

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu"):
        """Rebuild the model from ``path`` (a folder written by ``save_pretrained``)."""
        path = Path(path)
        config = cls.load_config_file(path)
        saved_cls = config.pop("_class", cls.__name__)
        if saved_cls != cls.__name__:
            raise ValueError(f"{path}: holds a {saved_cls}, not a {cls.__name__}")
        config.pop("_extra", None)
        model = cls(**_tupled(config))
        weights = path / WEIGHTS_NAME
        if not weights.exists():
            raise FileNotFoundError(f"{path}: missing {WEIGHTS_NAME}")
        try:
            state = load_file(str(weights), device=str(map_location))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{weights}: unreadable weights ({e})") from None
        model.load_state_dict(state)
        return model

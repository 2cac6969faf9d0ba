"""Shared core: typed configs with overrides, atomic outputs, save/load of trained parts, CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch
from torch import nn

from lad.config import ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict
from lad.models.base import PretrainedMixin, register_to_config
from lad.utils.atomic import OutputExistsError, atomic_dir, atomic_path, prepare_output_dir, write_json
from lad.utils.seed import derive_seed


@dataclasses.dataclass
class Inner:
    lr: float = 1e-4
    steps: int = 10
    betas: tuple[float, float] = (0.5, 0.9)


@dataclasses.dataclass
class Outer:
    name: str = "x"
    mode: Literal["a", "b"] = "a"
    inner: Inner = dataclasses.field(default_factory=Inner)
    flag: bool = False


def test_config_overrides_are_typed_and_reject_unknown_keys():
    cfg = apply_overrides(Outer(), ["inner.lr=3e-4", "inner.steps=20", "flag=true", "mode=b", "inner.betas=[0.1, 0.2]"])
    assert cfg.inner.lr == pytest.approx(3e-4) and cfg.inner.steps == 20 and cfg.flag is True and cfg.mode == "b"
    assert cfg.inner.betas == (0.1, 0.2)
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(Outer(), ["inner.lrr=1"])
    with pytest.raises(ConfigError, match="integer"):
        apply_overrides(Outer(), ["inner.steps=2.5"])
    with pytest.raises(ConfigError, match="not one of"):
        apply_overrides(Outer(), ["mode=c"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Outer(), ["inner.lr"])
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(Outer, {"inner": {"nope": 1}})


def test_config_yaml_round_trip(tmp_path):
    cfg = apply_overrides(Outer(), ["inner.lr=0.5"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(Outer, tmp_path / "c.yaml") == cfg
    assert to_dict(cfg)["inner"]["betas"] == [0.5, 0.9]


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "part"
    with atomic_dir(final) as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "f").write_text("2")
            raise RuntimeError
    assert (final / "f").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part"]


def test_prepare_output_dir_refuses_non_empty(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("k")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare_output_dir(tmp_path / "o")
    assert (tmp_path / "o" / "keep").exists()
    prepare_output_dir(tmp_path / "o", resume=True)
    assert (tmp_path / "o" / "keep").exists()
    prepare_output_dir(tmp_path / "o", overwrite=True)
    assert not any((tmp_path / "o").iterdir())


class Tiny(PretrainedMixin, nn.Module):
    @register_to_config
    def __init__(self, *, channels: tuple[int, ...] = (2, 3), scale: float = 1.0):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(channels[:-1], channels[1:])])
        self.scale = scale

    def forward(self, x):
        return self.layers(x) * self.scale


def test_save_load_round_trip_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    m = Tiny(channels=(4, 5, 2), scale=2.0)
    m.save_pretrained(tmp_path / "tiny")
    cfg = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert cfg == {"_class": "Tiny", "channels": [4, 5, 2], "scale": 2.0}
    m2 = Tiny.from_pretrained(tmp_path / "tiny")
    x = torch.randn(3, 4)
    assert torch.equal(m(x), m2(x))
    with pytest.raises(FileNotFoundError, match="config.json"):
        Tiny.from_pretrained(tmp_path / "missing")
    (tmp_path / "tiny" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable weights"):
        Tiny.from_pretrained(tmp_path / "tiny")


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, 1) == derive_seed(0, 1)
    assert len({derive_seed(0, i) for i in range(100)}) == 100
    assert derive_seed("a", 1) != derive_seed("b", 1)


def test_cli_help_and_module_entry():
    out = subprocess.run([sys.executable, "-m", "lad", "--help"], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert out.returncode == 0 and "usage: lad" in out.stdout
    out = subprocess.run([sys.executable, "-m", "lad", "--version"], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert out.stdout.strip().startswith("lad ")

"""Configuration of the HA-GAN baseline (``lad train hagan``): typed dataclasses and YAML presets.

Presets live in ``src/lad/configs/hagan-<name>.yaml``:

* ``paper`` (aliases ``paper-abdomenct1k``, ``paper-totalsegmentator``: the recipe is the same for both datasets): the
  Lad paper's protocol for its Table 1 baseline (section 4.2.1): the 32-slice windows resized in depth to 256 so that
  the public release's 256^3 model trains unchanged, samples resized back to 32 slices; the release's sizes and
  hyperparameters (batch 4, 80,000 iterations, Adam betas (0, 0.999), lr 1e-4 for G and the encoders, 4e-4 for D).
* ``paper-native``: ours. The same networks' widths at the windows' own shape (32 x 256 x 256, no depth resize):
  low-resolution volume 8 x 64 x 64, sub-volumes of 8 slices.
* ``demo`` (16 x 64 x 64 windows, minutes on 2 CPU cores) and ``tiny`` (8 x 32 x 32, tests): ours.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from pathlib import Path

from lad.config import load_layer, resolve_config
from lad.training.config import LoggingConfig

__all__ = ["HAGANConfig", "HAGANModelConfig", "HAGANTrainConfig", "resolve_hagan_config", "validate_hagan_config",
           "PRESET_ALIASES"]

PRESET_ALIASES = {"paper-abdomenct1k": "paper", "paper-totalsegmentator": "paper"}


@dataclasses.dataclass
class HAGANModelConfig:
    """Sizes of the four networks (``lad.models.hagan``); the defaults are the public release's 256^3 model."""

    image_shape: tuple[int, int, int] | None = None
    """The model's whole-volume shape (D, H, W). None: the prepared windows' shape. When it differs, the windows are
    resized to it (trilinear) for training and the samples resized back (area) to the windows' shape: the Lad paper
    trained HA-GAN on windows resized in depth from 32 to 256 (section 4.2.1)."""
    latent_dim: int = 1024
    crop_depth: int = 32
    """Depth of the high-resolution sub-volumes (the release: 32 = 256 / 8)."""
    trunk_channels: tuple[int, ...] = (512, 512, 256, 128, 64)
    high_channels: tuple[int, ...] = (32,)
    low_channels: tuple[int, ...] = (32, 16)
    norm_num_groups: int = 8
    disc_channels: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    disc_features: int = 128
    disc_low_channels: tuple[int, ...] = (32, 64, 128, 256)
    encoder_channels: tuple[int, ...] = (32, 64)
    sub_encoder_channels: tuple[int, ...] = (32, 64, 128, 256)


@dataclasses.dataclass
class HAGANTrainConfig:
    steps: int = 80_000
    batch_size: int = 4
    lr_g: float = 1e-4
    lr_d: float = 4e-4
    lr_e: float = 1e-4
    """Learning rate of both encoders (E^H and E^G)."""
    betas: tuple[float, float] = (0.0, 0.999)
    low_res_mode: Literal["nearest", "area"] = "nearest"
    """How the real volume is reduced to the low-resolution target of G^L and D^L: "nearest" (the release's
    ``F.interpolate(x, scale_factor=0.25)``) or "area" (a mean over each 4^3 block; ours, an option)."""


@dataclasses.dataclass
class HAGANConfig:
    """Everything that decides an HA-GAN training run, saved as ``RUN/hagan.yaml``."""

    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    hagan: HAGANModelConfig = dataclasses.field(default_factory=HAGANModelConfig)
    hagan_train: HAGANTrainConfig = dataclasses.field(default_factory=HAGANTrainConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


def resolve_hagan_config(preset: str = "demo", overrides: list[str] | None = None, seed: int | None = None,
                         config: str | Path | None = None) -> HAGANConfig:
    """The HA-GAN config: preset (``hagan-<name>.yaml``, an alias, or a YAML file) < ``config`` file (some keys, e.g.
    another run's ``RUN/hagan.yaml``) < ``seed`` (``--seed``) < ``--set`` ``overrides``; validated."""
    layers = []
    if config is not None:
        layers.append((str(config), load_layer(config)))
    if seed is not None:
        layers.append(("--seed", {"seed": int(seed)}))
    cfg = resolve_config(HAGANConfig, "hagan", PRESET_ALIASES.get(preset, preset), layers=layers, overrides=overrides)
    validate_hagan_config(cfg)
    return cfg


def validate_hagan_config(cfg: HAGANConfig) -> None:
    """Refuse counts < 1, non-finite or non-positive learning rates, betas outside [0, 1). Shapes and channel counts
    are checked by the networks themselves when the trainer builds them (before anything is written)."""
    m, t = cfg.hagan, cfg.hagan_train

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for sec, obj, keys in (("hagan", m, ("latent_dim", "crop_depth", "norm_num_groups", "disc_features")),
                           ("hagan_train", t, ("steps", "batch_size")),
                           ("logging", cfg.logging, ("log_every", "checkpoint_every", "max_nonfinite_steps"))):
        for k in keys:
            if not is_int(getattr(obj, k)) or getattr(obj, k) < 1:
                raise ValueError(f"{sec}.{k} must be a whole number >= 1, got {getattr(obj, k)!r}")
    for k in ("lr_g", "lr_d", "lr_e"):
        v = getattr(t, k)
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"hagan_train.{k} must be a finite number > 0, got {v!r}")
    if not all(0.0 <= b < 1.0 for b in t.betas):
        raise ValueError(f"hagan_train.betas must lie in [0, 1), got {list(t.betas)}")
    if m.image_shape is not None and (len(m.image_shape) != 3 or any(s < 1 for s in m.image_shape)):
        raise ValueError(f"hagan.image_shape must be null or three whole numbers >= 1, got {m.image_shape!r}")
    if m.encoder_channels[-1] != m.trunk_channels[-1]:
        raise ValueError(f"hagan.encoder_channels must end with the trunk's output channels {m.trunk_channels[-1]} (E^H "
                         f"encodes into G^H's input), got {list(m.encoder_channels)}")
    if len(m.encoder_channels) != len(m.high_channels) + 1:
        raise ValueError(f"hagan.encoder_channels needs {len(m.high_channels) + 1} entries (one x2 downsampling per x2 "
                         f"upsampling of G^H), got {list(m.encoder_channels)}")

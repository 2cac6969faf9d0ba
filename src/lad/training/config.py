"""Training configuration: typed dataclasses (the source of truth), YAML presets, ablation variants.

Presets live in ``src/lad/configs/train-<name>.yaml``: ``paper-abdomenct1k`` and
``paper-totalsegmentator`` (the paper's hyperparameters and the public release's recipe; the learning rate is used
exactly as configured, never rescaled), ``demo`` (minutes on 2 CPU cores) and ``tiny`` (tests).

A variant (Table 2) is a partial preset of the same keys (``VARIANT_PRESETS``). ``resolve_train_config`` merges, in
this one order: the preset < the variant < a ``--config`` file < ``--seed`` < ``--set`` overrides, so an explicit
``--set condition.use_structure=false`` wins over ``--variant full``; ``RUN/config.yaml`` records the result.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from lad.config import ConfigError, load_layer, load_preset, parse_overrides, resolve_config
from lad.utils.log import get_logger

__all__ = ["TrainConfig", "SamplingConfig", "VARIANTS", "VARIANT_PRESETS", "resolve_train_config", "validate_train_config"]

VARIANTS = ("V0", "V1", "V2", "V3", "full")

# Table 2's ablations as partial presets of the config's own keys: V0 Medical Diffusion (no Locality Loss, no
# condition), V1 content, V2 structure, V3 content + structure (no Locality Loss), full = Locality Loss + content +
# structure. "full" leaves vqgan_train.locality_weight at the preset's value (lambda = 1.0 in every shipped preset).
VARIANT_PRESETS: dict[str, dict] = {
    "V0": {"vqgan_train": {"locality_weight": 0.0}, "condition": {"use_content": False, "use_structure": False}},
    "V1": {"vqgan_train": {"locality_weight": 0.0}, "condition": {"use_content": True, "use_structure": False}},
    "V2": {"vqgan_train": {"locality_weight": 0.0}, "condition": {"use_content": False, "use_structure": True}},
    "V3": {"vqgan_train": {"locality_weight": 0.0}, "condition": {"use_content": True, "use_structure": True}},
    "full": {"condition": {"use_content": True, "use_structure": True}},
}

log = get_logger(__name__)


@dataclasses.dataclass
class VQGANModelConfig:
    channels: tuple[int, ...] = (16, 32, 64)
    num_res_blocks: int = 1
    downsample: tuple[int, int, int] = (4, 4, 4)
    embedding_dim: int = 8
    num_embeddings: int = 16384
    commitment_cost: float = 0.25
    decay: float = 0.99
    norm_num_groups: int = 16
    dead_code_threshold: float = 1e-3
    # "release": the public release's autoencoder (kernel-4 convs, transposed-conv decoder with two residual
    # blocks per stage); "compact": ours (lad.models.vqgan)
    architecture: Literal["compact", "release"] = "compact"


@dataclasses.dataclass
class VQGANTrainConfig:
    lr: float = 3e-4
    batch_size: int = 2
    steps: int = 100_000
    betas: tuple[float, float] = (0.5, 0.9)
    grad_clip: float = 1.0
    disc_start: int = 50_000
    l1_weight: float = 4.0
    perceptual_weight: float = 4.0
    disc2d_weight: float = 0.25
    disc3d_weight: float = 0.25
    feature_matching_weight: float = 4.0
    locality_weight: float = 1.0
    disc_channels: int = 64
    disc_layers: int = 3
    disc_kernel: int = 3  # 4: pix2pix's and the release's PatchGAN; 3: ours
    # learning-rate schedule of both optimisers: "constant" (the release) or "cosine" (ours: linear warm-up over
    # lr_warmup steps, then a cosine decay to 0 at the last step)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup: int = 0
    feature_matching: Literal["mean", "sum"] = "mean"  # "sum" over discriminator layers: the release


@dataclasses.dataclass
class DenoiserConfig:
    channels: tuple[int, ...] = (32, 64, 128, 256)
    attention_levels: tuple[bool, ...] = (False, False, True, True)
    num_res_blocks: int = 2
    num_head_channels: int = 32
    norm_num_groups: int = 32
    conditioning: Literal["embedding", "concat", "cross_attention"] = "embedding"
    """How the condition vector enters (``lad.models.denoiser``): "embedding", an MLP's output added to the time
    embedding (ours, the default); "concat", the raw vector concatenated to it (the public release's);
    "cross_attention"."""


@dataclasses.dataclass
class DiffusionTrainConfig:
    lr: float = 1e-4
    batch_size: int = 20
    steps: int = 150_000
    timesteps: int = 300
    schedule: Literal["cosine", "linear"] = "cosine"
    loss: Literal["l1", "l2"] = "l1"
    # what the denoiser predicts: "epsilon" (the paper), "v_prediction" or "sample" (x0); "rectified_flow" (ours, MAISI-v2's
    # objective): the velocity of a straight data-noise path (lad.schedulers.RectifiedFlowScheduler; sample it with euler)
    prediction: Literal["epsilon", "v_prediction", "sample", "rectified_flow"] = "epsilon"
    ema_decay: float = 0.995
    ema_every: int = 1
    """Update the EMA on every ``ema_every``-th step (``lad.training.ema.ema_step``). Ours: 1, from step 0
    (``ema_start``), so short schedules (demo: 1200 steps) get an average at all; the release (paper presets):
    every 10 steps from step 2000, a plain copy of the weights before."""
    ema_start: int = 0
    beta_max: float = 0.999
    """Clip of the cosine betas. Ours: 0.999 (Nichol & Dhariwal's and MONAI's value; the last alpha_bar of a
    300-step schedule is 2.7e-8); the release (paper presets): 0.9999 (2.7e-9)."""
    p_uncond: float = 0.25
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.ema_every < 1 or self.ema_start < 0:
            raise ValueError(f"ema_every must be >= 1 and ema_start >= 0, got {self.ema_every} and {self.ema_start}")
        if not 0.0 < self.beta_max < 1.0:
            raise ValueError(f"beta_max must be in (0, 1), got {self.beta_max}")


@dataclasses.dataclass
class SamplingConfig:
    """How ``lad sample`` samples this run when its command line does not say (``RUN/config.yaml``).

    The paper (sections 3.3.1, 3.4.2, 4.1.3) samples with DDPM over all of its 300 steps at guidance w = 1:
    the paper presets. The default, DDIM with 50 steps, is ours (deterministic, 6x fewer denoiser passes);
    the demo and tiny presets use it. Either sampler takes ``steps`` timesteps evenly spaced over the
    training steps (DDPM with fewer steps than it was trained with is respaced DDPM, Nichol & Dhariwal 2021).
    """

    sampler: Literal["ddpm", "ddim", "dpmpp2m", "euler"] = "ddim"
    """ddpm, ddim, dpmpp2m (DPM-Solver++(2M), ours) for DDPM-trained runs; euler for rectified-flow runs (ours)."""
    steps: int = 50
    guidance: float = 1.0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"sampling steps must be >= 1, got {self.steps}")


@dataclasses.dataclass
class ConditionConfig:
    use_content: bool = True
    use_structure: bool = True
    structure_dim: int = 192
    spatial: bool = False
    """Also feed the mask's organ/tumour occupancy on the latent grid as input channels of the denoiser
    (``lad.models.condition.spatial_condition``). Ours, not the paper's (whose condition is a vector only):
    off in the paper presets; conditional variants only (V0 has no condition)."""


@dataclasses.dataclass
class LoggingConfig:
    log_every: int = 50
    image_every: int = 2000
    checkpoint_every: int = 5000
    keep_last: int = 3
    max_nonfinite_steps: int = 5


@dataclasses.dataclass
class TrainConfig:
    """Everything that decides a training run (both parts), saved as ``RUN/config.yaml``."""

    variant: Literal["V0", "V1", "V2", "V3", "full"] = "full"
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    vqgan: VQGANModelConfig = dataclasses.field(default_factory=VQGANModelConfig)
    vqgan_train: VQGANTrainConfig = dataclasses.field(default_factory=VQGANTrainConfig)
    denoiser: DenoiserConfig = dataclasses.field(default_factory=DenoiserConfig)
    diffusion_train: DiffusionTrainConfig = dataclasses.field(default_factory=DiffusionTrainConfig)
    condition: ConditionConfig = dataclasses.field(default_factory=ConditionConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)

    @property
    def conditional(self) -> bool:
        return self.condition.use_content or self.condition.use_structure


def _variant_layer(name: str) -> dict:
    return {"variant": name, **VARIANT_PRESETS[name]}


def resolve_train_config(preset: str = "demo", overrides: list[str] | None = None, variant: str | None = None,
                         seed: int | None = None, config: str | Path | None = None) -> TrainConfig:
    """The training config: preset < variant < ``config`` file < ``seed`` (``--seed``) < ``--set`` ``overrides``.

    ``preset``: a shipped name (``preset_names("train")``) or a YAML file holding a whole config. ``variant``: V0, V1,
    V2, V3 or full (default: the one the config file, an override or the preset names); its switches (Locality Loss
    weight, content and structure condition) sit under the config file and the overrides, so an explicit value always
    wins. ``config``: a YAML file of some keys (e.g. another run's ``RUN/config.yaml``). Two sources naming different
    variants are refused.
    """
    file_layer = load_layer(config) if config is not None else {}
    named = [(src, v) for src, v in (("--variant", variant), (f"{config}", file_layer.get("variant")),
                                     ("--set variant", dict(parse_overrides(overrides)).get("variant"))) if v is not None]
    for src, v in named:
        if v not in VARIANTS:
            raise ValueError(f"--variant must be one of {VARIANTS}, got {v!r}" if src == "--variant"
                             else f"{src}: variant must be one of {VARIANTS}, got {v!r}")
    if len({v for _, v in named}) > 1:
        raise ConfigError("conflicting variants: " + ", ".join(f"{src} {v}" for src, v in named) + "; name one")
    name = named[0][1] if named else load_preset(TrainConfig, "train", preset).variant
    layers = [(f"variant {name}", _variant_layer(name))]
    if config is not None:
        layers.append((str(config), file_layer))
    if seed is not None:
        layers.append(("--seed", {"seed": int(seed)}))
    cfg = resolve_config(TrainConfig, "train", preset, layers=layers, overrides=overrides)
    _note_variant_departures(cfg)
    validate_train_config(cfg)
    return cfg


def _note_variant_departures(cfg: TrainConfig) -> None:
    """Log the keys where the resolved config departs from its variant's preset (set explicitly: they win)."""
    def walk(layer: dict, obj, prefix: str):
        for k, v in layer.items():
            if isinstance(v, dict):
                yield from walk(v, getattr(obj, k), f"{prefix}{k}.")
            elif getattr(obj, k) != v:
                yield f"{prefix}{k}={getattr(obj, k)!r} (variant {cfg.variant}: {v!r})"

    departures = list(walk(VARIANT_PRESETS[cfg.variant], cfg, ""))
    if departures:
        log.warning("explicit values override the variant's: %s; RUN/config.yaml records what runs", ", ".join(departures))


_POSITIVE_INTS = {
    "vqgan": ("num_res_blocks", "embedding_dim", "num_embeddings", "norm_num_groups"),
    "vqgan_train": ("batch_size", "steps", "disc_channels", "disc_layers"),
    "denoiser": ("num_res_blocks", "num_head_channels", "norm_num_groups"),
    "diffusion_train": ("batch_size", "steps", "timesteps"),
    "condition": ("structure_dim",),
    "logging": ("log_every", "checkpoint_every", "max_nonfinite_steps"),
}
_NONNEG_INTS = {"vqgan_train": ("disc_start",), "logging": ("image_every", "keep_last")}
_POSITIVE_FLOATS = {"vqgan_train": ("lr", "grad_clip"), "diffusion_train": ("lr", "grad_clip")}
_NONNEG_FLOATS = {"vqgan": ("commitment_cost", "dead_code_threshold"),
                  "vqgan_train": ("l1_weight", "perceptual_weight", "disc2d_weight", "disc3d_weight",
                                  "feature_matching_weight", "locality_weight")}
_UNIT_FLOATS = {"vqgan": ("decay",), "diffusion_train": ("ema_decay", "p_uncond")}


def validate_train_config(cfg: TrainConfig) -> None:
    """Refuse values that would train nothing or train silently wrong: counts (steps, batch sizes, sizes)
    must be positive whole numbers, rates and weights finite (lr > 0, weights >= 0, decays in [0, 1]),
    channel lists positive. Raises ``ValueError`` naming the key, e.g. ``vqgan_train.steps``."""
    import math

    def get(sec: str, key: str):
        return getattr(getattr(cfg, sec), key)

    def fail(sec: str, key: str, need: str):
        raise ValueError(f"{sec}.{key} must be {need}, got {get(sec, key)!r}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for sec, keys in _POSITIVE_INTS.items():
        for k in keys:
            if not is_int(get(sec, k)) or get(sec, k) < 1:
                fail(sec, k, "a whole number >= 1")
    for sec, keys in _NONNEG_INTS.items():
        for k in keys:
            if not is_int(get(sec, k)) or get(sec, k) < 0:
                fail(sec, k, "a whole number >= 0")
    for table, ok, need in ((_POSITIVE_FLOATS, lambda v: v > 0, "a finite number > 0"),
                            (_NONNEG_FLOATS, lambda v: v >= 0, "a finite number >= 0"),
                            (_UNIT_FLOATS, lambda v: 0 <= v <= 1, "a number in [0, 1]")):
        for sec, keys in table.items():
            for k in keys:
                v = get(sec, k)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                    fail(sec, k, need)
    for sec in ("vqgan", "denoiser"):
        ch = get(sec, "channels")
        if not ch or any(not is_int(c) or c < 1 for c in ch):
            fail(sec, "channels", "a non-empty list of whole numbers >= 1")
    if any(not is_int(f) or f < 1 for f in cfg.vqgan.downsample):
        fail("vqgan", "downsample", "whole numbers >= 1")
    from lad.schedulers import check_sampler

    try:  # a run whose own sampling default cannot sample it is refused before training
        check_sampler(cfg.diffusion_train.prediction, cfg.sampling.sampler)
    except ValueError as e:
        raise ValueError(f"sampling.sampler {cfg.sampling.sampler!r} does not fit diffusion_train.prediction "
                         f"{cfg.diffusion_train.prediction!r}: {e}") from None

"""ALPNet self-supervised training: SGD with the paper's schedule, checkpoints, resume, TensorBoard.

Every episode of step ``s`` is drawn from seeds derived from ``(seed, s)`` (``make_episode_batch``) and the
learning rate is a function of ``s`` (``lr * gamma ** (s // lr_step)``), so a resumed run needs only the
weights, the SGD momentum buffers and the step to continue exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lad.downstream.ssl.alpnet import ALPNet, alpnet_loss
from lad.downstream.ssl.data import SlicePool
from lad.downstream.ssl.episodes import EpisodeAugmentConfig, make_episode_batch
from lad.utils.log import get_logger, progress
from lad.utils.seed import derive_seed

__all__ = ["ModelConfig", "SSLTrainConfig", "DataConfig", "EvalConfig", "build_model", "train_alpnet", "learning_rate"]

log = get_logger(__name__)


@dataclasses.dataclass
class ModelConfig:
    """ALPNet: ``backbone`` in resnet18/34/50/101 (paper: resnet101, output stride 8, 256 feature channels)."""

    backbone: str = "resnet101"
    width: int = 64
    output_stride: int = 8
    feature_channels: int = 256
    train_window: int = 4
    test_window: int = 2
    fg_threshold: float = 0.95
    bg_threshold: float = 0.95
    temperature: float = 20.0


@dataclasses.dataclass
class SSLTrainConfig:
    """SGD (Ouyang et al.): lr 1e-3, momentum 0.9, weight decay 5e-4, x0.95 every 1000 iterations, batch 1."""

    iterations: int = 100000
    batch_size: int = 1
    lr: float = 1.0e-3
    momentum: float = 0.9
    weight_decay: float = 5.0e-4
    lr_step: int = 1000
    lr_gamma: float = 0.95
    class_weights: tuple[float, float] = (0.05, 1.0)
    align_weight: float = 1.0
    min_pixels: int = 4
    checkpoint_every: int = 1000
    keep_last: int = 2
    log_every: int = 100


@dataclasses.dataclass
class DataConfig:
    """Slices at ``image_size`` (paper: 256); Felzenszwalb ``min_size`` in pixels at that size (paper: 400)."""

    image_size: int = 256
    superpixel_min_size: int = 400
    superpixel_sigma: float = 1.0
    superpixel_scale: float = 1.0
    body_threshold_hu: float = -500.0
    min_body_fraction: float = 0.05
    augment: EpisodeAugmentConfig = dataclasses.field(default_factory=EpisodeAugmentConfig)


@dataclasses.dataclass
class EvalConfig:
    """1-shot evaluation: ``organs`` to test (the paper's four), ``n_part`` support slices/chunks (3)."""

    organs: tuple[str, ...] = ("liver", "kidney", "spleen", "pancreas")
    n_part: int = 3
    batch_size: int = 16


def build_model(cfg: ModelConfig) -> ALPNet:
    return ALPNet(**dataclasses.asdict(cfg))


def learning_rate(cfg: SSLTrainConfig, step: int) -> float:
    """The paper's step decay: ``lr * lr_gamma ** (step // lr_step)``."""
    return cfg.lr * cfg.lr_gamma ** (step // cfg.lr_step)


def train_alpnet(pools: dict[str, SlicePool], run: str | Path, *, model_cfg: ModelConfig, train_cfg: SSLTrainConfig,
                 data_cfg: DataConfig, seed: int, synthetic_fraction: float = 0.0, device: str | torch.device = "cpu",
                 backbone_weights: str | Path | None = None, resume: bool = False, stop_after: int | None = None,
                 progress_bar: bool = True) -> ALPNet:
    """Train one ALPNet in ``run`` (``checkpoints/``, ``tb/``, ``train_log.jsonl``, ``model/`` when finished).

    ``resume``: continue from the newest checkpoint in ``run/checkpoints``; ``stop_after``: stop after that many
    steps (tests of resume). Returns the model (in train mode).
    """
    from lad.downstream.ssl.backbone import load_backbone_weights
    from lad.training.common import CheckpointManager, Logger

    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    torch.manual_seed(derive_seed(seed, "ssl-init"))
    model = build_model(model_cfg)
    if backbone_weights:
        load_backbone_weights(model.encoder, backbone_weights)
    model.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=train_cfg.lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay)
    ckpt = CheckpointManager(run / "checkpoints", train_cfg.keep_last)
    start = 0
    if resume:
        state = ckpt.load_latest({"model": model}, {"opt": opt}, dev)
        start = int(state["step"]) if state else 0
    if start == 0 and (run / "train_log.jsonl").exists():  # a fresh start: drop the log of an attempt without checkpoint
        (run / "train_log.jsonl").unlink()
    end = train_cfg.iterations if stop_after is None else min(train_cfg.iterations, start + stop_after)
    logger = Logger(run / "tb", jsonl=run / "train_log.jsonl")
    model.train()
    bar = progress(range(start, end), total=end - start, desc=f"ALPNet {run.name}", unit="it", disable=not progress_bar)
    try:
        for step in bar:
            lr = learning_rate(train_cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = make_episode_batch(pools, batch_size=train_cfg.batch_size, seed=seed, step=step,
                                       synthetic_fraction=synthetic_fraction, augment=data_cfg.augment,
                                       min_pixels=train_cfg.min_pixels)
            batch = {k: v.to(dev) for k, v in batch.items()}
            losses = alpnet_loss(model, batch, class_weights=tuple(train_cfg.class_weights), align_weight=train_cfg.align_weight)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            logger.accumulate({k: v.detach() for k, v in losses.items()})
            if (step + 1) % train_cfg.log_every == 0 or step + 1 == end:
                means = logger.flush(step + 1, "ssl", {"lr": lr})
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{means['loss']:.3f}")
            if (step + 1) % train_cfg.checkpoint_every == 0 or step + 1 == train_cfg.iterations or (stop_after is not None and step + 1 == end):
                ckpt.save(step + 1, {"model": model}, {"opt": opt}, metric=float(losses["loss"].detach()))
    finally:
        logger.close()
    if end == train_cfg.iterations:
        model.save_pretrained(run / "model", extra={"trained_iterations": train_cfg.iterations, "seed": seed,
                                                   "backbone_weights": str(backbone_weights) if backbone_weights else None})
    return model

"""In-domain feature network: a small 3D ResNet trained by ``lad features train`` on the prepared real
TRAINING windows (never the held-out test split) to segment the organ label maps they hold.

Why: FID/MMD/PRDC/memorisation (paper section 4.2) are only as meaningful as the features they are
computed on. The paper uses MedicalNet; without those weights the fallback is a random-initialised
network ("untrained features"), which ranks sets by low-level statistics only. A network that has
learnt where the liver, kidneys, spleen, pancreas and tumours are in this dataset's CT gives features
that respond to anatomy and texture (``tests/test_metrics_sensitivity.py``,
``benchmarks/bench_metrics_sensitivity.py``).

Network (``CTFeatureNet``): a stem convolution and ``len(channels)`` residual stages, each halving the
size (in-plane only at the first stage, so thin windows keep depth), BatchNorm (a fixed affine map in
eval mode: a global HU shift moves the features, which per-volume normalisation would cancel), and a
light segmentation head (1x1x1 convolution per stage, upsampled to the stem's half in-plane resolution
and summed) used only in training. The stem and first stage halve the in-plane size only.
Input ``(B, 1, D, H, W)`` float32 in [0, 1] (HU [-1000, 400]) as is, no per-volume normalisation.
Features: four blocks, concatenated -> ``2 channels[0] + sum(channels)`` values: the stem's global mean
and spatial std per channel (texture, at full depth and half in-plane resolution) and the global
average pool of every stage (anatomy). After training each block is scaled to unit total variance over
the training windows (``calibrate``; stored as the buffer ``block_scale``), so the texture and anatomy
blocks weigh alike in FID and MMD.

Training: DiceCE loss (MONAI) against the 6-class organ map (background, liver, kidney, spleen,
pancreas, tumour), Adam, deterministic batches from the seed; no augmentation (flips would teach the
network that the liver may sit on the left). Saved like every trained part: ``OUT/model/config.json`` +
``model.safetensors`` (the windows it saw in ``_extra``), the resolved config ``OUT/config.yaml``,
``OUT/train_log.jsonl`` and ``OUT/metrics.json`` (training Dice per organ). The loop is lad's one training loop
(``lad.training.loop``: non-finite guard, logs, progress), without resume checkpoints (a run takes seconds to minutes).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lad.config import resolve_config, save_config
from lad.data.labels import ORGAN_NAMES
from lad.models.base import PretrainedMixin, register_to_config
from lad.training.loop import TrainStep, Update
from lad.utils.atomic import prepare_output_dir, write_json
from lad.utils.log import get_logger

__all__ = ["CTFeatureNet", "FeatureTrainConfig", "load_feature_train_config", "train_features", "is_feature_dir"]

log = get_logger(__name__)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: tuple[int, int, int]):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.skip = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


class CTFeatureNet(PretrainedMixin, nn.Module):
    """Small 3D ResNet encoder + organ segmentation head (training only); features = pooled stages.

    ``forward(x)``: ``(B, 1, D, H, W)`` in [0, 1] -> logits ``(B, out_channels, D, ceil(H/2), ceil(W/2))``
    (the stem halves the in-plane size; ``target`` brings the labels to that grid).
    ``features(x)``: same input -> ``(B, feature_dim)`` float32, ``feature_dim = 2 channels[0] (pool_stem) + sum(channels)``.
    """

    @register_to_config
    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 6,
                 channels: tuple[int, ...] = (16, 32, 64), pool_stem: bool = True):
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"CTFeatureNet is 3D only, got spatial_dims={spatial_dims}")
        if not channels:
            raise ValueError("CTFeatureNet: channels must name at least one stage")
        self.stem = nn.Sequential(nn.Conv3d(in_channels, channels[0], 3, stride=(1, 2, 2), padding=1, bias=False),
                                  nn.BatchNorm3d(channels[0]), nn.ReLU())
        stages, cin = [], channels[0]
        for i, c in enumerate(channels):
            stages.append(_ResBlock(cin, c, (1, 2, 2) if i == 0 else (2, 2, 2)))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(nn.Conv3d(c, out_channels, 1) for c in channels)
        self.pool_stem = bool(pool_stem)
        self.feature_dim = int(sum(channels)) + (2 * channels[0] if pool_stem else 0)
        n_blocks = len(channels) + (1 if pool_stem else 0)
        self.register_buffer("block_scale", torch.ones(n_blocks))  # set by ``calibrate`` after training

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.stem(x * 2.0 - 1.0)  # fixed affine [0, 1] -> [-1, 1]; no per-volume statistics
        outs = [h] if self.pool_stem else []
        for stage in self.stages:
            h = stage(h)
            outs.append(h)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[2], (x.shape[3] + 1) // 2, (x.shape[4] + 1) // 2)  # the stem's resolution (cheap on CPU)
        stages = self._stages(x)[1 if self.pool_stem else 0:]
        return sum(F.interpolate(head(h), size=size, mode="trilinear", align_corners=False) for head, h in zip(self.heads, stages))

    @staticmethod
    def target(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Organ labels ``(B, 1, D, H, W)`` int64 at the logits' (half in-plane) resolution, nearest neighbour."""
        return F.interpolate(labels.float(), size=logits.shape[2:], mode="nearest").long()

    def _blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        hs = self._stages(x)
        blocks = [h.mean(dim=(2, 3, 4)) for h in hs]
        if self.pool_stem:  # texture: mean and spatial std of the stem's maps
            blocks[0] = torch.cat([blocks[0], hs[0].flatten(2).std(2)], 1)
        return blocks

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b * s for b, s in zip(self._blocks(x), self.block_scale)], 1)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, batch_size: int = 8) -> None:
        """Scale each block so its total variance over ``x`` (the training windows) is 1: texture (stem) and
        anatomy (stages) then weigh alike in FID/MMD, instead of the block with the largest activations."""
        was = self.training
        self.eval()
        parts = [self._blocks(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]
        for i in range(len(self.block_scale)):
            b = torch.cat([p[i] for p in parts]).double()
            var = float(b.var(0).sum()) if len(b) > 1 else 0.0
            self.block_scale[i] = 1.0 / var ** 0.5 if var > 0 else 1.0
        self.train(was)


@dataclasses.dataclass
class FeatureTrainConfig:
    channels: tuple[int, ...] = (16, 32, 64)
    batch_size: int = 4
    steps: int = 200
    lr: float = 3e-3
    seed: int = 0


def load_feature_train_config(preset: str = "demo", overrides: list[str] | None = None) -> FeatureTrainConfig:
    """Preset ``features-<preset>.yaml`` (tiny | demo | paper | a YAML path) with ``--set`` overrides."""
    return resolve_config(FeatureTrainConfig, "features", preset, overrides=overrides)


def is_feature_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder written by ``train_features`` (or its ``model/`` subfolder)."""
    p = Path(path)
    return (p / "model" / "config.json").is_file() or ((p / "config.json").is_file() and "CTFeatureNet" in (p / "config.json").read_text())


def model_dir(path: str | Path) -> Path:
    p = Path(path)
    return p / "model" if (p / "model").is_dir() else p


class _FeatureStep(TrainStep):
    """One feature-network step for :class:`~lad.training.loop.Trainer`: a batch drawn with replacement from the
    step's own generator (seeded once from ``cfg.seed``, as before the shared loop), DiceCE on the organ map."""

    def __init__(self, net: CTFeatureNet, images: torch.Tensor, labels: torch.Tensor, cfg: FeatureTrainConfig, dev: torch.device):
        from monai.losses import DiceCELoss

        self.net, self.images, self.labels, self.dev = net, images, labels, dev
        self.batch_size = min(cfg.batch_size, len(images))
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        self.modules, self.optimizers, self.update = {"model": net}, {"opt": opt}, Update(opt)
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def batch(self, step, indices):
        idx = torch.randint(len(self.images), (self.batch_size,), generator=self.gen)
        return self.images[idx].to(self.dev), self.labels[idx].to(self.dev)

    def forward(self, batch, step, generator):
        x, y = batch
        logits = self.net(x)
        loss = self.loss_fn(logits, self.net.target(y, logits))
        return loss, {"loss": loss}


def train_features(data: str | Path | torch.utils.data.Dataset, out: str | Path, cfg: FeatureTrainConfig, *, device: str = "cpu",
                   overwrite: bool = False, progress_bar: bool = True) -> dict:
    """Train ``CTFeatureNet`` on the ``train`` split of prepared dataset ``data`` (or on a
    ``torch.utils.data.Dataset`` of ``PreparedDataset`` items with ``organs``); returns the training summary.

    Only training windows are read (the held-out test split is the evaluation's real set and must stay
    unseen by the features). Writes ``out/model`` (safetensors + config), ``out/config.yaml``,
    ``out/train_log.jsonl`` (the loss mean every ``steps // 20`` steps), ``out/metrics.json``.
    """
    from lad.data.dataset import describe_dataset, open_dataset
    from lad.training.loop import Trainer

    out = prepare_output_dir(out, overwrite=overwrite)
    ds = open_dataset(data, split="train")
    if len(ds) < 1:
        raise ValueError(f"{data}: no training windows to train the feature network on")
    items = [ds[i] for i in range(len(ds))]
    if "organs" not in items[0]:
        raise ValueError(f"{data}: items have no 'organs' label map to train the feature network on")
    images = torch.from_numpy(np.stack([it["image"] for it in items]))
    labels = torch.from_numpy(np.stack([it["organs"] for it in items]).astype(np.int64))
    windows = [it["meta"]["id"] if isinstance(it.get("meta"), dict) and "id" in it["meta"] else str(i) for i, it in enumerate(items)]
    del items
    save_config(cfg, out / "config.yaml")
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = CTFeatureNet(channels=tuple(cfg.channels)).to(dev)
    t0 = time.perf_counter()
    step = _FeatureStep(net, images, labels, cfg, dev)
    net.train()
    # no seed: the batches come from the step's generator and the global RNG is left alone; no resume checkpoints
    Trainer(step, steps=cfg.steps, part="features", device=dev, batch_size=step.batch_size, jsonl=out / "train_log.jsonl",
            log_every=max(1, cfg.steps // 20), progress_bar=progress_bar).run()
    net.eval()
    net.calibrate(images.to(dev))
    dice = _train_dice(net, images, labels, dev)
    info = describe_dataset(ds)
    summary = {"trained_on": str(info.path.resolve()) if info.path is not None else info.name, "split": "train",
               "n_windows": len(ds), "windows": windows, "steps": cfg.steps, "seconds": round(time.perf_counter() - t0, 1),
               "train_dice": dice}
    net.cpu().save_pretrained(out / "model", extra={k: summary[k] for k in ("trained_on", "split", "windows", "steps")})
    write_json(out / "metrics.json", {k: v for k, v in summary.items() if k != "windows"})
    log.info("feature network trained on %d windows in %.0f s; training Dice %s", len(ds), summary["seconds"],
             {k: round(v, 3) for k, v in dice.items()})
    return summary


@torch.inference_mode()
def _train_dice(net: CTFeatureNet, images: torch.Tensor, labels: torch.Tensor, dev: torch.device) -> dict[str, float]:
    inter, total = np.zeros(6), np.zeros(6)
    for s in range(0, len(images), 4):
        logits = net(images[s : s + 4].to(dev))
        pred = logits.argmax(1).cpu().numpy()
        gt = net.target(labels[s : s + 4].to(dev), logits)[:, 0].cpu().numpy()
        for k in range(1, 6):
            inter[k] += np.logical_and(pred == k, gt == k).sum()
            total[k] += (pred == k).sum() + (gt == k).sum()
    return {ORGAN_NAMES[k]: float(2 * inter[k] / total[k]) for k in range(1, 6) if total[k] > 0}

"""``lad priors train``: a MONAI segmenter on labeled prepared data (four organs + tumour).

MONAI transforms (random crops with a foreground ratio, flips, intensity jitter), DiceCE loss, Adam,
sliding-window validation (overlap 0.5) on the held-out split with Dice per label written to
``SEGMENTER/metrics.json`` (so users know how good their priors are). Deterministic per-step batches
and checkpoints as the generator's trainers (``--resume`` continues bit-for-bit on CPU).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from lad.config import resolve_config, save_config
from lad.data.labels import ORGAN_NAMES
from lad.utils.atomic import write_json
from lad.utils.log import get_logger, progress

__all__ = ["SegmenterTrainConfig", "train_segmenter", "evaluate_segmenter", "train_transforms"]

log = get_logger(__name__)


@dataclasses.dataclass
class SegmenterTrainConfig:
    network: str = "segresnet"
    network_kwargs: dict = dataclasses.field(default_factory=lambda: {"init_filters": 16})
    roi_size: tuple[int, int, int] = (32, 128, 128)
    batch_size: int = 2
    steps: int = 20000
    lr: float = 1e-3
    pos_ratio: float = 2.0
    intensity_jitter: float = 0.05
    flip_prob: float = 0.1
    """Probability of a flip along each spatial axis (MONAI's segmentation tutorials use 0.1 per axis)."""
    checkpoint_every: int = 1000
    keep_last: int = 2
    seed: int = 0


def train_transforms(cfg, window_shape):
    """Random crop (foreground : background centres = ``cfg.pos_ratio`` : 1), flips (``cfg.flip_prob`` per axis),
    intensity scale/shift (``cfg.intensity_jitter``, p 0.5 each) on ``{"image", "label"}`` dicts of ``(1, D, H, W)``
    arrays; the crop is ``cfg.roi_size`` capped by ``window_shape``. Shared by the priors segmenter and
    ``lad downstream supervised``."""
    from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd, RandScaleIntensityd, RandShiftIntensityd

    roi = tuple(int(min(r, s)) for r, s in zip(cfg.roi_size, window_shape))
    return Compose([
        RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=roi, pos=cfg.pos_ratio, neg=1.0,
                               num_samples=1, allow_smaller=True),
        *[RandFlipd(keys=["image", "label"], prob=cfg.flip_prob, spatial_axis=axis) for axis in range(3)],
        RandScaleIntensityd(keys="image", factors=cfg.intensity_jitter, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=cfg.intensity_jitter, prob=0.5),
    ])


def evaluate_segmenter(model, dataset, device) -> dict[str, float]:
    """Dice per organ label on ``dataset`` (sliding window, overlap 0.5), from summed counts."""
    inter, total = np.zeros(6), np.zeros(6)
    model.eval()
    for i in range(len(dataset)):
        it = dataset[i]
        pred = model.predict(torch.from_numpy(it["image"][None]).to(device))[0].cpu().numpy()
        gt = it["organs"][0]
        for k in range(1, 6):
            inter[k] += np.logical_and(pred == k, gt == k).sum()
            total[k] += (pred == k).sum() + (gt == k).sum()
    return {ORGAN_NAMES[k]: float(2 * inter[k] / total[k]) for k in range(1, 6) if total[k] > 0}


def train_segmenter(data: str | Path, out: str | Path, cfg: SegmenterTrainConfig, *, resume: bool = False,
                    overwrite: bool = False, device: str = "cpu", stop_after: int | None = None, progress_bar: bool = True) -> dict:
    """Train the segmenter into ``out``; returns the validation Dice per label."""
    from monai.losses import DiceCELoss
    from monai.utils import convert_to_tensor

    from lad.data.dataset import PreparedDataset
    from lad.priors.segmenter import Segmenter
    from lad.training.common import CheckpointManager, batch_indices, check_run_part, resolve_device, seed_step

    out = Path(out)
    dev = resolve_device(device)
    train = PreparedDataset(data, split="train")
    test = PreparedDataset(data, split="test")
    if len(train) == 0:
        raise ValueError(f"{data}: the training split has no windows")
    check_run_part(out, ["model", "checkpoints", "metrics.json"], resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "train_config.yaml")
    roi = tuple(int(min(r, s)) for r, s in zip(cfg.roi_size, train.shape))
    torch.manual_seed(cfg.seed)
    model = Segmenter(network=cfg.network, network_kwargs=dict(cfg.network_kwargs), spacing=tuple(train.config["spacing"]),
                      roi_size=roi).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    ckpt = CheckpointManager(out / "checkpoints", cfg.keep_last)
    start = 0
    if resume:
        state = ckpt.load_latest({"model": model}, {"opt": opt}, dev)
        start = state["step"] if state else 0
    tf = train_transforms(cfg, train.shape)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    model.train()
    bar = progress(range(start, end), total=end - start, desc="segmenter", unit="step", disable=not progress_bar)
    for step in bar:
        seed_step(cfg.seed, step, "segmenter")
        tf.set_random_state(seed=int(np.random.SeedSequence([cfg.seed, step]).generate_state(1)[0] % (2**31)))
        xs, ys = [], []
        for i in batch_indices(step, cfg.batch_size, len(train), cfg.seed):
            it = train[int(i)]
            sample = tf({"image": it["image"], "label": it["organs"].astype(np.float32)})[0]
            # plain tensors: MONAI's MetaTensor would route every network op through __torch_function__ (~10x slower here)
            xs.append(convert_to_tensor(sample["image"], track_meta=False))
            ys.append(convert_to_tensor(sample["label"], track_meta=False))
        x, y = torch.stack(xs).to(dev).float(), torch.stack(ys).to(dev)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(bar, "set_postfix") and (step + 1) % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            ckpt.save(step + 1, {"model": model}, {"opt": opt})
    if end < cfg.steps:
        return {}
    val = test if len(test) else train
    dice = evaluate_segmenter(model, val, dev)
    model.save_pretrained(out / "model", extra={"trained_steps": cfg.steps})
    write_json(out / "metrics.json", {"dice": dice, "split": "test" if len(test) else "train (no test split)",
                                      "n_windows": len(val), "data": str(Path(data).resolve())})
    log.info("segmenter saved to %s; Dice %s", out / "model", {k: round(v, 3) for k, v in dice.items()})
    return dice


def load_segmenter_config(preset: str, overrides: list[str] | None = None) -> SegmenterTrainConfig:
    return resolve_config(SegmenterTrainConfig, "priors", preset, overrides=overrides)

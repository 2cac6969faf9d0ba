"""``lad priors train``: a MONAI segmenter on labeled prepared data (four organs + tumour).

MONAI transforms (random crops with a foreground ratio, flips, intensity jitter), DiceCE loss, Adam,
sliding-window validation (overlap 0.5) on the held-out split with Dice per label written to
``SEGMENTER/metrics.json`` (so users know how good their priors are). It trains through the generator's loop
(``lad.training.loop``): deterministic per-step batches, the non-finite guard, logs, checkpoints (``--resume``
continues bit-for-bit on CPU).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from lad.config import resolve_config, save_config
from lad.data.dataset import describe_dataset, open_dataset
from lad.data.labels import ORGAN_NAMES
from lad.training.loop import TrainStep, Update
from lad.utils.atomic import write_json
from lad.utils.log import get_logger

__all__ = ["SegmenterTrainConfig", "train_segmenter", "evaluate_segmenter", "train_transforms", "SEGMENTER_OUTPUTS"]

log = get_logger(__name__)

SEGMENTER_LOG_EVERY = 10  # steps between logged loss means (the progress bar showed the loss every 10 steps before)


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


class _SegmenterStep(TrainStep):
    """One segmenter step for :class:`~lad.training.loop.Trainer`: augmented crops (MONAI transforms seeded from
    ``(seed, step)``), DiceCE loss, Adam."""

    def __init__(self, model, train, cfg: SegmenterTrainConfig, dev: torch.device, *, out: Path, test, data_name: str):
        from monai.losses import DiceCELoss

        self.model, self.train, self.cfg, self.dev, self.out, self.test, self.data_name = model, train, cfg, dev, out, test, data_name
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.tf = train_transforms(cfg, describe_dataset(train).shape)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        self.modules, self.optimizers, self.update = {"model": model}, {"opt": opt}, Update(opt)
        self.dice: dict[str, float] = {}

    def batch(self, step, indices):
        from monai.utils import convert_to_tensor

        self.tf.set_random_state(seed=int(np.random.SeedSequence([self.cfg.seed, step]).generate_state(1)[0] % (2**31)))
        xs, ys = [], []
        for i in indices:
            it = self.train[int(i)]
            sample = self.tf({"image": it["image"], "label": it["organs"].astype(np.float32)})[0]
            # plain tensors: MONAI's MetaTensor would route every network op through __torch_function__ (~10x slower here)
            xs.append(convert_to_tensor(sample["image"], track_meta=False))
            ys.append(convert_to_tensor(sample["label"], track_meta=False))
        return torch.stack(xs).to(self.dev).float(), torch.stack(ys).to(self.dev)

    def forward(self, batch, step, generator):
        x, y = batch
        loss = self.loss_fn(self.model(x), y)
        return loss, {"loss": loss}

    def finish(self):
        val = self.test if self.test is not None and len(self.test) else self.train
        self.dice = evaluate_segmenter(self.model, val, self.dev)
        self.model.save_pretrained(self.out / "model", extra={"trained_steps": self.cfg.steps})
        split = "test" if val is self.test else "train (no test split)"
        write_json(self.out / "metrics.json", {"dice": self.dice, "split": split, "n_windows": len(val), "data": self.data_name})
        log.info("segmenter saved to %s; Dice %s", self.out / "model", {k: round(v, 3) for k, v in self.dice.items()})


# What a segmenter (re)training owns in its folder.
SEGMENTER_OUTPUTS = ["model", "checkpoints", "metrics.json", "train_log.jsonl", "tensorboard"]


def train_segmenter(data: str | Path | torch.utils.data.Dataset, out: str | Path, cfg: SegmenterTrainConfig, *,
                    resume: bool = False, overwrite: bool = False, device: str = "cpu", stop_after: int | None = None,
                    test_data: torch.utils.data.Dataset | None = None, progress_bar: bool = True) -> dict:
    """Train the segmenter into ``out``; returns the validation Dice per label ({} when ``stop_after`` ended it early).

    ``data``: a prepared dataset folder (trains on its train split, validates on its test split) or a
    ``torch.utils.data.Dataset`` of ``PreparedDataset`` items with ``organs`` and a ``spacing`` attribute
    (validated on ``test_data``, else on itself). Loss and learning rate go to ``out/train_log.jsonl`` and
    ``out/tensorboard``; resume checkpoints to ``out/checkpoints``.
    """
    from lad.priors.segmenter import Segmenter
    from lad.training.common import check_run_part, resolve_device
    from lad.training.loop import Trainer

    out = Path(out)
    dev = resolve_device(device)
    train = open_dataset(data, split="train")
    test = open_dataset(data, split="test") if isinstance(data, (str, Path)) else test_data
    if len(train) == 0:
        raise ValueError(f"{data}: the training split has no windows")
    info = describe_dataset(train)
    if info.spacing is None:
        raise ValueError(f"{info.name}: the dataset object has no `spacing` attribute ((x, y, z) voxel size in mm), which the "
                         "segmenter records for prediction at other spacings: set it on the dataset")
    if "organs" not in train[0]:
        raise ValueError(f"{info.name}: items have no 'organs' label map (1, D, H, W) uint8 (0 background, 1 liver, 2 kidney, "
                         "3 spleen, 4 pancreas, 5 tumour) to train the segmenter on")
    check_run_part(out, SEGMENTER_OUTPUTS, resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "train_config.yaml")
    roi = tuple(int(min(r, s)) for r, s in zip(cfg.roi_size, info.shape))
    torch.manual_seed(cfg.seed)
    model = Segmenter(network=cfg.network, network_kwargs=dict(cfg.network_kwargs), spacing=info.spacing, roi_size=roi).to(dev)
    data_name = str(Path(data).resolve()) if isinstance(data, (str, Path)) else info.name
    step = _SegmenterStep(model, train, cfg, dev, out=out, test=test, data_name=data_name)
    model.train()
    trainer = Trainer(step, steps=cfg.steps, part="segmenter", device=dev, seed=cfg.seed, num_samples=len(train),
                      batch_size=cfg.batch_size, checkpoints=out / "checkpoints", keep_last=cfg.keep_last,
                      checkpoint_every=cfg.checkpoint_every, tensorboard=out / "tensorboard", jsonl=out / "train_log.jsonl",
                      log_every=SEGMENTER_LOG_EVERY, progress_bar=progress_bar)
    trainer.run(resume=resume, stop_after=stop_after)
    return step.dice


def load_segmenter_config(preset: str, overrides: list[str] | None = None) -> SegmenterTrainConfig:
    return resolve_config(SegmenterTrainConfig, "priors", preset, overrides=overrides)

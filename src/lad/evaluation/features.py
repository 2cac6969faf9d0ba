"""3D feature extractor for FID / MMD / PRDC / memorisation: MedicalNet's ResNet layout via MONAI.

``FeatureExtractor.from_spec("medicalnet-resnet50:/path/resnet_50_23dataset.pth")`` loads official
MedicalNet weights from a local file (the ``module.`` prefix is stripped, the segmentation head
``conv_seg.*`` ignored). ``"random-resnet10"`` (the default, no weights here) builds a fixed-seed
random-initialised network: every number computed with it carries ``label`` saying so, and is
only comparable with numbers from the same extractor. MedicalNet normalises each volume by the
mean and standard deviation of its non-zero voxels; so do we.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from lad.utils.atomic import atomic_path
from lad.utils.log import get_logger, progress

__all__ = ["FeatureExtractor"]

log = get_logger(__name__)

_DEPTHS = (10, 18, 34, 50)


class FeatureExtractor:
    """Global-average-pooled 3D ResNet features of volumes ``(B, 1, D, H, W)`` in [0, 1]."""

    def __init__(self, depth: int = 10, weights: str | Path | None = None, device: str = "cpu", seed: int = 0):
        from monai.networks.nets import resnet
        from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

        if depth not in _DEPTHS:
            raise ValueError(f"feature extractor depth must be one of {_DEPTHS}, got {depth}")
        bias_downsample, shortcut = get_medicalnet_pretrained_resnet_args(depth)
        torch.manual_seed(seed)
        self.net = getattr(resnet, f"resnet{depth}")(spatial_dims=3, n_input_channels=1, feed_forward=False,
                                                     shortcut_type=shortcut, bias_downsample=bias_downsample)
        self.is_pretrained = weights is not None
        if weights is not None:
            self._load(Path(weights))
            self.label = f"MedicalNet resnet{depth} ({Path(weights).name})"
        else:
            self.label = f"random-init resnet{depth} (seed {seed}) - not MedicalNet; numbers comparable only with the same extractor"
        self.device = torch.device(device)
        self.net.to(self.device).eval()

    @classmethod
    def from_spec(cls, spec: str = "random-resnet10", device: str = "cpu") -> "FeatureExtractor":
        m = re.fullmatch(r"medicalnet-resnet(\d+):(.+)", spec)
        if m:
            return cls(int(m.group(1)), weights=m.group(2), device=device)
        m = re.fullmatch(r"random-resnet(\d+)", spec)
        if m:
            return cls(int(m.group(1)), device=device)
        raise ValueError(f"--features: expected medicalnet-resnetN:/path/to/weights.pth or random-resnetN, got {spec!r}")

    def _load(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(f"{path}: MedicalNet weights not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt files
            raise ValueError(f"{path}: unreadable weights file ({e})") from None
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("conv_seg")}
        own = self.net.state_dict()
        missing = sorted(set(own) - set(state))
        if missing or any(state[k].shape != own[k].shape for k in own):
            raise ValueError(f"{path}: not a MedicalNet state dict for this ResNet depth (missing {missing[:3]})")
        self.net.load_state_dict({k: state[k] for k in own})

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        """Per volume: zero mean, unit std over its non-zero voxels (MedicalNet's preprocessing)."""
        out = torch.empty_like(x)
        for i in range(x.shape[0]):
            v = x[i]
            nz = v[v > 0]
            mean, std = (nz.mean(), nz.std()) if nz.numel() > 1 else (v.mean(), v.std())
            out[i] = (v - mean) / (std + 1e-6)
        return out

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(x.float().to(self.device))).cpu()

    def extract(self, volumes: Iterable[np.ndarray], n: int | None = None, batch_size: int = 4,
                cache_dir: str | Path | None = None) -> np.ndarray:
        """Features ``(N, F)`` of an iterable of ``(1, D, H, W)`` volumes in [0, 1]; cached per volume when asked."""
        tag = hashlib.sha256(self.label.encode()).hexdigest()[:8]
        feats: list[np.ndarray] = []
        pending: list[tuple[int, np.ndarray, Path | None]] = []
        results: dict[int, np.ndarray] = {}

        def flush():
            if not pending:
                return
            f = self(torch.from_numpy(np.stack([p[1] for p in pending]))).numpy()
            for (i, _, path), row in zip(pending, f):
                results[i] = row
                if path is not None:
                    with atomic_path(path, suffix=".npy") as tmp:
                        np.save(tmp, row)
            pending.clear()

        count = 0
        for i, v in enumerate(progress(volumes, total=n, desc="features", unit="vol")):
            v = np.asarray(v, dtype=np.float32)
            path = None
            if cache_dir is not None:
                key = hashlib.sha256(v.tobytes()).hexdigest()[:24]
                path = Path(cache_dir) / f"{key}_{tag}.npy"
                if path.exists():
                    results[i] = np.load(path)
                    count += 1
                    continue
            pending.append((i, v, path))
            count += 1
            if len(pending) >= batch_size:
                flush()
        flush()
        feats = [results[i] for i in range(count)]
        return np.stack(feats) if feats else np.zeros((0, 0), np.float32)

"""3D feature extractor for FID / MMD / PRDC / memorisation: MedicalNet's ResNet, built from MONAI.

``FeatureExtractor.from_spec("medicalnet-resnet50:/path/resnet_50_23dataset.pth")`` loads official
MedicalNet weights from a local file (``torch.load(weights_only=True)``, ``state_dict`` unwrapped, the
``module.`` prefix stripped, the segmentation head ``conv_seg.*`` ignored; any other missing,
unexpected or mis-shaped key is a ValueError naming the file). ``"random-resnet10"`` (the default:
no weights can be downloaded here) builds a fixed-seed random-initialised network; its ``label`` says
so and every number computed with it must carry that label: such numbers are comparable only with
numbers from the same extractor, never with the paper's MedicalNet figures.

Architecture (MedicalNet, Chen et al. 2019, ``models/resnet.py``): ``monai.networks.nets.resnetN`` with
``spatial_dims=3, n_input_channels=1, feed_forward=False``, shortcut type and downsample bias from
``monai.networks.nets.resnet.get_medicalnet_pretrained_resnet_args`` (tested by MONAI against the
released files: 'A' for resnet18/34, 'B' for resnet10/50), first convolution 7^3 with stride 2, and
layers 3 / 4 turned into MedicalNet's form (stride 1, dilation 2 / 4: MONAI's ResNet has no dilation
argument, so the convolutions are changed after construction; the weights' shapes are unchanged).
Output: global average pool of layer 4 -> 512 features (resnet10/18/34) or 2048 (resnet50).

Preprocessing (MedicalNet ``itensity_normalize_one_volume``): per volume, subtract the mean and divide
by the std of its non-zero voxels. MedicalNet's training loader then fills zero voxels with random
noise; we keep them at their normalised value so features are deterministic.

In-domain features: ``from_spec(FEATURES_DIR)`` (or ``"lad:FEATURES_DIR"``) loads the network that ``lad
features train`` trained on the prepared training windows (``lad.evaluation.ct_features``); its input is
the [0, 1] volume as is (no per-volume normalisation, so global HU shifts stay visible). ``kind`` is
``"in-domain"``, ``"medicalnet"`` or ``"untrained"`` (the random-initialised network; its label starts
with "untrained features").
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from lad.utils.atomic import atomic_path
from lad.utils.log import get_logger, progress

__all__ = ["FeatureExtractor", "build_medicalnet_resnet", "normalise_nonzero"]

log = get_logger(__name__)

DEPTHS = (10, 18, 34, 50)
_RANGE_TOL = 1e-3


def build_medicalnet_resnet(depth: int) -> nn.Module:
    """MedicalNet's 3D ResNet-``depth`` trunk (no head) from MONAI blocks; random init from torch's global RNG.

    Input ``(B, 1, D, H, W)`` float32; output ``(B, 512 or 2048)`` float32.
    """
    from monai.networks.nets import resnet

    if depth not in DEPTHS:
        raise ValueError(f"feature extractor depth must be one of {DEPTHS}, got {depth}")
    bias_downsample, shortcut = resnet.get_medicalnet_pretrained_resnet_args(depth)
    net = getattr(resnet, f"resnet{depth}")(spatial_dims=3, n_input_channels=1, feed_forward=False, conv1_t_size=7,
                                            conv1_t_stride=2, shortcut_type=shortcut, bias_downsample=bias_downsample)
    for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
        for block in layer:
            convs = [block.conv1, block.conv2] if isinstance(block, resnet.ResNetBlock) else [block.conv2]
            for conv in convs:  # the 3x3x3 convolutions
                conv.stride, conv.dilation, conv.padding = (1, 1, 1), (dilation,) * 3, (dilation,) * 3
            block.stride = 1
            if isinstance(block.downsample, nn.Sequential):  # shortcut B: 1x1x1 conv + norm
                block.downsample[0].stride = (1, 1, 1)
            elif isinstance(block.downsample, functools.partial):  # shortcut A: strided identity + zero channels
                block.downsample = functools.partial(block.downsample.func, **{**block.downsample.keywords, "stride": 1})
    return net


def normalise_nonzero(x: torch.Tensor) -> torch.Tensor:
    """Per volume: ``(x - mean) / (std + 1e-6)``, mean/std (ddof 0) of its non-zero voxels (of all voxels if fewer than 2 are non-zero).

    ``x``: ``(B, 1, D, H, W)`` float; returns the same shape, float32.
    """
    x = x.float()
    flat = x.reshape(len(x), -1)
    nz = flat != 0
    cnt = nz.sum(1, keepdim=True)
    use_all = cnt < 2
    w = torch.where(use_all, torch.ones_like(flat), nz.float())
    n = w.sum(1, keepdim=True)
    mean = (flat * w).sum(1, keepdim=True) / n
    var = (((flat - mean) * w) ** 2).sum(1, keepdim=True) / n  # numpy's std (ddof 0), as MedicalNet
    return ((flat - mean) / (var.sqrt() + 1e-6)).reshape(x.shape)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class FeatureExtractor:
    """Global-average-pooled 3D ResNet features of volumes ``(B, 1, D, H, W)`` in [0, 1].

    Attributes: ``net`` (eval mode, on ``device``), ``depth``, ``feature_dim``, ``is_pretrained``,
    ``label`` (carry it with every number), ``fingerprint`` (hash identifying the weights; cache key).
    """

    def __init__(self, *, depth: int = 10, weights: str | Path | None = None, device: str | torch.device = "cpu", seed: int = 0):
        with torch.random.fork_rng(devices=[]):  # fixed init without touching the caller's RNG
            torch.manual_seed(seed)
            self.net = build_medicalnet_resnet(depth)
        self.depth = depth
        self.feature_dim = 2048 if depth >= 50 else 512
        self.is_pretrained = weights is not None
        self._forward = self.net
        self._prep = normalise_nonzero
        self.trained_on: dict[str, Any] | None = None
        if weights is not None:
            path = Path(weights)
            self._load(path)
            self.kind = "medicalnet"
            self.label = f"MedicalNet resnet{depth} ({path.name})"
            self.fingerprint = _sha256_file(path)[:16]
        else:
            self.kind = "untrained"
            self.label = (f"untrained features: random-init resnet{depth} (seed {seed}) — not MedicalNet; "
                          "comparable only with the same extractor")
            self.fingerprint = hashlib.sha256(f"{self.label.removeprefix('untrained features: ')}|torch {torch.__version__}".encode()).hexdigest()[:16]
        self.device = torch.device(device)
        self.net.to(self.device).eval()

    @classmethod
    def from_trained(cls, path: str | Path, device: str | torch.device = "cpu") -> "FeatureExtractor":
        """The in-domain network of ``lad features train`` (folder ``path`` or its ``model/`` subfolder)."""
        from lad.evaluation.ct_features import CTFeatureNet, model_dir

        mdir = model_dir(path)
        self = cls.__new__(cls)
        self.net = CTFeatureNet.from_pretrained(mdir)
        self.depth = None
        self.feature_dim = self.net.feature_dim
        self.is_pretrained = True
        self.kind = "in-domain"
        extra = CTFeatureNet.load_config_file(mdir).get("_extra", {})
        self.trained_on = {k: extra[k] for k in ("trained_on", "split", "windows", "steps") if k in extra}
        self.label = f"in-domain features: CTFeatureNet trained on {extra.get('split', '?')} windows ({Path(path).resolve().name})"
        self.fingerprint = _sha256_file(mdir / "model.safetensors")[:16]
        self.device = torch.device(device)
        self.net.to(self.device).eval()
        self._forward = self.net.features
        self._prep = lambda x: x.float()
        return self

    @classmethod
    def from_spec(cls, spec: str = "random-resnet10", device: str | torch.device = "cpu") -> "FeatureExtractor":
        """``"medicalnet-resnetN:/path/to/weights.pth"``, ``"random-resnetN"`` (N in 10, 18, 34, 50), or a
        ``lad features train`` folder (``"FEATURES_DIR"`` or ``"lad:FEATURES_DIR"``)."""
        from lad.evaluation.ct_features import is_feature_dir

        if spec.startswith("lad:"):
            if not is_feature_dir(spec[4:]):
                raise ValueError(f"--features {spec!r}: {spec[4:]} is not a `lad features train` folder")
            return cls.from_trained(spec[4:], device=device)
        if is_feature_dir(spec):
            return cls.from_trained(spec, device=device)
        m = re.fullmatch(r"medicalnet-resnet(\d+):(.+)", spec)
        if m:
            return cls(depth=int(m.group(1)), weights=m.group(2), device=device)
        m = re.fullmatch(r"random-resnet(\d+)", spec)
        if m:
            return cls(depth=int(m.group(1)), device=device)
        raise ValueError(f"--features: expected a `lad features train` folder, medicalnet-resnetN:/path/to/weights.pth "
                         f"or random-resnetN, got {spec!r}")

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: MedicalNet weights file not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt or non-tensor files
            raise ValueError(f"{path}: unreadable weights file ({type(e).__name__}: {e})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{path}: not a MedicalNet state dict (got {type(state).__name__})")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("conv_seg.")}
        own = self.net.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            raise ValueError(f"{path}: not a MedicalNet state dict for resnet{self.depth} "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {shapes[:3]}); "
                             "check the depth in the spec matches the file")
        self.net.load_state_dict(state)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, 1, D, H, W)`` float in [0, 1] -> ``(B, feature_dim)`` float32 on CPU."""
        return self._forward(self._prep(x.to(self.device))).float().cpu()

    def cache_key(self, volume: np.ndarray) -> str:
        """Cache file stem: hash of the volume's bytes, shape and dtype + this extractor's fingerprint."""
        h = hashlib.sha256(volume.tobytes())
        h.update(f"{volume.shape}{volume.dtype}".encode())
        return f"{h.hexdigest()[:32]}_{self.fingerprint}"

    def extract(self, volumes: Iterable[Any], batch_size: int = 4, cache_dir: str | Path | None = None,
                n: int | None = None, *, progress_bar: bool = True) -> np.ndarray:
        """Features ``(N, feature_dim)`` float32 of ``(1, D, H, W)`` or ``(D, H, W)`` volumes in [0, 1].

        Volumes are batched (consecutive volumes of equal shape); with ``cache_dir`` each volume's
        features are read from / written atomically to ``<cache_dir>/<cache_key>.npy``. ``n``: total
        for the progress bar when ``volumes`` has no ``len``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if n is None and hasattr(volumes, "__len__"):
            n = len(volumes)  # type: ignore[arg-type]
        results: list[np.ndarray | None] = []
        pending: list[tuple[int, np.ndarray, Path | None]] = []

        def flush() -> None:
            if not pending:
                return
            feats = self(torch.from_numpy(np.stack([p[1] for p in pending]))).numpy()
            for (i, _, path), row in zip(pending, feats):
                results[i] = row
                if path is not None:
                    with atomic_path(path, suffix=".npy") as tmp:
                        np.save(tmp, row)
            pending.clear()

        for i, v in enumerate(progress(volumes, total=n, desc="features", unit="vol", disable=not progress_bar)):
            v = np.ascontiguousarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v), dtype=np.float32)
            if v.ndim == 3:
                v = v[None]
            if v.ndim != 4 or v.shape[0] != 1:
                raise ValueError(f"volume {i}: expected (1, D, H, W) or (D, H, W), got shape {v.shape}")
            lo, hi = float(v.min()), float(v.max())
            if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL or not np.isfinite([lo, hi]).all():
                raise ValueError(f"volume {i}: values in [{lo:.4g}, {hi:.4g}], expected [0, 1] (HU scaled by lad.data.labels.hu_to_unit)")
            results.append(None)
            path = None
            if cache_dir is not None:
                path = Path(cache_dir) / f"{self.cache_key(v)}.npy"
                if path.exists():
                    results[i] = np.load(path)
                    continue
            if pending and pending[0][1].shape != v.shape:
                flush()
            pending.append((i, v, path))
            if len(pending) >= batch_size:
                flush()
        flush()
        if not results:
            return np.zeros((0, self.feature_dim), np.float32)
        return np.stack(results).astype(np.float32)  # type: ignore[arg-type]

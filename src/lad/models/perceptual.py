"""Perceptual (LPIPS-style) loss on a 2D slice, with backbone weights from a local file only.

The backbone is VGG16's feature stack in torchvision's state-dict layout (``features.N.weight``),
built here with plain ``nn.Conv2d`` (torchvision is not a dependency), so an official torchvision
``vgg16`` file or the VGG part of an LPIPS checkpoint loads. The distance is LPIPS' unweighted form:
channel-normalised features of five stages, squared difference, spatial mean, summed over stages.
Without ``--perceptual-weights`` the term is off (``PerceptualLoss.maybe`` returns None and logs
it): a random-initialised backbone is never used.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from lad.utils.log import get_logger

__all__ = ["PerceptualLoss", "VGG16_CFG"]

log = get_logger(__name__)

# torchvision vgg16 "features": conv channel counts, "M" = max-pool; stage ends after these ReLU indices
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_STAGE_ENDS = (3, 8, 15, 22, 29)
# an LPIPS checkpoint keeps torchvision's layer indices inside net.slice1..5
_SLICE_KEY = re.compile(r"^(?:net\.)?slice[1-5]\.(\d+\.(?:weight|bias))$")


def _vgg16_features(device: str | torch.device | None = None) -> nn.Sequential:
    """torchvision's ``vgg16().features`` layout; ``device="meta"`` builds it without initialising weights."""
    layers: list[nn.Module] = []
    cin = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1, device=device), nn.ReLU(inplace=False)]
            cin = v
    return nn.Sequential(*layers)


class PerceptualLoss(nn.Module):
    """LPIPS-style distance between two batches of single-channel 2D images in [0, 1]."""

    def __init__(self, weights_path: str | Path):
        super().__init__()
        path = Path(weights_path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: perceptual-loss weights not found")
        self.features = _vgg16_features(device="meta")  # no random init: every weight comes from the file
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt files
            raise ValueError(f"{path}: unreadable weights file ({e})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        wanted = {f"features.{k}" for k in self.features.state_dict()}
        found = {}
        for key, value in state.items() if isinstance(state, dict) else ():
            k = _SLICE_KEY.sub(r"features.\1", key.removeprefix("module."))  # LPIPS: net.sliceK.N.* -> features.N.*
            if k in wanted:
                found[k] = value
        missing = sorted(wanted - set(found))
        if missing:
            raise ValueError(f"{path}: not a VGG16 state dict in torchvision layout (missing {missing[:3]}...)")
        try:
            self.features.load_state_dict({k.removeprefix("features."): v.float() for k, v in found.items()}, assign=True)
        except RuntimeError as e:  # right keys, wrong shapes
            raise ValueError(f"{path}: VGG16 keys with wrong shapes ({str(e).splitlines()[-1].strip()})") from None
        self.features.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @classmethod
    def maybe(cls, weights_path: str | Path | None) -> "PerceptualLoss | None":
        if not weights_path:
            log.info("perceptual loss off: no --perceptual-weights given (a random backbone is never used)")
            return None
        return cls(weights_path)

    def train(self, mode: bool = True):  # the backbone stays in eval mode
        super().train(mode)
        self.features.eval()
        return self

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x.repeat(1, 3, 1, 1) - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _STAGE_ENDS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            if i == _STAGE_ENDS[-1]:
                break
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a``, ``b``: (B, 1, H, W) in [0, 1] -> scalar distance (mean over the batch)."""
        return sum(((fa - fb) ** 2).sum(1).mean() for fa, fb in zip(self._stages(a), self._stages(b)))

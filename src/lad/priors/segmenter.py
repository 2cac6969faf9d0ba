"""The organ segmenter behind the priors (and the conditioning-fidelity metric): any MONAI network.

A ``Segmenter`` folder is ``config.json`` + ``model.safetensors`` like every trained part; it
records the spacing and window it was trained at, so prediction on raw CT needs nothing else.
Input: ``(B, 1, D, H, W)`` float32 in [0, 1] (HU [-1000, 400] scaled, as prepared data); output
logits over 6 classes (0 background, 1 liver, 2 kidney, 3 spleen, 4 pancreas, 5 tumour).
"""

from __future__ import annotations

import torch
from torch import nn

from lad.models.base import PretrainedMixin, register_to_config

__all__ = ["Segmenter", "NUM_CLASSES"]

NUM_CLASSES = 6


class Segmenter(PretrainedMixin, nn.Module):
    """A MONAI segmentation network chosen by name, with its training geometry."""

    @register_to_config
    def __init__(self, *, network: str = "segresnet", network_kwargs: dict | None = None,
                 spacing: tuple[float, float, float] = (1.6, 1.6, 2.3), roi_size: tuple[int, int, int] = (32, 256, 256),
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        from monai.networks import nets

        kwargs = dict(network_kwargs or {})
        name = {"segresnet": "SegResNet", "unet": "UNet", "basicunet": "BasicUNet", "dynunet": "DynUNet",
                "attentionunet": "AttentionUnet", "unetr": "UNETR", "swinunetr": "SwinUNETR"}.get(network.lower(), network)
        cls = getattr(nets, name, None)
        if cls is None:
            raise ValueError(f"unknown MONAI network {network!r} (e.g. segresnet, unet, basicunet, swinunetr)")
        if name == "UNet":
            kwargs.setdefault("channels", (16, 32, 64, 128))
            kwargs.setdefault("strides", (2, 2, 2))
        if name in ("UNETR", "SwinUNETR"):
            kwargs.setdefault("img_size", tuple(roi_size))
        self.net = cls(spatial_dims=3, in_channels=1, out_channels=num_classes, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, overlap: float = 0.5, sw_batch_size: int = 2) -> torch.Tensor:
        """Labels ``(B, D, H, W)`` long by sliding-window inference (overlap 0.5, as the tumour-scaling paper)."""
        from monai.inferers import sliding_window_inference

        roi = tuple(min(r, s) for r, s in zip(self.config["roi_size"], x.shape[2:]))
        roi = tuple(max(8, (r // 8) * 8) if s >= 8 else s for r, s in zip(roi, x.shape[2:]))
        logits = sliding_window_inference(x, roi, sw_batch_size, self, overlap=overlap, mode="gaussian", padding_mode="replicate")
        return logits.argmax(1)

"""PatchGAN discriminators (2D on an axial slice, 3D on the volume), as Medical Diffusion's VQ-GAN."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PatchDiscriminator"]


class PatchDiscriminator(nn.Module):
    """pix2pix-style PatchGAN: ``num_layers`` strided conv + norm + LeakyReLU stages, then patch logits.

    ``kernel_size`` 4 with padding 2 is pix2pix's and the public release's (the paper presets); 3 with
    padding 1 is ours (the demo and tiny presets: about half the arithmetic). ``forward`` returns every intermediate feature map (for the
    feature-matching loss); the last element is the patch logits.
    """

    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 1, channels: int = 64, num_layers: int = 3, norm: str = "batch",
                 kernel_size: int = 3):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        bn = {3: nn.BatchNorm3d, 2: nn.BatchNorm2d}[spatial_dims] if norm == "batch" else None
        if norm not in ("batch", "none"):
            raise ValueError(f"norm must be batch or none, got {norm!r}")
        if kernel_size not in (3, 4):
            raise ValueError(f"kernel_size must be 3 or 4, got {kernel_size}")
        k, pad = kernel_size, (kernel_size - 1 + 1) // 2  # 3 -> 1, 4 -> 2 (pix2pix: ceil((k - 1) / 2))
        layers = [nn.Sequential(conv(in_channels, channels, k, stride=2, padding=pad), nn.LeakyReLU(0.2, True))]
        ch = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            block = [conv(ch, out, k, stride=stride, padding=pad, bias=bn is None)]
            if bn is not None:
                block.append(bn(out))
            block.append(nn.LeakyReLU(0.2, True))
            layers.append(nn.Sequential(*block))
            ch = out
        layers.append(nn.Sequential(conv(ch, 1, k, stride=1, padding=pad)))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats

"""HA-GAN: the Hierarchical Amortized GAN of Sun et al. (2022), "Hierarchical Amortized GAN for 3D High
Resolution Medical Image Synthesis" (IEEE JBHI 26(8)), the GAN baseline of the Lad paper's Table 1
(section 4.2.1).

The four networks of HA-GAN, with the sizes of its public release (``Model_HA_GAN_256.py``) as the defaults
and every size a keyword argument, so that the same classes build the release's 256^3 model, a native
32 x 256 x 256 model and the small demo/test models:

* :class:`HAGANGenerator`: a shared trunk G^A maps the noise ``z`` (``latent_dim``, 1024 in the release) to a
  feature volume at 1/``low_res_factor`` resolution (4: two x2 upsamplings in G^H); the low-resolution head
  G^L turns all of it into the whole volume at low resolution; the high-resolution head G^H turns a depth slab of
  it into a sub-volume at full resolution (training) or all of it into the whole volume (sampling).
* :class:`HAGANDiscriminator`: D^H on the high-resolution sub-volume (with the sub-volume's position as an extra
  input of its classifier) and D^L on the low-resolution whole volume; the logit is the mean of the two.
  Spectral normalisation on every layer.
* :class:`HAGANEncoder` (E^H): a high-resolution sub-volume -> the feature slab G^H decodes it from.
* :class:`HAGANSubEncoder` (E^G): the E^H features of all sub-volumes of a volume, concatenated along depth
  -> the noise vector ``z`` that G reproduces the volume from.

Values: volumes in [-1, 1] (``tanh`` outputs, as the release; ``lad.training.hagan_trainer`` maps the prepared
windows' [0, 1] onto it). Shapes are ``(B, C, D, H, W)``; ``image_shape`` is the model's whole-volume shape
``(D, H, W)``, ``crop_depth`` the depth of the high-resolution sub-volumes (the release: 32 of 256).

What is generalised beyond the release (cubic 256^3 only): axes shorter than the rest are upsampled in the trunk's
later levels only (the trunk's start shape is derived from ``image_shape``), and the discriminators' and E^G's
strided layers follow one rule per axis (kernel 4 stride 2 down to 8, kernel 2 stride 2 below, kernel 1 at 1)
that gives exactly the release's layers at its shapes. At the release's shapes the networks are the release's,
layer for layer (parameter counts checked in the tests).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from lad.models.base import PretrainedMixin, register_to_config

__all__ = ["HAGANGenerator", "HAGANDiscriminator", "HAGANEncoder", "HAGANSubEncoder", "trunk_layout", "down_layout"]


def _v2(n: int) -> int:
    """The exponent of the largest power of two dividing ``n`` (n >= 1)."""
    return (n & -n).bit_length() - 1


def trunk_layout(low_shape: Sequence[int], levels: int) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """Start shape and per-level x2 factors of a trunk with ``levels`` upsamplings that ends at ``low_shape``.

    Each axis doubles ``min(levels, v2(size))`` times, in the last levels (the release: 4^3 -> 64^3 with 4
    doublings per axis; a depth of 8 at 64 x 64 starts at 1 x 4 x 4 and skips the first depth doubling).
    """
    doublings = [min(levels, _v2(int(s))) for s in low_shape]
    start = tuple(int(s) >> k for s, k in zip(low_shape, doublings))
    scales = [tuple(2 if i >= levels - k else 1 for k in doublings) for i in range(levels)]
    return start, scales


def down_layout(shape: Sequence[int], layers: int) -> tuple[list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]], tuple[int, ...]]:
    """(kernel, stride, padding) per axis of ``layers`` strided convolutions on ``shape``, and the shape left.

    Per axis of size ``s``: kernel 4, stride 2, padding 1 while ``s >= 8``; kernel 2, stride 2 for ``2 <= s < 8``;
    kernel 1 at ``s == 1``. This reproduces the release's D^H on 32 x 256 x 256 (its depth kernels 4, 4, 4, 2, 2, 1),
    its D^L on 64^3 and its E^G on 64^3.
    """
    out, cur = [], [int(s) for s in shape]
    for _ in range(layers):
        k, st, p = [], [], []
        for i, s in enumerate(cur):
            if s >= 8:
                k.append(4), st.append(2), p.append(1)
                cur[i] = s // 2
            elif s >= 2:
                k.append(2), st.append(2), p.append(0)
                cur[i] = s // 2
            else:
                k.append(1), st.append(1), p.append(0)
        out.append((tuple(k), tuple(st), tuple(p)))
    return out, tuple(cur)


def _block(cin: int, cout: int, groups: int, kernel=3, stride=1, padding=None) -> Convolution:
    """conv -> GroupNorm -> ReLU (the release's generator and encoder block), MONAI's ``Convolution``."""
    return Convolution(spatial_dims=3, in_channels=cin, out_channels=cout, kernel_size=kernel, strides=stride, padding=padding,
                       act="RELU", norm=("GROUP", {"num_groups": groups}), bias=True)


def _check_groups(channels: Sequence[int], groups: int, what: str) -> None:
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(f"{what}: channel counts {bad} are not divisible by norm_num_groups={groups}")


def _positive(values: Sequence[int], what: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} must be a non-empty list of whole numbers >= 1, got {list(values)}")
    return values


class HAGANGenerator(PretrainedMixin, nn.Module):
    """G = G^A (trunk) + G^H (high-resolution head) + G^L (low-resolution head) of HA-GAN (Sun et al., 2022).

    Release (256^3): ``latent_dim=1024``, ``trunk_channels=(512, 512, 256, 128, 64)`` (the linear layer's output and
    one conv per level, upsampling x2 before every level but the first: 4^3 -> 64^3), ``high_channels=(32,)``
    (x2, conv 64 -> 32, x2, conv 32 -> 1: 64^3 -> 256^3), ``low_channels=(32, 16)`` (convs 64 -> 32 -> 16 -> 1 at
    64^3), GroupNorm(8) + ReLU after every conv but the last, nearest-neighbour upsampling, ``tanh`` outputs.

    ``forward(z)``: ``z`` (B, latent_dim) -> the whole volume (B, 1, *image_shape) in [-1, 1] (sampling).
    ``forward(z, crop_start=s)``: -> ``(crop, small)``: the high-resolution sub-volume of depths ``[s, s + crop_depth)``
    (B, 1, crop_depth, H, W) and the whole volume at low resolution (B, 1, *low_shape), both in [-1, 1] (training).
    ``s`` must be a multiple of ``low_res_factor``.
    """

    @register_to_config
    def __init__(self, *, image_shape: Sequence[int], latent_dim: int = 1024, crop_depth: int = 32,
                 trunk_channels: Sequence[int] = (512, 512, 256, 128, 64), high_channels: Sequence[int] = (32,),
                 low_channels: Sequence[int] = (32, 16), norm_num_groups: int = 8):
        super().__init__()
        self.image_shape = _positive(image_shape, "image_shape")
        trunk, high, low = (_positive(c, n) for c, n in ((trunk_channels, "trunk_channels"), (high_channels, "high_channels"),
                                                           (low_channels, "low_channels")))
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (D, H, W), got {list(image_shape)}")
        if latent_dim < 1 or norm_num_groups < 1:
            raise ValueError(f"latent_dim and norm_num_groups must be >= 1, got {latent_dim} and {norm_num_groups}")
        _check_groups((*trunk, *high, *low), norm_num_groups, "HAGANGenerator")
        self.latent_dim, self.crop_depth = int(latent_dim), int(crop_depth)
        self.low_res_factor = 2 ** (len(high) + 1)
        f = self.low_res_factor
        if any(s % f for s in self.image_shape):
            raise ValueError(f"image_shape {list(self.image_shape)} must be divisible by the low-resolution factor {f} "
                             f"(2 ** (len(high_channels) + 1)) on every axis")
        if crop_depth < f or crop_depth % f or self.image_shape[0] % crop_depth:
            raise ValueError(f"crop_depth {crop_depth} must be a multiple of the low-resolution factor {f} that divides the "
                             f"depth {self.image_shape[0]} (the sub-volumes tile the volume)")
        self.low_shape = tuple(s // f for s in self.image_shape)
        self.start_shape, self.scales = trunk_layout(self.low_shape, len(trunk) - 1)
        # G^A: linear (no norm, no activation: the release) -> conv blocks, x2 nearest upsampling before all but the first
        self.fc = nn.Linear(latent_dim, trunk[0] * math.prod(self.start_shape))
        self.trunk = nn.ModuleList([_block(trunk[0], trunk[0], norm_num_groups)]
                                   + [_block(a, b, norm_num_groups) for a, b in zip(trunk[:-1], trunk[1:])])
        # G^H: (x2, conv block) per high channel, then x2 and a plain conv to one channel
        chain = (trunk[-1], *high)
        self.high = nn.ModuleList([_block(a, b, norm_num_groups) for a, b in zip(chain[:-1], chain[1:])])
        self.high_out = nn.Conv3d(chain[-1], 1, 3, padding=1)
        # G^L: conv blocks at the trunk's resolution, then a plain conv to one channel
        chain = (trunk[-1], *low)
        self.low = nn.Sequential(*[_block(a, b, norm_num_groups) for a, b in zip(chain[:-1], chain[1:])])
        self.low_out = nn.Conv3d(chain[-1], 1, 3, padding=1)

    @property
    def feature_channels(self) -> int:
        """Channels of the trunk's output (what E^H encodes a sub-volume into)."""
        return int(self.config["trunk_channels"][-1])

    def crop_starts(self) -> int:
        """Number of admissible sub-volume starts: ``0, f, 2f, ...`` up to ``D - crop_depth`` (f = low_res_factor)."""
        return (self.image_shape[0] - self.crop_depth) // self.low_res_factor + 1

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """G^A: ``z`` (B, latent_dim) -> features (B, trunk_channels[-1], *low_shape)."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be (B, {self.latent_dim}), got {tuple(z.shape)}")
        h = self.fc(z).view(z.shape[0], -1, *self.start_shape)
        h = self.trunk[0](h)
        for scale, block in zip(self.scales, self.trunk[1:]):
            h = block(F.interpolate(h, scale_factor=scale, mode="nearest"))
        return h

    def high_res(self, h: torch.Tensor) -> torch.Tensor:
        """G^H: features (B, C, d, h, w) -> (B, 1, f d, f h, f w) in [-1, 1]."""
        for block in self.high:
            h = block(F.interpolate(h, scale_factor=2, mode="nearest"))
        return torch.tanh(self.high_out(F.interpolate(h, scale_factor=2, mode="nearest")))

    def low_res(self, h: torch.Tensor) -> torch.Tensor:
        """G^L: features (B, C, *low_shape) -> the whole volume at low resolution (B, 1, *low_shape) in [-1, 1]."""
        return torch.tanh(self.low_out(self.low(h)))

    def forward(self, z: torch.Tensor, crop_start: int | None = None):
        h = self.features(z)
        if crop_start is None:
            return self.high_res(h)
        f = self.low_res_factor
        if crop_start % f or not 0 <= crop_start <= self.image_shape[0] - self.crop_depth:
            raise ValueError(f"crop_start {crop_start} must be a multiple of {f} in [0, {self.image_shape[0] - self.crop_depth}]")
        slab = h[:, :, crop_start // f: (crop_start + self.crop_depth) // f]
        return self.high_res(slab), self.low_res(h)


def _sn_stack(channels: Sequence[int], shape: Sequence[int], in_channels: int = 1) -> tuple[nn.ModuleList, tuple[int, ...]]:
    layout, rest = down_layout(shape, len(channels))
    chain = (in_channels, *channels)
    convs = nn.ModuleList([spectral_norm(nn.Conv3d(a, b, k, stride=s, padding=p))
                           for (a, b), (k, s, p) in zip(zip(chain[:-1], chain[1:]), layout)])
    return convs, rest


class HAGANDiscriminator(PretrainedMixin, nn.Module):
    """D = (D^H + D^L) / 2 of HA-GAN (Sun et al., 2022), spectrally normalised, LeakyReLU(0.2).

    Release (256^3, crop depth 32): D^H ``channels=(16, 32, 64, 128, 256, 512)`` strided convs on the
    32 x 256 x 256 sub-volume, a conv to ``features=128`` over what is left (1 x 4 x 4), the sub-volume's start
    divided by its largest value appended, linear 129 -> 64 -> 1; D^L ``low_channels=(32, 64, 128, 256)`` strided
    convs on the 64^3 low-resolution volume and a conv to one logit over what is left (4^3).

    ``forward(crop, small, position)``: crop (B, 1, crop_depth, H, W), small (B, 1, *low_shape), both in [-1, 1];
    position (B,) or a float in [0, 1] (start / (D - crop_depth)) -> logits (B, 1).
    """

    @register_to_config
    def __init__(self, *, image_shape: Sequence[int], crop_depth: int = 32, low_res_factor: int = 4,
                 channels: Sequence[int] = (16, 32, 64, 128, 256, 512), features: int = 128,
                 low_channels: Sequence[int] = (32, 64, 128, 256)):
        super().__init__()
        image_shape = _positive(image_shape, "image_shape")
        channels, low_channels = _positive(channels, "channels"), _positive(low_channels, "low_channels")
        if features < 2:
            raise ValueError(f"features must be >= 2, got {features}")
        if any(s % low_res_factor for s in image_shape):
            raise ValueError(f"image_shape {list(image_shape)} must be divisible by low_res_factor {low_res_factor}")
        crop_shape = (int(crop_depth), *image_shape[1:])
        low_shape = tuple(s // low_res_factor for s in image_shape)
        self.high, rest = _sn_stack(channels, crop_shape)
        self.high_out = spectral_norm(nn.Conv3d(channels[-1], features, rest))
        self.fc1 = spectral_norm(nn.Linear(features + 1, features // 2))
        self.fc2 = spectral_norm(nn.Linear(features // 2, 1))
        self.low, rest = _sn_stack(low_channels, low_shape)
        self.low_out = spectral_norm(nn.Conv3d(low_channels[-1], 1, rest))

    def forward(self, crop: torch.Tensor, small: torch.Tensor, position) -> torch.Tensor:
        h = crop
        for conv in self.high:
            h = F.leaky_relu(conv(h), 0.2)
        h = F.leaky_relu(self.high_out(h), 0.2).flatten(1)
        pos = torch.as_tensor(position, dtype=h.dtype, device=h.device).reshape(-1, 1).expand(h.shape[0], 1)
        h = F.leaky_relu(self.fc1(torch.cat([h, pos], dim=1)), 0.2)
        high_logit = self.fc2(h)
        s = small
        for conv in self.low:
            s = F.leaky_relu(conv(s), 0.2)
        low_logit = self.low_out(s).flatten(1)
        return (high_logit + low_logit) / 2


class HAGANEncoder(PretrainedMixin, nn.Module):
    """E^H of HA-GAN (Sun et al., 2022): a high-resolution sub-volume -> the feature slab G^H decodes it from.

    Release: ``channels=(32, 64)``: conv k4 s2 (1 -> 32), conv k3 (32 -> 32), conv k4 s2 (32 -> 64), each followed by
    GroupNorm(8) + ReLU. One k4 s2 conv per entry: ``len(channels)`` halvings, which must equal the generator's
    log2(low_res_factor), and ``channels[-1]`` its ``trunk_channels[-1]``.

    ``forward(x)``: (B, 1, d, H, W) in [-1, 1] -> (B, channels[-1], d / f, H / f, W / f).
    """

    @register_to_config
    def __init__(self, *, channels: Sequence[int] = (32, 64), norm_num_groups: int = 8):
        super().__init__()
        channels = _positive(channels, "channels")
        _check_groups(channels, norm_num_groups, "HAGANEncoder")
        layers = [_block(1, channels[0], norm_num_groups, 4, 2, 1), _block(channels[0], channels[0], norm_num_groups, 3, 1, 1)]
        layers += [_block(a, b, norm_num_groups, 4, 2, 1) for a, b in zip(channels[:-1], channels[1:])]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class HAGANSubEncoder(PretrainedMixin, nn.Module):
    """E^G of HA-GAN (Sun et al., 2022): E^H features of a whole volume -> the noise vector ``z``.

    Release (features 64 x 64^3): ``channels=(32, 64, 128, 256)`` strided convs (k4 s2) with GroupNorm(8) + ReLU, then
    a conv to ``latent_dim`` over what is left (4^3).

    ``forward(h)``: (B, in_channels, *input_shape) -> (B, latent_dim).
    """

    @register_to_config
    def __init__(self, *, input_shape: Sequence[int], in_channels: int = 64, channels: Sequence[int] = (32, 64, 128, 256),
                 latent_dim: int = 1024, norm_num_groups: int = 8):
        super().__init__()
        channels = _positive(channels, "channels")
        _check_groups(channels, norm_num_groups, "HAGANSubEncoder")
        layout, rest = down_layout(_positive(input_shape, "input_shape"), len(channels))
        chain = (in_channels, *channels)
        self.net = nn.Sequential(*[_block(a, b, norm_num_groups, k, s, p)
                                   for (a, b), (k, s, p) in zip(zip(chain[:-1], chain[1:]), layout)])
        self.out = nn.Conv3d(channels[-1], latent_dim, rest)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(h)).flatten(1)

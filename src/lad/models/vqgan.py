"""VQ-GAN autoencoder following Medical Diffusion (the paper's latent space, section 3.2).

Two layouts (``architecture``):

- ``"release"``: the public release's (TATS-style) autoencoder. Encoder: 3^3 conv -> per stage a
  kernel-4 strided "same" conv + ``num_res_blocks`` residual blocks -> GroupNorm + SiLU -> 1^3 conv to
  ``embedding_dim``. Decoder: 1^3 conv -> GroupNorm + SiLU -> per stage a kernel-4 transposed conv +
  two residual blocks (widths ``channels[-1], ..., channels[1]``: the full-resolution stage keeps
  ``channels[1]``) -> 3^3 conv. The paper presets use it.
- ``"compact"`` (ours; the demo and tiny presets): kernel-3 strided convs, and a decoder that mirrors
  the encoder with nearest-neighbour upsampling + conv (transposed convolutions can leave
  checkerboard artefacts) and ``num_res_blocks`` blocks per stage, ending at ``channels[0]``.

Both: EMA codebook, group norm, SiLU, replicate padding as the release.

Shapes: ``x`` (B, in_channels, D, H, W) float32 in [0, 1] -> ``z_e`` (B, embedding_dim, D/fd, H/fh, W/fw)
for ``downsample=(fd, fh, fw)`` (powers of two).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lad.models.base import PretrainedMixin, register_to_config
from lad.models.quantizer import EMAQuantizer, QuantizerOutput

__all__ = ["VQGAN", "VQGANOutput"]


def _conv(spatial_dims: int, cin: int, cout: int, k: int = 3, stride=1, padding_mode: str = "replicate") -> nn.Module:
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    return conv(cin, cout, k, stride=stride, padding=k // 2, padding_mode=padding_mode if k > 1 else "zeros")


def _same_pad(k: int, stride) -> list[int]:
    """F.pad amounts (last axis first) of a "same" convolution with kernel ``k`` and per-axis ``stride``:
    ``k - s`` in all, the larger half in front (the release's SamePadConv3d)."""
    pads = [k - s for s in stride]
    return [q for p in reversed(pads) for q in (p // 2 + p % 2, p // 2)]


class SamePadConv(nn.Module):
    """Kernel-``k`` strided conv on a replicate-padded input: output size ``ceil(n / s)`` (the release's encoder)."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, k: int, stride, padding_mode: str):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.pad, self.mode = _same_pad(k, stride), padding_mode
        self.conv = conv(cin, cout, k, stride=stride, padding=0)

    def forward(self, x):
        return self.conv(torch.nn.functional.pad(x, self.pad, mode=self.mode))


class SamePadConvTranspose(nn.Module):
    """Kernel-``k`` transposed conv that multiplies each axis by its stride (the release's decoder):
    replicate-pad by ``k - s``, then ``ConvTranspose(k, stride=s, padding=k - 1)``."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, k: int, stride, padding_mode: str):
        super().__init__()
        conv = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
        self.pad, self.mode = _same_pad(k, stride), padding_mode
        self.conv = conv(cin, cout, k, stride=stride, padding=k - 1)

    def forward(self, x):
        return self.conv(torch.nn.functional.pad(x, self.pad, mode=self.mode))


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    g = math.gcd(ch, groups)
    return nn.GroupNorm(g, ch, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> GroupNorm -> SiLU -> conv, plus identity."""

    def __init__(self, spatial_dims: int, ch: int, groups: int, padding_mode: str):
        super().__init__()
        self.block = nn.Sequential(
            _norm(ch, groups), nn.SiLU(), _conv(spatial_dims, ch, ch, 3, 1, padding_mode),
            _norm(ch, groups), nn.SiLU(), _conv(spatial_dims, ch, ch, 3, 1, padding_mode),
        )

    def forward(self, x):
        return x + self.block(x)


@dataclasses.dataclass
class VQGANOutput:
    """``recon`` (B, C, D, H, W); ``z_e`` pre-quantisation latent; ``z_q`` quantised (straight-through)."""

    recon: torch.Tensor
    z_e: torch.Tensor
    z_q: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor
    indices: torch.Tensor


class VQGAN(PretrainedMixin, nn.Module):
    """Vector-quantised autoencoder with an EMA codebook (Medical Diffusion's VQ-GAN)."""

    @register_to_config
    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: tuple[int, ...] = (16, 32, 64),
        num_res_blocks: int = 1,
        downsample: tuple[int, ...] = (4, 4, 4),
        embedding_dim: int = 8,
        num_embeddings: int = 16384,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        norm_num_groups: int = 16,
        padding_mode: str = "replicate",
        dead_code_threshold: float = 1e-3,
        restart_dead_codes: bool = True,
        gradient_checkpointing: bool = True,
        architecture: str = "compact",
    ):
        super().__init__()
        if architecture not in ("compact", "release"):
            raise ValueError(f"architecture must be 'compact' or 'release', got {architecture!r}")
        if len(downsample) != spatial_dims:
            raise ValueError(f"downsample needs {spatial_dims} factors, got {downsample}")
        if any(f < 1 or f & (f - 1) for f in downsample):
            raise ValueError(f"downsample factors must be powers of two, got {downsample}")
        n_stages = int(math.log2(max(downsample)))
        if len(channels) != n_stages + 1:
            raise ValueError(f"channels needs {n_stages + 1} entries for downsample {downsample}, got {channels}")
        self.downsample = tuple(downsample)
        strides = [tuple(2 if (f >> i) > 1 else 1 for f in downsample) for i in range(n_stages)]
        sd, g, pm = spatial_dims, norm_num_groups, padding_mode

        release = architecture == "release"
        enc: list[nn.Module] = [_conv(sd, in_channels, channels[0], 3, 1, pm)]
        for i, s_ in enumerate(strides):
            enc.append(SamePadConv(sd, channels[i], channels[i + 1], 4, s_, pm) if release
                       else _conv(sd, channels[i], channels[i + 1], 3, s_, pm))
            enc += [ResBlock(sd, channels[i + 1], g, pm) for _ in range(num_res_blocks)]
        enc += [_norm(channels[-1], g), nn.SiLU(), _conv(sd, channels[-1], embedding_dim, 1)]
        self.encoder = nn.Sequential(*enc)

        self.quantizer = EMAQuantizer(num_embeddings=num_embeddings, embedding_dim=embedding_dim, decay=decay,
                                      commitment_cost=commitment_cost, dead_code_threshold=dead_code_threshold,
                                      restart_dead_codes=restart_dead_codes)

        if release:
            dec: list[nn.Module] = [_conv(sd, embedding_dim, channels[-1], 1), _norm(channels[-1], g), nn.SiLU()]
            ch = channels[-1]
            for j, i in enumerate(reversed(range(n_stages))):
                out = channels[n_stages - j]
                dec.append(SamePadConvTranspose(sd, ch, out, 4, strides[i], pm))
                dec += [ResBlock(sd, out, g, pm) for _ in range(2)]
                ch = out
            dec.append(_conv(sd, ch, out_channels, 3, 1, pm))
        else:
            dec = [_conv(sd, embedding_dim, channels[-1], 1)]
            dec += [ResBlock(sd, channels[-1], g, pm) for _ in range(num_res_blocks)]
            for i in reversed(range(n_stages)):
                dec.append(nn.Upsample(scale_factor=strides[i], mode="nearest"))
                dec.append(_conv(sd, channels[i + 1], channels[i], 3, 1, pm))
                dec += [ResBlock(sd, channels[i], g, pm) for _ in range(num_res_blocks)]
            dec += [_norm(channels[0], g), nn.SiLU(), _conv(sd, channels[0], out_channels, 3, 1, pm)]
        self.decoder = nn.Sequential(*dec)
        # the full-resolution part of the decoder (last upsampling onwards), checkpointed per block in
        # training: at the paper's shape (2 x 32x256x256) each 16-channel full-res activation is 0.5 GiB
        # only where it pays: at 2 x 16x64x64 it cost 25% of the step (2.18 -> 2.74 s CPU, 1 thread) and is
        # skipped (a 17 MB activation); at 2 x 32x256x256 it cut the step's peak RSS from 8.08 to 6.41 GiB
        self.gradient_checkpointing = gradient_checkpointing
        self.checkpoint_min_bytes = 64 * 2**20
        ups = [i for i, m in enumerate(dec) if isinstance(m, (nn.Upsample, SamePadConvTranspose))]
        self._full_res = ups[-1] if ups else len(dec)

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(embedding_dim, d, h, w)`` of the latent of an image of spatial ``image_shape``."""
        bad = [s for s, f in zip(image_shape, self.downsample) if s % f]
        if bad:
            raise ValueError(f"image shape {tuple(image_shape)} is not divisible by the compression {self.downsample}")
        return (self.config["embedding_dim"], *(s // f for s, f in zip(image_shape, self.downsample)))

    def _pair_batch_of_one(self, x: torch.Tensor, latent_spatial: tuple[int, ...]) -> bool:
        """Whether to run a CPU inference batch of one as two identical samples.

        PyTorch's CPU convolution uses oneDNN only for batch > 1 or an input with N*C*D*H > 20480, and
        otherwise a slow im2col path (``aten::slow_conv3d_forward``). Decoding ONE demo volume (latent
        8x4x16x16) cost 0.68 CPU s, 91% in that path, against 0.155 CPU s per volume in a batch of two
        (benchmarks/README.md, "Sampling"). GroupNorm is per sample, so the first of the two outputs is
        the batch-of-one result. Applied only when the lowest-resolution layers fall under that size
        (not at the paper's latent 8x64x64, where batch 1 already takes oneDNN).
        """
        if x.shape[0] != 1 or x.device.type != "cpu" or torch.is_grad_enabled():
            return False
        padded = [s + 2 for s in latent_spatial]  # replicate padding of the 3x3(x3) convolutions
        # PyTorch's size test is N * C * (first two spatial sizes): D, H in 3D and H, W in 2D
        return self.config["channels"][-1] * padded[0] * padded[1] <= 20480

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, D, H, W) in [0, 1] -> pre-quantisation latent ``z_e``."""
        if self._pair_batch_of_one(x, tuple(s // f for s, f in zip(x.shape[2:], self.downsample))):
            return self.encoder(torch.cat([x, x]))[:1]
        return self.encoder(x)

    def quantize(self, z_e: torch.Tensor) -> QuantizerOutput:
        return self.quantizer(z_e)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a (quantised or continuous) latent to an image."""
        full_res_bytes = z[:, :1].numel() * math.prod(self.downsample) * self.config["channels"][0] * 4
        if not (self.gradient_checkpointing and torch.is_grad_enabled() and z.requires_grad
                and full_res_bytes >= self.checkpoint_min_bytes):
            if self._pair_batch_of_one(z, tuple(z.shape[2:])):
                return self.decoder(torch.cat([z, z]))[:1]
            return self.decoder(z)
        h = self.decoder[: self._full_res](z)
        tail = list(self.decoder[self._full_res :])
        # segments: the upsampling (+ conv), each residual block, the head
        up = 2 if isinstance(tail[0], nn.Upsample) else 1
        head = 3 if isinstance(tail[-3], nn.GroupNorm) else 1
        segments = [tail[:up]] + [[m] for m in tail[up:-head]] + [tail[-head:]]
        for seg in segments:
            h = checkpoint(nn.Sequential(*seg), h, use_reentrant=False)
        return h

    def decode_latent(self, z_e: torch.Tensor) -> torch.Tensor:
        """Quantise then decode, as in training (used to decode diffusion samples)."""
        return self.decode(self.quantizer(z_e).z_q)

    def forward(self, x: torch.Tensor) -> VQGANOutput:
        z_e = self.encode(x)
        q = self.quantize(z_e)
        return VQGANOutput(recon=self.decode(q.z_q), z_e=z_e, z_q=q.z_q, commitment_loss=q.commitment_loss,
                           perplexity=q.perplexity, usage=q.usage, indices=q.indices)

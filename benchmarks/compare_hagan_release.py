"""lad's HA-GAN networks against the public release's (github.com/batmanlab/HA-GAN, ``models/Model_HA_GAN_256.py``).

Builds the release's Generator, Discriminator, Encoder and Sub_Encoder and lad's ``paper`` preset (256^3), copies the
release's (random) weights into lad's networks and prints one JSON line per network: parameter counts, whether the
parameter shapes match in order, and the largest output difference on random inputs (G: the training pair at sub-volume
start 96 and G^H on E^H's features; E^H; E^G; D in eval mode with both spectral norms set to the exact top singular
vectors, since the two implementations keep different power-iteration vectors). Needs a checkout of the release
(its code is not part of lad) and about 8 GB of memory; 2-10 minutes on 2 CPU cores:

    .venv/bin/python benchmarks/compare_hagan_release.py --release /path/to/HA-GAN
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _copy(src: list[torch.nn.Module], dst: list[torch.nn.Module]) -> bool:
    """Copy weights layer by layer (conv / linear / group norm, in construction order); True when all shapes match."""
    ok = len(src) == len(dst)
    with torch.no_grad():
        for a, b in zip(src, dst):
            wb = b.parametrizations.weight.original if hasattr(b, "parametrizations") else b.weight
            ok &= a.weight.shape == wb.shape
            if ok:
                wb.copy_(a.weight)
                b.bias.copy_(a.bias)
    return ok


def _layers(m: torch.nn.Module) -> list[torch.nn.Module]:
    return [x for x in m.modules() if isinstance(x, (torch.nn.Conv3d, torch.nn.Linear, torch.nn.GroupNorm))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--release", required=True, help="checkout of github.com/batmanlab/HA-GAN")
    args = ap.parse_args()
    sys.path.insert(0, args.release)
    torch.Tensor.cuda = lambda self, *a, **k: self  # the release's D moves the sub-volume position to CUDA
    from models.Model_HA_GAN_256 import Discriminator, Encoder, Generator, Sub_Encoder

    from lad.training.hagan_config import resolve_hagan_config
    from lad.training.hagan_trainer import build_hagan

    torch.manual_seed(0)
    ours = build_hagan(resolve_hagan_config("paper"), (32, 256, 256))
    rg, rd, re, rs = Generator(mode="train"), Discriminator(), Encoder(), Sub_Encoder()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.no_grad():
        z = torch.randn(1, 1024)
        same = _copy(_layers(rg), _layers(ours.generator))
        (a_crop, a_small), (b_crop, b_small) = rg(z, crop_idx=96), ours.generator(z, crop_start=96)
        g_diff = max(float((a_crop - b_crop).abs().max()), float((a_small - b_small).abs().max()))
        x = torch.rand(1, 1, 32, 256, 256) * 2 - 1
        e_same = _copy(_layers(re), _layers(ours.encoder))
        fa, fb = re(x), ours.encoder(x)
        e_diff = float((fa - fb).abs().max())
        gh_diff = float((rg(fa, crop_idx=None) - ours.generator.high_res(fb)).abs().max())
        s_same = _copy(_layers(rs), _layers(ours.sub_encoder))
        h = torch.randn(1, 64, 64, 64, 64)
        s_diff = float((rs(h) - ours.sub_encoder(h)).abs().max())
        rl, ol = _layers(rd), _layers(ours.discriminator)
        d_same = _copy(rl, ol)
        for a, b in zip(rl, ol):  # both spectral norms at the exact largest singular value
            u, _, vh = torch.linalg.svd(a.weight.flatten(1), full_matrices=False)
            a.u0.copy_(u[:, 0][None])
            sn = b.parametrizations.weight[0]
            sn._u.copy_(u[:, 0])
            sn._v.copy_(vh[0])
        rd.eval(), ours.discriminator.eval()
        crop, small = torch.rand(2, 1, 32, 256, 256) * 2 - 1, torch.rand(2, 1, 64, 64, 64) * 2 - 1
        d_diff = float((rd(crop, small, 96) - ours.discriminator(crop, small, 96 / 224)).abs().max())
    for name, r, o, ok, diff in (("generator", rg, ours.generator, same, {"max_abs_diff": g_diff, "g_high_of_e_diff": gh_diff}),
                                 ("discriminator", rd, ours.discriminator, d_same, {"max_abs_diff": d_diff}),
                                 ("encoder", re, ours.encoder, e_same, {"max_abs_diff": e_diff}),
                                 ("sub_encoder", rs, ours.sub_encoder, s_same, {"max_abs_diff": s_diff})):
        print(json.dumps({"network": name, "release_params": count(r), "lad_params": count(o), "shapes_match": bool(ok), **diff}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""HA-GAN baseline (``lad.models.hagan``, ``lad train hagan``, ``lad sample`` on an HA-GAN run): the release's layout
at its 256^3 shapes (parameter counts of Model_HA_GAN_256.py), shapes at every preset, each loss falls on a fixed
batch, resume is bit-exact, save/load round trips, and the sample folder is read by ``lad evaluate``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lad.models.hagan import (HAGANDiscriminator, HAGANEncoder, HAGANGenerator, HAGANSubEncoder, down_layout,
                              trunk_layout)
from lad.training.hagan_config import resolve_hagan_config
from lad.training.hagan_trainer import (build_hagan, discriminator_loss, encode_volume, encoder_loss, generator_loss,
                                        low_resolution, sub_encoder_loss, to_model_space, to_unit, train_hagan)


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_layout_rules_reproduce_the_release():
    # 256^3: trunk 4^3 -> 64^3 with four x2 levels; 32 x 256 x 256 (native): depth starts at 1, skips the first doubling
    assert trunk_layout((64, 64, 64), 4) == ((4, 4, 4), [(2, 2, 2)] * 4)
    assert trunk_layout((8, 64, 64), 4) == ((1, 4, 4), [(1, 2, 2)] + [(2, 2, 2)] * 3)
    # the release's D^H on a 32 x 256 x 256 sub-volume: depth kernels 4, 4, 4, 2, 2, 1 (conv4..conv6: (2,4,4), (2,4,4),
    # (1,4,4)), in-plane 4 throughout; 1 x 4 x 4 left for conv7
    layout, rest = down_layout((32, 256, 256), 6)
    assert [k for k, _, _ in layout] == [(4, 4, 4)] * 3 + [(2, 4, 4), (2, 4, 4), (1, 4, 4)]
    assert [s for _, s, _ in layout] == [(2, 2, 2)] * 5 + [(1, 2, 2)] and rest == (1, 4, 4)
    assert down_layout((64, 64, 64), 4)[1] == (4, 4, 4)


def test_paper_preset_is_the_release_model_with_its_shapes():
    """Parameter counts of the release's Generator / Discriminator / Encoder / Sub_Encoder (Model_HA_GAN_256.py,
    counted from the release's classes), and the shapes of every part at 256^3, on meta tensors."""
    cfg = resolve_hagan_config("paper-abdomenct1k")
    with torch.device("meta"):
        p = build_hagan(cfg, (32, 256, 256))
        g, d, e, se = p.generator, p.discriminator, p.encoder, p.sub_encoder
        assert [_count(m) for m in (g, d, e, se)] == [52_518_210, 7_402_258, 161_152, 19_663_264]
        z = torch.empty(2, 1024)
        crop, small = g(z, crop_start=224)
        assert crop.shape == (2, 1, 32, 256, 256) and small.shape == (2, 1, 64, 64, 64)
        assert g(z).shape == (2, 1, 256, 256, 256)
        assert d(crop, small, 1.0).shape == (2, 1)
        feats = e(crop)
        assert feats.shape == (2, 64, 8, 64, 64)
        whole = torch.empty(2, 1, 256, 256, 256)
        assert encode_volume(e, whole, 32).shape == (2, 64, 64, 64, 64)
        assert se(encode_volume(e, whole, 32)).shape == (2, 1024)
        assert g.high_res(feats).shape == crop.shape


@pytest.mark.parametrize("preset,data_shape,low,crop_depth", [
    ("paper-native", (32, 256, 256), (8, 64, 64), 8),
    ("demo", (16, 64, 64), (4, 16, 16), 8),
    ("tiny", (8, 32, 32), (2, 8, 8), 4),
])
def test_shapes_at_each_preset(preset, data_shape, low, crop_depth):
    cfg = resolve_hagan_config(preset)
    dev = torch.device("meta" if preset.startswith("paper") else "cpu")  # the paper's sizes: shapes only
    with dev:
        p = build_hagan(cfg, data_shape)
    g, d, e, se = p.generator, p.discriminator, p.encoder, p.sub_encoder
    assert g.low_shape == low and g.crop_depth == crop_depth and g.low_res_factor == 4
    z = torch.zeros(2, cfg.hagan.latent_dim, device=dev)
    s = data_shape[0] - crop_depth
    crop, small = g(z, crop_start=s)
    assert crop.shape == (2, 1, crop_depth, *data_shape[1:]) and small.shape == (2, 1, *low)
    assert g(z).shape == (2, 1, *data_shape)
    assert d(crop, small, torch.ones(2, device=dev)).shape == (2, 1)
    assert e(crop).shape == (2, cfg.hagan.trunk_channels[-1], crop_depth // 4, *low[1:])
    x = torch.zeros(2, 1, *data_shape, device=dev)
    assert se(encode_volume(e, x, crop_depth)).shape == (2, cfg.hagan.latent_dim)
    if dev.type == "cpu":
        assert crop.abs().max() <= 1 and small.abs().max() <= 1  # tanh outputs


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="crop_depth 6 must be a multiple"):
        HAGANGenerator(image_shape=(8, 32, 32), crop_depth=6, trunk_channels=(8, 8), high_channels=(8,), low_channels=(8,))
    with pytest.raises(ValueError, match="divisible by the low-resolution factor 4"):
        HAGANGenerator(image_shape=(8, 30, 32), crop_depth=4, trunk_channels=(8, 8), high_channels=(8,), low_channels=(8,))
    with pytest.raises(ValueError, match="not divisible by norm_num_groups=8"):
        HAGANEncoder(channels=(4, 8))
    g = HAGANGenerator(image_shape=(8, 32, 32), crop_depth=4, trunk_channels=(8, 8), high_channels=(8,), low_channels=(8,))
    with pytest.raises(ValueError, match="crop_start 2 must be a multiple of 4"):
        g(torch.zeros(1, 1024), crop_start=2)
    with pytest.raises(ValueError, match="encoder_channels must end with"):
        resolve_hagan_config("tiny", ["hagan.encoder_channels=[8, 8]"])
    with pytest.raises(ValueError, match="unknown"):
        resolve_hagan_config("tiny", ["hagan.nope=1"])


def test_low_resolution_and_value_mapping():
    x = torch.arange(4 * 8 * 8, dtype=torch.float32).reshape(1, 1, 4, 8, 8)
    near, area = low_resolution(x, 4, "nearest"), low_resolution(x, 4, "area")
    assert near.shape == area.shape == (1, 1, 1, 2, 2)
    assert near.flatten().tolist() == [0.0, 4.0, 32.0, 36.0]  # the voxel at index 4 i, as F.interpolate(scale 1/4)
    assert torch.equal(near, torch.nn.functional.interpolate(x, scale_factor=0.25))
    assert area[0, 0, 0, 0, 0] == x[0, 0, :4, :4, :4].mean()
    u = torch.rand(2, 1, 8, 4, 4)
    assert torch.allclose(to_unit(to_model_space(u, (8, 4, 4))), u, atol=1e-6)
    up = to_model_space(u, (16, 4, 4))  # the Lad paper's depth resize, and back (area: pairs of slices averaged)
    assert up.shape == (2, 1, 16, 4, 4) and to_unit(up, (8, 4, 4)).shape == u.shape
    ramp = torch.linspace(0, 1, 8).view(1, 1, 8, 1, 1).expand(1, 1, 8, 4, 4)
    back = to_unit(to_model_space(ramp, (16, 4, 4)), (8, 4, 4))  # a linear ramp is recovered inside (edges clamp)
    assert torch.allclose(back[:, :, 1:-1], ramp[:, :, 1:-1], atol=1e-6)


def _tiny_parts():
    torch.manual_seed(0)
    return build_hagan(resolve_hagan_config("tiny"), (8, 32, 32))


def _fixed_batch():
    """Two volumes in [-1, 1]: air (-1) around a soft-tissue ellipse (0.3) with a bright blob, slightly noisy."""
    zz, yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(32.0), torch.arange(32.0), indexing="ij")
    vols = []
    for k in range(2):
        body = ((yy - 16) / (12 - k)) ** 2 + ((xx - 16) / 14) ** 2 < 1
        blob = ((zz - 4) / 3) ** 2 + ((yy - 12 - 6 * k) / 4) ** 2 + ((xx - 18) / 4) ** 2 < 1
        vols.append(torch.where(blob, 0.8, torch.where(body, 0.3, -1.0)))
    x = torch.stack(vols)[:, None] + 0.02 * torch.randn(2, 1, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    return x, x[:, :, 4:8], low_resolution(x, 4)


def test_each_loss_falls_on_a_fixed_batch():
    p = _tiny_parts()
    g, d, e, se = p.generator, p.discriminator, p.encoder, p.sub_encoder
    x, crop, small = _fixed_batch()
    z = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fake_crop, fake_small = g(z, 4)

    def fit(params, loss_fn, lr, n=10):
        opt = torch.optim.Adam(params, lr=lr, betas=(0.0, 0.999))
        losses = []
        for _ in range(n):
            loss = loss_fn()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    ld = fit(d.parameters(), lambda: discriminator_loss(d, crop, small, fake_crop, fake_small, 1.0)[0], 4e-3)
    assert ld[-1] < 0.8 * ld[0], ld
    lg = fit(g.parameters(), lambda: generator_loss(d, *g(z, 4), 1.0), 2e-3)  # against the (now fixed) D
    assert lg[-1] < 0.8 * lg[0], lg
    le = fit(e.parameters(), lambda: encoder_loss(g, e, crop), 3e-3)
    assert le[-1] < 0.8 * le[0], le
    ls = fit(se.parameters(), lambda: sub_encoder_loss(g, e, se, x, small, crop, 4), 3e-3)
    assert min(ls[-3:]) < 0.9 * ls[0], ls  # E^G through a random G: a slower fall


def test_save_load_round_trip(tmp_path):
    p = _tiny_parts()
    x, crop, small = _fixed_batch()
    z = torch.randn(2, 32)
    inputs = {"generator": (z,), "discriminator": (crop, small, 0.5), "encoder": (crop,),
              "sub_encoder": (encode_volume(p.encoder, x, 4).detach(),)}
    classes = {"generator": HAGANGenerator, "discriminator": HAGANDiscriminator, "encoder": HAGANEncoder,
               "sub_encoder": HAGANSubEncoder}
    for name, mod in p.modules().items():
        mod.eval().save_pretrained(tmp_path / name)
        back = classes[name].from_pretrained(tmp_path / name).eval()
        a, b = mod.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        with torch.no_grad():
            assert torch.equal(mod(*inputs[name]), back(*inputs[name])), name
        assert json.loads((tmp_path / name / "config.json").read_text(encoding="utf-8"))["_class"] == classes[name].__name__
    with pytest.raises(ValueError, match="holds a HAGANGenerator, not a HAGANEncoder"):
        HAGANEncoder.from_pretrained(tmp_path / "generator")


def _cfg(*sets):
    return resolve_hagan_config("tiny", ["hagan_train.steps=5", "logging.checkpoint_every=2", "logging.keep_last=1", *sets])


def test_resume_equals_uninterrupted(handmade_prepared, tmp_path):
    cfg = _cfg()
    train_hagan(handmade_prepared, tmp_path / "a", cfg, progress_bar=False)
    train_hagan(handmade_prepared, tmp_path / "b", cfg, stop_after=3, progress_bar=False)  # killed after step 3
    assert not (tmp_path / "b" / "hagan").exists()
    assert [p.name for p in (tmp_path / "b" / "checkpoints" / "hagan").iterdir() if p.name.startswith("step")] == ["step_0000002"]
    train_hagan(handmade_prepared, tmp_path / "b", cfg, resume=True, progress_bar=False)
    for part in ("generator", "discriminator", "encoder", "sub_encoder"):
        a = load_file(str(tmp_path / "a" / "hagan" / part / "model.safetensors"))
        b = load_file(str(tmp_path / "b" / "hagan" / part / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part  # incl. spectral-norm vectors
    for opt in ("opt_g", "opt_d", "opt_e", "opt_sub_e"):
        oa = torch.load(tmp_path / "a" / "checkpoints" / "hagan" / "step_0000005" / f"{opt}.pt", weights_only=True)
        ob = torch.load(tmp_path / "b" / "checkpoints" / "hagan" / "step_0000005" / f"{opt}.pt", weights_only=True)
        assert oa["state"] and all(torch.equal(oa["state"][k]["exp_avg"], ob["state"][k]["exp_avg"]) for k in oa["state"])
    logs = [json.loads(line) for line in (tmp_path / "a" / "logs" / "hagan.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in logs] == [2, 4, 5] and all({"d", "g", "e", "sub_e", "d_real", "d_fake"} <= set(r) for r in logs)
    data = json.loads((tmp_path / "a" / "hagan" / "data.json").read_text(encoding="utf-8"))
    assert data["image_shape"] == [8, 32, 32] and data["model_shape"] == [8, 32, 32] and data["trained_steps"] == 5
    # resuming with a changed recipe is refused, naming the key
    with pytest.raises(ValueError, match="hagan_train.lr_d"):
        train_hagan(handmade_prepared, tmp_path / "b", _cfg("hagan_train.lr_d=1e-3"), resume=True, progress_bar=False)


def test_refusals_leave_folders_untouched(handmade_prepared, tmp_path):
    lad_run = tmp_path / "lad"
    (lad_run / "vqgan").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="holds a Lad model"):
        train_hagan(handmade_prepared, lad_run, _cfg(), progress_bar=False)
    assert [p.name for p in lad_run.iterdir()] == ["vqgan"]
    with pytest.raises(ValueError, match="crop_depth 3 must be a multiple"):
        train_hagan(handmade_prepared, tmp_path / "new", _cfg("hagan.crop_depth=3"), progress_bar=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "old" / "hagan").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--resume to continue or --overwrite"):
        train_hagan(handmade_prepared, tmp_path / "old", _cfg(), progress_bar=False)


def test_nan_guard_skips_then_stops_without_checkpoint(handmade_prepared, tmp_path, monkeypatch):
    from lad.training import hagan_trainer

    real, calls = hagan_trainer.generator_loss, {"n": 0}

    def flaky(*a, **k):  # G's loss is NaN at (0-based) step 1, then from step 3 on
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 2 or calls["n"] >= 4 else loss

    monkeypatch.setattr(hagan_trainer, "generator_loss", flaky)
    cfg = _cfg("hagan_train.steps=10", "logging.checkpoint_every=3", "logging.max_nonfinite_steps=3")
    with pytest.raises(RuntimeError, match="3 consecutive non-finite losses at step 5"):
        train_hagan(handmade_prepared, tmp_path / "r", cfg, progress_bar=False)
    # the checkpoint after 3 steps was written (step 1 was a single skip); none from the failing run that followed
    assert [p.name for p in (tmp_path / "r" / "checkpoints" / "hagan").iterdir()] == ["step_0000003"]
    assert not (tmp_path / "r" / "hagan").exists()


@pytest.fixture(scope="module")
def hagan_run(tiny_prepared, tmp_path_factory):
    """HA-GAN (tiny preset) trained on the phantom tiny dataset, the model's depth twice the windows' (the Lad paper's
    depth resize, scaled down: 8 -> 16 slices for training, back to 8 in the samples)."""
    run = tmp_path_factory.mktemp("hagan") / "run"
    train_hagan(tiny_prepared, run, resolve_hagan_config("tiny", ["hagan.image_shape=[16, 32, 32]", "hagan_train.steps=2"]),
                progress_bar=False)
    return run


def test_sample_folder_is_read_by_evaluate(hagan_run, tiny_prepared, tmp_path):
    from lad.data.dataset import PreparedDataset
    from lad.evaluation.evaluate import evaluate, load_synthetic
    from lad.sampling.generate import SampleSettings, generate_samples
    from lad.sampling.writer import finished_samples

    assert json.loads((hagan_run / "hagan" / "data.json").read_text(encoding="utf-8"))["model_shape"] == [16, 32, 32]
    out = generate_samples(hagan_run, tiny_prepared, tmp_path / "s", SampleSettings(n=3, augment="none"))
    assert out["written"] == 3
    vols, masks = load_synthetic(tmp_path / "s")
    ds = PreparedDataset(tiny_prepared)
    assert [v.shape for v in vols] == [(1, 8, 32, 32)] * 3 and all(0 <= v.min() and v.max() <= 1 for v in vols)
    for j, m in enumerate(masks):  # unconditional: the drawn source mask j % len(masks) written beside the sample
        assert np.array_equal(m, ds[j % len(ds)]["mask"][0])
    recs = [r for r, _ in finished_samples(tmp_path / "s", keys=("ct", "mask"))]
    assert [r["sampler"] for r in recs] == ["hagan"] * 3 and recs[0]["guidance"] is None and recs[0]["steps"] is None
    # a sample depends on its seed only: the same volumes in batches of 2, different volumes for different seeds
    generate_samples(hagan_run, tiny_prepared, tmp_path / "b2", SampleSettings(n=3, augment="none"), batch_size=2)
    assert all(np.array_equal(a, b) for a, b in zip(vols, load_synthetic(tmp_path / "b2")[0]))
    assert not np.array_equal(vols[0], vols[1])
    with pytest.raises(ValueError, match="has no --guidance"):
        generate_samples(hagan_run, tiny_prepared, tmp_path / "g", SampleSettings(n=1, guidance=1.0))
    evaluate(tiny_prepared, {"HA-GAN": tmp_path / "s"}, tmp_path / "rep", n_pairs=2)
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text(encoding="utf-8"))
    e = m["sets"]["HA-GAN"]
    assert e["n"] == 3 and e["fid"] >= 0 and 0 < e["ms_ssim"] <= 1 and "vqgan_reconstruction" not in e
    assert "HA-GAN" in (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")


def test_cli_train_hagan(handmade_prepared, tmp_path):
    from lad.cli import main

    extra = tmp_path / "extra.yaml"
    extra.write_text("hagan_train: {steps: 3, lr_d: 2.0e-4}\nseed: 1\n", encoding="utf-8")
    rc = main(["train", "hagan", "--data", str(handmade_prepared), "--run", str(tmp_path / "r"), "--preset", "tiny",
               "--config", str(extra), "--seed", "5", "--set", "hagan_train.steps=1", "--no-progress"])
    assert rc == 0 and (tmp_path / "r" / "hagan" / "generator" / "model.safetensors").exists()
    saved = resolve_hagan_config("tiny", config=tmp_path / "r" / "hagan.yaml")  # preset < --config < --seed < --set
    assert (saved.hagan.crop_depth, saved.hagan_train.steps, saved.hagan_train.lr_d, saved.seed) == (4, 1, 2.0e-4, 5)
    assert main(["train", "hagan", "--data", str(handmade_prepared), "--run", str(tmp_path / "r"), "--preset", "nope"]) != 0

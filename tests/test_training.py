"""Trainers: configs and variants, loss goes down, resume equals uninterrupted, caches, guards, errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lad.config import ConfigError
from lad.training.config import resolve_train_config
from lad.training.diffusion_trainer import train_diffusion
from lad.training.vqgan_trainer import train_vqgan


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_presets_overrides_and_variants():
    for name in ("tiny", "demo", "paper-abdomenct1k", "paper-totalsegmentator"):
        cfg = resolve_train_config(name)
        assert cfg.variant == "full" and cfg.vqgan_train.locality_weight > 0
    paper = resolve_train_config("paper-abdomenct1k")
    assert paper.vqgan_train.lr == 3e-4 and paper.diffusion_train.timesteps == 300 and paper.diffusion_train.batch_size == 20
    assert paper.vqgan.num_embeddings == 16384 and paper.diffusion_train.p_uncond == 0.25
    v0 = resolve_train_config("tiny", variant="V0")
    assert v0.vqgan_train.locality_weight == 0 and not v0.conditional
    v1, v2 = resolve_train_config("tiny", variant="V1"), resolve_train_config("tiny", variant="V2")
    assert (v1.condition.use_content, v1.condition.use_structure) == (True, False)
    assert (v2.condition.use_content, v2.condition.use_structure) == (False, True)
    assert resolve_train_config("tiny", ["vqgan_train.steps=7"]).vqgan_train.steps == 7
    with pytest.raises(ConfigError, match="unknown key"):
        resolve_train_config("tiny", ["vqgan_train.stepz=7"])
    with pytest.raises(ConfigError, match="unknown train preset"):
        resolve_train_config("huge")


def test_vqgan_resume_equals_uninterrupted(tiny_prepared, tmp_path):
    cfg = resolve_train_config("tiny")
    train_vqgan(tiny_prepared, tmp_path / "a", cfg)
    # killed after 6 steps (last checkpoint at step 4), then resumed to the end
    train_vqgan(tiny_prepared, tmp_path / "b", cfg, stop_after=6)
    assert not (tmp_path / "b" / "vqgan").exists()
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints" / "vqgan").iterdir() if p.name.startswith("step_")) == ["step_0000004"]
    train_vqgan(tiny_prepared, tmp_path / "b", cfg, resume=True)
    assert _equal(_weights(tmp_path / "a" / "vqgan"), _weights(tmp_path / "b" / "vqgan"))
    # the discriminators passed disc_start (6) in both runs
    assert (tmp_path / "a" / "tensorboard" / "vqgan").exists()


def test_diffusion_resume_equals_uninterrupted_and_cache_reuse(tiny_prepared, tiny_run, tmp_path):
    import shutil

    cfg = resolve_train_config("tiny")
    run = tmp_path / "r"
    run.mkdir()
    shutil.copytree(tiny_run / "vqgan", run / "vqgan")
    train_diffusion(tiny_prepared, run, cfg, stop_after=5)
    meta = (run / "latent_cache" / "meta.json").stat().st_mtime_ns
    train_diffusion(tiny_prepared, run, cfg, resume=True)
    assert (run / "latent_cache" / "meta.json").stat().st_mtime_ns == meta  # cache reused
    for part in ("denoiser", "denoiser_ema", "condition"):
        assert _equal(_weights(tiny_run / part), _weights(run / part)), part
    # a changed VQ-GAN invalidates the cache
    w = _weights(run / "vqgan")
    w = {k: (v + 1e-3 if v.is_floating_point() else v) for k, v in w.items()}
    from safetensors.torch import save_file

    save_file(w, str(run / "vqgan" / "model.safetensors"))
    train_diffusion(tiny_prepared, run, dataclasses.replace(cfg, diffusion_train=dataclasses.replace(cfg.diffusion_train, steps=1)), overwrite=True)
    assert (run / "latent_cache" / "meta.json").stat().st_mtime_ns != meta


def test_run_folder_contents(tiny_run):
    for name in ("config.yaml", "vqgan", "denoiser", "denoiser_ema", "condition", "condition_raw", "scheduler",
                 "latent_stats.json", "vqgan_reconstruction.json", "tensorboard", "checkpoints"):
        assert (tiny_run / name).exists(), name
    stats = json.loads((tiny_run / "latent_stats.json").read_text())
    assert stats["latent_shape"] == [8, 2, 8, 8] and stats["image_shape"] == [8, 32, 32] and len(stats["scale"]) == 8
    assert "pancreas" in stats["fingerprint"]["hu_percentiles_per_organ"]


@pytest.mark.parametrize("variant", ["V0", "V1", "V2", "V3", "full"])
def test_each_variant_reduces_its_losses(tiny_prepared, variant):
    from lad.data.dataset import PreparedDataset
    from lad.models.guidance import diffusion_loss
    from lad.schedulers import DDPMScheduler
    from lad.training.common import gather_batch
    from lad.training.diffusion_trainer import build_diffusion_models
    from lad.training.losses import VQGANLoss
    from lad.training.vqgan_trainer import build_vqgan

    torch.manual_seed(0)
    cfg = resolve_train_config("tiny", variant=variant)
    ds = PreparedDataset(tiny_prepared)
    batch = gather_batch(ds, [0, 1], torch.device("cpu"))
    vq = build_vqgan(cfg)
    crit = VQGANLoss(locality_weight=cfg.vqgan_train.locality_weight, disc_start=10**9)
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    first = last = None
    for _ in range(15):
        loss, logs = crit.generator_loss(batch["image"], vq(batch["image"]), batch["mask"], 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
        last = loss.item()
    assert last < 0.7 * first
    assert ("locality" in logs) == (variant == "full")
    net = build_diffusion_models(cfg, (8, 2, 8, 8), 8)
    assert ("condition" in net) == (variant != "V0")
    sched = DDPMScheduler(num_train_timesteps=50)
    z0 = torch.randn(2, 8, 2, 8, 8)
    cond = None
    if "condition" in net:
        c = cfg.condition
        cond_in = (torch.randn(2, 8, 2, 8, 8) if c.use_content else None, torch.rand(2, 48) if c.use_structure else None)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for i in range(20):
        cond = net["condition"](*cond_in) if "condition" in net else None
        loss, _ = diffusion_loss(net["denoiser"], sched, z0, cond, generator=torch.Generator().manual_seed(i % 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-2:]) < 0.85 * sum(losses[:2])


def test_errors_leave_files_untouched(tiny_prepared, tiny_run, tmp_path):
    cfg = resolve_train_config("tiny")
    before = _weights(tiny_run / "vqgan")
    with pytest.raises(FileExistsError, match="--resume"):
        train_vqgan(tiny_prepared, tiny_run, cfg)
    assert _equal(before, _weights(tiny_run / "vqgan"))
    with pytest.raises(ValueError, match="not a prepared dataset"):
        train_vqgan(tmp_path, tmp_path / "x", cfg)
    with pytest.raises(FileNotFoundError, match="no trained VQ-GAN"):
        train_diffusion(tiny_prepared, tmp_path / "empty", cfg)
    other = resolve_train_config("tiny", ["vqgan.embedding_dim=4"])
    with pytest.raises(ValueError, match="does not match the diffusion config"):
        train_diffusion(tiny_prepared, tiny_run, other, overwrite=True)
    assert (tiny_run / "denoiser_ema").exists()


def test_nan_guard_skips_then_stops_without_checkpoint(tiny_prepared, tmp_path, monkeypatch):
    from lad.training import losses

    real = losses.VQGANLoss.generator_loss
    calls = {"n": 0}

    def flaky(self, *a, **k):
        loss, logs = real(self, *a, **k)
        calls["n"] += 1
        return (loss * float("nan"), logs) if calls["n"] in (2,) or calls["n"] > 5 else (loss, logs)

    monkeypatch.setattr(losses.VQGANLoss, "generator_loss", flaky)
    cfg = resolve_train_config("tiny", ["logging.checkpoint_every=100", "logging.max_nonfinite_steps=3"])
    with pytest.raises(RuntimeError, match="3 consecutive non-finite losses"):
        train_vqgan(tiny_prepared, tmp_path / "r", cfg)
    assert not (tmp_path / "r" / "checkpoints" / "vqgan").exists() and not (tmp_path / "r" / "vqgan").exists()


def test_cli_train_help_and_bad_input(tmp_path):
    for args in (["train", "--help"], ["train", "vqgan", "--help"], ["train", "diffusion", "--help"]):
        r = subprocess.run([sys.executable, "-m", "lad", *args], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: lad train" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lad", "train", "vqgan", "--data", str(tmp_path), "--run", str(tmp_path / "r"),
                        "--preset", "tiny"], capture_output=True, text=True)
    assert r.returncode == 2 and "not a prepared dataset" in r.stderr

"""``train_diffusion`` on the hand-written tiny dataset: bit-exact resume, the latent cache (oracle,
reuse, invalidation), latent scaling, loss reduction per conditioning variant, errors, the NaN guard,
the run folder of docs/contracts.md, and the CLI end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lad.training.config import resolve_train_config
from lad.training.diffusion_trainer import build_diffusion_models, train_diffusion


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _with_vqgan(handmade_run, run):
    run.mkdir(parents=True)
    shutil.copytree(handmade_run / "vqgan", run / "vqgan")
    return run


def _tree(folder):
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_equals_uninterrupted_and_cache(handmade_prepared, handmade_run, tmp_path):
    from lad.data.dataset import PreparedDataset
    from lad.models.condition import encode_mask
    from lad.models.vqgan import VQGAN
    from lad.topology import betti_vectors

    cfg = resolve_train_config("tiny", ["diffusion_train.steps=4", "logging.checkpoint_every=2", "logging.image_every=0"])
    a, b = _with_vqgan(handmade_run, tmp_path / "a"), _with_vqgan(handmade_run, tmp_path / "b")
    train_diffusion(handmade_prepared, a, cfg)
    train_diffusion(handmade_prepared, b, cfg, stop_after=3)  # killed after 3 steps; last checkpoint at step 2
    assert not (b / "denoiser_ema").exists()
    meta = (b / "latent_cache" / "meta.json").stat().st_mtime_ns
    train_diffusion(handmade_prepared, b, cfg, resume=True)
    assert (b / "latent_cache" / "meta.json").stat().st_mtime_ns == meta  # cache reused, not recomputed
    for part in ("denoiser", "denoiser_ema", "condition", "condition_raw"):
        assert _equal(_weights(a / part), _weights(b / part)), part
    ema, raw = _weights(a / "denoiser_ema"), _weights(a / "denoiser")
    assert not all(torch.equal(ema[k], raw[k]) for k in raw)  # EMA is not the raw weights

    # the cache holds exactly what the frozen encoder gives (oracle) ...
    cache = load_file(str(a / "latent_cache" / "latents.safetensors"))
    ds = PreparedDataset(handmade_prepared)
    vq = VQGAN.from_pretrained(a / "vqgan").eval()
    item = ds[3]
    with torch.no_grad():
        z = vq.encode(torch.from_numpy(item["image"])[None])
        mz = encode_mask(vq, torch.from_numpy(item["mask"])[None])
    assert cache["z"].shape == (6, 8, 2, 8, 8) and torch.allclose(cache["z"][3], z[0], atol=1e-5)
    assert torch.allclose(cache["mask_z"][3], mz[0], atol=1e-5)
    assert torch.equal(cache["betti"][3], torch.from_numpy(betti_vectors(item["mask"][None, 0]))[0])
    # ... and the scaling is the per-channel mean/std of the training latents
    stats = json.loads((a / "latent_stats.json").read_text())
    zc = cache["z"].transpose(0, 1).reshape(8, -1).double()
    assert np.allclose(stats["shift"], zc.mean(1).numpy()) and np.allclose(stats["scale"], zc.std(1).numpy())
    assert stats["latent_shape"] == [8, 2, 8, 8] and stats["image_shape"] == [8, 32, 32]

    # changed VQ-GAN weights invalidate the cache
    w = {k: (v + 1e-2 if v.is_floating_point() else v) for k, v in _weights(b / "vqgan").items()}
    save_file(w, str(b / "vqgan" / "model.safetensors"))
    train_diffusion(handmade_prepared, b, resolve_train_config("tiny", ["diffusion_train.steps=1", "logging.image_every=0"]),
                    overwrite=True)
    new = load_file(str(b / "latent_cache" / "latents.safetensors"))
    assert not torch.allclose(new["z"], cache["z"])
    assert json.loads((b / "latent_cache" / "meta.json").read_text())["vqgan"] != json.loads((a / "latent_cache" / "meta.json").read_text())["vqgan"]


@pytest.mark.parametrize("variant", ["V0", "V1", "V2", "V3"])  # full conditions the diffusion model as V3 does
def test_variant_reduces_diffusion_loss_on_fixed_batch(handmade_run, variant):
    from lad.models.guidance import diffusion_loss
    from lad.schedulers import DDPMScheduler
    from lad.training.diffusion_trainer import _conditions, build_diffusion_models

    cfg = resolve_train_config("tiny", variant=variant)
    cache = load_file(str(handmade_run / "latent_cache" / "latents.safetensors"))
    stats = json.loads((handmade_run / "latent_stats.json").read_text())
    batch = {k: v[:2] for k, v in cache.items()}
    z0 = (batch["z"] - torch.tensor(stats["shift"]).view(1, -1, 1, 1, 1)) / torch.tensor(stats["scale"]).view(1, -1, 1, 1, 1)
    torch.manual_seed(0)
    net = build_diffusion_models(cfg, (8, 2, 8, 8), 8)
    assert ("condition" in net) == (variant != "V0")
    if "condition" in net:
        assert net["condition"].use_content == cfg.condition.use_content and net["condition"].use_structure == cfg.condition.use_structure
    sched = DDPMScheduler(num_train_timesteps=cfg.diffusion_train.timesteps)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(10):
        loss, _ = diffusion_loss(net["denoiser"], sched, z0, _conditions(net, batch), generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_mismatched_vqgan_and_missing_vqgan(handmade_prepared, handmade_run, tmp_path):
    before = _tree(handmade_run)
    with pytest.raises(ValueError, match=r"latent shape \(8, 2, 8, 8\).*does not match the diffusion config's latent shape \(4, 2, 8, 8\)"):
        train_diffusion(handmade_prepared, handmade_run, resolve_train_config("tiny", ["vqgan.embedding_dim=4"]), overwrite=True)
    with pytest.raises(ValueError, match=r"does not match the diffusion config's latent shape \(8, 4, 8, 8\)"):
        train_diffusion(handmade_prepared, handmade_run, resolve_train_config("tiny", ["vqgan.downsample=[2, 4, 4]"]), overwrite=True)
    with pytest.raises(FileExistsError, match="--resume to continue or --overwrite"):
        train_diffusion(handmade_prepared, handmade_run, resolve_train_config("tiny"))
    assert _tree(handmade_run) == before  # nothing overwritten or deleted
    with pytest.raises(FileNotFoundError, match="no trained VQ-GAN"):
        train_diffusion(handmade_prepared, tmp_path / "empty", resolve_train_config("tiny"))
    assert not (tmp_path / "empty").exists()


def test_nan_guard_stops_without_checkpoint(handmade_prepared, handmade_run, tmp_path, monkeypatch):
    from lad.models import guidance

    real = guidance.diffusion_loss

    def nan_loss(*a, **k):
        loss, logs = real(*a, **k)
        return loss * float("inf"), logs

    monkeypatch.setattr(guidance, "diffusion_loss", nan_loss)
    run = _with_vqgan(handmade_run, tmp_path / "r")
    cfg = resolve_train_config("tiny", ["logging.checkpoint_every=1", "logging.max_nonfinite_steps=2"])
    with pytest.raises(RuntimeError, match="2 consecutive non-finite losses at step 1"):
        train_diffusion(handmade_prepared, run, cfg)
    assert not (run / "checkpoints" / "diffusion").exists() and not (run / "denoiser_ema").exists()


def test_run_folder_matches_contract(handmade_run, handmade_prepared):
    from lad.config import load_config
    from lad.models.condition import ConditionExtractor
    from lad.models.denoiser import LatentDenoiser
    from lad.models.vqgan import VQGAN
    from lad.schedulers import DDPMScheduler
    from lad.training.config import TrainConfig

    from conftest import HANDMADE_RUN_SETTINGS

    r = handmade_run
    assert load_config(TrainConfig, r / "config.yaml") == resolve_train_config("tiny", HANDMADE_RUN_SETTINGS)
    for part in ("vqgan", "condition", "denoiser", "denoiser_ema"):
        assert (r / part / "config.json").exists() and (r / part / "model.safetensors").exists(), part
    assert VQGAN.from_pretrained(r / "vqgan").latent_shape((8, 32, 32)) == (8, 2, 8, 8)
    den = LatentDenoiser.from_pretrained(r / "denoiser_ema")
    cond = ConditionExtractor.from_pretrained(r / "condition")
    assert den.config["cond_dim"] == cond.cond_dim > 0
    sched = DDPMScheduler.from_pretrained(r / "scheduler")
    assert sched.num_train_timesteps == 50  # the tiny preset's timesteps
    assert (r / "condition_raw" / "model.safetensors").exists() and (r / "vqgan_reconstruction.json").exists()
    stats = json.loads((r / "latent_stats.json").read_text())
    assert {"method", "shift", "scale", "latent_shape", "image_shape", "spacing"} <= set(stats) and len(stats["shift"]) == 8
    assert stats["spacing"] == [12.0, 12.0, 10.0] and stats["organ"] == "pancreas"
    assert stats["fingerprint"] == json.loads((handmade_prepared / "fingerprint.json").read_text(encoding="utf-8"))
    for part in ("vqgan", "diffusion"):
        steps = sorted(p.name for p in (r / "checkpoints" / part).iterdir())
        assert steps == ["best", "step_0000004"], steps
        state = torch.load(r / "checkpoints" / part / "step_0000004" / "trainer_state.pt", weights_only=True)
        assert state["step"] == 4 and {"torch", "numpy", "python"} <= set(state["rng"]) and state["data"]["num_windows"] == 6
        assert list((r / "tensorboard" / part).glob("events.out.tfevents.*")), part
        rows = [json.loads(line) for line in (r / "logs" / f"{part}.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == 4 and rows[-1]["skipped_steps"] == 0 and 0 <= rows[-1]["data_share"] <= 1
    assert {"l1", "commitment", "locality", "perplexity", "codebook_usage", "lr", "samples_per_s"} <= set(rows and
        json.loads((r / "logs" / "vqgan.jsonl").read_text().splitlines()[-1]))


def test_cli_end_to_end(handmade_prepared, tmp_path):
    run = tmp_path / "run"
    base = ["--data", str(handmade_prepared), "--run", str(run), "--preset", "tiny", "--no-progress", "--variant", "V2"]
    cmd = [sys.executable, "-m", "lad", "train"]
    r = subprocess.run(cmd + ["vqgan", *base, "--set", "vqgan_train.steps=2"], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cmd + ["diffusion", *base, "--set", "vqgan_train.steps=2", "--set", "diffusion_train.steps=2"],
                       capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 0, r.stderr
    assert (run / "denoiser_ema" / "model.safetensors").exists() and (run / "condition" / "model.safetensors").exists()
    assert "mask_z" not in load_file(str(run / "latent_cache" / "latents.safetensors"))  # V2: structure only
    r = subprocess.run(cmd + ["vqgan", *base, "--set", "vqgan_train.steps=2"], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cmd + ["vqgan", *base, "--set", "vqgan_train.stepz=2"], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 2 and "unknown key 'stepz'" in r.stderr
    r = subprocess.run(cmd + ["vqgan", "--data", str(tmp_path), "--run", str(tmp_path / "r"), "--preset", "tiny"], capture_output=True,
                       text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 2 and "not a prepared dataset" in r.stderr and "Traceback" not in r.stderr


def test_release_ema_schedule_and_beta_clip_resume(handmade_prepared, handmade_run, tmp_path):
    """diffusion_train.ema_every / ema_start (the release's: every 10 steps from step 2000, a copy before) and
    beta_max reach the trainer and the saved scheduler, and a resumed run continues the same EMA."""
    sets = ["diffusion_train.steps=6", "logging.checkpoint_every=2", "logging.image_every=0",
            "diffusion_train.ema_every=2", "diffusion_train.ema_start=2", "diffusion_train.beta_max=0.9999"]
    cfg = resolve_train_config("tiny", sets)
    a, b = _with_vqgan(handmade_run, tmp_path / "a"), _with_vqgan(handmade_run, tmp_path / "b")
    train_diffusion(handmade_prepared, a, cfg)
    train_diffusion(handmade_prepared, b, cfg, stop_after=3)
    train_diffusion(handmade_prepared, b, cfg, resume=True)
    assert _equal(_weights(a / "denoiser_ema"), _weights(b / "denoiser_ema"))
    ema, raw = _weights(a / "denoiser_ema"), _weights(a / "denoiser")
    assert not all(torch.equal(ema[k], raw[k]) for k in raw)  # averaged at steps 2 and 4
    assert json.loads((a / "scheduler" / "scheduler_config.json").read_text())["beta_max"] == 0.9999
    # before ema_start the EMA is a copy of the weights: with the last update (step 4 of 0..4) before the
    # start, the EMA weights are the final raw weights
    c = _with_vqgan(handmade_run, tmp_path / "c")
    late = [*sets[:3], "diffusion_train.steps=5", "diffusion_train.ema_every=2", "diffusion_train.ema_start=5"]
    train_diffusion(handmade_prepared, c, resolve_train_config("tiny", late))
    assert _equal(_weights(c / "denoiser_ema"), _weights(c / "denoiser"))


def test_concat_conditioning_trains_and_samples(handmade_prepared, handmade_run, tmp_path):
    """denoiser.conditioning=concat (the release's path) trains, saves and samples through the pipeline."""
    from lad.models.denoiser import LatentDenoiser
    from lad.sampling.pipeline import LadPipeline

    run = _with_vqgan(handmade_run, tmp_path / "r")
    cfg = resolve_train_config("tiny", ["diffusion_train.steps=2", "logging.image_every=0", "denoiser.conditioning=concat"])
    train_diffusion(handmade_prepared, run, cfg)
    den = LatentDenoiser.from_pretrained(run / "denoiser_ema")
    assert den.config["conditioning"] == "concat"
    pipe = LadPipeline.from_run(run, ema=False)  # the raw weights: two steps moved them off MONAI's zero init
    mask = torch.zeros((2, 1, *pipe.image_shape), dtype=torch.uint8)
    mask[1, 0, 2:6, 8:20, 8:20] = 1  # two different conditions
    assert pipe(mask, seeds=[0, 0], steps=2).shape == (2, 1, *pipe.image_shape)
    cond = pipe.conditions(mask)
    z = torch.randn(1, *pipe.latent_shape).expand(2, *pipe.latent_shape)
    with torch.no_grad():
        eps = pipe.denoiser(z, torch.tensor([10, 10]), cond)
    assert not torch.equal(cond[0], cond[1]) and not torch.equal(eps[0], eps[1])


def test_spatial_condition_trains_caches_and_samples(handmade_prepared, handmade_run, tmp_path):
    """condition.spatial=true (ours): the cache holds the mask's occupancy on the latent grid, the denoiser takes
    it as 2 extra input channels, and the pipeline builds the same map from the masks it samples for."""
    from lad.models.condition import spatial_condition
    from lad.models.denoiser import LatentDenoiser
    from lad.sampling.pipeline import LadPipeline

    run = _with_vqgan(handmade_run, tmp_path / "r")
    cfg = resolve_train_config("tiny", ["diffusion_train.steps=2", "logging.image_every=0", "condition.spatial=true"])
    train_diffusion(handmade_prepared, run, cfg)
    den = LatentDenoiser.from_pretrained(run / "denoiser_ema")
    assert den.config["spatial_channels"] == 2
    cache = load_file(str(run / "latent_cache" / "latents.safetensors"))
    assert cache["mask_lr"].shape == (cache["z"].shape[0], 2, *cache["z"].shape[2:])
    assert float(cache["mask_lr"].min()) >= 0.0 and float(cache["mask_lr"].max()) <= 1.0 and float(cache["mask_lr"].sum()) > 0
    pipe = LadPipeline.from_run(run, ema=False)
    mask = torch.zeros((2, 1, *pipe.image_shape), dtype=torch.uint8)
    mask[1, 0, :4, :8, :8] = 1  # 256 organ voxels
    spatial = pipe.spatial(mask)
    factors = tuple(s // l for s, l in zip(pipe.image_shape, pipe.latent_shape[1:]))
    assert torch.equal(spatial, spatial_condition(mask, factors))
    assert spatial.shape == (2, 2, *pipe.latent_shape[1:]) and float(spatial[0].sum()) == 0.0
    assert float(spatial[1, 0].sum()) * factors[0] * factors[1] * factors[2] == 4 * 8 * 8
    assert pipe(mask, seeds=[0, 0], steps=2).shape == (2, 1, *pipe.image_shape)
    # V0 has no condition: no spatial map either
    v0 = build_diffusion_models(resolve_train_config("tiny", ["condition.spatial=true"], variant="V0"), (8, 2, 4, 4), 8)
    assert v0["denoiser"].spatial_channels == 0


def test_a_dataset_object_trains_as_its_prepared_folder(handmade_prepared, handmade_run, tmp_path):
    """train_diffusion(Dataset, ...): the same denoiser, bit for bit, as from the folder (handmade_run); the latent
    cache is keyed by the items' content (reused by a second call); a Dataset without ``spacing`` is refused first."""
    from conftest import HANDMADE_RUN_SETTINGS, WindowsDataset

    cfg = resolve_train_config("tiny", HANDMADE_RUN_SETTINGS)
    run = _with_vqgan(handmade_run, tmp_path / "r")
    with pytest.raises(ValueError, match=r"<WindowsDataset>: the dataset object has no `spacing` attribute"):
        train_diffusion(WindowsDataset(handmade_prepared, spacing=False), run, cfg)
    assert sorted(p.name for p in run.iterdir()) == ["vqgan"]
    train_diffusion(WindowsDataset(handmade_prepared), run, cfg)
    for part in ("denoiser", "denoiser_ema", "condition"):
        assert _equal(_weights(handmade_run / part), _weights(run / part)), part
    stats, ref = (json.loads((d / "latent_stats.json").read_text(encoding="utf-8")) for d in (run, handmade_run))
    assert stats["spacing"] == ref["spacing"] and stats["shift"] == ref["shift"] and stats["fingerprint"] == {}
    meta = json.loads((run / "latent_cache" / "meta.json").read_text(encoding="utf-8"))
    assert "manifest" not in meta and len(meta["data"]) == 16
    mtime = (run / "latent_cache" / "meta.json").stat().st_mtime_ns
    train_diffusion(WindowsDataset(handmade_prepared), run, cfg, resume=True)  # nothing left to train: the cache is reused
    assert (run / "latent_cache" / "meta.json").stat().st_mtime_ns == mtime

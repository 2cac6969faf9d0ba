"""Resume checkpoints, RNG capture, data order, NaN guard, run-folder guards, configs, EMA (no training)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from lad.config import ConfigError, to_dict
from lad.training.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from lad.training.common import NonFiniteGuard, batch_indices, check_resume_config, check_run_part, data_state, validate_dataset
from lad.training.config import resolve_train_config
from lad.training.ema import ema_step, make_ema


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def _trained(seed):
    m = _model(seed)
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    m(torch.randn(5, 3)).square().mean().backward()
    opt.step()
    return m, opt


def test_checkpoint_round_trip_weights_only_and_keep_last(tmp_path):
    m, opt = _trained(0)
    ckpt = CheckpointManager(tmp_path / "ck", keep_last=2)
    for step, metric in ((2, 0.5), (4, 0.7), (6, 0.3), (8, float("nan"))):
        ckpt.save(step, {"m": m}, {"opt": opt}, {"rng": capture_rng_state(), "data": data_state(step, 2, 5, 7)}, metric=metric)
    assert ckpt.steps() == [6, 8]  # last two kept
    assert json.loads((tmp_path / "ck" / "best" / "state.json").read_text()) == {"step": 6, "metric": 0.3}
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]  # no temporary folders left
    # every file of a checkpoint loads with weights_only=True
    for f in (tmp_path / "ck" / "step_0000008").glob("*.pt"):
        torch.load(f, weights_only=True)
    m2 = _model(1)
    opt2 = torch.optim.Adam(m2.parameters(), 1e-2)
    state = ckpt.load_latest({"m": m2}, {"opt": opt2})
    assert state["step"] == 8 and state["data"] == {"seed": 7, "epoch": 3, "position": 1, "batch_size": 2, "num_windows": 5}
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    a, b = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert CheckpointManager(tmp_path / "none").load_latest({"m": m2}, {}) is None


def test_failed_save_leaves_previous_checkpoints(tmp_path, monkeypatch):
    m, opt = _trained(0)
    ckpt = CheckpointManager(tmp_path / "ck", keep_last=1)
    ckpt.save(2, {"m": m}, {"opt": opt})
    import lad.training.checkpoint as mod

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mod.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(4, {"m": m}, {"opt": opt})
    assert ckpt.steps() == [2] and sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_0000002"]


def test_rng_state_round_trip():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = capture_rng_state()
    first = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_state(state)
    again = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_batch_order_is_a_seeded_permutation_per_epoch():
    n, bs = 7, 3
    order = np.concatenate([batch_indices(s, bs, n, seed=5) for s in range(7)])  # 21 draws = 3 epochs
    for e in range(3):
        assert sorted(order[e * n:(e + 1) * n]) == list(range(n))  # every window once per epoch
    assert not np.array_equal(order[:n], order[n:2 * n])  # reshuffled each epoch
    assert np.array_equal(batch_indices(4, bs, n, 5), order[12:15])  # pure function of the step: resumable
    assert not np.array_equal(np.concatenate([batch_indices(s, bs, n, seed=6) for s in range(3)]), order[:9])


def test_nonfinite_guard():
    g = NonFiniteGuard(limit=3)
    assert g.ok(torch.tensor(1.0), 0)
    assert not g.ok(torch.tensor(float("nan")), 1)
    assert not g.ok(torch.tensor(1.0), 2, grad_norm=torch.tensor(float("inf")))
    assert g.ok(torch.tensor(1.0), 3, grad_norm=torch.tensor(2.0)) and g.in_a_row == 0 and g.skipped == 2
    assert not g.ok(torch.tensor(float("inf")), 4) and not g.ok(torch.tensor(float("nan")), 5)
    with pytest.raises(RuntimeError, match="3 consecutive non-finite losses at step 6"):
        g.ok(torch.tensor(float("nan")), 6)


def test_run_part_guard(tmp_path):
    run = tmp_path / "run"
    (run / "vqgan").mkdir(parents=True)
    (run / "vqgan" / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(FileExistsError, match="--resume to continue or --overwrite"):
        check_run_part(run, ["vqgan", "latent_cache"], resume=False, overwrite=False)
    assert (run / "vqgan" / "model.safetensors").read_bytes() == b"weights"
    with pytest.raises(ValueError, match="not both"):
        check_run_part(run, ["vqgan"], resume=True, overwrite=True)
    check_run_part(run, ["vqgan"], resume=True, overwrite=False)
    assert (run / "vqgan").exists()
    check_run_part(run, ["vqgan"], resume=False, overwrite=True)
    assert not (run / "vqgan").exists()


def test_dataset_validation(tmp_path):
    from conftest import write_prepared
    from lad.data.dataset import PreparedDataset

    ok = PreparedDataset(write_prepared(tmp_path / "ok", patients=2, windows=1))
    validate_dataset(ok, (4, 4, 4))
    with pytest.raises(ValueError, match=r"not divisible by the VQ-GAN compression \(3, 4, 4\)"):
        validate_dataset(ok, (3, 4, 4))
    bad = PreparedDataset(write_prepared(tmp_path / "bad", patients=2, windows=1, bad_label_patient="p01"))
    with pytest.raises(ValueError, match=r"p01/mask.npy: mask label 3 outside \{0, 1, 2\}"):
        validate_dataset(bad)
    odd = PreparedDataset(write_prepared(tmp_path / "odd", patients=2, windows=1, odd_shape_patient="p00"))
    with pytest.raises(ValueError, match=r"p00/image.npy: windows of shape \(7, 32, 32\).*mixed"):
        validate_dataset(odd)


def test_presets_overrides_and_variants():
    for name in ("tiny", "demo", "paper-abdomenct1k", "paper-totalsegmentator"):
        cfg = resolve_train_config(name)
        assert cfg.variant == "full" and cfg.vqgan_train.locality_weight > 0, name
    with pytest.raises(ConfigError, match="unknown train preset"):
        resolve_train_config("huge")
    paper = resolve_train_config("paper-abdomenct1k")
    t, d = paper.vqgan_train, paper.diffusion_train
    assert (t.lr, t.batch_size, t.steps, tuple(t.betas), t.grad_clip, t.disc_start) == (3e-4, 2, 100_000, (0.5, 0.9), 1.0, 50_000)
    assert (t.l1_weight, t.perceptual_weight, t.disc2d_weight, t.feature_matching_weight) == (4.0, 4.0, 0.25, 4.0)
    assert (d.lr, d.batch_size, d.steps, d.timesteps, d.schedule, d.loss, d.ema_decay, d.p_uncond) == \
        (1e-4, 20, 150_000, 300, "cosine", "l1", 0.995, 0.25)
    assert (paper.vqgan.num_embeddings, paper.vqgan.embedding_dim, tuple(paper.vqgan.downsample)) == (16384, 8, (4, 4, 4))
    assert resolve_train_config("paper-totalsegmentator").diffusion_train == d
    demo = resolve_train_config("demo")
    assert tuple(demo.vqgan.channels) == (16, 32, 32) and demo.vqgan.num_embeddings == 1024
    table2 = {"V0": (0.0, False, False), "V1": (0.0, True, False), "V2": (0.0, False, True), "V3": (0.0, True, True),
              "full": (1.0, True, True)}
    for v, expected in table2.items():
        c = resolve_train_config("tiny", variant=v)
        assert (c.vqgan_train.locality_weight, c.condition.use_content, c.condition.use_structure) == expected, v
        assert c.conditional == (v != "V0"), v
    assert resolve_train_config("tiny", ["vqgan_train.steps=7", "diffusion_train.ema_decay=0.9"]).vqgan_train.steps == 7
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        resolve_train_config("tiny", ["vqgan_train.stepz=7"])
    with pytest.raises(ConfigError):
        resolve_train_config("tiny", ["vqgan_train.steps=many"])
    with pytest.raises(ConfigError):
        resolve_train_config("tiny", ["precision=fp8"])
    with pytest.raises(ValueError, match="--variant must be one of"):
        resolve_train_config("tiny", variant="V4")


def test_resume_config_must_match(tmp_path):
    from lad.config import save_config

    cfg = resolve_train_config("tiny")
    save_config(cfg, tmp_path / "config.yaml")
    check_resume_config(tmp_path, resolve_train_config("tiny", ["vqgan_train.steps=50"]), ("vqgan", "vqgan_train", "seed"))
    with pytest.raises(ValueError, match=r"different vqgan_train config \(keys \['lr'\]\)"):
        check_resume_config(tmp_path, resolve_train_config("tiny", ["vqgan_train.lr=0.5"]), ("vqgan", "vqgan_train", "seed"))
    with pytest.raises(ValueError, match="seed=1"):
        check_resume_config(tmp_path, resolve_train_config("tiny", seed=1), ("vqgan", "vqgan_train", "seed"))


def test_ema_hand_computed():
    m = torch.nn.Linear(1, 1, bias=False)
    ema = make_ema(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(2.0)
    ema.update_parameters(m)  # first update copies
    with torch.no_grad():
        m.weight.fill_(12.0)
    ema.update_parameters(m)
    assert ema.module.weight.item() == pytest.approx(0.9 * 2.0 + 0.1 * 12.0)
    with pytest.raises(ValueError, match="decay"):
        make_ema(m, decay=1.0)


def test_cli_help():
    for args in (["train", "--help"], ["train", "vqgan", "--help"], ["train", "diffusion", "--help"]):
        r = subprocess.run([sys.executable, "-m", "lad", *args], capture_output=True, text=True, encoding="utf-8", errors="replace")
        assert r.returncode == 0 and "usage: lad train" in r.stdout, r.stderr
        if len(args) == 3:
            for flag in ("--data", "--run", "--preset", "--variant", "--set", "--resume", "--overwrite", "--device", "--seed",
                         "--no-progress"):
                assert flag in r.stdout, flag


def test_ema_step_release_schedule_and_resume():
    """ema_step: on every ``every``-th step; a copy of the weights before ``start``, an average from it; the
    state_dict (n_averaged included) resumes it exactly."""
    m = torch.nn.Linear(1, 1, bias=False)

    def run(steps, ema):
        for step in steps:
            with torch.no_grad():
                m.weight.fill_(float(step))
            ema_step(ema, m, step, every=2, start=4)
        return ema

    ema = run(range(8), make_ema(m, decay=0.5))
    # step 0, 2: copies (2.0); step 4: 0.5 * 2 + 0.5 * 4 = 3; step 6: 0.5 * 3 + 0.5 * 6 = 4.5
    assert ema.module.weight.item() == pytest.approx(4.5)
    half = run(range(5), make_ema(m, decay=0.5))
    resumed = make_ema(m, decay=0.5)
    resumed.load_state_dict(half.state_dict())
    assert run(range(5, 8), resumed).module.weight.item() == pytest.approx(4.5)
    with pytest.raises(ValueError, match="every"):
        ema_step(ema, m, 0, every=0)


def test_ema_and_beta_clip_presets():
    """The paper presets use the release's EMA schedule and beta clip; demo and tiny keep lad's (1, 0, 0.999)."""
    for name in ("paper-abdomenct1k", "paper-totalsegmentator"):
        d = resolve_train_config(name).diffusion_train
        assert (d.ema_decay, d.ema_every, d.ema_start, d.beta_max) == (0.995, 10, 2000, 0.9999), name
        assert resolve_train_config(name).denoiser.conditioning == "concat", name  # the release's condition path
    for name in ("demo", "tiny"):
        d = resolve_train_config(name).diffusion_train
        assert (d.ema_every, d.ema_start, d.beta_max) == (1, 0, 0.999), name
    for bad in ("diffusion_train.ema_every=0", "diffusion_train.beta_max=1.0"):
        with pytest.raises(ConfigError):
            resolve_train_config("tiny", [bad])


def test_resume_config_fills_keys_the_run_predates(tmp_path):
    """A run saved before diffusion_train.ema_every / ema_start / beta_max existed ran with their defaults: it
    resumes with them, and refuses the paper presets' release values."""
    import yaml

    cfg = resolve_train_config("tiny")
    old = to_dict(cfg)
    for k in ("ema_every", "ema_start", "beta_max"):
        del old["diffusion_train"][k]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_resume_config(tmp_path, cfg, ("diffusion_train",))
    with pytest.raises(ValueError, match=r"keys \['ema_every'\]"):
        check_resume_config(tmp_path, resolve_train_config("tiny", ["diffusion_train.ema_every=10"]), ("diffusion_train",))

"""``train_vqgan`` on the hand-written tiny dataset: resume is bit-exact, the loss goes down for each
VQ-GAN variant, bad inputs fail before anything is written, the NaN guard skips and then stops."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from safetensors.torch import load_file

from lad.training.config import resolve_train_config
from lad.training.vqgan_trainer import train_vqgan


def _short(cfg, **train):
    return dataclasses.replace(cfg, vqgan_train=dataclasses.replace(cfg.vqgan_train, **train))


def _tree(folder):
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_equals_uninterrupted(handmade_prepared, tmp_path):
    # 5 steps, discriminators from step 2, checkpoints every 2: killed after 3 steps (last checkpoint 2), resumed
    cfg = _short(resolve_train_config("tiny", ["logging.checkpoint_every=2", "logging.keep_last=1"]), steps=5, disc_start=2)
    train_vqgan(handmade_prepared, tmp_path / "a", cfg)
    train_vqgan(handmade_prepared, tmp_path / "b", cfg, stop_after=3)
    assert not (tmp_path / "b" / "vqgan").exists()
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints" / "vqgan").iterdir() if p.name.startswith("step")) == ["step_0000002"]
    train_vqgan(handmade_prepared, tmp_path / "b", cfg, resume=True)
    a, b = load_file(str(tmp_path / "a" / "vqgan" / "model.safetensors")), load_file(str(tmp_path / "b" / "vqgan" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # incl. the EMA codebook buffers
    for name in ("loss.safetensors", "vqgan.safetensors"):  # discriminators too
        a = load_file(str(tmp_path / "a" / "checkpoints" / "vqgan" / "step_0000005" / name))
        b = load_file(str(tmp_path / "b" / "checkpoints" / "vqgan" / "step_0000005" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    oa = torch.load(tmp_path / "a" / "checkpoints" / "vqgan" / "step_0000005" / "opt_d.pt", weights_only=True)
    assert oa["state"], "the discriminator optimiser stepped (disc_start 2 < 5)"
    assert (tmp_path / "a" / "config.yaml").exists() and (tmp_path / "a" / "logs" / "vqgan.jsonl").exists()


@pytest.mark.parametrize("variant", ["V0", "full"])  # V1-V3 train the same VQ-GAN as V0 (no locality loss)
def test_variant_reduces_reconstruction_loss_on_fixed_batch(handmade_prepared, variant):
    from lad.data.dataset import PreparedDataset
    from lad.training.common import gather_batch
    from lad.training.losses import VQGANLoss
    from lad.training.vqgan_trainer import build_vqgan

    cfg = resolve_train_config("tiny", variant=variant)
    torch.manual_seed(0)
    batch = gather_batch(PreparedDataset(handmade_prepared), [0, 1], torch.device("cpu"))
    x, mask = batch["image"], batch["mask"]
    vq = build_vqgan(cfg)
    crit = VQGANLoss(perceptual=None, locality_weight=cfg.vqgan_train.locality_weight, disc_start=10**9)
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    l1 = []
    for _ in range(10):
        loss, logs = crit.generator_loss(x, vq(x), mask, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        l1.append(float(logs["l1"]))
    assert ("locality" in logs) == (variant == "full")
    assert l1[-1] < 0.6 * l1[0], l1


def test_bad_inputs_fail_before_writing(handmade_prepared, tmp_path):
    from conftest import write_prepared

    cfg = resolve_train_config("tiny")
    with pytest.raises(ValueError, match="not a prepared dataset"):
        train_vqgan(tmp_path, tmp_path / "r1", cfg)
    bad = write_prepared(tmp_path / "bad", patients=2, windows=1, bad_label_patient="p00")
    with pytest.raises(ValueError, match=r"mask label 3 outside \{0, 1, 2\}"):
        train_vqgan(bad, tmp_path / "r2", cfg)
    odd = write_prepared(tmp_path / "odd", patients=2, windows=1, odd_shape_patient="p01")
    with pytest.raises(ValueError, match="mixed"):
        train_vqgan(odd, tmp_path / "r3", cfg)
    with pytest.raises(ValueError, match="not divisible by the VQ-GAN compression"):
        train_vqgan(handmade_prepared, tmp_path / "r4", resolve_train_config("tiny", ["vqgan.downsample=[3, 4, 4]"]))
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        train_vqgan(handmade_prepared, tmp_path / "r5", resolve_train_config("tiny", ["precision=fp16"]))
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 6))


def test_existing_run_refused_untouched(handmade_run, handmade_prepared):
    before = _tree(handmade_run)
    with pytest.raises(FileExistsError, match="--resume to continue or --overwrite"):
        train_vqgan(handmade_prepared, handmade_run, resolve_train_config("tiny"))
    with pytest.raises(ValueError, match=r"different vqgan_train config \(keys \['lr'\]\)"):
        train_vqgan(handmade_prepared, handmade_run, resolve_train_config("tiny", ["vqgan_train.lr=0.1"]), resume=True)
    assert _tree(handmade_run) == before


def test_nan_guard_skips_then_stops_without_checkpoint(handmade_prepared, tmp_path, monkeypatch, caplog):
    from lad.training import losses

    real = losses.VQGANLoss.generator_loss
    calls = {"n": 0}

    def flaky(self, *a, **k):  # NaN at step 1 (skipped), fine at 2, NaN from step 3 on
        loss, logs = real(self, *a, **k)
        calls["n"] += 1
        return (loss * float("nan"), logs) if calls["n"] == 2 or calls["n"] >= 4 else (loss, logs)

    monkeypatch.setattr(losses.VQGANLoss, "generator_loss", flaky)
    cfg = resolve_train_config("tiny", ["logging.checkpoint_every=1", "logging.max_nonfinite_steps=3"])
    with caplog.at_level(logging.WARNING, logger="lad"), pytest.raises(RuntimeError, match="3 consecutive non-finite losses at step 5"):
        train_vqgan(handmade_prepared, tmp_path / "r", cfg)
    assert "step 1: non-finite loss nan" in caplog.text
    ck = tmp_path / "r" / "checkpoints" / "vqgan"
    # checkpoints only after healthy steps (1 and 3), none during a run of skipped steps; keep_last 2
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step")) == ["step_0000001", "step_0000003"]
    assert not (tmp_path / "r" / "vqgan").exists()
    w = load_file(str(ck / "step_0000003" / "vqgan.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


def test_lr_schedule_warm_up_then_cosine_to_zero():
    """Hand-computed values: warm-up 1/4, 2/4, ... of the peak, half the peak midway through the decay, 0 at the end."""
    import math
    import types

    from lad.training.vqgan_trainer import lr_at

    t = types.SimpleNamespace(lr=1e-3, steps=104, lr_warmup=4, lr_schedule="cosine")
    assert [lr_at(s, t) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(4, t) == pytest.approx(1e-3)
    assert lr_at(54, t) == pytest.approx(5e-4)
    assert lr_at(29, t) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 25 / 100)))
    assert lr_at(104, t) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(50, types.SimpleNamespace(lr=3e-4, steps=100, lr_warmup=10, lr_schedule="constant")) == 3e-4


def test_a_dataset_object_trains_as_its_prepared_folder(handmade_prepared, handmade_run, tmp_path):
    """train_vqgan(Dataset, ...): the same VQ-GAN, bit for bit, as from the folder the items come from (handmade_run);
    the reconstruction report is then on those (training) windows."""
    import json

    from conftest import HANDMADE_RUN_SETTINGS, WindowsDataset

    train_vqgan(WindowsDataset(handmade_prepared), tmp_path / "r", resolve_train_config("tiny", HANDMADE_RUN_SETTINGS))
    a, b = load_file(str(handmade_run / "vqgan" / "model.safetensors")), load_file(str(tmp_path / "r" / "vqgan" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rec = json.loads((tmp_path / "r" / "vqgan_reconstruction.json").read_text(encoding="utf-8"))
    ref = json.loads((handmade_run / "vqgan_reconstruction.json").read_text(encoding="utf-8"))
    assert rec["split"] == "train (a Dataset object)" and rec["n_windows"] == 6 and rec["mae_hu"] == pytest.approx(ref["mae_hu"])

"""`lad sample`: shapes, NIfTI geometry, same seed same volume, resume and shards equal one run, masks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from lad.sampling.generate import SampleSettings, generate_samples
from lad.sampling.masks import MaskSource
from lad.sampling.pipeline import LadPipeline
from lad.sampling.writer import parse_shard

FAST = dict(steps=4, sampler="ddim")


def _volumes(folder):
    out = {}
    for rec in (json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()):
        out[rec["index"]] = np.asarray(nib.load(folder / rec["files"]["ct"]).dataobj)
    return out


def test_pipeline_shapes_and_seed(tiny_run, tiny_prepared):
    pipe = LadPipeline.from_run(tiny_run)
    src = MaskSource(tiny_prepared, shape=pipe.image_shape)
    masks = torch.as_tensor(np.stack([src[0].mask, src[1].mask])[:, None])
    a = pipe(masks, seeds=[3, 4], steps=3)
    assert a.shape == (2, 1, 8, 32, 32) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    b = pipe(masks[1:], seeds=[4], steps=3)
    assert torch.allclose(a[1:], b, atol=1e-5)  # a sample does not depend on its batch
    c = pipe(masks[1:], seeds=[5], steps=3)
    assert not torch.allclose(b, c)
    ddpm = pipe(masks[:1], seeds=[3], sampler="ddpm", steps=300)
    assert ddpm.shape == (1, 1, 8, 32, 32)
    with pytest.raises(ValueError, match="one seed per mask"):
        pipe(masks, seeds=[1])


def test_outputs_geometry_and_manifest(tiny_run, tiny_prepared, tmp_path):
    out = tmp_path / "s"
    s = generate_samples(tiny_run, tiny_prepared, out, SampleSettings(n=3, **FAST))
    assert s["written"] == 3 and s["finished_total"] == 3
    recs = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in recs] == [0, 1, 2]
    r0 = recs[0]
    assert {"seed", "source_mask", "augmentation", "sampler", "steps", "guidance", "checkpoint_hash"} <= set(r0)
    ct = nib.load(out / r0["files"]["ct"])
    mask = nib.load(out / r0["files"]["mask"])
    hu = np.asarray(ct.dataobj)
    assert hu.dtype == np.int16 and hu.min() >= -1000 and hu.max() <= 400
    from lad.data.dataset import PreparedDataset

    ds = PreparedDataset(tiny_prepared)
    w = ds.index_of(r0["source_id"])
    # same grid, spacing and orientation as the prepared window the mask came from
    assert np.allclose(ct.affine, mask.affine)
    ref = ds[w]["affine"]
    # nibabel index (i, j, k) = our (w, h, d): compare the mm position of voxel (d, h, w) = (1, 2, 3)
    assert np.allclose(ct.affine @ [3, 2, 1, 1], ref @ [1, 2, 3, 1], atol=1e-4)
    # the augmented mask is replayable from its record
    from lad.sampling.augment import apply_augmentation

    src_mask = ds[w]["mask"][0]
    replay = apply_augmentation(src_mask, r0["augmentation"])
    assert np.array_equal(np.transpose(np.asarray(mask.dataobj), (2, 1, 0)), replay)


def test_resume_and_shards_equal_single_run(tiny_run, tiny_prepared, tmp_path):
    settings = SampleSettings(n=4, **FAST)
    generate_samples(tiny_run, tiny_prepared, tmp_path / "single", settings)
    single = _volumes(tmp_path / "single")
    # killed after 1 sample, then the same command again
    generate_samples(tiny_run, tiny_prepared, tmp_path / "resumed", settings, stop_after=1)
    assert len(list((tmp_path / "resumed" / "records").iterdir())) == 1
    stamp = (tmp_path / "resumed" / "records" / "sample_000000.json").stat().st_mtime_ns
    s = generate_samples(tiny_run, tiny_prepared, tmp_path / "resumed", settings)
    assert s["written"] == 3 and (tmp_path / "resumed" / "records" / "sample_000000.json").stat().st_mtime_ns == stamp
    resumed = _volumes(tmp_path / "resumed")
    # two shards into one folder
    generate_samples(tiny_run, tiny_prepared, tmp_path / "sharded", settings, shard="0/2", batch_size=2)
    generate_samples(tiny_run, tiny_prepared, tmp_path / "sharded", settings, shard="1/2")
    sharded = _volumes(tmp_path / "sharded")
    assert sorted(single) == sorted(resumed) == sorted(sharded) == [0, 1, 2, 3]
    for k in single:
        assert np.abs(single[k].astype(int) - resumed[k]).max() == 0
        assert np.abs(single[k].astype(int) - sharded[k]).max() <= 1  # batch 2 vs 1: float rounding only


def test_other_settings_refused_and_shard_parsing(tiny_run, tiny_prepared, tmp_path):
    generate_samples(tiny_run, tiny_prepared, tmp_path / "o", SampleSettings(n=1, **FAST))
    with pytest.raises(FileExistsError, match="guidance"):
        generate_samples(tiny_run, tiny_prepared, tmp_path / "o", SampleSettings(n=1, guidance=2.0, **FAST))
    assert (tmp_path / "o" / "records" / "sample_000000.json").exists()
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(ValueError, match="i/k"):
        parse_shard("x")
    with pytest.raises(ValueError, match="0 <= i < k"):
        parse_shard("4/4")


def test_mask_sources_npy_nifti_and_bad_labels(tiny_run, tiny_prepared, tmp_path):
    from lad.data.dataset import PreparedDataset
    from lad.data.io import write_nifti

    ds = PreparedDataset(tiny_prepared)
    npy = tmp_path / "npy"
    npy.mkdir()
    np.save(npy / "a.npy", ds[0]["mask"][0])
    big = np.repeat(np.repeat(ds[1]["mask"][0], 2, axis=1), 2, axis=2)  # 8 x 64 x 64: another grid
    np.save(npy / "b.npy", big)
    src = MaskSource(npy, shape=(8, 32, 32))
    assert src.kind == "npy" and src[0].mask.shape == (8, 32, 32)
    assert np.array_equal(src[1].mask, ds[1]["mask"][0])  # nearest resampling back to the model grid
    nii = tmp_path / "nii"
    write_nifti(ds[0]["mask"][0], ds[0]["affine"], nii / "m.nii.gz")
    item = MaskSource(nii, shape=(8, 32, 32))[0]
    assert np.array_equal(item.mask, ds[0]["mask"][0]) and np.allclose(item.affine, ds[0]["affine"])
    bad = tmp_path / "bad"
    bad.mkdir()
    m = ds[0]["mask"][0].copy()
    m[0, 0, 0] = 7
    np.save(bad / "x.npy", m)
    with pytest.raises(ValueError, match=r"x.npy: mask labels must be in \{0, 1, 2\}"):
        MaskSource(bad)[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no masks found"):
        MaskSource(tmp_path / "empty")
    out = tmp_path / "fromnpy"
    generate_samples(tiny_run, npy, out, SampleSettings(n=2, format="npy", **FAST))
    arr = np.load(out / "samples" / "sample_000001_ct.npy")
    assert arr.shape == (8, 32, 32) and arr.dtype == np.int16


def test_cli_sample_with_preview(tiny_run, tiny_prepared, tmp_path):
    r = subprocess.run([sys.executable, "-m", "lad", "sample", "--run", str(tiny_run), "--masks", str(tiny_prepared), "--n", "2",
                        "--out", str(tmp_path / "c"), "--steps", "3", "--preview", "--no-progress"], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 0, r.stderr
    assert "written=2" in r.stdout and (tmp_path / "c" / "preview.png").stat().st_size > 5000
    r = subprocess.run([sys.executable, "-m", "lad", "sample", "--run", str(tmp_path / "nothing"), "--masks", str(tiny_prepared),
                        "--n", "1", "--out", str(tmp_path / "d")], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 2 and "no trained VQ-GAN" in r.stderr
    shutil.rmtree(tmp_path / "c")


def _copy_run(tiny_run, dst):
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns("checkpoints", "latent_cache", "tensorboard"))
    return dst


def test_sampler_defaults_come_from_the_run(tiny_run, tiny_prepared, tmp_path):
    """Sampler, steps and guidance not given are the run's ``sampling`` section: the paper presets' DDPM-300, the
    demo/tiny presets' DDIM-50 (ours), a run saved without a section gets DDIM-50."""
    import yaml

    from lad.sampling.generate import resolve_settings
    from lad.training.config import resolve_train_config

    got = lambda st: (st.sampler, st.steps, st.guidance)
    assert got(resolve_settings(SampleSettings(), tiny_run)) == ("ddim", 50, 1.0)
    paper = resolve_train_config("paper-abdomenct1k").sampling
    assert (paper.sampler, paper.steps, paper.guidance) == ("ddpm", 300, 1.0)
    run = _copy_run(tiny_run, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["sampling"] = {"sampler": "ddpm", "steps": 5, "guidance": 2.0}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    generate_samples(run, tiny_prepared, tmp_path / "s", SampleSettings(n=1))
    saved = json.loads((tmp_path / "s" / "sampling.json").read_text())
    assert (saved["sampler"], saved["steps"], saved["guidance"], saved["quality_check"]) == ("ddpm", 5, 2.0, False)
    rec = json.loads((tmp_path / "s" / "manifest.jsonl").read_text().splitlines()[0])
    assert (rec["sampler"], rec["steps"], rec["guidance"]) == ("ddpm", 5, 2.0)
    # the command line (explicit settings) wins, field by field
    assert got(resolve_settings(SampleSettings(sampler="ddim", steps=3), run)) == ("ddim", 3, 2.0)
    (run / "config.yaml").unlink()
    assert got(resolve_settings(SampleSettings(), run)) == ("ddim", 50, 1.0)


def test_median_hu_selection_is_off_by_default_and_recorded(tiny_run, tiny_prepared, tmp_path):
    """No redraws unless asked; with --quality-check every rejected draw is in the manifest and the summary."""
    from lad.sampling.generate import selection_summary

    run = _copy_run(tiny_run, tmp_path / "run")
    stats = json.loads((run / "latent_stats.json").read_text())
    # a training range no sample can meet: every draw fails the check
    stats["fingerprint"] = {"hu_percentiles_per_organ": {stats.get("organ", "pancreas"): {"0.5": 5000.0, "99.5": 6000.0}}}
    (run / "latent_stats.json").write_text(json.dumps(stats))
    off = generate_samples(run, tiny_prepared, tmp_path / "off", SampleSettings(n=2, steps=2))
    assert off["redrawn"] == 0
    q = [json.loads(line)["quality"] for line in (tmp_path / "off" / "manifest.jsonl").read_text().splitlines()]
    assert all(not x["check"] and x["redraws"] == 0 and x["in_range"] is False for x in q)
    assert selection_summary(tmp_path / "off") == {"quality_check": False, "max_retries": 0, "draws": 2, "rejected": 0,
                                                   "rejection_rate": 0.0, "kept_out_of_range": 0}
    on = generate_samples(run, tiny_prepared, tmp_path / "on", SampleSettings(n=2, steps=2, quality_check=True, max_retries=2))
    assert on["redrawn"] == 4
    lines = (tmp_path / "on" / "manifest.jsonl").read_text().splitlines()
    assert all(json.loads(line)["quality"]["redraws"] == 2 for line in lines)
    sel = selection_summary(tmp_path / "on")
    assert (sel["quality_check"], sel["draws"], sel["rejected"], sel["kept_out_of_range"]) == (True, 6, 4, 2)
    assert sel["rejection_rate"] == pytest.approx(4 / 6)

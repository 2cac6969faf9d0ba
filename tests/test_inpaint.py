"""`lad sample --inpaint`: tumours into real CT by RePaint latent inpainting.

Oracles: the RePaint schedule and the blending weights by hand; with a denoiser whose prediction is known, the
latent outside the region equals the real latent noised to each step's level (and the inside follows the
scheduler's step); on disk, the CT equals the input voxel for voxel outside the blended margin, the label's
tumour equals the placed mask, resume equals one run, other settings are refused, bad input gives one error.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from lad.sampling.inpaint import (CTSource, InpaintSettings, blend_weights, ellipsoid_tumour, generate_inpainted,
                                  known_noise_seed, latent_region, place_tumour, real_tumour, repaint_schedule)
from lad.utils.seed import derive_seed

FAST = dict(steps=4, sampler="ddim")


def _read(folder, rec):
    """(ct int16, label uint8) of a sample record as (D, H, W) arrays (nibabel holds (W, H, D))."""
    ct = np.transpose(np.asarray(nib.load(folder / rec["files"]["ct"]).dataobj), (2, 1, 0))
    lab = np.transpose(np.asarray(nib.load(folder / rec["files"]["mask"]).dataobj), (2, 1, 0))
    return ct, lab


def _records(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def inpainted(tiny_run, tiny_prepared, tmp_path_factory):
    """Three tumours into the tiny dataset's training windows (every window: most hold a tumour already)."""
    out = tmp_path_factory.mktemp("inpaint") / "out"
    summary = generate_inpainted(tiny_run, tiny_prepared, out, InpaintSettings(n=3, cases="all", **FAST))
    assert summary["written"] == 3 and summary["finished_total"] == 3
    return out


# ------------------------------------------------------------------------------------------------ pieces


def test_repaint_schedule_blend_weights_and_latent_region_by_hand():
    assert repaint_schedule(4) == [4, 3, 2, 1, 0]
    # RePaint's get_schedule_jump(t_T=4, jump_length=2, jump_n_sample=2): times 3,2,1,0,1,2,1,0,-1 -> positions + 1
    assert repaint_schedule(4, jump=2, resample=2) == [4, 3, 2, 1, 2, 3, 2, 1, 0]
    # jump 1, resample 3 over 3 steps: RePaint's jump points t = 0, 1 (< 3 - 1) are positions 1, 2; the step into
    # each is undone twice: times 2,1,2,1,2,1,0,1,0,1,0,-1
    assert repaint_schedule(3, jump=1, resample=3) == [3, 2, 3, 2, 3, 2, 1, 2, 1, 2, 1, 0]
    line = np.zeros((1, 1, 9), bool)
    line[0, 0, 4] = True
    w = blend_weights(line, 2)[0, 0]
    assert np.allclose(w, [0, 0, 1 / 3, 2 / 3, 1, 2 / 3, 1 / 3, 0, 0])
    assert np.array_equal(blend_weights(line, 0), line.astype(np.float32))
    # a diagonal neighbour at distance sqrt(2) <= 2 gets 1 - sqrt(2) / 3; at sqrt(5) > 2 nothing
    dot = np.zeros((1, 5, 5), bool)
    dot[0, 2, 2] = True
    w = blend_weights(dot, 2)[0]
    assert w[1, 1] == pytest.approx(1 - np.sqrt(2) / 3) and w[0, 1] == 0.0 and w[0, 2] == pytest.approx(1 / 3)
    vox = torch.zeros(1, 1, 8, 16, 16, dtype=torch.bool)
    vox[0, 0, 5, 9, 2] = True  # latent cell (1, 2, 0) of a 4x4x4 compression
    cells = latent_region(vox, (4, 4, 4), dilation=0)[0, 0]
    assert cells.shape == (2, 4, 4) and cells.sum() == 1 and cells[1, 2, 0]
    grown = latent_region(vox, (4, 4, 4), dilation=1)[0, 0]
    assert grown.sum() == 2 * 3 * 2 and grown[0, 1:4, 0:2].all()  # 3x3x3 around it, cut by the grid's edges


def test_tumour_placement_stays_in_the_organ_and_replays():
    mask = np.zeros((10, 30, 30), np.uint8)
    mask[2:8, 5:25, 5:25] = 1
    mask[4, 10, 10] = 2  # an existing tumour voxel stays a tumour voxel
    spacing = (2.0, 1.0, 1.0)
    t1, r1 = ellipsoid_tumour(mask, spacing, np.random.default_rng(3), ("small",))
    t2, r2 = ellipsoid_tumour(mask, spacing, np.random.default_rng(3), ("small",))
    assert np.array_equal(t1, t2) and r1 == r2  # the rng decides everything
    assert t1.any() and not (t1 & (mask == 0)).any() and t1[tuple(r1["centre"])]
    assert mask[tuple(r1["centre"])] == 1 and r1["size"] == "small" and r1["voxels"] == int(t1.sum())
    assert all(6.0 <= r <= 10.0 for r in r1["radii_mm"])  # small: 8 mm x U(0.75, 1.25)
    # uncut (labels >= 1 everywhere, one organ voxel for the centre): 4/3 pi abc voxels of 1 mm^3, and the points at
    # 0.8 / 1.2 x each semi-axis along the drawn orientation lie inside / outside
    from scipy.spatial.transform import Rotation

    big = np.full((80, 80, 80), 2, np.uint8)
    big[40, 40, 40] = 1
    t, r = ellipsoid_tumour(big, (1.0, 1.0, 1.0), np.random.default_rng(0), ("medium",))
    assert r["centre"] == [40, 40, 40] and t.sum() == pytest.approx(4 / 3 * np.pi * np.prod(r["radii_mm"]), rel=0.03)
    axes = Rotation.from_quat(r["rotation_quat_xyzw"]).as_matrix().T  # rows: the ellipsoid's axes in (D, H, W)
    for axis, radius in zip(axes, r["radii_mm"]):
        assert t[tuple(np.rint(40 + 0.8 * radius * axis).astype(int))]
        assert not t[tuple(np.rint(40 + 1.2 * radius * axis).astype(int))]
    # a real tumour mask moved into the organ keeps its shape (up to flips) when the organ has room
    donor = np.zeros_like(mask, bool)
    donor[1, 1:4, 1] = donor[1, 3, 2] = donor[2, 3, 2] = True  # an L of 5 voxels
    moved, rec = real_tumour(mask, donor, np.random.default_rng(5), donor_id="d")
    assert rec["voxels"] == int(moved.sum()) and not (moved & (mask == 0)).any()
    if rec["kept_fraction"] == 1.0:
        pts = np.argwhere(moved)
        src = np.where(rec["flips"], -np.argwhere(donor), np.argwhere(donor)) + rec["shift"]
        assert sorted(map(tuple, pts)) == sorted(map(tuple, src))
    assert rec["kept_fraction"] >= 0.5


# ------------------------------------------------------------------------------------------------ the sampler


def _check_known_region(run, prepared, cases):
    """Denoiser replaced by a known prediction (0.1 z) and ``cases`` = [(sampler, steps, jump, resample, calls)]:
    before every call the outside equals ``scheduler.add_noise(real latent, known-noise draw i, t_i)``; the inside
    at call 0 is the sample's initial noise and, without jumps back, afterwards the scheduler's step from the
    previous call (eq. 4 with a prediction linear in z is 0.1 z for any w); the result's outside is the real latent."""
    from lad.data.dataset import PreparedDataset
    from lad.data.labels import hu_to_unit
    from lad.sampling.inpaint import inpaint_latents
    from lad.sampling.pipeline import LadPipeline

    pipe = LadPipeline.from_pretrained(run)
    r = PreparedDataset(prepared).get_arrays(0, organs=False)
    known = pipe.encode(torch.as_tensor(hu_to_unit(r["hu"]))[None, None])
    region = torch.zeros((1, 1, *pipe.latent_shape[1:]), dtype=torch.bool)
    region[0, 0, 1, 2:5, 3:6] = True
    masks = torch.as_tensor(r["mask"])[None, None]
    seen = []

    def fake(z, t, cond, *extra):
        seen.append((z[: z.shape[0] // 2 if cond is not None else None].clone(), int(t[0])))
        return 0.1 * z

    pipe.denoiser = fake
    outside, inside = ~region.expand_as(known), region.expand_as(known)
    for sampler, steps, jump, resample, calls in cases:
        seen.clear()
        out = inpaint_latents(pipe, known, region, masks, seeds=[11], guidance=1.0, sampler=sampler, steps=steps,
                              jump=jump, resample=resample)
        assert len(seen) == calls
        sched = pipe.make_scheduler(sampler)
        sched.set_timesteps(steps)
        g = torch.Generator().manual_seed(known_noise_seed(11))
        for i, (z, t) in enumerate(seen):
            expect = sched.add_noise(known, torch.randn(pipe.latent_shape, generator=g)[None], t)
            assert torch.equal(z[outside], expect[outside]), f"{sampler}: call {i} at t = {t}"
        z0 = torch.randn(pipe.latent_shape, generator=torch.Generator().manual_seed(11))[None]
        assert torch.equal(seen[0][0][inside], z0[inside])
        if resample == 1 and sampler != "ddpm":  # deterministic steps (DDPM draws from the sample's generator)
            for (z, t), (z_next, _) in zip(seen[:-1], seen[1:]):
                step = sched.step(0.1 * z, torch.tensor(t), z)
                assert torch.allclose(z_next[inside], step[inside], atol=1e-6)
        assert torch.equal(out[outside], known[outside])
        assert not torch.equal(out[inside], known[inside])


def test_latent_outside_the_region_is_the_noised_real_latent_at_every_step(tiny_run, tiny_prepared):
    _check_known_region(tiny_run, tiny_prepared, [("ddim", 4, 1, 1, 4), ("ddim", 4, 2, 2, 6), ("ddpm", 5, 1, 1, 5)])


@pytest.fixture(scope="module")
def rf_run(handmade_prepared, handmade_run, tmp_path_factory):
    """The hand-made run's VQ-GAN with a rectified-flow diffusion model (2 training steps; samples with Euler)."""
    from lad.training.config import resolve_train_config
    from lad.training.diffusion_trainer import train_diffusion

    run = tmp_path_factory.mktemp("rf") / "run"
    run.mkdir(parents=True)
    shutil.copytree(handmade_run / "vqgan", run / "vqgan")
    cfg = resolve_train_config("tiny", ["diffusion_train.steps=2", "logging.image_every=2", "logging.checkpoint_every=2",
                                        "diffusion_train.prediction=rectified_flow", "sampling.sampler=euler", "sampling.steps=5"])
    train_diffusion(handmade_prepared, run, cfg, progress_bar=False)
    return run


def test_rectified_flow_runs_inpaint_with_euler_and_multistep_samplers_are_refused(rf_run, handmade_prepared, tiny_run,
                                                                                    tiny_prepared, tmp_path):
    _check_known_region(rf_run, handmade_prepared, [("euler", 5, 1, 1, 5)])
    out = tmp_path / "rf"
    generate_inpainted(rf_run, handmade_prepared, out, InpaintSettings(n=1, cases="all"), progress_bar=False)
    rec = _records(out)[0]
    assert (rec["sampler"], rec["steps"]) == ("euler", 5)  # the run's sampling defaults
    ct, label = _read(out, rec)
    source = CTSource(handmade_prepared, shape=ct.shape)
    case = source[source.ids.index(rec["source_id"])]
    tumour, expect_label, _ = place_tumour(case, InpaintSettings(cases="all"),
                                           np.random.default_rng(derive_seed(rec["seed"], "tumour")), source, [])
    w = blend_weights(tumour, 2)
    assert np.array_equal(label, expect_label) and np.array_equal(ct[w == 0], case.hu[w == 0])
    with pytest.raises(ValueError, match="--resample > 1 needs a DDPM-trained run"):
        generate_inpainted(rf_run, handmade_prepared, tmp_path / "x", InpaintSettings(n=1, cases="all", resample=2))
    with pytest.raises(ValueError, match="--sampler must be one of ddpm, ddim, euler with --inpaint"):
        generate_inpainted(tiny_run, tiny_prepared, tmp_path / "y", InpaintSettings(n=1, sampler="dpmpp2m", steps=4))
    with pytest.raises(ValueError, match="'euler' integrates a rectified-flow model"):
        generate_inpainted(tiny_run, tiny_prepared, tmp_path / "z", InpaintSettings(n=1, sampler="euler", steps=4))
    assert not any((tmp_path / d).exists() for d in "xyz")


def test_outputs_equal_the_input_outside_the_margin_and_labels_are_the_placed_tumours(inpainted, tiny_prepared):
    from lad.data.dataset import PreparedDataset
    from lad.evaluation.evaluate import load_synthetic
    from lad.sampling.generate import selection_summary

    ds = PreparedDataset(tiny_prepared)
    settings = json.loads((inpainted / "sampling.json").read_text(encoding="utf-8"))
    assert settings["mode"] == "inpaint" and settings["blend_margin"] == 2 and settings["tumour"] == "ellipsoid"
    source = CTSource(tiny_prepared, shape=ds.shape)
    recs = _records(inpainted)
    assert [r["index"] for r in recs] == [0, 1, 2]
    assert [r["source_id"] for r in recs] == [w["id"] for w in ds.windows[:3]]  # cases="all": window j % 4
    for rec in recs:
        ct, label = _read(inpainted, rec)
        case = source[ds.index_of(rec["source_id"])]
        assert rec["source_mask"] == f"{tiny_prepared}:{rec['source_id']}"
        # the placed tumour, replayed from the sample's seed
        tumour, expect_label, trec = place_tumour(case, InpaintSettings(cases="all"),
                                                  np.random.default_rng(derive_seed(rec["seed"], "tumour")), source, [])
        assert trec == rec["tumour"] and np.array_equal(label, expect_label)
        assert np.array_equal(label == 2, tumour | (case.mask == 2)) and np.array_equal(label[~tumour], case.mask[~tumour])
        w = blend_weights(tumour, 2)
        assert ct.dtype == np.int16
        assert np.array_equal(ct[w == 0], case.hu[w == 0].astype(np.int16))  # voxel for voxel outside the margin
        assert (ct[tumour] != case.hu[tumour]).any()  # the tumour region was generated
        assert rec["inpaint"]["blended_voxels"] == int((w > 0).sum()) and rec["inpaint"]["denoiser_calls"] == 4
        img = nib.load(inpainted / rec["files"]["ct"])
        assert np.allclose(img.affine @ [3, 2, 1, 1], case.affine @ [1, 2, 3, 1], atol=1e-4)  # the input's geometry
    # `lad evaluate` reads the folder as any sample folder
    vols, masks = load_synthetic(inpainted)
    assert len(vols) == 3 and vols[0].shape == (1, *ds.shape) and masks[0].max() == 2
    assert selection_summary(inpainted)["rejected"] == 0


def test_resume_equals_one_run_and_other_settings_are_refused(tiny_run, tiny_prepared, inpainted, tmp_path):
    from lad.sampling.generate import SampleSettings, generate_samples

    settings = InpaintSettings(n=3, cases="all", **FAST)
    out = tmp_path / "resumed"
    assert generate_inpainted(tiny_run, tiny_prepared, out, settings, stop_after=1)["finished_total"] == 1
    assert generate_inpainted(tiny_run, tiny_prepared, out, settings)["written"] == 2
    for a, b in zip(_records(out), _records(inpainted)):
        assert a["tumour"] == b["tumour"]
        for x, y in zip(_read(out, a), _read(inpainted, b)):
            assert np.array_equal(x, y)
    assert generate_inpainted(tiny_run, tiny_prepared, out, settings)["written"] == 0
    with pytest.raises(FileExistsError, match="blend_margin"):
        generate_inpainted(tiny_run, tiny_prepared, out, InpaintSettings(n=3, cases="all", blend_margin=3, **FAST))
    with pytest.raises(FileExistsError, match="other settings"):
        generate_samples(tiny_run, tiny_prepared, out, SampleSettings(n=1, **FAST))
    assert len(_records(out)) == 3


def test_nifti_pairs_real_tumours_and_bad_inputs(tiny_run, tiny_prepared, tmp_path):
    from lad.data.dataset import PreparedDataset
    from lad.data.prepare import export_window

    ds = PreparedDataset(tiny_prepared)
    pairs = tmp_path / "pairs"
    for w in ds.windows:
        export_window(tiny_prepared, w["id"], pairs)
    out = tmp_path / "fromnifti"
    generate_inpainted(tiny_run, pairs, out, InpaintSettings(n=2, tumour="real", resample=2, jump=2, **FAST))
    healthy = [w["id"] for w in ds.windows if w["organ_voxels"]["tumor"] == 0]
    for rec in _records(out):
        assert rec["source_id"] in healthy and rec["tumour"]["kind"] == "real"
        assert rec["tumour"]["donor"].endswith("_image.nii.gz") and rec["inpaint"]["denoiser_calls"] == 6
        ct, label = _read(out, rec)
        r = ds.get_arrays(ds.index_of(rec["source_id"]), organs=False)
        tumour = label == 2
        assert tumour.sum() == rec["tumour"]["voxels"] > 0 and not (tumour & (r["mask"] == 0)).any()
        w = blend_weights(tumour, 2)
        assert np.array_equal(ct[w == 0], r["hu"][w == 0])
    # bad input: one error naming the file or folder and the reason
    with pytest.raises(FileNotFoundError, match="nowhere: --inpaint CT folder does not exist"):
        generate_inpainted(tiny_run, tmp_path / "nowhere", tmp_path / "o1", InpaintSettings(n=1, **FAST))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no CT found"):
        generate_inpainted(tiny_run, tmp_path / "empty", tmp_path / "o2", InpaintSettings(n=1, **FAST))
    first = ds.windows[0]["id"]
    bad = tmp_path / "noorgan"
    shutil.copytree(pairs, bad)
    import SimpleITK as sitk

    m = sitk.ReadImage(str(bad / f"{first}_mask.nii.gz"))
    empty = sitk.GetImageFromArray(np.zeros(sitk.GetArrayFromImage(m).shape, np.uint8))
    empty.CopyInformation(m)
    sitk.WriteImage(empty, str(bad / f"{first}_mask.nii.gz"))
    with pytest.raises(ValueError, match=rf"{first}_image.nii.gz: no organ in the mask \(label 1\)"):
        generate_inpainted(tiny_run, bad, tmp_path / "o3", InpaintSettings(n=1, cases="all", **FAST))
    (bad / f"{first}_mask.nii.gz").unlink()
    with pytest.raises(ValueError, match=rf"{first}_image.nii.gz: no mask beside it"):
        generate_inpainted(tiny_run, bad, tmp_path / "o4", InpaintSettings(n=1, **FAST))
    tumours_only = tmp_path / "tumours"
    tumours_only.mkdir()
    for w in ds.windows:
        if w["organ_voxels"]["tumor"]:
            for k in ("image", "mask"):
                shutil.copy(pairs / f"{w['id']}_{k}.nii.gz", tumours_only)
    with pytest.raises(ValueError, match="already holds a tumour"):
        generate_inpainted(tiny_run, tumours_only, tmp_path / "o5", InpaintSettings(n=1, **FAST))
    with pytest.raises(ValueError, match="--blend-margin must be"):
        generate_inpainted(tiny_run, pairs, tmp_path / "o6", InpaintSettings(n=1, blend_margin=-1, **FAST))
    with pytest.raises(ValueError, match="--jump 4 must be smaller"):
        generate_inpainted(tiny_run, pairs, tmp_path / "o7", InpaintSettings(n=1, jump=4, resample=2, **FAST))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_cli_inpaint(tiny_run, tiny_prepared, tmp_path, capsys):
    from lad.cli import main

    out = tmp_path / "cli"
    rc = main(["sample", "--run", str(tiny_run), "--inpaint", str(tiny_prepared), "--n", "1", "--out", str(out),
               "--steps", "3", "--tumour-sizes", "tiny", "--blend-margin", "1", "--no-progress"])
    assert rc == 0 and "written=1" in capsys.readouterr().out
    rec = _records(out)[0]
    assert rec["tumour"]["size"] == "tiny" and rec["inpaint"]["blend_margin"] == 1 and rec["steps"] == 3
    assert main(["sample", "--run", str(tiny_run), "--inpaint", str(tiny_prepared), "--masks", str(tiny_prepared),
                 "--n", "1", "--out", str(tmp_path / "x")]) == 2
    assert "either --masks SOURCE" in capsys.readouterr().err
    assert main(["sample", "--run", str(tiny_run), "--inpaint", str(tiny_prepared), "--n", "1", "--out", str(tmp_path / "y"),
                 "--tumour-sizes", "huge"]) == 2
    assert "--tumour-sizes must name some of tiny, small, medium, large" in capsys.readouterr().err


def test_supervised_track_trains_on_inpainted_samples(inpainted, tiny_run, tiny_prepared, tmp_path):
    """`lad downstream supervised --synthetic` reads any sample folder with CT + label files: an inpainted folder
    needs no flag. Its labels are the inpainted labels; samples made from test windows are refused (leakage)."""
    from lad.data.dataset import PreparedDataset
    from lad.downstream.supervised import load_supervised_config, run_supervised
    from lad.downstream.supervised.data import axis_spacing, load_synthetic_samples

    ds = PreparedDataset(tiny_prepared)
    samples = load_synthetic_samples(inpainted, shape=ds.shape, spacing=axis_spacing(ds.windows[0]["affine"]))
    recs = _records(inpainted)
    assert [s.id for s in samples] == [r["id"] for r in recs]
    for s, rec in zip(samples, recs):
        hu, mask = s.read()
        ct, label = _read(inpainted, rec)
        assert np.array_equal(mask, label) and np.array_equal(hu, ct) and s.source_id == rec["source_id"]
    res = run_supervised(tiny_prepared, tmp_path / "sup", load_supervised_config("tiny"), synthetic=inpainted,
                         synthetic_volumes="2", real_sizes="1", preset="tiny")
    run = next(r for r in res["runs"] if r["arm"] == "real+2synthetic")
    data = json.loads((tmp_path / "sup" / "models" / "real0001_real+2synthetic" / "data.json").read_text(encoding="utf-8"))
    assert run["n_synthetic"] == 2 and set(data["synthetic"]) <= {r["id"] for r in recs}
    leaky = tmp_path / "test-windows"
    generate_inpainted(tiny_run, tiny_prepared, leaky, InpaintSettings(n=1, split="test", cases="all", **FAST))
    with pytest.raises(ValueError, match="test patient"):
        run_supervised(tiny_prepared, tmp_path / "sup2", load_supervised_config("tiny"), synthetic=leaky, real_sizes="1")

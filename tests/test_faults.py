"""Fault injection: every fault of docs/troubleshooting.md ("Faults") on the tiny preset, with its exact outcome.

Commands run in-process through ``lad.cli.main`` (the same code as the ``lad`` console script), so a
writer can be patched to fail; an exception escaping ``main`` would be the traceback a user sees. Where
nothing may be written, the output folder is compared byte for byte before and after.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lad.cli import main

FAST = ["--steps", "2", "--no-quality-check", "--augment", "none"]


def lad(capsys, *argv) -> tuple[int, str, str]:
    """Run ``lad ARGV`` in-process: (exit code, stdout, stderr). A traceback would propagate as an exception."""
    logger = logging.getLogger("lad")

    def unbind():
        for h in [h for h in logger.handlers if getattr(h, "_lad", False)]:
            logger.removeHandler(h)

    unbind()  # the CLI binds its log handler to the current stderr: this test's captured one
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    finally:
        unbind()
    out, err = capsys.readouterr()
    return rc, out, err


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (empty when it does not exist)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(err: str, verb: str, *needles: str) -> str:
    """The one ``lad VERB: error: ...`` line of ``err``; asserts it names every needle and no traceback came."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"lad {verb}: error: ")]
    assert len(lines) == 1, err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="session")
def fault_samples(tiny_run, tiny_prepared, tmp_path_factory):
    """Two finished samples of the tiny run (2 DDIM steps)."""
    from lad.sampling.generate import SampleSettings, generate_samples

    out = tmp_path_factory.mktemp("fault-samples") / "s"
    generate_samples(tiny_run, tiny_prepared, out, SampleSettings(n=2, steps=2, quality_check=False, augment="none"))
    return out


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.fixture
def raw3(tiny_prepared, tmp_path):
    """Three phantom cases (abdomenct1k layout) copied from the tiny dataset's raw folder."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in sorted((tiny_prepared.parent / "raw").glob("Case_0000[123]*.nii.gz")):
        shutil.copy2(f, raw / f.name)
    return raw


# ------------------------------------------------------------------ 1. truncated / corrupt compressed files


def test_truncated_integer_nifti_is_refused_by_every_reader(raw3, fault_samples, tiny_prepared, tmp_path, capsys):
    from lad.data.io import CaseError, read_image

    img = tmp_path / "int.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 400, (12, 32, 32)).astype(np.int16)),
                    str(img), useCompression=True)
    truncate(img)
    with pytest.raises(CaseError, match=re.escape(f"{img}: unreadable or corrupt image (truncated or corrupt compressed file")):
        read_image(img)
    raw_nii = tmp_path / "raw.nii"
    full = tmp_path / "full.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16)), str(full))
    raw_nii.write_bytes(full.read_bytes()[:-64])  # an uncompressed file cut short: the header's size check
    with pytest.raises(CaseError, match=f"{raw_nii}: truncated file: .* the header needs"):
        read_image(raw_nii)
    regz = tmp_path / "regz.nii.gz"  # a cut-short stream re-compressed: complete gzip, too little data
    regz.write_bytes(gzip.compress(full.read_bytes()[:-64]))
    with pytest.raises(CaseError, match="truncated file"):
        read_image(regz)

    # prepare: the case is dropped with the file named (never prepared from zeros)
    truncate(raw3 / "Case_00002_0000.nii.gz")
    rc, out, err = lad(capsys, "prepare", "--layout", "abdomenct1k", "--input", raw3, "--output", tmp_path / "prep", "--preset", "tiny")
    assert rc == 0, err
    dropped = json.loads((tmp_path / "prep" / "manifest.json").read_text())["dropped"]
    assert [d["patient"] for d in dropped] == ["Case_00002"]
    assert dropped[0]["file"] == str(raw3 / "Case_00002_0000.nii.gz") and "truncated" in dropped[0]["reason"]

    # priors predict: the case is listed as failed with the file named
    from lad.priors.predict import predict_priors

    from lad.priors.segmenter import Segmenter

    seg = tmp_path / "seg"
    Segmenter(spacing=(12.0, 12.0, 10.0), roi_size=(8, 32, 32)).save_pretrained(seg)  # untrained: only the reader matters
    s = predict_priors(raw3, tmp_path / "priors", segmenter=seg, layout="abdomenct1k")
    assert [f["case"] for f in s["failed"]] == ["Case_00002"] and "truncated" in s["failed"][0]["reason"]

    # evaluate: one line naming the truncated sample, exit 2
    syn = tmp_path / "syn"
    shutil.copytree(fault_samples, syn)
    ct = syn / json.loads((syn / "manifest.jsonl").read_text().splitlines()[1])["files"]["ct"]
    truncate(ct, 0.6)
    rc, out, err = lad(capsys, "evaluate", "--real", tiny_prepared, "--synthetic", syn, "--out", tmp_path / "rep", "--pairs", 1)
    assert rc == 2
    one_error_line(err, "evaluate", ct, "unreadable or corrupt image (truncated or corrupt compressed file")


def test_truncated_npy_sample_is_named_by_evaluate(tiny_run, tiny_prepared, tmp_path, capsys):
    from lad.sampling.generate import SampleSettings, generate_samples

    syn = tmp_path / "npy"
    generate_samples(tiny_run, tiny_prepared, syn, SampleSettings(n=2, steps=2, quality_check=False, augment="none", format="npy"))
    ct = syn / json.loads((syn / "manifest.jsonl").read_text().splitlines()[0])["files"]["ct"]
    truncate(ct)
    rc, _, err = lad(capsys, "evaluate", "--real", tiny_prepared, "--synthetic", syn, "--out", tmp_path / "rep", "--pairs", 1)
    assert rc == 2
    one_error_line(err, "evaluate", ct, "truncated or corrupt .npy file")


# ------------------------------------------------------------------ 2. a changed VQ-GAN invalidates what depends on it


def test_vqgan_resume_on_a_run_with_a_diffusion_model(run_copy, tiny_prepared, capsys):
    before = tree(run_copy)
    args = ["train", "vqgan", "--data", tiny_prepared, "--run", run_copy, "--preset", "tiny", "--resume",
            "--set", "vqgan_train.steps=13", "--no-progress"]
    rc, _, err = lad(capsys, *args)
    assert rc == 2
    one_error_line(err, "train", run_copy, "denoiser_ema", "latent_stats.json", "--discard-diffusion")
    assert tree(run_copy) == before
    # resuming a VQ-GAN that is already at its steps changes nothing, so it is allowed and keeps the denoiser
    rc, _, err = lad(capsys, *args[:-3], "--no-progress")
    assert rc == 0, err
    assert (run_copy / "denoiser_ema").is_dir() and (run_copy / "latent_stats.json").exists()
    rc, _, err = lad(capsys, *args, "--discard-diffusion")
    assert rc == 0, err
    for part in ("denoiser", "denoiser_ema", "condition", "latent_cache", "latent_stats.json", "checkpoints/diffusion"):
        assert not (run_copy / part).exists(), part
    assert "deleting the diffusion model" in err


def test_sampling_refuses_a_denoiser_of_another_vqgan(run_copy, tiny_prepared, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    w = run_copy / "vqgan" / "model.safetensors"
    state = load_file(str(w))
    k = next(iter(state))
    state[k] = state[k] + 1.0  # a VQ-GAN replaced behind the trainer's back
    save_file(state, str(w))
    rc, _, err = lad(capsys, "sample", "--run", run_copy, "--masks", tiny_prepared, "--n", 1, "--out", tmp_path / "s", *FAST)
    assert rc == 2
    one_error_line(err, "sample", run_copy / "vqgan", "changed after the diffusion model was trained")
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------ 3, 6, 13. arguments checked at parse time


@pytest.mark.parametrize("option, value, needle", [
    ("--guidance", "nan", "finite"), ("--guidance", "inf", "finite"), ("--guidance", "-5", ">= -1"),
    ("--steps", "0", "at least 1"), ("--batch-size", "0", "at least 1"), ("--batch-size", "-2", "at least 1"),
    ("--n", "0", "at least 1"), ("--max-retries", "-1", "at least 0"),
])
def test_sample_arguments_refused_before_anything_is_created(tiny_run, tiny_prepared, tmp_path, capsys, option, value, needle):
    argv = {"--run": tiny_run, "--masks": tiny_prepared, "--n": 1, "--out": tmp_path / "s", option: value}
    rc, _, err = lad(capsys, "sample", *[x for kv in argv.items() for x in kv], *FAST[2:])
    assert rc == 2 and "Traceback" not in err
    assert option in err and needle in err, err
    assert not (tmp_path / "s").exists()


def test_sample_steps_beyond_the_model_are_refused(tiny_run, tiny_prepared, tmp_path, capsys):
    rc, _, err = lad(capsys, "sample", "--run", tiny_run, "--masks", tiny_prepared, "--n", 1, "--out", tmp_path / "s",
                     "--steps", 100000, "--no-quality-check")
    assert rc == 2
    one_error_line(err, "sample", "--steps 100000", "50 timesteps", "at most 50")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, needle", [
    (["phantom", "--out", "{tmp}/ph", "--tumor-fraction", "nan"], "--tumor-fraction"),
    (["prepare", "--layout", "abdomenct1k", "--input", "{tmp}", "--output", "{tmp}/p", "--spacing", "1", "inf", "1"], "--spacing"),
    (["prepare", "--layout", "abdomenct1k", "--input", "{tmp}", "--output", "{tmp}/p", "--split", "0"], "--split"),
    (["evaluate", "--real", "{tmp}", "--synthetic", "{tmp}", "--out", "{tmp}/r", "--pairs", "0"], "--pairs"),
])
def test_other_numbers_refused_at_parse_time(tmp_path, capsys, argv, needle):
    rc, _, err = lad(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert rc == 2 and needle in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_device_without_gpu_and_unknown_device(tiny_run, tiny_prepared, tmp_path, capsys):
    import torch

    if not torch.cuda.is_available():
        rc, _, err = lad(capsys, "sample", "--run", tiny_run, "--masks", tiny_prepared, "--n", 1, "--out", tmp_path / "s",
                         "--device", "cuda", *FAST)
        assert rc == 2
        one_error_line(err, "sample", "--device cuda: no CUDA device is available")
        rc, _, err = lad(capsys, "train", "vqgan", "--data", tiny_prepared, "--run", tmp_path / "r", "--preset", "tiny", "--device", "cuda")
        assert rc == 2
        one_error_line(err, "train", "--device cuda: no CUDA device")
    rc, _, err = lad(capsys, "sample", "--run", tiny_run, "--masks", tiny_prepared, "--n", 1, "--out", tmp_path / "s",
                     "--device", "gpu", *FAST)
    assert rc == 2
    one_error_line(err, "sample", "--device gpu: not a device")
    assert sorted(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 4. counts must be positive; zero steps is no model


@pytest.mark.parametrize("setting", ["vqgan_train.steps=0", "vqgan_train.steps=-3", "diffusion_train.batch_size=0",
                                     "logging.checkpoint_every=0", "vqgan_train.lr=nan", "diffusion_train.p_uncond=1.5"])
def test_train_counts_and_rates_refused(tiny_prepared, tmp_path, capsys, setting):
    rc, _, err = lad(capsys, "train", "vqgan", "--data", tiny_prepared, "--run", tmp_path / "run", "--preset", "tiny", "--set", setting)
    assert rc == 2
    one_error_line(err, "train", setting.split("=")[0])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("verb, setting", [(["priors", "train"], "steps=0"), (["priors", "train"], "lr=inf"),
                                           (["downstream", "supervised"], "batch_size=0")])
def test_other_configs_refuse_zero_counts_and_non_finite_numbers(tiny_prepared, tmp_path, capsys, verb, setting):
    rc, _, err = lad(capsys, *verb, "--data", tiny_prepared, "--out", tmp_path / "o", "--preset", "tiny", "--set", setting)
    assert rc == 2
    one_error_line(err, verb[0], setting.split("=")[0], "must be a")
    assert not (tmp_path / "o").exists()


def test_resume_with_fewer_steps_than_done_is_refused(run_copy, tiny_prepared, capsys):
    before = tree(run_copy)
    rc, _, err = lad(capsys, "train", "diffusion", "--data", tiny_prepared, "--run", run_copy, "--preset", "tiny", "--resume",
                     "--set", "diffusion_train.steps=5")
    assert rc == 2
    one_error_line(err, "train", "diffusion_train.steps=5", "already at step 12")
    assert tree(run_copy) == before


# ------------------------------------------------------------------ 5. resume notices changed inputs


def test_prepare_resume_redoes_changed_added_and_removed_cases(raw3, tiny_prepared, tmp_path, capsys):
    out = tmp_path / "prep"
    cmd = ["prepare", "--layout", "abdomenct1k", "--input", raw3, "--output", out, "--preset", "tiny"]
    assert lad(capsys, *cmd)[0] == 0
    first = json.loads((out / "manifest.json").read_text())
    assert first["splits"]["train"] + first["splits"]["test"] and len({w["patient"] for w in first["windows"]}) == 3
    # case 2's image replaced by case 4's (another patient), case 3 removed, case 5 added
    src = tiny_prepared.parent / "raw"
    shutil.copyfile(src / "Case_00004_0000.nii.gz", raw3 / "Case_00002_0000.nii.gz")
    shutil.copyfile(src / "Case_00004.nii.gz", raw3 / "Case_00002.nii.gz")
    for f in raw3.glob("Case_00003*"):
        f.unlink()
    for f in src.glob("Case_00005*"):
        shutil.copy2(f, raw3 / f.name)
    old1 = (out / "patients" / "Case_00001" / "image.npy").read_bytes()
    rc, _, err = lad(capsys, *cmd)
    assert rc == 0, err
    assert "changed since they were prepared" in err and "Case_00002" in err and "no longer in the input" in err
    man = json.loads((out / "manifest.json").read_text())
    assert sorted({w["patient"] for w in man["windows"]}) == ["Case_00001", "Case_00002", "Case_00005"]
    assert not (out / "patients" / "Case_00003").exists()
    assert (out / "patients" / "Case_00001" / "image.npy").read_bytes() == old1  # unchanged case kept as it was
    # what Case_00002 holds now is case 4's data, exactly as a fresh prepare of it gives
    fresh = tmp_path / "fresh"
    (fresh / "in").mkdir(parents=True)
    shutil.copyfile(src / "Case_00004_0000.nii.gz", fresh / "in" / "Case_00002_0000.nii.gz")
    shutil.copyfile(src / "Case_00004.nii.gz", fresh / "in" / "Case_00002.nii.gz")
    assert lad(capsys, "prepare", "--layout", "abdomenct1k", "--input", fresh / "in", "--output", fresh / "p", "--preset", "tiny")[0] == 0
    assert np.array_equal(np.load(out / "patients" / "Case_00002" / "image.npy"), np.load(fresh / "p" / "patients" / "Case_00002" / "image.npy"))


def test_prepare_resume_redoes_a_patient_with_a_corrupt_record(raw3, tmp_path, capsys):
    out = tmp_path / "prep"
    cmd = ["prepare", "--layout", "abdomenct1k", "--input", raw3, "--output", out, "--preset", "tiny"]
    assert lad(capsys, *cmd)[0] == 0
    manifest = (out / "manifest.json").read_bytes()
    truncate(out / "patients" / "Case_00001" / "meta.json")
    rc, _, err = lad(capsys, *cmd)
    assert rc == 0 and "corrupt record" in err, err
    assert (out / "manifest.json").read_bytes() == manifest  # redone exactly


def test_corrupt_latent_stats_is_named(run_copy, tiny_prepared, tmp_path, capsys):
    truncate(run_copy / "latent_stats.json")
    rc, _, err = lad(capsys, "sample", "--run", run_copy, "--masks", tiny_prepared, "--n", 1, "--out", tmp_path / "s", *FAST)
    assert rc == 2 and not (tmp_path / "s").exists()
    one_error_line(err, "sample", run_copy / "latent_stats.json", "corrupt latent scaling")


@pytest.mark.parametrize("fault", ["truncated", "deleted"])
def test_sample_resume_refuses_a_changed_mask_source(tiny_run, tiny_prepared, tmp_path, capsys, fault):
    masks = tmp_path / "masks"
    shutil.copytree(tiny_prepared, masks)
    out = tmp_path / "s"
    cmd = ["sample", "--run", tiny_run, "--masks", masks, "--n", 1, "--out", out, *FAST]
    assert lad(capsys, *cmd)[0] == 0
    victim = sorted((masks / "patients").glob("*/mask.npy"))[0]
    truncate(victim) if fault == "truncated" else victim.unlink()
    before = tree(out)
    rc, _, err = lad(capsys, *cmd[:5], "--n", 2, *cmd[7:])
    assert rc == 2
    one_error_line(err, "sample", out, "mask source", "changed since these samples were made", "--overwrite")
    assert tree(out) == before


def test_sample_folder_without_a_fingerprint_still_resumes(tiny_run, tiny_prepared, tmp_path, capsys):
    out = tmp_path / "s"
    cmd = ["sample", "--run", tiny_run, "--masks", tiny_prepared, "--n", 1, "--out", out, *FAST]
    assert lad(capsys, *cmd)[0] == 0
    settings = json.loads((out / "sampling.json").read_text())
    del settings["masks_fingerprint"]  # a folder written before fingerprints were recorded
    (out / "sampling.json").write_text(json.dumps(settings))
    rc, _, err = lad(capsys, *cmd[:5], "--n", 2, *cmd[7:])
    assert rc == 0, err
    assert "masks_fingerprint" in json.loads((out / "sampling.json").read_text())  # tracked from now on


# ------------------------------------------------------------------ 7. geometry and blank CT


def _volume(arr, spacing=(5.0, 5.0, 5.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection([float(d) for d in direction])
    return img


def test_flipped_label_header_is_aligned_by_geometry_or_refused(tmp_path):
    from lad.data.io import CaseError, read_pair
    from lad.downstream.supervised.data import _read_pair

    d, h, w = 6, 10, 12
    hu = np.full((d, h, w), -1000, np.int16)
    hu[:, 2:8, 2:10] = 40
    lab = np.zeros((d, h, w), np.uint8)
    lab[:, 3:6, 2:5] = 1  # organ on the low-x side of the image
    sitk.WriteImage(_volume(hu), str(tmp_path / "ct.nii.gz"))
    # the same label stored mirrored along x: array flipped, direction -x, origin at the far x end
    mirrored = _volume(np.ascontiguousarray(lab[:, :, ::-1]), origin=((w - 1) * 5.0, 0, 0), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(mirrored, str(tmp_path / "mirrored.nii.gz"))
    img, out = read_pair(tmp_path / "ct.nii.gz", tmp_path / "mirrored.nii.gz")
    ref, _ = read_pair(tmp_path / "ct.nii.gz", tmp_path / "ct.nii.gz")
    exp = sitk.GetArrayFromImage(sitk.DICOMOrient(_volume(lab), "LPS"))
    assert np.array_equal(sitk.GetArrayFromImage(out), exp)
    _, m, _ = _read_pair(tmp_path / "ct.nii.gz", tmp_path / "mirrored.nii.gz")  # downstream reads pairs the same way
    assert np.array_equal(m, exp)
    # a flipped header with the image's origin covers other space: refused, never paired by array shape
    sitk.WriteImage(_volume(lab, direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1)), str(tmp_path / "flipped.nii.gz"))
    with pytest.raises(CaseError, match=f"{tmp_path / 'flipped.nii.gz'}: label covers a different physical extent"):
        read_pair(tmp_path / "ct.nii.gz", tmp_path / "flipped.nii.gz")
    with pytest.raises(CaseError, match="flipped.nii.gz: label covers a different physical extent"):
        _read_pair(tmp_path / "ct.nii.gz", tmp_path / "flipped.nii.gz")


def test_air_only_ct_is_refused_with_its_name(raw3, tmp_path, capsys):
    ct = raw3 / "Case_00001_0000.nii.gz"
    img = sitk.ReadImage(str(ct))
    blank = sitk.Image(img.GetSize(), img.GetPixelID())
    blank.CopyInformation(img)
    blank = blank - 1000
    sitk.WriteImage(blank, str(ct), useCompression=True)
    rc, _, err = lad(capsys, "prepare", "--layout", "abdomenct1k", "--input", raw3, "--output", tmp_path / "p", "--preset", "tiny")
    assert rc == 0, err
    dropped = json.loads((tmp_path / "p" / "manifest.json").read_text())["dropped"]
    assert [(d["patient"], d["file"]) for d in dropped] == [("Case_00001", str(ct))]
    assert "air only" in dropped[0]["reason"] and "not a patient CT" in dropped[0]["reason"]


# ------------------------------------------------------------------ 8. one writer per sample folder


def test_second_sampler_into_the_same_folder_is_refused(tiny_run, tiny_prepared, tmp_path, capsys):
    out = tmp_path / "s"
    cmd = ["sample", "--run", tiny_run, "--masks", tiny_prepared, "--n", 1, "--out", out, *FAST]
    assert lad(capsys, *cmd)[0] == 0
    assert not list(out.glob(".lock*"))  # released when done
    holder = subprocess.Popen(["sleep", "60"])  # a live process "holding" the folder
    try:
        (out / ".lock.0-of-1").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        before = tree(out)
        rc, _, err = lad(capsys, *cmd[:5], "--n", 2, *cmd[7:])
        assert rc == 2
        one_error_line(err, "sample", out / ".lock.0-of-1", f"pid {holder.pid}", socket.gethostname())
        assert tree(out) == before
        # a disjoint shard may run at the same time; an overlapping one may not
        rc, _, err = lad(capsys, *cmd[:5], "--n", 2, *cmd[7:], "--shard", "1/2")
        assert rc == 2, err  # 1/2 overlaps 0/1
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over
    rc, _, err = lad(capsys, *cmd[:5], "--n", 2, *cmd[7:])
    assert rc == 0, err
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2 and not list(out.glob(".lock*"))


def test_disjoint_shards_do_not_block_each_other(tmp_path):
    from lad.sampling.writer import SampleFolder

    f = SampleFolder(tmp_path / "s")
    a = f.lock((0, 2))
    b = f.lock((1, 2))
    with pytest.raises(FileExistsError, match=r"pid \d+ on host"):
        SampleFolder(tmp_path / "s").lock((0, 4))  # overlaps 0/2 (indices 0, 4, 8, ...)
    f.unlock(a)
    f.unlock(b)


# ------------------------------------------------------------------ 9, 10. outputs are never replaced silently


def test_evaluate_refuses_an_existing_report(fault_samples, tiny_prepared, tmp_path, capsys):
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "metrics.json").write_text("{}\n")
    (rep / "report.html").write_text("<html>mine</html>\n")
    before = tree(rep)
    rc, _, err = lad(capsys, "evaluate", "--real", tiny_prepared, "--synthetic", fault_samples, "--out", rep, "--pairs", 1)
    assert rc == 2
    one_error_line(err, "evaluate", rep, "metrics.json and report.html", "--overwrite")
    assert tree(rep) == before
    # a missing input is refused before the report folder is created
    rc, _, err = lad(capsys, "evaluate", "--real", tiny_prepared, "--synthetic", tmp_path / "nope", "--out", tmp_path / "r2")
    assert rc == 2 and not (tmp_path / "r2").exists()
    one_error_line(err, "evaluate", tmp_path / "nope", "not a lad sample folder")


def test_export_window_refuses_existing_files_and_bad_indices(tiny_prepared, tmp_path, capsys):
    wid = json.loads((tiny_prepared / "manifest.json").read_text())["windows"][0]["id"]
    out = tmp_path / "view"
    assert lad(capsys, "export-window", tiny_prepared, wid, "--out", out)[0] == 0
    before = tree(out)
    assert sorted(before) == [f"{wid}_image.nii.gz", f"{wid}_mask.nii.gz", f"{wid}_organs.nii.gz"]
    mode = (out / f"{wid}_image.nii.gz").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # 15: the user's umask, not a temporary file's 0600
    rc, _, err = lad(capsys, "export-window", tiny_prepared, wid, "--out", out)
    assert rc == 2
    one_error_line(err, "export-window", out / f"{wid}_image.nii.gz", "exists", "--overwrite")
    assert tree(out) == before
    assert lad(capsys, "export-window", tiny_prepared, wid, "--out", out, "--overwrite")[0] == 0
    # a manifest whose window index is past the patient's arrays
    prep = tmp_path / "prep"
    shutil.copytree(tiny_prepared, prep)
    man = json.loads((prep / "manifest.json").read_text())
    man["windows"][0]["index"] = 99
    (prep / "manifest.json").write_text(json.dumps(man))
    rc, _, err = lad(capsys, "export-window", prep, wid, "--out", tmp_path / "v2")
    assert rc == 2
    one_error_line(err, "export-window", prep / "patients" / man["windows"][0]["patient"] / "image.npy", "index 99")
    assert not (tmp_path / "v2").exists()
    rc, _, err = lad(capsys, "export-window", prep, "no_such_window", "--out", tmp_path / "v2")
    assert rc == 2 and not (tmp_path / "v2").exists()
    one_error_line(err, "export-window", "no window 'no_such_window'")


# ------------------------------------------------------------------ 11. the OS refuses a write


def test_full_disk_is_one_line_and_leaves_nothing(tiny_prepared, tmp_path, capsys, monkeypatch):
    wid = json.loads((tiny_prepared / "manifest.json").read_text())["windows"][0]["id"]

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sitk, "WriteImage", full)
    out = tmp_path / "view"
    rc, _, err = lad(capsys, "export-window", tiny_prepared, wid, "--out", out)
    assert rc == 2
    one_error_line(err, "export-window", f"{out / wid}_image.nii.gz: No space left on device")
    assert tree(out) == {}  # no temporary file left behind


def test_itk_writer_that_fails_silently_is_caught(tiny_prepared, tmp_path, capsys, monkeypatch):
    """ITK's NIfTI writer only prints "** ERROR: NWAD" on a full disk: the written bytes are checked."""
    wid = json.loads((tiny_prepared / "manifest.json").read_text())["windows"][0]["id"]
    real = sitk.WriteImage

    def short_write(img, path, *a, **k):
        real(img, path, *a, **k)
        truncate(Path(path), 0.5)

    monkeypatch.setattr(sitk, "WriteImage", short_write)
    out = tmp_path / "view"
    rc, _, err = lad(capsys, "export-window", tiny_prepared, wid, "--out", out)
    assert rc == 2
    one_error_line(err, "export-window", f"{out / wid}_image.nii.gz: could not write the image")
    assert tree(out) == {}


def test_real_full_tmpfs(tiny_prepared, tmp_path, capsys):
    """The same on a real 4 KiB tmpfs (needs root and mount; skipped elsewhere)."""
    wid = json.loads((tiny_prepared / "manifest.json").read_text())["windows"][0]["id"]
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        rc, _, err = lad(capsys, "export-window", tiny_prepared, wid, "--out", mnt / "v")
        assert rc == 2
        one_error_line(err, "export-window", f"{mnt / 'v' / wid}_image.nii.gz: No space left on device")
        assert tree(mnt) == {}
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_permission_denied_is_one_line_and_leaves_nothing(tiny_run, tiny_prepared, tmp_path, capsys, monkeypatch):
    import lad.utils.atomic as atomic

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    out = tmp_path / "s"
    monkeypatch.setattr(atomic.os, "replace", denied)  # the rename into the output folder is refused
    rc, _, err = lad(capsys, "sample", "--run", tiny_run, "--masks", tiny_prepared, "--n", 1, "--out", out, *FAST)
    assert rc == 2
    one_error_line(err, "sample", out / "sampling.json", "Permission denied")
    assert not [p for p in out.rglob("*") if p.is_file()]  # no temporary or half-written file, no lock left


# ------------------------------------------------------------------ 12. corrupt checkpoint


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
    import torch

    from lad.training.checkpoint import CheckpointManager

    ckpt = CheckpointManager(tmp_path / "ck", keep_last=3)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ckpt.save(1, {"net": net}, {"opt": opt}, {"x": 1})
    good = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1)
    ckpt.save(2, {"net": net}, {"opt": opt}, {"x": 2})
    truncate(ckpt.folder(2) / "net.safetensors")
    fresh = torch.nn.Linear(3, 2)
    with caplog.at_level(logging.WARNING, logger="lad"):
        state = ckpt.load_latest({"net": fresh}, {"opt": torch.optim.SGD(fresh.parameters(), lr=0.1)})
    assert state["step"] == 1 and torch.equal(fresh.weight, good["weight"])
    assert str(ckpt.folder(2)) in caplog.text and "instead of the newest checkpoint" in caplog.text
    truncate(ckpt.folder(1) / "trainer_state.pt")
    with pytest.raises(ValueError, match="every checkpoint is corrupt.*step_0000002.*step_0000001"):
        ckpt.load_latest({"net": fresh}, {"opt": torch.optim.SGD(fresh.parameters(), lr=0.1)})


def test_train_resume_over_a_corrupt_checkpoint(run_copy, tiny_prepared, capsys):
    ck = run_copy / "checkpoints" / "diffusion"
    newest = sorted(ck.glob("step_*"))[-1]
    truncate(newest / "net.safetensors")
    rc, _, err = lad(capsys, "train", "diffusion", "--data", tiny_prepared, "--run", run_copy, "--preset", "tiny", "--resume",
                     "--no-progress")
    assert rc == 0, err
    assert str(newest) in err and "instead of the newest checkpoint" in err


# ------------------------------------------------------------------ 14. mismatched latent config


def test_latent_config_mismatch_shows_both_sides(tiny_run, tiny_prepared, capsys):
    before = tree(tiny_run)
    rc, _, err = lad(capsys, "train", "diffusion", "--data", tiny_prepared, "--run", tiny_run, "--preset", "tiny", "--overwrite",
                     "--set", "vqgan.embedding_dim=4")
    assert rc == 2
    one_error_line(err, "train", "latent shape (8, 2, 8, 8)", "latent shape (4, 2, 8, 8)", "embedding_dim 8 (VQ-GAN) vs 4 (config)")
    rc, _, err = lad(capsys, "train", "diffusion", "--data", tiny_prepared, "--run", tiny_run, "--preset", "tiny", "--overwrite",
                     "--set", "vqgan.channels=[8, 16, 24]")
    assert rc == 2
    one_error_line(err, "train", "channels [8, 16, 16] (VQ-GAN) vs [8, 16, 24] (config)")
    assert tree(tiny_run) == before


# ------------------------------------------------------------------ beyond the list


def test_text_outputs_are_utf8_under_an_ascii_locale(tmp_path):
    import sys

    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = ("import sys; from lad.utils.atomic import write_text; assert sys.getfilesystemencoding(); "
            "import locale; print(locale.getpreferredencoding(False)); write_text(sys.argv[1], 'V0 \\u2014 Lad')")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.html")], env=env, capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 0, r.stderr  # the report's dash under an ASCII locale
    assert (tmp_path / "r.html").read_bytes() == "V0 \u2014 Lad".encode()


# ------------------------------------------------------------------ 15. file modes


def test_outputs_get_the_users_umask(tiny_run):
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in tiny_run.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".yaml")]
    assert files
    bad = {str(p.relative_to(tiny_run)): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != 0o666 & ~umask}
    assert not bad
    dirs = [p for p in tiny_run.rglob("*") if p.is_dir()]
    assert all(p.stat().st_mode & 0o777 == 0o777 & ~umask for p in dirs)


def test_full_disk_while_training_is_one_line_and_leaves_no_partial_checkpoint(tiny_prepared, tmp_path, capsys, monkeypatch):
    import lad.training.checkpoint as checkpoint
    from safetensors import SafetensorError

    def full(*a, **k):  # what safetensors raises on a full disk (measured on a 64 KiB tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    run = tmp_path / "run"
    rc, _, err = lad(capsys, "train", "vqgan", "--data", tiny_prepared, "--run", run, "--preset", "tiny", "--no-progress")
    assert rc == 2
    one_error_line(err, "train", f"{run / 'checkpoints' / 'vqgan' / 'step_0000004'}: No space left on device")
    assert not list((run / "checkpoints" / "vqgan").iterdir()) and not (run / "vqgan").exists()


def test_torch_save_on_a_full_disk_becomes_an_os_error(tmp_path, monkeypatch):
    import shutil as sh

    import torch

    from lad.utils import atomic

    def zip_writer_fails(*a, **k):  # torch.save's error on a full disk (64 KiB tmpfs)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", zip_writer_fails)
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(1 << 30, 1 << 30, 0))
    with pytest.raises(OSError, match="No space left on device") as e:
        with atomic.atomic_dir(tmp_path / "ck") as tmp:
            torch.save({}, tmp / "a.pt")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []

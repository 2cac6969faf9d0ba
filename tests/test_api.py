"""The public Python API: ``import lad`` names, ``LatentScaler``, ``LadPipeline.from_pretrained`` /
``save_pretrained`` / ``.to`` / ``generator=``, and the README's "Use from Python" block, run as written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lad
from lad.sampling.pipeline import LadPipeline
from lad.training.latents import LatentScaler

ROOT = Path(__file__).resolve().parents[1]


def _masks(prepared, n=2):
    ds = lad.PreparedDataset(prepared, split="train")
    return torch.stack([torch.from_numpy(ds[i]["mask"]) for i in range(n)])  # (n, 1, D, H, W) uint8


def _old_latent_stats(z: torch.Tensor) -> dict:
    """The scaling as the trainer computed it before LatentScaler (the oracle)."""
    zc = z.transpose(0, 1).reshape(z.shape[1], -1).double()
    mean, std = zc.mean(1), zc.std(1).clamp(min=1e-6)
    abs_max = float(((zc - mean[:, None]) / std[:, None]).abs().max())
    return {"method": "per-channel mean/std", "shift": mean.tolist(), "scale": std.tolist(), "scaled_abs_max": abs_max}


def test_import_lad_is_light_and_exports_the_main_objects():
    code = "import sys, lad; print(sorted(m for m in ('torch', 'monai', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", check=True).stdout.strip()
    assert out == "[]"  # the names load on first use
    expected = {"PreparedDataset", "LadPipeline", "VQGAN", "LatentDenoiser", "ConditionExtractor", "LatentScaler", "train_vqgan",
                "train_diffusion", "generate_samples", "evaluate", "resolve_train_config"}
    assert expected <= set(lad.__all__)
    from lad.data.dataset import PreparedDataset
    from lad.evaluation.evaluate import evaluate
    from lad.models.condition import ConditionExtractor
    from lad.models.denoiser import LatentDenoiser
    from lad.models.vqgan import VQGAN
    from lad.sampling.generate import generate_samples
    from lad.training.config import resolve_train_config
    from lad.training.diffusion_trainer import train_diffusion
    from lad.training.vqgan_trainer import train_vqgan

    for obj in (PreparedDataset, evaluate, ConditionExtractor, LatentDenoiser, VQGAN, generate_samples, resolve_train_config,
                train_diffusion, train_vqgan, LadPipeline, LatentScaler):
        assert getattr(lad, obj.__name__) is obj
    assert all(hasattr(lad, n) for n in lad.__all__) and set(lad.__all__) <= set(dir(lad))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lad.nope  # noqa: B018


def test_latent_scaler_matches_the_old_numbers_and_round_trips(tiny_run):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 3, 2, 4, 4, generator=g) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1, 1) + 2.0
    z[:, 2] = 0.25  # a constant channel: std clamped at 1e-6
    sc = LatentScaler.fit(z)
    old = _old_latent_stats(z)
    assert sc.to_dict() == old
    # applied as the trainer did: float32 tensors from the JSON numbers
    shift = torch.tensor(old["shift"]).view(1, -1, 1, 1, 1)
    scale = torch.tensor(old["scale"]).view(1, -1, 1, 1, 1)
    assert torch.equal(sc.scale(z), (z - shift) / scale)
    y = sc.scale(z)
    assert torch.equal(sc.unscale(y), y * scale + shift)
    assert torch.allclose(sc.unscale(y), z, atol=1e-5)
    assert torch.allclose(y[:, :2].mean((0, 2, 3, 4)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(y[:, :2].std((0, 2, 3, 4)), torch.ones(2), atol=1e-5)
    # to_dict / from_dict (through JSON) and .to
    back = LatentScaler.from_dict(json.loads(json.dumps(sc.to_dict())))
    assert back == sc and back.to("cpu") is back and torch.equal(back.scale(z), sc.scale(z))
    # an existing run's latent_stats.json loads as it is, and matches the numbers of its cached latents
    stats = json.loads((tiny_run / "latent_stats.json").read_text(encoding="utf-8"))
    from safetensors.torch import load_file

    cache = load_file(str(tiny_run / "latent_cache" / "latents.safetensors"))
    assert LatentScaler.from_dict(stats) == LatentScaler.fit(cache["z"])
    assert {k: stats[k] for k in ("method", "shift", "scale", "scaled_abs_max")} == _old_latent_stats(cache["z"])
    # a run saved with scalar statistics or without scaled_abs_max still loads
    scalar = LatentScaler.from_dict({"shift": 0.5, "scale": 2.0})
    assert scalar.scaled_abs_max is None and torch.equal(scalar.unscale(torch.ones(1, 3, 2, 2, 2)), torch.full((1, 3, 2, 2, 2), 2.5))
    with pytest.raises(ValueError, match="missing \\['scale'\\]"):
        LatentScaler.from_dict({"shift": [0.0]}, source="x.json")
    with pytest.raises(ValueError, match="scale > 0"):
        LatentScaler([0.0], [0.0])


def test_generator_equals_seeds_and_keeps_samples_independent(tiny_run, tiny_prepared):
    pipe = LadPipeline.from_pretrained(tiny_run)
    masks = _masks(tiny_prepared)
    a = pipe(masks, seeds=[3, 4], steps=3)
    b = pipe(masks, generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)], steps=3)
    assert torch.equal(a, b)
    one = pipe(masks[1:], generator=[torch.Generator().manual_seed(4)], steps=3)
    assert torch.allclose(one, a[1:], atol=1e-5)  # a per-sample generator: independent of the batch
    # one generator for the batch (diffusers' convention): reproducible from its seed
    c = pipe(masks, generator=torch.Generator().manual_seed(3), steps=3)
    d = pipe(masks, generator=torch.Generator().manual_seed(3), steps=3)
    assert torch.equal(c, d) and torch.equal(c[0], a[0]) and not torch.equal(c[1], a[1])
    # DDPM draws noise at every step from the same generators
    e = pipe(masks, seeds=[3, 4], steps=3, sampler="ddpm")
    f = pipe(masks, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], steps=3, sampler="ddpm")
    assert torch.equal(e, f) and not torch.equal(e, a)
    with pytest.raises(ValueError, match="exactly one of them"):
        pipe(masks, seeds=[1, 2], generator=torch.Generator())
    with pytest.raises(ValueError, match="exactly one of them"):
        pipe(masks)
    with pytest.raises(ValueError, match="one generator per mask: 1 generators for 2 masks"):
        pipe(masks, generator=[torch.Generator()])


def test_save_pretrained_round_trip_is_bit_for_bit(tiny_run, tiny_prepared, tmp_path):
    pipe = LadPipeline.from_pretrained(tiny_run).to("cpu")
    out = pipe.save_pretrained(tmp_path / "export")
    assert out == tmp_path / "export"
    assert sorted(p.name for p in out.iterdir()) == ["condition", "denoiser", "latent_stats.json", "model_index.json",
                                                    "pipeline_config.json", "scheduler", "vqgan"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    index = json.loads((out / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == "LadPipeline" and index["format"] == "lad-pipeline" and index["version"] == 1
    assert index["checkpoint_hash"] == pipe.checkpoint_hash
    assert json.loads((out / "pipeline_config.json").read_text(encoding="utf-8"))["sampling"] == \
        {"sampler": "ddim", "steps": 50, "guidance": 1.0}  # the tiny run's sampling defaults
    run_stats = json.loads((tiny_run / "latent_stats.json").read_text(encoding="utf-8"))
    exp_stats = json.loads((out / "latent_stats.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in exp_stats.items() if k != "vqgan_hash"} == {k: v for k, v in run_stats.items() if k != "vqgan_hash"}
    # the weights are the EMA ones the run samples with
    from safetensors.torch import load_file

    for part, src in (("denoiser", "denoiser_ema"), ("condition", "condition"), ("vqgan", "vqgan")):
        a, b = load_file(str(out / part / "model.safetensors")), load_file(str(tiny_run / src / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part

    pipe2 = lad.LadPipeline.from_pretrained(out)
    assert pipe2.sampling == pipe.sampling and pipe2.scaler == pipe.scaler and pipe2.checkpoint_hash == pipe.checkpoint_hash
    masks = _masks(tiny_prepared)
    for kwargs in ({"steps": 4}, {"steps": 3, "sampler": "ddpm", "guidance": 2.0}):
        gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8)]  # noqa: E731
        assert torch.equal(pipe(masks, generator=gens(), **kwargs), pipe2(masks, generator=gens(), **kwargs)), kwargs
    # an export of the export is the same export
    pipe2.save_pretrained(tmp_path / "again")
    for f in ("latent_stats.json", "model_index.json", "pipeline_config.json", "vqgan/model.safetensors",
              "denoiser/model.safetensors", "scheduler/scheduler_config.json"):
        assert (tmp_path / "again" / f).read_bytes() == (out / f).read_bytes(), f


def test_save_pretrained_refuses_an_existing_folder(tiny_run, tmp_path):
    from lad.utils.atomic import OutputExistsError

    pipe = LadPipeline.from_pretrained(tiny_run)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(OutputExistsError, match="busy: exists and is not empty; pass overwrite=True"):
        pipe.save_pretrained(busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]  # untouched
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    with pytest.raises(OutputExistsError, match="afile: exists and is not a folder"):
        pipe.save_pretrained(tmp_path / "afile", overwrite=True)
    pipe.save_pretrained(busy, overwrite=True)
    assert not (busy / "keep.txt").exists() and (busy / "model_index.json").is_file()
    (tmp_path / "empty").mkdir()
    pipe.save_pretrained(tmp_path / "empty")  # an empty folder is fine
    for where in (tmp_path, tmp_path / "missing"):
        with pytest.raises(FileNotFoundError, match="no trained VQ-GAN .* or give an exported pipeline, a folder with model_index.json"):
            LadPipeline.from_pretrained(where)
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "empty", broken)
    (broken / "model_index.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="model_index.json: corrupt pipeline index"):
        LadPipeline.from_pretrained(broken)
    shutil.rmtree(broken / "denoiser")
    (broken / "model_index.json").write_text((tmp_path / "empty" / "model_index.json").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="broken/denoiser: missing"):
        LadPipeline.from_pretrained(broken)


def test_lad_sample_runs_an_export_like_its_run(tiny_run, tiny_prepared, tmp_path):
    from lad.cli import main

    export = LadPipeline.from_pretrained(tiny_run).save_pretrained(tmp_path / "export")
    for name, src in (("from-run", tiny_run), ("from-export", export)):
        assert main(["sample", "--run", str(src), "--masks", str(tiny_prepared), "--n", "2", "--out", str(tmp_path / name),
                     "--steps", "3", "--no-progress"]) == 0
    recs = {name: [json.loads(x) for x in (tmp_path / name / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
            for name in ("from-run", "from-export")}
    for a, b in zip(recs["from-run"], recs["from-export"]):
        assert a == b  # same seeds, masks, augmentation, checkpoint hash, files
        for f in a["files"].values():
            assert (tmp_path / "from-run" / f).read_bytes() == (tmp_path / "from-export" / f).read_bytes()


def _readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "README.md: expected two python blocks under 'Use from Python'"
    return blocks


def test_readme_python_block_runs(tiny_run, tiny_prepared, tmp_path, monkeypatch):
    code = _readme_blocks()[0]
    for path in ('"prepared/"', '"runs/lad"', '"export/"'):
        assert path in code, path
    assert code.count("steps=50") == 2
    code = (code.replace('"prepared/"', repr(str(tiny_prepared))).replace('"runs/lad"', repr(str(tiny_run)))
            .replace('"export/"', repr(str(tmp_path / "export")))
            .replace("steps=50", "steps=5"))  # the suite's budget; the tiny run's 50 steps behave the same
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    vols, again = scope["volumes"], scope["again"]
    assert vols.shape == (2, 1, 8, 32, 32) and vols.dtype == torch.float32 and 0 <= vols.min() and vols.max() <= 1
    assert torch.equal(vols, again)  # the exported pipeline samples the same volumes
    assert (tmp_path / "export" / "model_index.json").is_file()
    hu = scope["hu"]
    assert hu.shape == (2, 1, 8, 32, 32) and hu.dtype == np.float32 and hu.min() >= -1000 and hu.max() <= 400


@pytest.mark.slow
def test_readme_training_block_runs(tiny_prepared, tmp_path, monkeypatch):
    """The second block (train, sample to a folder, evaluate) on the tiny preset with a few steps."""
    code = _readme_blocks()[1]
    for old in ('"demo"', "diffusion_train.steps=2000", "n=16"):
        assert old in code, old
    code = (code.replace('"demo"', '"tiny"').replace("diffusion_train.steps=2000", "diffusion_train.steps=4")
            .replace("n=16", "n=3, steps=2").replace('"prepared/"', repr(str(tiny_prepared))))
    monkeypatch.chdir(tmp_path)
    exec(compile("import lad\n" + code, "README.md", "exec"), {})  # noqa: S102
    assert (tmp_path / "runs" / "lad" / "denoiser_ema" / "model.safetensors").is_file()
    assert len((tmp_path / "samples" / "manifest.jsonl").read_text(encoding="utf-8").splitlines()) == 3
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text(encoding="utf-8"))
    assert "Lad" in json.dumps(metrics)

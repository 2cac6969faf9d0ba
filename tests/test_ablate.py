"""`lad ablate`: every variant (and every priors dataset) is trained, sampled and evaluated into one table;
a rerun resumes without retraining; a priors dataset on other windows is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

from conftest import HANDMADE_RUN_SETTINGS
from lad.evaluation.ablate import run_ablation


def _degraded_copy(prepared, dst):
    """The same windows with coarser organ masks (one voxel of erosion): priors of a weaker segmenter."""
    shutil.copytree(prepared, dst)
    for mask_file in sorted((dst / "patients").glob("*/mask.npy")):
        m = np.load(mask_file)
        organ = ndimage.binary_erosion(m > 0, iterations=1)
        np.save(mask_file, np.where(organ, m, 0).astype(np.uint8))
    return dst


def test_ablation_with_a_priors_dataset(handmade_prepared, tmp_path):
    weak = _degraded_copy(handmade_prepared, tmp_path / "weak")
    out = tmp_path / "ablation"
    kwargs = dict(preset="tiny", variants=["V0", "full"], overrides=HANDMADE_RUN_SETTINGS, n_samples=2, steps=2,
                  n_pairs=2, priors_data={"weak": weak})
    res = run_ablation(handmade_prepared, out, **kwargs)
    assert set(res["sets"]) == {"V0", "V0@weak", "full", "full@weak"}
    for e in res["sets"].values():
        assert np.isfinite(e["fid"]) and e["n"] == 2
    assert (out / "evaluation" / "report.html").exists()
    # the priors run was trained on the degraded masks: its sampling conditions come from them
    cond = json.loads((out / "samples" / "full@weak" / "manifest.jsonl").read_text().splitlines()[0])
    assert str(weak) in json.dumps(cond)
    # resumable: a rerun trains nothing again
    model = out / "runs" / "full@weak" / "vqgan" / "model.safetensors"
    before = model.stat().st_mtime_ns
    res2 = run_ablation(handmade_prepared, out, **kwargs)
    assert model.stat().st_mtime_ns == before
    assert res2["sets"]["full"]["fid"] == pytest.approx(res["sets"]["full"]["fid"])


def test_priors_dataset_on_other_windows_is_refused(handmade_prepared, tiny_prepared, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(handmade_prepared, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["config"]["depth"] = 16
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="priors dataset 'bad'.*shape"):
        run_ablation(handmade_prepared, tmp_path / "out", preset="tiny", variants=["full"], priors_data={"bad": other})
    with pytest.raises(ValueError, match="plain name"):
        run_ablation(handmade_prepared, tmp_path / "out", preset="tiny", variants=["full"], priors_data={"a@b": handmade_prepared})

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
    names = {"V0", "V0@weak", "full", "full@weak"}
    assert set(res["sets"]) == names | {f"{n} (original masks)" for n in names}  # the two columns of Table 2
    for e in res["sets"].values():
        assert np.isfinite(e["fid"]) and e["n"] == 2
    assert (out / "evaluation" / "report.html").exists()
    # the priors run was trained on the degraded masks: its sampling conditions come from them
    cond = json.loads((out / "samples" / "full@weak" / "manifest.jsonl").read_text().splitlines()[0])
    assert str(weak) in json.dumps(cond)
    orig = json.loads((out / "samples" / "full@weak_original_masks" / "manifest.jsonl").read_text().splitlines()[0])
    assert orig["augmentation"] != cond["augmentation"]
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


def test_seeds_give_mean_std_intervals_and_significance(handmade_prepared, tmp_path):
    from scipy import stats

    out = tmp_path / "ablation"
    res = run_ablation(handmade_prepared, out, preset="tiny", variants=["V0", "full"], overrides=HANDMADE_RUN_SETTINGS,
                       n_samples=2, steps=2, n_pairs=2, seeds=2, seed=3, n_boot=20)
    assert (out / "runs" / "full" / "seed3").is_dir() and (out / "runs" / "full" / "seed4").is_dir()
    rows = res["ablation"]
    assert {(r["variant"], r["masks"]) for r in rows} == {(v, m) for v in ("V0", "full") for m in ("augmented", "original")}
    for r in rows:
        assert r["seeds"] == [3, 4] and len(r["per_seed"]) == 2 and r["per_seed"][0] != r["per_seed"][1]
        half = stats.t.ppf(0.975, 1) * np.std(r["per_seed"], ddof=1) / np.sqrt(2)
        assert r["mean"] == pytest.approx(np.mean(r["per_seed"])) and r["ci95"] == pytest.approx([r["mean"] - half, r["mean"] + half])
        if r["variant"] == "V0":
            assert r["significant"] is None
        else:
            b = next(x for x in rows if x["variant"] == "V0" and x["masks"] == r["masks"] and x["metric"] == r["metric"])
            assert r["significant"] == (r["ci95"][0] > b["ci95"][1] or r["ci95"][1] < b["ci95"][0])
    csv_lines = (out / "ablation.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows) and csv_lines[0].startswith("variant,guidance,masks,metric,mean,std")
    md = (out / "ablation.md").read_text()
    assert "FID (augmented masks)" in md and "FID (original masks)" in md and "| full |" in md
    assert (out / "ablation.png").stat().st_size > 1000 and not (out / "guidance.md").exists()


def test_guidance_sweep_samples_one_model_at_every_w(handmade_prepared, tmp_path):
    out = tmp_path / "ablation"
    res = run_ablation(handmade_prepared, out, preset="tiny", variants=["full"], overrides=HANDMADE_RUN_SETTINGS, n_samples=2,
                       steps=2, n_pairs=2, guidance=[0, 1, 4], masks=["augmented"], n_boot=20)
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["full"]  # one training for the sweep
    assert set(res["sets"]) == {"full w=0", "full w=1", "full w=4"}
    for w in (0, 1, 4):
        rec = json.loads((out / "samples" / f"full_w={w}" / "manifest.jsonl").read_text().splitlines()[0])
        assert rec["guidance"] == w
    fids = {r["guidance"]: r["mean"] for r in res["ablation"] if r["metric"] == "fid"}
    assert set(fids) == {0.0, 1.0, 4.0}  # one row per w (the 4-step tiny model's samples barely depend on w)
    assert all(len(r["ci95"]) == 2 and np.isfinite(r["ci95"]).all() for r in res["ablation"])  # one seed: bootstrap interval
    md = (out / "guidance.md").read_text()
    assert all(f"| full | {w} |" in md for w in (0, 1, 4))
    assert (out / "guidance.png").stat().st_size > 1000


def test_summary_marks_only_non_overlapping_intervals(tmp_path):
    from lad.evaluation.ablate import _write_tables, summarise

    res, index = {"sets": {}}, {}
    values = {"V0": (10.0, 10.2, 9.8), "near": (10.1, 10.4, 9.9), "far": (5.0, 5.1, 4.9)}
    for v, vals in values.items():
        for s, x in enumerate(vals):
            name = f"{v} s{s}"
            res["sets"][name] = {"fid": x, "fid_localized": x, "mmd": x, "mmd_localized": x, "n": 8}
            index[name] = {"variant": v, "seed": s, "guidance": 1.0, "masks": "augmented"}
    rows = {(r["variant"], r["metric"]): r for r in summarise(res, index)}
    assert rows[("V0", "fid")]["significant"] is None
    assert rows[("near", "fid")]["significant"] is False and rows[("far", "fid")]["significant"] is True
    assert rows[("far", "fid")]["per_seed"] == [5.0, 5.1, 4.9] and rows[("far", "fid")]["std"] == pytest.approx(0.1)
    _write_tables(tmp_path, list(rows.values()), [1.0], ["augmented"])
    md = (tmp_path / "ablation.md").read_text()
    far = next(line for line in md.splitlines() if line.startswith("| far |"))
    near = next(line for line in md.splitlines() if line.startswith("| near |"))
    assert far.count(" *") == 4 and " *" not in near and "5 ± 0.1" in far

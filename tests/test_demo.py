"""`lad demo --preset tiny` end to end: every stage, the report, resume and --from; the output-folder guards."""

from __future__ import annotations

import json
import re

import pytest

from lad.demo import STAGES, run_demo


def test_tiny_demo_end_to_end_and_resume(tmp_path):
    out = tmp_path / "demo"
    report = run_demo(out, preset="tiny")
    html = report.read_text()
    assert "Lad" in html and "V0 (Medical Diffusion)" in html and "What these numbers are" in html and "real-vs-real floor" in html
    assert "Pipeline settings" in html and "Time per stage" in html and "exactly Lad's budget" in html
    # curves, MDS, slices, histograms, closest synthetic-training pairs
    assert len(re.findall(r"data:image/png;base64,", html)) == 5
    assert "MDS" in html and "closest synthetic-training pairs" in html
    # the README picture: rows real / Lad / V0, one column per volume (at most 6; tiny: 4 samples per model), 1.9 x 2.0 in at 80 dpi
    from PIL import Image

    from lad.data.dataset import PreparedDataset

    n_test = len(PreparedDataset(out / "prepared", split="test"))
    n_real = n_test if n_test >= 2 else len(PreparedDataset(out / "prepared", split="train"))  # evaluate()'s fallback
    cols = min(6, max(4, n_real))
    with Image.open(out / "figures" / "overview.png") as img:
        assert img.format == "PNG" and img.size == (round(1.9 * cols * 80), round(2.0 * 3 * 80))
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert set(metrics["sets"]) == {"Lad", "V0 (Medical Diffusion)", "Lad, original masks", "V0, original masks"}
    # both models are sampled alike and without the median-HU redraws (a selection the paper does not make)
    assert all(e["selection"]["quality_check"] is False and e["selection"]["rejected"] == 0 for e in metrics["sets"].values())
    assert metrics["settings"]["selection_identical"] and "<td>none</td>" in html
    assert all((out / ".stages" / f"{s}.done").exists() for s in STAGES)
    timings = json.loads((out / ".stages" / "timings.json").read_text())
    assert set(timings) == set(STAGES)
    assert all(t["wall_s"] >= 0 and t["cpu_s"] >= 0 for t in timings.values())
    # summary.json: the headline numbers, flat, equal to those of metrics.json, the runs' reconstruction reports and timings
    from lad.demo import SUMMARY_KEYS

    summary = json.loads((out / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in summary.values())
    assert summary["wall_s"] == pytest.approx(sum(t["wall_s"] for t in timings.values()), abs=0.11)
    assert summary["cpu_s"] == pytest.approx(sum(t["cpu_s"] for t in timings.values()), abs=0.11)
    for run, pre in (("run-lad", ""), ("run-v0", "v0_")):
        rec = json.loads((out / run / "vqgan_reconstruction.json").read_text())
        assert summary[f"{pre}vqgan_heldout_mae_hu"] == rec["mae_body_hu"] > 0 and 1 <= rec["codes_used"] <= rec["num_embeddings"]
        assert summary[f"{pre}vqgan_codes_used"] == rec["codes_used"]
        assert rec["split"] == ("test" if n_test else "train (no test split)") and rec["n_windows"] == (n_test or len(
            PreparedDataset(out / "prepared", split="train")))
    lad, real = metrics["sets"]["Lad"], metrics["real"]
    assert set(lad["anatomy"]["present_fraction"]) == {"liver", "kidney", "spleen", "pancreas", "tumor"}
    assert summary["lad_anatomy_present_fraction"] == lad["anatomy"]["mean_liver_kidney_spleen"]
    assert summary["v0_anatomy_present_fraction"] == metrics["sets"]["V0 (Medical Diffusion)"]["anatomy"]["mean_liver_kidney_spleen"]
    assert summary["real_anatomy_present_fraction"] == real["anatomy"]["mean_liver_kidney_spleen"]
    assert summary["lad_fidelity_dice"] == lad["fidelity_dice"]["organ"] and summary["real_fidelity_dice"] == real["fidelity_dice"]["organ"]
    assert summary["lad_organ_hu_w1"] == lad["hu_w1"]["organ"] > 0
    assert summary["real_body_ok_fraction"] == 1.0  # the real windows lie within their own minimum-maximum body fraction
    assert summary["lad_fidelity_dice_low"] <= summary["lad_fidelity_dice"] <= summary["lad_fidelity_dice_high"]
    assert summary["lad_anatomy_present_fraction_low"] <= summary["lad_anatomy_present_fraction"] <= summary[
        "lad_anatomy_present_fraction_high"]
    ceiling = lad["decoder_ceiling"]
    assert summary["lad_decoder_ceiling_fidelity_dice"] == ceiling["fidelity_dice"]["organ"]
    assert summary["lad_decoder_ceiling_organ_hu_w1"] == ceiling["hu_w1"]["organ"] and "v0_decoder_ceiling_fidelity_dice" in summary
    # Table 2's other column: both models also sampled from the original training masks, unaugmented
    orig = metrics["sets"]["Lad, original masks"]
    assert summary["lad_original_fidelity_dice"] == orig["fidelity_dice"]["organ"] and "v0_original_fidelity_dice" in summary
    rows = [json.loads(line) for line in (out / "samples-lad-original" / "manifest.jsonl").read_text().splitlines() if line.strip()]
    assert rows and all(r["augmentation"]["kind"] == "none" for r in rows)
    assert "Anatomy and realism checks" in html and "VQ-GAN reconstruction (held-out windows)" in html
    # V0 has no condition extractor and no locality term; Lad has both; both got the same budget
    assert not (out / "run-v0" / "condition").exists() and (out / "run-lad" / "condition").exists()
    assert json.loads((out / "run-lad" / "logs" / "vqgan.jsonl").read_text().splitlines()[-1])["locality"] >= 0
    for part in ("vqgan", "diffusion"):
        logs = [(out / run / "logs" / f"{part}.jsonl").read_text().splitlines() for run in ("run-lad", "run-v0")]
        assert json.loads(logs[0][-1])["step"] == json.loads(logs[1][-1])["step"]
    # a second call resumes (nothing re-done); --from evaluate redoes only the evaluation
    stamp = (out / "samples-lad" / "manifest.jsonl").stat().st_mtime_ns
    run_demo(out, preset="tiny")
    assert (out / "samples-lad" / "manifest.jsonl").stat().st_mtime_ns == stamp
    before = (out / ".stages" / "evaluate.done").stat().st_mtime_ns
    run_demo(out, preset="tiny", start="evaluate")
    assert (out / ".stages" / "evaluate.done").stat().st_mtime_ns > before
    assert (out / "samples-lad" / "manifest.jsonl").stat().st_mtime_ns == stamp
    # the same folder with another seed is refused before anything is touched
    with pytest.raises(FileExistsError, match="other settings"):
        run_demo(out, preset="tiny", seed=1)
    assert (out / "samples-lad" / "manifest.jsonl").stat().st_mtime_ns == stamp


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a lad demo folder"):
        run_demo(tmp_path / "mine", preset="tiny")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("kwargs, message", [({"preset": "huge"}, "--preset"), ({"start": "deploy"}, "--from")])
def test_demo_rejects_unknown_preset_and_stage(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_demo(tmp_path / "d", **kwargs)
    assert not (tmp_path / "d").exists()

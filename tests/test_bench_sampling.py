"""benchmarks/bench_sampling.py's quality-against-steps mode: the plan (step counts cut to the run's training steps,
runs checked against their samplers), the table and plot from ``lad evaluate``'s metrics, and (slow) the whole mode."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_sampling  # noqa: E402


def _fake_run(root: Path, name: str, scheduler) -> Path:
    scheduler.save_pretrained(root / name / "scheduler")
    return root / name


def test_quality_plan_cuts_steps_and_checks_the_runs(tmp_path):
    from lad.schedulers import DDPMScheduler, RectifiedFlowScheduler

    eps = _fake_run(tmp_path, "eps", DDPMScheduler(num_train_timesteps=20, prediction_type="v_prediction"))
    rf = _fake_run(tmp_path, "rf", RectifiedFlowScheduler(num_train_timesteps=300))
    plan = bench_sampling.quality_plan({"eps": eps, "rf": rf})
    got = [(p["label"], p["sampler"], p["steps"], p["run"].name) for p in plan]
    assert got == [("DDPM-20", "ddpm", 20, "eps"), ("DDIM-20", "ddim", 20, "eps"), ("DDIM-10", "ddim", 10, "eps"),
                   ("DPM-Solver++(2M)-20", "dpmpp2m", 20, "eps"), ("DPM-Solver++(2M)-10", "dpmpp2m", 10, "eps"),
                   ("RF Euler-30", "euler", 30, "rf"), ("RF Euler-10", "euler", 10, "rf"), ("RF Euler-5", "euler", 5, "rf")]
    assert [p["label"] for p in bench_sampling.quality_plan({"eps": None, "rf": rf})] == ["RF Euler-30", "RF Euler-10", "RF Euler-5"]
    with pytest.raises(ValueError, match="trained with 'rectified_flow'; the first run must be a DDPM-trained run"):
        bench_sampling.quality_plan({"eps": rf, "rf": None})
    with pytest.raises(ValueError, match="trained with 'v_prediction'; the second run must be a rectified-flow run"):
        bench_sampling.quality_plan({"eps": None, "rf": eps})


def test_quality_rows_table_and_plot_from_evaluate_metrics(tmp_path):
    plan = [{"label": "DDIM-10", "run": Path("/r/eps"), "sampler": "ddim", "steps": 10, "prediction": "epsilon"},
            {"label": "RF Euler-5", "run": Path("/r/rf"), "sampler": "euler", "steps": 5, "prediction": "rectified_flow"}]
    entry = lambda k: {"n": 4, "fid": 10.0 * k, "fid_ci95": [9.0 * k, 12.0 * k], "hu_w1": {"organ": 30.0 + k, "body": 1.0},  # noqa: E731
                       "anatomy": {"mean_liver_kidney_spleen": 0.5 + k / 10}, "fidelity_dice": {"organ": 0.2 * k}}
    metrics = {"sets": {"DDIM-10": entry(1), "RF Euler-5": entry(2)},
               "real": {"anatomy": {"mean_liver_kidney_spleen": 0.93}, "fidelity_dice": {"organ": 0.67}, "floor": {"fid": 3.5}}}
    timing = {"DDIM-10": {"seconds_per_volume": 1.5, "cpu_seconds_per_volume": 1.25},
              "RF Euler-5": {"seconds_per_volume": 0.75, "cpu_seconds_per_volume": 0.5}}
    rows = bench_sampling.quality_rows(plan, metrics, timing)
    assert rows[1] == {"label": "RF Euler-5", "sampler": "euler", "steps": 5, "run": "/r/rf", "prediction": "rectified_flow", "n": 4,
                       "seconds_per_volume": 0.75, "cpu_seconds_per_volume": 0.5, "anatomy_present": 0.7, "organ_hu_w1": 32.0,
                       "fidelity_dice": 0.4, "fid": 20.0, "fid_ci95_low": 18.0, "fid_ci95_high": 24.0}
    settings = {"n": 4, "features": "in-domain", "segmenter": "/seg", "batch_size": 2, "device": "cpu", "threads": 1,
                "load_avg_1min": 0.5, "date_utc": "2026-12-03T00:00:00Z"}
    bench_sampling.write_quality_tables(rows, metrics["real"], tmp_path, settings)
    with open(tmp_path / "quality_vs_steps.csv", encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["label"] for r in table] == ["DDIM-10", "RF Euler-5"] and tuple(table[0]) == bench_sampling.QUALITY_COLUMNS
    assert float(table[0]["fid_ci95_high"]) == 12.0 and float(table[1]["organ_hu_w1"]) == 32.0
    md = (tmp_path / "quality_vs_steps.md").read_text(encoding="utf-8").splitlines()
    assert "| DDIM | 10 | eps (epsilon) | 1.500 | 1.250 | 0.60 | 31.0 | 0.20 | 10 [9, 12] |" in md
    assert "| RF Euler | 5 | rf (rectified_flow) | 0.750 | 0.500 | 0.70 | 32.0 | 0.40 | 20 [18, 24] |" in md
    assert md[-1] == "| held-out real windows | | | | | 0.93 | 0 | 0.67 | floor 3.5 |"
    bench_sampling.plot_quality(rows, metrics["real"], tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quality_mode_end_to_end(handmade_run, handmade_prepared, tmp_path):
    """The whole --quality mode on the hand-made epsilon run and a 2-step rectified-flow run (no segmenter, the
    random feature network): every planned set sampled, evaluated and tabled."""
    from lad.training.config import resolve_train_config
    from lad.training.diffusion_trainer import train_diffusion

    rf = tmp_path / "rf"
    rf.mkdir()
    shutil.copytree(handmade_run / "vqgan", rf / "vqgan")
    train_diffusion(handmade_prepared, rf, resolve_train_config("tiny", ["diffusion_train.steps=2", "logging.image_every=0",
                                                                         "diffusion_train.prediction=rectified_flow",
                                                                         "sampling.sampler=euler"]), progress_bar=False)
    a = argparse.Namespace(quality=f"{handmade_run},{rf}", prepared=str(handmade_prepared), out=str(tmp_path / "q"), n=2,
                           batch_size=2, device="cpu", seed=0, pairs=2, bootstrap=10, segmenter=None, features=None)
    rows = bench_sampling.quality(a)
    assert [r["label"] for r in rows] == ["DDPM-50", "DDIM-50", "DDIM-25", "DDIM-10", "DPM-Solver++(2M)-20",
                                          "DPM-Solver++(2M)-10", "RF Euler-30", "RF Euler-10", "RF Euler-5"]
    metrics = json.loads((tmp_path / "q" / "evaluation" / "metrics.json").read_text(encoding="utf-8"))
    for r in rows:
        assert r["n"] == 2 and r["fid"] == metrics["sets"][r["label"]]["fid"] and r["seconds_per_volume"] > 0
        assert r["organ_hu_w1"] == metrics["sets"][r["label"]]["hu_w1"]["organ"]
    for f in ("quality_vs_steps.csv", "quality_vs_steps.md", "quality_vs_steps.png", "quality_vs_steps.json"):
        assert (tmp_path / "q" / f).stat().st_size > 0

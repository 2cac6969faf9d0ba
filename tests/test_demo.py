"""`lad demo --preset tiny` end to end: every stage, the report, resume and --from."""

from __future__ import annotations

import json
import re

from lad.demo import STAGES, run_demo


def test_tiny_demo_end_to_end_and_resume(tmp_path):
    out = tmp_path / "demo"
    report = run_demo(out, preset="tiny")
    html = report.read_text()
    assert "Lad" in html and "V0 (Medical Diffusion)" in html and "Illustrative numbers" in html
    assert len(re.findall(r"data:image/png;base64,", html)) == 4  # curves, MDS, slices, histograms
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert set(metrics["sets"]) == {"Lad", "V0 (Medical Diffusion)"}
    assert all((out / ".stages" / f"{s}.done").exists() for s in STAGES)
    # V0 has no condition extractor and no locality term; Lad has both
    assert not (out / "run-v0" / "condition").exists() and (out / "run-lad" / "condition").exists()
    assert json.loads((out / "run-lad" / "logs" / "vqgan.jsonl").read_text().splitlines()[-1])["locality"] >= 0
    # a second call resumes (nothing re-done); --from evaluate redoes only the evaluation
    stamp = (out / "samples-lad" / "manifest.jsonl").stat().st_mtime_ns
    run_demo(out, preset="tiny")
    assert (out / "samples-lad" / "manifest.jsonl").stat().st_mtime_ns == stamp
    before = (out / ".stages" / "evaluate.done").stat().st_mtime_ns
    run_demo(out, preset="tiny", start="evaluate")
    assert (out / ".stages" / "evaluate.done").stat().st_mtime_ns > before
    assert (out / "samples-lad" / "manifest.jsonl").stat().st_mtime_ns == stamp

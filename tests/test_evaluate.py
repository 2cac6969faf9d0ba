"""`lad evaluate` end to end on the tiny run: metrics.json, report.html with embedded figures, compare."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from lad.evaluation.evaluate import evaluate
from lad.evaluation.report import classical_mds
from lad.sampling.generate import SampleSettings, generate_samples


def test_classical_mds_recovers_distances():
    import numpy as np

    x = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    y = classical_mds(np.c_[x, np.zeros(3)])
    d = lambda p: np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1))
    assert np.allclose(d(y), d(x), atol=1e-8)


def test_evaluate_writes_metrics_and_report(tiny_run, tiny_prepared, tmp_path):
    s = SampleSettings(n=3, steps=3, quality_check=True, max_retries=1)  # the optional median-HU selection
    generate_samples(tiny_run, tiny_prepared, tmp_path / "a", s)
    generate_samples(tiny_run, tiny_prepared, tmp_path / "b", SampleSettings(n=3, steps=3, augment="none"))
    res = evaluate(tiny_prepared, {"Lad": tmp_path / "a", "noaug": tmp_path / "b"}, tmp_path / "rep", n_pairs=3)
    with pytest.raises(ValueError, match="ellipses must be"):
        evaluate(tiny_prepared, {"Lad": tmp_path / "a"}, tmp_path / "rep2", ellipses="circles")
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert set(m["sets"]) == {"Lad", "noaug"}
    for e in m["sets"].values():
        assert e["n"] == 3 and e["fid"] >= 0 and 0 < e["ms_ssim"] <= 1 and {"precision", "recall"} <= set(e["prdc"])
        assert "n_flagged" in e["memorisation"]
        # the anatomy checks without --segmenter: body, bone and HU W1 only; the run's VQ-GAN reconstruction report
        assert 0 <= e["body_ok_fraction"] <= 1 and 0 <= e["bone_ok_fraction"] <= 1 and "anatomy" not in e
        assert e["hu_w1"]["organ"] > 0 and e["vqgan_reconstruction"]["codes_used"] >= 1
    assert m["real"]["body_ok_fraction"] == 1.0 and "fidelity_dice" not in m["real"] and "anatomy" not in m["real"]
    assert m["settings"]["anatomy"]["presence_ranges_voxels"] is None and m["settings"]["anatomy"]["bone_min_voxels"] >= 1
    assert m["settings"]["pretrained_features"] is False and "not MedicalNet" in m["settings"]["features"]
    # the selection is recorded per set; sets sampled with different selection are flagged
    sel = m["sets"]["Lad"]["selection"]
    assert sel["quality_check"] is True and sel["max_retries"] == 1 and sel["draws"] == 3 + sel["rejected"]
    assert m["sets"]["noaug"]["selection"]["quality_check"] is False and m["settings"]["selection_identical"] is False
    box = m["settings"]["localized_box"]
    assert len(box) == 3 and all(0 <= a < b for a, b in box)
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert len(re.findall(r"data:image/png;base64,", html)) == 4 and "random-initialised" in html  # MDS, slices, HU, closest pairs
    assert "Anatomy and realism checks" in html and "VQ-GAN reconstruction (held-out windows)" in html
    assert f"median HU, {sel['rejection_rate']:.0%} of {sel['draws']} draws rejected" in html
    assert "different median-HU selection" in html
    assert m["settings"]["mds_ellipses"] == "least-squares" and "least-squares ellipses" in html
    r = subprocess.run([sys.executable, "-m", "lad", "evaluate", "--real", str(tiny_prepared), "--synthetic", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "r2")], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 2 and "not a lad sample folder" in r.stderr


@pytest.mark.slow
def test_report_renders_in_a_headless_browser(tiny_run, tiny_prepared, tmp_path):
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless browser installed")
    generate_samples(tiny_run, tiny_prepared, tmp_path / "a", SampleSettings(n=2, steps=2, quality_check=False))
    evaluate(tiny_prepared, {"Lad": tmp_path / "a"}, tmp_path / "rep", n_pairs=1)
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1200,3000",
                    f"file://{tmp_path / 'rep' / 'report.html'}"], capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1200, 3000) and len(set(img.getdata())) > 50  # the figures drew, not a blank page


def test_mds_ellipses_least_squares_fit_and_two_sigma():
    """The MDS figure's ellipses: the paper's least-squares fit recovers an ellipse the points lie on; the
    2-sigma covariance ellipse (an option) does not (it is 2 standard deviations wide)."""
    import numpy as np

    from lad.evaluation.report import fit_ellipse

    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    a, b, th, c = 3.0, 1.0, 0.4, np.array([2.0, -1.0])
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    pts = c + np.c_[a * np.cos(t), b * np.sin(t)] @ rot.T
    centre, axes, theta = fit_ellipse(pts)
    np.testing.assert_allclose(centre, c, atol=1e-6)
    np.testing.assert_allclose(axes, (a, b), atol=1e-6)
    assert np.isclose(np.cos(2 * (theta - th)), 1.0)  # the same axis direction (up to a half turn)
    centre2, axes2, _ = fit_ellipse(pts, "2-sigma")
    np.testing.assert_allclose(centre2, c, atol=1e-6)
    assert axes2[0] == pytest.approx(2 * a / np.sqrt(2), rel=0.02)  # sd of a*cos(t) is a / sqrt(2)
    assert fit_ellipse(pts[:4]) is None
    with pytest.raises(ValueError, match="ellipses must be"):
        fit_ellipse(pts, "circle")


def test_real_vs_real_floor_halves_and_distances():
    """The floor splits the real windows into two disjoint seeded halves covering all of them; identical feature
    sets score FID 0 and a shifted set a larger FID and MMD."""
    import numpy as np

    from lad.evaluation.evaluate import _feature_distances, _real_halves

    assert _real_halves(3, 0) is None
    a, b = _real_halves(11, 0)
    assert len(a) == 5 and len(b) == 6 and set(a) | set(b) == set(range(11)) and not set(a) & set(b)
    a2, _ = _real_halves(11, 0)
    assert np.array_equal(a, a2)
    f = np.random.default_rng(0).normal(size=(20, 6))
    same = _feature_distances(f, f, f, f)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["fid_localized"] == pytest.approx(0.0, abs=1e-6)
    moved = _feature_distances(f, f + 2.0, f, f + 2.0)
    assert moved["fid"] == pytest.approx(6 * 4.0, rel=1e-6) and moved["mmd"] > same["mmd"]


def test_evaluate_reports_the_floor_beside_each_set(tiny_run, tiny_prepared, tmp_path):
    """With at least 4 real windows metrics.json holds the real-vs-real floor and each set's like-for-like score."""
    generate_samples(tiny_run, tiny_prepared, tmp_path / "a", SampleSettings(n=3, steps=2))
    m = evaluate(tiny_prepared, {"Lad": tmp_path / "a"}, tmp_path / "rep", n_pairs=2)
    n_real = m["real"]["n"]
    if n_real < 4:
        assert "floor" not in m["real"]
        pytest.skip(f"the tiny dataset has {n_real} real windows")
    floor, e = m["real"]["floor"], m["sets"]["Lad"]
    assert floor["n_a"] + floor["n_b"] == n_real and floor["fid"] >= 0
    assert e["vs_half"]["n"] == min(floor["n_a"], 3) and e["vs_half"]["n_real"] == floor["n_b"]
    assert "Real-vs-real floor" in (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")


def test_decoder_ceiling_of_an_identity_autoencoder_is_the_real_row(tiny_run, tiny_prepared, tmp_path, monkeypatch):
    """Each set's run VQ-GAN reconstructs the real windows and they are scored like the samples: with an autoencoder
    that returns its input, the ceiling must equal the real row exactly (same Dice, same checks, W1 = 0)."""
    import types

    import torch

    from lad.evaluation import fidelity
    from lad.evaluation.anatomy import ORGAN_LABELS
    from lad.models.vqgan import VQGAN

    class Identity(torch.nn.Module):
        def forward(self, x):
            return types.SimpleNamespace(recon=x)

    class BrightIsPancreas:  # a stand-in segmenter: pancreas wherever the window is brighter than 0.55
        def predict(self, x):
            return (x[:, 0] > 0.55).long() * ORGAN_LABELS["pancreas"]

    generate_samples(tiny_run, tiny_prepared, tmp_path / "a", SampleSettings(n=2, steps=2))
    generate_samples(tiny_run, tiny_prepared, tmp_path / "b", SampleSettings(n=2, steps=2, augment="none"))
    monkeypatch.setattr(fidelity, "load_segmenter", lambda *a, **k: BrightIsPancreas())
    monkeypatch.setattr(VQGAN, "from_pretrained", classmethod(lambda cls, *a, **k: Identity()))
    m = evaluate(tiny_prepared, {"Lad": tmp_path / "a", "Lad, original": tmp_path / "b"}, tmp_path / "rep", n_pairs=2,
                 segmenter=tmp_path / "unused", n_boot=0)
    c, real = m["sets"]["Lad"]["decoder_ceiling"], m["real"]
    assert c == m["sets"]["Lad, original"]["decoder_ceiling"] and c["run"] == str(tiny_run) and c["n"] == real["n"]
    assert c["fidelity_dice"] == real["fidelity_dice"] and c["fidelity_dice"]["organ"] > 0
    assert c["anatomy"] == real["anatomy"] and c["body_ok_fraction"] == real["body_ok_fraction"]
    assert c["bone_ok_fraction"] == real["bone_ok_fraction"] and c["hu_w1"] == {"organ": 0.0, "body": 0.0}
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert html.count("(decoder ceiling)") == 1  # one row per run

"""In-domain feature network (`lad features train`): trains on the training split only, saves and loads as
config.json + safetensors, is used by `lad evaluate --features DIR`, and is refused when it saw held-out windows."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lad.data.dataset import PreparedDataset
from lad.evaluation.ct_features import CTFeatureNet, load_feature_train_config, train_features
from lad.evaluation.features import FeatureExtractor


@pytest.fixture(scope="module")
def tiny_features(tiny_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "features"
    summary = train_features(tiny_prepared, out, load_feature_train_config("tiny", ["steps=40"]))
    return out, summary


def test_shapes_and_block_calibration():
    net = CTFeatureNet(channels=(4, 8)).eval()
    x = torch.rand(3, 1, 8, 32, 32)
    assert net(x).shape == (3, 6, 8, 16, 16) and net.features(x).shape == (3, net.feature_dim) == (3, 2 * 4 + 12)
    net.calibrate(x)
    f = net.features(x).double()
    sizes = [8, 4, 8]  # stem mean + std, stage 1, stage 2
    for b in torch.split(f, sizes, 1):
        assert float(b.detach().var(0).sum()) == pytest.approx(1.0, rel=1e-4)


def test_trains_on_training_windows_only_and_round_trips(tiny_features, tiny_prepared):
    out, s = tiny_features
    test_ids = {w["id"] for w in PreparedDataset(tiny_prepared, split="test").windows}
    train_ids = {w["id"] for w in PreparedDataset(tiny_prepared, split="train").windows}
    assert test_ids and set(s["windows"]) == train_ids and not set(s["windows"]) & test_ids
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["_class"] == "CTFeatureNet" and set(cfg["_extra"]["windows"]) == train_ids
    assert (out / "model" / "model.safetensors").exists() and (out / "config.yaml").exists()
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]  # it learnt something
    fx, fx2 = FeatureExtractor.from_spec(str(out)), FeatureExtractor.from_spec(f"lad:{out / 'model'}")
    assert fx.kind == "in-domain" and "in-domain" in fx.label and fx.fingerprint == fx2.fingerprint
    vols = [PreparedDataset(tiny_prepared, split="test")[0]["image"]]
    f = fx.extract(vols)
    direct = CTFeatureNet.from_pretrained(out / "model").eval().features(torch.from_numpy(vols[0][None]))
    np.testing.assert_allclose(f, direct.detach().numpy(), rtol=1e-5, atol=1e-6)
    # no per-volume normalisation: a global HU shift moves the features (it would cancel under MedicalNet's)
    assert not np.allclose(fx.extract([np.clip(vols[0] + 0.05, 0, 1)]), f, atol=1e-4)


def test_untrained_features_are_labelled():
    fx = FeatureExtractor.from_spec("random-resnet10")
    assert fx.kind == "untrained" and fx.label.startswith("untrained features")
    with pytest.raises(ValueError, match="not a `lad features train` folder"):
        FeatureExtractor.from_spec("lad:/nonexistent")


def test_evaluate_uses_in_domain_features_and_refuses_leaked_ones(tiny_features, tiny_run, tiny_prepared, tmp_path):
    from lad.evaluation.evaluate import evaluate
    from lad.sampling.generate import SampleSettings, generate_samples

    out, _ = tiny_features
    generate_samples(tiny_run, tiny_prepared, tmp_path / "s", SampleSettings(n=3, steps=2, quality_check=False))
    res = evaluate(tiny_prepared, {"Lad": tmp_path / "s"}, tmp_path / "rep", features=str(out), n_pairs=3, n_boot=20)
    assert res["settings"]["features_kind"] == "in-domain" and res["settings"]["features_trained_on"]["split"] == "train"
    e = res["sets"]["Lad"]
    assert e["n_features_dim"] == FeatureExtractor.from_spec(str(out)).feature_dim
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "In-domain features" in html and "Untrained features" not in html
    # a feature folder whose training windows include held-out ones is refused
    leaked = tmp_path / "leaked"
    subprocess.run(["cp", "-r", str(out), str(leaked)], check=True)
    cfg = json.loads((leaked / "model" / "config.json").read_text())
    cfg["_extra"]["windows"].append(PreparedDataset(tiny_prepared, split="test").windows[0]["id"])
    (leaked / "model" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="held-out"):
        evaluate(tiny_prepared, {"Lad": tmp_path / "s"}, tmp_path / "rep2", features=str(leaked), n_pairs=3, n_boot=0)


def test_cli_trains(tiny_prepared, tmp_path):
    r = subprocess.run([sys.executable, "-m", "lad", "features", "train", "--data", str(tiny_prepared), "--out", str(tmp_path / "f"),
                        "--preset", "tiny", "--set", "steps=2"], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 0, r.stderr
    assert "training Dice" in r.stdout and (tmp_path / "f" / "model" / "model.safetensors").exists()

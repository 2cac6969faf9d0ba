"""Feature extractor: MedicalNet architecture (functional oracle), weight loading, labels, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lad.evaluation.features import FeatureExtractor, normalise_nonzero


def _vols(n=3, shape=(1, 8, 32, 32)):
    out = []
    for i in range(n):
        v = np.random.default_rng(i).random(shape).astype(np.float32)
        v[..., :4] = 0.0  # "air" voxels excluded from the normalisation statistics
        out.append(v)
    return out


def _medicalnet_resnet10_reference(state: dict, x: torch.Tensor) -> torch.Tensor:
    """MedicalNet's resnet10 forward (conv1 stride 2, layer3/4 stride 1 dilation 2/4, shortcut B), by hand."""
    def bn(t, p):
        return F.batch_norm(t, state[f"{p}.running_mean"], state[f"{p}.running_var"], state[f"{p}.weight"],
                            state[f"{p}.bias"], False, 0.0, 1e-5)

    x = F.relu(bn(F.conv3d(x, state["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool3d(x, 3, 2, 1)
    for i, (stride, dil) in enumerate([(1, 1), (2, 1), (1, 2), (1, 4)], 1):
        p = f"layer{i}.0"
        out = F.relu(bn(F.conv3d(x, state[f"{p}.conv1.weight"], stride=stride, padding=dil, dilation=dil), f"{p}.bn1"))
        out = bn(F.conv3d(out, state[f"{p}.conv2.weight"], padding=dil, dilation=dil), f"{p}.bn2")
        res = bn(F.conv3d(x, state[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1") \
            if f"{p}.downsample.0.weight" in state else x
        x = F.relu(out + res)
    return x.mean(dim=(2, 3, 4))


def _random_bn_stats(net: torch.nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for k, v in state.items():
        if k.endswith("running_mean") or k.endswith("bias"):
            state[k] = torch.randn(v.shape, generator=g) * 0.1
        elif k.endswith("running_var") or (k.endswith("weight") and v.ndim == 1):
            state[k] = torch.rand(v.shape, generator=g) + 0.5
    return state


def test_normalise_matches_medicalnet_numpy():
    v = _vols(1)[0]
    nz = v[v > 0]
    expect = (v - nz.mean()) / (nz.std() + 1e-6)  # MedicalNet: numpy mean/std of the non-zero voxels
    got = normalise_nonzero(torch.from_numpy(v)[None])[0].numpy()
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    flat = normalise_nonzero(torch.zeros(1, 1, 2, 2, 2))  # no non-zero voxel: finite, all zero
    assert torch.equal(flat, torch.zeros_like(flat))


def test_random_spec_shape_determinism_label_and_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    fx = FeatureExtractor.from_spec("random-resnet10")
    assert torch.equal(torch.rand(1), before)  # building the extractor leaves the caller's RNG alone
    assert not fx.is_pretrained and "random-init resnet10 (seed 0)" in fx.label and "not MedicalNet" in fx.label
    vols = _vols()
    f = fx.extract(vols, batch_size=2)
    assert f.shape == (3, 512) and f.dtype == np.float32
    np.testing.assert_allclose(FeatureExtractor.from_spec("random-resnet10").extract(vols, batch_size=3), f, atol=1e-5)
    # batching does not change a volume's features; (D, H, W) input is accepted
    np.testing.assert_allclose(fx.extract([v[0] for v in vols[1:2]]), f[1:2], atol=1e-5)
    assert np.abs(f[0] - f[1]).max() > 1e-4  # different volumes, different features


def test_medicalnet_file_loads_and_equals_reference_forward(tmp_path):
    net = FeatureExtractor.from_spec("random-resnet10", device="cpu").net
    state = _random_bn_stats(net, seed=7)
    official = {f"module.{k}": v for k, v in state.items()}
    official["module.conv_seg.0.weight"] = torch.zeros(512, 32, 2, 2, 2)  # segmentation head: ignored
    official["module.conv_seg.0.bias"] = torch.zeros(32)
    torch.save({"state_dict": official}, tmp_path / "resnet_10_23dataset.pth")
    fx = FeatureExtractor.from_spec(f"medicalnet-resnet10:{tmp_path / 'resnet_10_23dataset.pth'}")
    assert fx.is_pretrained and fx.label == "MedicalNet resnet10 (resnet_10_23dataset.pth)"
    vols = _vols(2)
    got = fx.extract(vols)
    x = normalise_nonzero(torch.from_numpy(np.stack(vols)))
    with torch.no_grad():
        ref = _medicalnet_resnet10_reference(state, x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert np.abs(got - FeatureExtractor.from_spec("random-resnet10").extract(vols)).max() > 1e-3  # weights took effect


def test_wrong_files_raise_naming_the_file(tmp_path):
    torch.save({"wrong.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth: not a MedicalNet state dict for resnet10"):
        FeatureExtractor.from_spec(f"medicalnet-resnet10:{tmp_path / 'bad.pth'}")
    r18 = {f"module.{k}": v for k, v in FeatureExtractor(depth=18).net.state_dict().items()}
    torch.save(r18, tmp_path / "resnet_18.pth")  # right format, wrong depth
    with pytest.raises(ValueError, match=r"resnet_18\.pth: .*unexpected"):
        FeatureExtractor.from_spec(f"medicalnet-resnet10:{tmp_path / 'resnet_18.pth'}")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pth: unreadable"):
        FeatureExtractor.from_spec(f"medicalnet-resnet10:{tmp_path / 'junk.pth'}")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        FeatureExtractor.from_spec(f"medicalnet-resnet10:{tmp_path / 'missing.pth'}")
    with pytest.raises(ValueError, match="--features"):
        FeatureExtractor.from_spec("inception")
    with pytest.raises(ValueError, match="depth must be one of"):
        FeatureExtractor.from_spec("random-resnet11")


def test_resnet18_shortcut_a_keeps_medicalnet_geometry():
    fx = FeatureExtractor(depth=18)
    sizes = {}
    hooks = [getattr(fx.net, n).register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, tuple(o.shape)))
             for n in ("layer2", "layer4")]
    f = fx(torch.rand(1, 1, 16, 32, 32))
    for h in hooks:
        h.remove()
    # conv1 /2, maxpool /2, layer2 /2 -> 2x4x4; layers 3 and 4 keep it (dilated, stride 1)
    assert sizes == {"layer2": (1, 128, 2, 4, 4), "layer4": (1, 512, 2, 4, 4)} and f.shape == (1, 512)


def test_cache_round_trip_and_input_validation(tmp_path):
    fx = FeatureExtractor.from_spec("random-resnet10")
    vols = _vols()
    f = fx.extract(vols, batch_size=2, cache_dir=tmp_path)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 3 and all(p.name.endswith(f"_{fx.fingerprint}.npy") for p in files)
    np.save(files[0], np.full(512, 7.0, np.float32))  # a cached row is used instead of recomputing
    again = fx.extract(vols, cache_dir=tmp_path)
    assert (again == 7.0).all(1).sum() == 1 and np.allclose(np.delete(again, np.flatnonzero((again == 7.0).all(1)), 0),
                                                            np.delete(f, np.flatnonzero((again == 7.0).all(1)), 0), atol=1e-6)
    with pytest.raises(ValueError, match=r"volume 1: values in \[-1000"):
        fx.extract([vols[0], vols[1] * 1400 - 1000])
    with pytest.raises(ValueError, match="volume 0: expected"):
        fx.extract([np.zeros((2, 4, 8, 8), np.float32)])
    assert fx.extract([]).shape == (0, 512)

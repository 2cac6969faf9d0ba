"""SSL-ALPNet (``lad downstream ssl``): superpixels, ALPNet, episodes, the 1-shot protocol, training, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lad.downstream.ssl.alpnet import ALPNet, alpnet_loss, class_score, global_prototype, local_prototypes, prototype_scores
from lad.downstream.ssl.backbone import build_resnet, load_backbone_weights
from lad.downstream.ssl.data import Scan, SlicePool, organ_binary
from lad.downstream.ssl.episodes import EpisodeAugmentConfig, apply_augmentation, draw_augmentation, make_episode_batch
from lad.downstream.ssl.protocol import chunk_plan, dice_from_counts, evaluate_organ, query_part, support_positions
from lad.downstream.ssl.superpixels import body_mask, slice_superpixels, volume_superpixels


def _phantom_slice(size: int = 48, seed: int = 0) -> np.ndarray:
    """A body ellipse (soft tissue with two 'organs') in air, values in [0, 1] (HU [-1000, 400])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), 0.0, np.float32)  # -1000 HU
    body = ((yy - size / 2) / (0.4 * size)) ** 2 + ((xx - size / 2) / (0.45 * size)) ** 2 < 1
    img[body] = 0.72  # ~0 HU
    img[body & (((yy - size * 0.4) / 6) ** 2 + ((xx - size * 0.35) / 8) ** 2 < 1)] = 0.8
    img[body & (((yy - size * 0.6) / 5) ** 2 + ((xx - size * 0.65) / 5) ** 2 < 1)] = 0.6
    img[body] += rng.normal(0, 0.01, int(body.sum())).astype(np.float32)
    return np.clip(img, 0, 1)


# ---------------------------------------------------------------- superpixels

def test_superpixels_deterministic_cover_body_and_nothing_outside():
    vol = np.stack([_phantom_slice(seed=s) for s in range(3)])
    lab1, body = volume_superpixels(vol, min_size=20, sigma=0.5)
    lab2, _ = volume_superpixels(vol, min_size=20, sigma=0.5)
    assert np.array_equal(lab1, lab2)                      # deterministic
    assert lab1.shape == vol.shape and lab1.dtype == np.int32
    assert (lab1[body] > 0).all()                          # every body pixel has a superpixel
    assert (lab1[~body] == 0).all()                        # none outside the body
    for s in lab1:                                         # renumbered 1..K per slice, several superpixels
        ids = np.unique(s[s > 0])
        assert ids[0] == 1 and np.array_equal(ids, np.arange(1, len(ids) + 1)) and len(ids) >= 2


def test_body_mask_largest_component_and_holes_filled():
    img = np.zeros((20, 20), np.float32)
    img[2:12, 2:12] = 0.7          # body (100 px)
    img[5:8, 5:8] = 0.0            # a hole of air inside (lungs / bowel gas)
    img[15:17, 15:17] = 0.7        # a small separate blob (table, arm)
    m = body_mask(img)
    expect = np.zeros((20, 20), bool)
    expect[2:12, 2:12] = True
    assert np.array_equal(m, expect)


def test_slice_superpixels_min_size_respected_inside_body():
    img = _phantom_slice(64)
    body = body_mask(img)
    lab = slice_superpixels(img, body, min_size=30, sigma=1.0)
    sizes = np.bincount(lab[lab > 0])[1:]
    # Felzenszwalb guarantees min_size before the body cut; only segments cut by the body border may be smaller
    interior = [k + 1 for k in range(len(sizes)) if not (lab == k + 1)[np.roll(~body, 1, 0) | np.roll(~body, -1, 1)].any()]
    assert all(sizes[k - 1] >= 30 for k in interior)


# ---------------------------------------------------------------- ALPNet

def test_local_and_global_prototypes_hand_computed():
    f = torch.arange(32, dtype=torch.float32).reshape(2, 4, 4)     # C=2, 4x4
    mask = torch.zeros(4, 4)
    mask[:2, :2] = 1.0                                             # top-left 2x2 cell fully foreground
    mask[2:, 2:] = 0.75                                            # bottom-right cell 0.75 < 0.95
    protos = local_prototypes(f, mask, window=2, threshold=0.95)
    # cell (0,0) of channel 0 = mean(0,1,4,5) = 2.5; channel 1 = 2.5 + 16
    assert torch.allclose(protos, torch.tensor([[2.5, 18.5]]))
    g = global_prototype(f, mask)
    w = mask.reshape(-1)
    expect = torch.stack([(f[c].reshape(-1) * w).sum() / (w.sum() + 1e-5) for c in range(2)])[None]
    assert torch.allclose(g, expect)
    # window 1 with threshold 0.5: every pixel with mask > 0.5 is a prototype (4 + 4 = 8)
    assert local_prototypes(f, mask, window=1, threshold=0.5).shape == (8, 2)


def test_prototype_scores_soft_max_of_cosines():
    q = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])                 # C=2, 1x2: pixel 0 = e1, pixel 1 = e2
    protos = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    s = prototype_scores(q, protos, temperature=20.0)
    d0 = torch.tensor([20.0, 20.0 / 2 ** 0.5])                     # pixel 0 cosines x 20
    d1 = torch.tensor([0.0, 20.0 / 2 ** 0.5])
    expect = torch.stack([(torch.softmax(d, 0) * d).sum() for d in (d0, d1)])
    assert torch.allclose(s[0], expect, atol=1e-5)
    # no local prototype over the threshold: background falls back to the global one (no crash)
    f = torch.randn(3, 4, 4)
    out = class_score(f, f, torch.full((4, 4), 0.5), window=2, threshold=0.95, with_global=False)
    assert out.shape == (4, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch,width,size,channels", [("resnet18", 8, 32, 16), ("resnet50", 8, 32, 16)])
def test_alpnet_shapes(arch, width, size, channels):
    torch.manual_seed(0)
    m = ALPNet(backbone=arch, width=width, feature_channels=channels, train_window=2, test_window=1)
    x = torch.rand(2, 1, size, size)
    mask = torch.zeros(2, size, size)
    mask[:, 8:20, 8:20] = 1
    assert m.features(x).shape == (2, channels, size // 8, size // 8)   # output stride 8
    assert m(x, mask, x).shape == (2, 2, size, size)
    m.eval()
    with torch.no_grad():
        assert m(x, mask, x).shape == (2, 2, size, size)


def test_resnet101_is_the_dilated_deeplab_body():
    r = build_resnet("resnet101", width=64, output_stride=8)
    n = sum(p.numel() for p in r.parameters())
    assert n == 42_500_160  # torchvision resnet101 without fc (44,549,160 - 2,049,000)
    assert r.layer4[0].conv2.dilation == (2, 2) and r.layer4[1].conv2.dilation == (4, 4)
    assert r.out_channels == 2048 and r.output_stride == 8


def test_backbone_weights_from_a_torchvision_style_checkpoint(tmp_path, caplog):
    src = build_resnet("resnet18", width=8)
    state = {f"backbone.{k}": v.clone() + 1.0 for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["classifier.0.weight"] = torch.zeros(3)
    state["backbone.extra.weight"] = torch.zeros(1)
    f = tmp_path / "deeplab.pth"
    torch.save(state, f)
    dst = build_resnet("resnet18", width=8)
    rep = load_backbone_weights(dst, f)
    assert torch.equal(dst.conv1.weight, src.conv1.weight + 1) and torch.equal(dst.layer4[1].bn2.running_var, src.layer4[1].bn2.running_var + 1)
    assert rep["unexpected"] == ["extra.weight"] and "classifier.0.weight" in rep["ignored"]
    assert all(k.endswith("num_batches_tracked") for k in rep["missing"])
    with pytest.raises(ValueError, match="shape"):
        load_backbone_weights(build_resnet("resnet18", width=16), f)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="no tensor matches"):
        load_backbone_weights(dst, tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        load_backbone_weights(dst, tmp_path / "missing.pth")


# ---------------------------------------------------------------- episodes and training

def _pool(n: int = 4, size: int = 32) -> SlicePool:
    imgs = np.stack([_phantom_slice(size, seed=s) for s in range(n)])
    labs, _ = volume_superpixels(imgs, min_size=10, sigma=0.5)
    counts = labs.reshape(n, -1).max(axis=1)
    return SlicePool(imgs, labs, counts, np.full(n, "real", dtype="<U9"))


def test_augmentation_replays_and_identity():
    img = torch.from_numpy(_phantom_slice(32))
    mask = (img > 0.75).float()
    p1 = draw_augmentation(torch.Generator().manual_seed(3), 32, EpisodeAugmentConfig())
    p2 = draw_augmentation(torch.Generator().manual_seed(3), 32, EpisodeAugmentConfig())
    a, am = apply_augmentation(img, mask, p1)
    b, bm = apply_augmentation(img, mask, p2)
    assert torch.equal(a, b) and torch.equal(am, bm) and set(am.unique().tolist()) <= {0.0, 1.0}
    ident = EpisodeAugmentConfig(rotate_deg=0, shear_deg=0, scale=(1, 1), shift=0, elastic_alpha=0, gamma=(1, 1), contrast=(1, 1), brightness=0)
    c, cm = apply_augmentation(img, mask, draw_augmentation(torch.Generator().manual_seed(0), 32, ident))
    assert torch.allclose(c, img, atol=1e-5) and torch.equal(cm, mask)


def test_episode_batch_is_a_pure_function_of_seed_and_step():
    pools = {"real": _pool()}
    a = make_episode_batch(pools, batch_size=2, seed=1, step=5, synthetic_fraction=0.0, augment=EpisodeAugmentConfig())
    b = make_episode_batch(pools, batch_size=2, seed=1, step=5, synthetic_fraction=0.0, augment=EpisodeAugmentConfig())
    c = make_episode_batch(pools, batch_size=2, seed=1, step=6, synthetic_fraction=0.0, augment=EpisodeAugmentConfig())
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["query_image"], c["query_image"])
    assert a["support_image"].shape == (2, 1, 32, 32) and a["query_label"].dtype == torch.int64
    assert (a["query_label"].sum(dim=(1, 2)) >= 4).all()


def test_synthetic_fraction_draws_from_both_pools():
    real, syn = _pool(2), _pool(2)
    syn.images = syn.images * 0 + 0.5  # recognisable: flat synthetic slices (superpixels from the real ones)
    syn.sources[:] = "synthetic"
    pools = {"real": real, "synthetic": syn}
    ident = EpisodeAugmentConfig(rotate_deg=0, shear_deg=0, scale=(1, 1), shift=0, elastic_alpha=0, gamma=(1, 1), contrast=(1, 1), brightness=0)
    flat = [bool(make_episode_batch(pools, batch_size=1, seed=0, step=s, synthetic_fraction=0.3, augment=ident)["query_image"].std() < 1e-4)
            for s in range(60)]
    assert 8 <= sum(flat) <= 30  # ~30 % synthetic


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = ALPNet(backbone="resnet18", width=8, feature_channels=16, train_window=2, test_window=1)
    batch = make_episode_batch({"real": _pool()}, batch_size=2, seed=0, step=0, synthetic_fraction=0.0, augment=EpisodeAugmentConfig())
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    model.train()
    losses = []
    for _ in range(8):
        out = alpnet_loss(model, batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.7 * losses[0]
    assert out["align_loss"] > 0 and out["query_loss"] > 0


def test_resume_equals_uninterrupted(tmp_path):
    from lad.downstream.ssl.train import DataConfig, ModelConfig, SSLTrainConfig, learning_rate, train_alpnet

    mc = ModelConfig(backbone="resnet18", width=8, feature_channels=16, train_window=2, test_window=1)
    tc = SSLTrainConfig(iterations=4, batch_size=1, lr=1e-2, lr_step=2, checkpoint_every=100, log_every=2)
    dc = DataConfig(image_size=32, superpixel_min_size=10)
    pools = {"real": _pool()}
    a = train_alpnet(pools, tmp_path / "a", model_cfg=mc, train_cfg=tc, data_cfg=dc, seed=3)
    train_alpnet(pools, tmp_path / "b", model_cfg=mc, train_cfg=tc, data_cfg=dc, seed=3, stop_after=2)
    assert not (tmp_path / "b" / "model").exists()
    b = train_alpnet(pools, tmp_path / "b", model_cfg=mc, train_cfg=tc, data_cfg=dc, seed=3, resume=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (tmp_path / "b" / "model" / "model.safetensors").exists() and any((tmp_path / "b" / "tb").iterdir())
    assert learning_rate(tc, 0) == 1e-2 and learning_rate(tc, 3) == pytest.approx(1e-2 * 0.95)
    re = ALPNet.from_pretrained(tmp_path / "a" / "model")
    assert all(torch.equal(re.state_dict()[k], sa[k]) for k in sa)


# ---------------------------------------------------------------- 1-shot protocol

def test_support_positions_and_chunks_hand_computed():
    assert support_positions(3) == pytest.approx([1 / 6, 1 / 2, 5 / 6])
    assert support_positions(1) == [0.5]
    support_z = np.arange(10, 22)                  # 12 organ slices: picks int(2)=12, int(6)=16, int(10)=20
    plan = chunk_plan(support_z, 30, 39, 3)        # query range 30..39: (z - 30) // 3 -> 0,0,0,1,1,1,2,2,2,2(clipped 3)
    assert [q for q, _ in plan] == list(range(30, 40))
    assert [s for _, s in plan] == [12, 12, 12, 16, 16, 16, 20, 20, 20, 20]
    assert query_part(5, 5, 5) == 0 and query_part(9, 0, 9, 3) == 2 and query_part(-1, 0, 9) == 0
    assert dice_from_counts(3, 1, 1) == pytest.approx(0.75) and dice_from_counts(0, 0, 0) == 1.0


def _scan(seed: int, sid: str, size: int = 32, depth: int = 12) -> Scan:
    rng = np.random.default_rng(seed)
    img = rng.random((depth, size, size)).astype(np.float32)
    org = np.zeros((depth, size, size), np.uint8)
    org[2:9, 8:16, 8:16] = 1   # liver on slices 2..8
    org[4:7, 20:24, 20:24] = 3  # spleen
    org[5, 2:4, 2:4] = 5        # tumour counts as pancreas
    return Scan(sid, img, org)


def test_oracle_predictor_gives_dice_one_and_uses_the_chunked_support_slices():
    support = _scan(0, "s")
    query = _scan(0, "q")      # query == support (same volume)
    truth = {a.tobytes(): b for a, b in zip(query.image, organ_binary(query.organs, "liver"))}
    calls = []

    def oracle(s_img, s_mask, q_imgs):
        calls.append((int(np.flatnonzero([np.array_equal(s_img, x) for x in support.image])[0]), len(q_imgs)))
        return np.stack([truth[q.tobytes()] for q in q_imgs])

    res = evaluate_organ(oracle, support, [query], "liver", size=32)
    assert res["dice"] == 1.0 and res["counts"]["q"]["fp"] == 0
    # organ slices 2..8 (C=7): support picks int(7/6)=1 -> 3, int(3.5)=3 -> 5, int(35/6)=5 -> 7
    # query range 2..8, (z - 2) // 2: 0,0,1,1,2,2,2(clipped)
    assert res["support"]["slices"] == [3, 5, 7] and sorted(calls) == [(3, 2), (5, 2), (7, 3)]
    wrong = evaluate_organ(lambda s, m, q: np.zeros(q.shape, bool), support, [query], "liver", size=32)
    assert wrong["dice"] == 0.0 and wrong["counts"]["q"]["fn"] == 7 * 64
    # pancreas = label 4 or tumour 5
    assert organ_binary(query.organs, "pancreas").sum() == 4


# ---------------------------------------------------------------- experiment and CLI

def test_cli_tiny_writes_results_and_chart(tiny_prepared, tmp_path):
    from lad.cli import main

    out = tmp_path / "ssl"
    rc = main(["downstream", "ssl", "--data", str(tiny_prepared), "--train", "real", "--runs", "2", "--preset", "tiny",
               "--out", str(out), "--no-progress", "--set", "train.iterations=3"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    organs = ["liver", "kidney", "spleen", "pancreas"]
    assert list(res["dice_mean"]) == organs and len(res["runs"]) == 2
    assert all(0.0 <= r["dice"][o] <= 1.0 for r in res["runs"] for o in organs)
    assert res["dice_mean"]["liver"] == pytest.approx(np.mean([r["dice"]["liver"] for r in res["runs"]]))
    assert res["dice_std"]["liver"] == pytest.approx(np.std([r["dice"]["liver"] for r in res["runs"]], ddof=1))
    assert res["preset"] == "tiny" and res["backbone_pretrained"] is False and "random init" in res["backbone"]
    assert (out / "dice.png").read_bytes()[:4] == b"\x89PNG"
    # an existing folder is refused; --resume keeps the finished runs and gives the same numbers
    with pytest.raises(FileExistsError):
        main(["-v", "downstream", "ssl", "--data", str(tiny_prepared), "--train", "real", "--runs", "2", "--preset", "tiny",
              "--out", str(out), "--set", "train.iterations=3"])
    assert main(["downstream", "ssl", "--data", str(tiny_prepared), "--train", "real", "--runs", "2", "--preset", "tiny",
                 "--out", str(out), "--resume", "--set", "train.iterations=3"]) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == res["runs"]


def test_bad_inputs_give_clear_errors(tiny_prepared, tmp_path):
    from lad.config import ConfigError
    from lad.downstream.ssl import load_ssl_config, run_ssl

    cfg = load_ssl_config("tiny")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_ssl(tmp_path / "nope", tmp_path / "o1", cfg)
    with pytest.raises(ValueError, match="needs --synthetic"):
        run_ssl(tiny_prepared, tmp_path / "o2", cfg, train="synthetic")
    with pytest.raises(ValueError, match="setting 2"):
        run_ssl(tiny_prepared, tmp_path / "o3", cfg, train="real+synthetic", synthetic=tmp_path, setting=2)
    with pytest.raises(ConfigError):
        load_ssl_config("tiny", ["train.nope=1"])
    with pytest.raises(ValueError, match="eval.organs"):
        load_ssl_config("tiny", ["eval.organs=[heart]"])


def test_missing_organ_labels_error(tmp_path):
    from conftest import write_prepared

    from lad.downstream.ssl import load_ssl_config, run_ssl

    data = write_prepared(tmp_path / "prep", patients=3, windows=2, test_patients=1)  # pancreas (+tumour) only
    with pytest.raises(ValueError, match="no test scan has liver"):
        run_ssl(data, tmp_path / "o", load_ssl_config("tiny"), runs=1, test_scans="windows")
    assert not (tmp_path / "o").exists()  # nothing created before the inputs were checked
    res = run_ssl(data, tmp_path / "o", load_ssl_config("tiny", ["eval.organs=[pancreas]", "train.iterations=2"]), runs=1,
                  setting=2, test_scans="windows")
    assert list(res["dice_mean"]) == ["pancreas"] and (tmp_path / "o" / "run_000" / "pancreas" / "model").exists()


def _write_samples(folder, prepared, n: int = 2):
    """A `lad sample`-layout folder (docs/sampling.md "Output folder") with NIfTI volumes from prepared windows."""
    import SimpleITK as sitk

    from lad.data.dataset import PreparedDataset

    ds = PreparedDataset(prepared, split="train")
    (folder / "samples").mkdir(parents=True)
    lines = []
    for i in range(n):
        r = ds.get_arrays(i)
        for kind, arr in (("ct", r["hu"].astype(np.int16)), ("mask", r["mask"].astype(np.uint8))):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((12.0, 12.0, 10.0))
            sitk.WriteImage(img, str(folder / "samples" / f"sample_{i:06d}_{kind}.nii.gz"))
        lines.append(json.dumps({"id": f"sample_{i:06d}", "index": i, "files": {"ct": f"samples/sample_{i:06d}_ct.nii.gz",
                                                                              "mask": f"samples/sample_{i:06d}_mask.nii.gz"}}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_synthetic_and_real_plus_synthetic_training(tiny_prepared, tmp_path):
    from lad.downstream.ssl import load_ssl_config, run_ssl
    from lad.downstream.ssl.data import synthetic_scans

    samples = _write_samples(tmp_path / "samples", tiny_prepared)
    scans = synthetic_scans(samples)
    assert len(scans) == 2 and scans[0].image.shape == (8, 32, 32) and scans[0].organs is None
    assert 0.0 <= scans[0].image.min() and scans[0].image.max() <= 1.0
    cfg = load_ssl_config("tiny", ["train.iterations=2"])
    mix = run_ssl(tiny_prepared, tmp_path / "mix", cfg, train="real+synthetic", synthetic=samples, synthetic_episode_fraction=0.5,
                  runs=1)
    syn = run_ssl(tiny_prepared, tmp_path / "syn", cfg, train="synthetic", synthetic=samples, runs=1)
    assert mix["episode_synthetic_share"] == 0.5 and mix["synthetic_mode"] == "episode" and mix["synthetic_volumes"] == 2
    assert syn["episode_synthetic_share"] == 1.0 and syn["train"] == "synthetic" and syn["synthetic_volumes"] == 2
    from lad.downstream.ssl import plot_comparison

    both = plot_comparison([tmp_path / "mix", tmp_path / "syn"], tmp_path / "fig6.png", labels=["real+Lad", "Lad"])
    assert list(both) == ["real+Lad", "Lad"] and (tmp_path / "fig6.png").read_bytes()[:4] == b"\x89PNG"
    assert set(syn["dice_mean"]) == {"liver", "kidney", "spleen", "pancreas"}
    with pytest.raises(FileNotFoundError, match="no manifest.jsonl"):
        run_ssl(tiny_prepared, tmp_path / "bad", cfg, train="synthetic", synthetic=tmp_path, runs=1)


def test_paper_preset_holds_the_published_values():
    from lad.downstream.ssl import load_ssl_config

    p = load_ssl_config("paper")
    assert (p.model.backbone, p.model.output_stride, p.model.width, p.data.image_size) == ("resnet101", 8, 64, 256)
    assert (p.model.train_window, p.model.test_window, p.model.fg_threshold, p.model.bg_threshold, p.model.temperature) == (4, 2, 0.95, 0.95, 20.0)
    assert (p.train.iterations, p.train.lr, p.train.momentum, p.train.weight_decay, p.train.lr_step, p.train.lr_gamma) == \
        (100000, 1e-3, 0.9, 5e-4, 1000, 0.95)
    assert (p.data.superpixel_min_size, p.data.superpixel_sigma, tuple(p.train.class_weights)) == (400, 1.0, (0.05, 1.0))
    assert tuple(p.eval.organs) == ("liver", "kidney", "spleen", "pancreas") and p.eval.n_part == 3
    d = load_ssl_config("demo")
    assert d.model.backbone == "resnet18" and d.train.iterations <= 500


# ---------------------------------------------------------------- whole test scans, synthetic set composition, sweeps

def test_test_scans_are_the_whole_original_volumes(tiny_prepared):
    from lad.data.dataset import PreparedDataset
    from lad.data.originals import read_original_case
    from lad.downstream.ssl.data import original_scans, prepared_scans

    whole = list(original_scans(tiny_prepared, "test"))
    windows = prepared_scans(tiny_prepared, "test")
    assert [s.id for s in whole] == [s.id for s in windows]
    for w, s in zip(windows, whole):
        # the windows follow the pancreas: the original scan holds much more of the other organs
        assert len(s.image) > len(w.image)
        assert (s.organs == 1).sum() > (w.organs == 1).sum() and (s.organs == 3).sum() > (w.organs == 3).sum()
        assert s.image.shape[1:] == w.image.shape[1:] and 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.0
        has = np.isin(s.organs, [1, 2, 3, 4, 5]).reshape(len(s.organs), -1).any(axis=1)
        assert has[0] and has[-1]  # kept from the first to the last slice with a test organ
    # the original, resampled to the training spacing and cropped as prepared, reproduces every window exactly
    ds = PreparedDataset(tiny_prepared, split="test")
    case = read_original_case(tiny_prepared, ds.windows[0]["patient"])
    for i, w in enumerate(ds.windows):
        r = ds.get_arrays(i)
        z0, z1 = w["z_range"]
        assert np.array_equal(case.hu[z0:z1], r["hu"]) and np.array_equal(case.organs[z0:z1], r["organs"])


def _copy_with_moved_original(prepared, dest):
    import shutil

    shutil.copytree(prepared, dest)
    m = json.loads((dest / "manifest.json").read_text())
    test = [w for w in m["windows"] if w["split"] == "test"]
    moved = str(dest.parent / "moved" / "Case_moved_0000.nii.gz")
    for w in test:
        w["source_image"] = moved
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest, moved


def test_unreachable_original_is_one_clear_error_and_windows_are_opt_in(tiny_prepared, tmp_path):
    from lad.data.originals import OriginalCaseError
    from lad.downstream.ssl import load_ssl_config, run_ssl

    data, moved = _copy_with_moved_original(tiny_prepared, tmp_path / "prep")
    cfg = load_ssl_config("tiny", ["train.iterations=1"])
    with pytest.raises(OriginalCaseError, match=f"{moved}: file not found"):
        run_ssl(data, tmp_path / "o", cfg, runs=1)
    assert not (tmp_path / "o").exists()
    res = run_ssl(data, tmp_path / "o", cfg, runs=1, test_scans="windows")
    settings = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert settings["test_scans"] == "windows" and res["evaluation"]["test_scans"] == "windows"
    assert any("windows" in n for n in res["notes"])


def test_synthetic_share_is_a_set_composition_by_default_and_sizes_sweep(tiny_prepared, tmp_path):
    import csv

    from lad.data.dataset import PreparedDataset
    from lad.downstream.ssl import load_ssl_config, run_ssl

    samples = _write_samples(tmp_path / "samples", tiny_prepared, n=4)
    n_real = len(PreparedDataset(tiny_prepared, split="train"))
    cfg = load_ssl_config("tiny", ["train.iterations=1"])
    res = run_ssl(tiny_prepared, tmp_path / "set", cfg, train="real+synthetic", synthetic=samples, runs=1)
    settings = json.loads((tmp_path / "set" / "settings.json").read_text())
    n = max(1, round(0.2 * n_real))  # the paper's "about 20 % of the training set", counted in volumes
    assert res["synthetic_mode"] == "set" and res["synthetic_volumes"] == n and len(res["synthetic_ids"]) == n
    assert settings["synthetic_ratio"] == 0.2 and settings["synthetic_episode_fraction"] is None
    assert settings["synthetic_volumes"] == [n]
    # every slice of the composed set equally likely: the synthetic share of episodes is its share of slices
    share = res["n_synthetic_slices"] / (res["n_synthetic_slices"] + res["n_real_slices"])
    assert res["episode_synthetic_share"] == pytest.approx(share) and settings["episode_synthetic_share"][str(n)] == pytest.approx(share)
    assert 0 < share < 0.5
    # the per-episode probability stays available under its own name and is recorded beside the volumes
    ep = run_ssl(tiny_prepared, tmp_path / "ep", cfg, train="real+synthetic", synthetic=samples, runs=1,
                 synthetic_volumes=3, synthetic_episode_fraction=0.5)
    s2 = json.loads((tmp_path / "ep" / "settings.json").read_text())
    assert (s2["synthetic_mode"], s2["synthetic_volumes"], s2["synthetic_episode_fraction"]) == ("episode", [3], 0.5)
    assert ep["episode_synthetic_share"] == 0.5
    with pytest.raises(ValueError, match="holds 4"):
        run_ssl(tiny_prepared, tmp_path / "big", cfg, train="real+synthetic", synthetic=samples, runs=1, synthetic_volumes=5)
    with pytest.raises(ValueError, match="not both"):
        run_ssl(tiny_prepared, tmp_path / "both", cfg, train="real+synthetic", synthetic=samples, synthetic_volumes=2,
                synthetic_ratio=0.5)

    out = tmp_path / "sweep"
    sw = run_ssl(tiny_prepared, out, cfg, train="real+synthetic", synthetic=samples, runs=1, synthetic_volumes="0,2,4")
    assert [s["synthetic_volumes"] for s in sw["sweep"]] == [0, 2, 4]
    per = {n: json.loads((out / f"synthetic_{n:05d}" / "results.json").read_text()) for n in (0, 2, 4)}
    assert per[0]["n_synthetic_slices"] == 0 and per[0]["episode_synthetic_share"] == 0.0
    assert per[2]["synthetic_ids"] == per[4]["synthetic_ids"][:2]  # nested sets
    assert 0 < per[2]["n_synthetic_slices"] < per[4]["n_synthetic_slices"]
    for s in sw["sweep"]:
        assert s["dice_mean"] == per[s["synthetic_volumes"]]["dice_mean"]
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [int(r["synthetic_volumes"]) for r in rows] == [0, 2, 4]
    assert [float(r["liver_mean"]) for r in rows] == pytest.approx([per[n]["dice_mean"]["liver"] for n in (0, 2, 4)], abs=1e-4)
    assert float(rows[2]["mean"]) == pytest.approx(per[4]["mean_over_organs"]["mean"], abs=1e-4)
    md = (out / "sweep.md").read_text().splitlines()
    assert md[2].startswith("| synthetic_volumes |") and len([line for line in md if line.startswith("| ")]) == 4
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # --resume keeps every finished size; another size list is another experiment
    again = run_ssl(tiny_prepared, out, cfg, train="real+synthetic", synthetic=samples, runs=1, synthetic_volumes="0,2,4",
                    resume=True)
    assert [s["runs"] for s in again["sweep"]] == [s["runs"] for s in sw["sweep"]]
    with pytest.raises(ValueError, match="different settings"):
        run_ssl(tiny_prepared, out, cfg, train="real+synthetic", synthetic=samples, runs=1, synthetic_volumes="0,4", resume=True)


def test_cli_synthetic_options():
    import argparse

    from lad.cli.downstream_ssl import register

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    p = sub.choices["ssl"]
    a = p.parse_args(["--data", "d", "--train", "real+synthetic", "--out", "o", "--synthetic-fraction", "0.3"])
    assert a.synthetic_episode_fraction == 0.3 and a.synthetic_volumes is None and a.test_scans == "original"
    a = p.parse_args(["--data", "d", "--train", "real+synthetic", "--out", "o", "--synthetic-volumes", "0,8,16"])
    assert a.synthetic_volumes == "0,8,16" and a.synthetic_episode_fraction is None and a.synthetic_ratio is None


def test_original_scan_of_a_totalsegmentator_case(tmp_path):
    from pathlib import Path

    from lad.data.dataset import PreparedDataset
    from lad.data.originals import read_original_case
    from lad.data.prepare import PrepareConfig, prepare_dataset
    from lad.downstream.ssl.data import original_scans

    real = next((p / "shared" / "data" / "real-ct" / "patient-a" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "data" / "real-ct" / "patient-a").exists()), None)
    if real is None:
        pytest.skip("the real TotalSegmentator example (shared/data/real-ct/patient-a) is not here")
    cfg = PrepareConfig(spacing=(3.0, 3.0, 3.0), size=(96, 96), depth=8, stride=4, split=1.0)
    prepare_dataset("totalsegmentator", real, tmp_path / "prep", cfg)
    (scan,) = original_scans(tmp_path / "prep", "train")  # per-structure binary files, kidney = left | right
    ds = PreparedDataset(tmp_path / "prep", split="train")
    case = read_original_case(tmp_path / "prep", "patient-a")
    in_windows = sorted({z for w in ds.windows for z in range(*w["z_range"])})
    # nothing of the organs is cut from the whole scan; the liver reaches far above the pancreas windows
    assert (scan.organs == 1).sum() == (case.organs == 1).sum() > 1.5 * (case.organs[in_windows] == 1).sum() > 0
    assert {1, 2, 3, 4} <= set(np.unique(scan.organs).tolist()) and scan.image.shape[1:] == (96, 96)

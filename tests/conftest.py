"""Shared fixtures: prepared datasets (hand-written per docs/contracts.md, and phantom + ``lad prepare``)
and a trained tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

# The suite's tensors are tiny: one intra-op thread is faster than two here (up to 47x on a loaded
# 2-core machine) and leaves the second core to a parallel process.
import torch  # noqa: E402

torch.set_num_threads(1)


def write_prepared(root: Path, *, patients: int = 3, windows: int = 2, shape=(8, 32, 32), spacing=(12.0, 12.0, 10.0),
                   seed: int = 0, test_patients: int = 0, bad_label_patient: str | None = None,
                   odd_shape_patient: str | None = None) -> Path:
    """Write a prepared-dataset folder by hand, exactly per docs/contracts.md ("Prepared dataset folder").

    Smooth random HU images (a body ellipse, an organ blob of ~40 HU with a tumour of ~-20 HU inside),
    masks 0/1/2, organ maps 0..5. ``bad_label_patient`` gets a mask label 3; ``odd_shape_patient`` gets
    windows one slice thinner than the manifest's shape.
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    d, h, w = shape
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    ids = [f"p{i:02d}" for i in range(patients)]
    manifest_windows, splits = [], {"train": [], "test": []}
    for n, pid in enumerate(ids):
        split = "test" if n >= patients - test_patients else "train"
        splits[split].append(pid)
        hu, masks, organs, metas = [], [], [], []
        for k in range(windows):
            noise = gaussian_filter(rng.standard_normal(shape), 2.0) * 300
            body = ((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 < 1
            img = np.where(body, noise, -1000.0)
            c = rng.uniform([d * 0.3, h * 0.3, w * 0.3], [d * 0.7, h * 0.7, w * 0.7])
            organ = ((zz - c[0]) / (d * 0.3)) ** 2 + ((yy - c[1]) / (h * 0.18)) ** 2 + ((xx - c[2]) / (w * 0.18)) ** 2 < 1
            tumour = organ & (((zz - c[0]) / (d * 0.15)) ** 2 + ((yy - c[1]) / (h * 0.07)) ** 2 + ((xx - c[2]) / (w * 0.07)) ** 2 < 1)
            img[organ] = 40 + noise[organ] * 0.05
            img[tumour] = -20
            mask = organ.astype(np.uint8) + tumour.astype(np.uint8)
            org = np.where(tumour, 5, np.where(organ, 4, 0)).astype(np.uint8)
            if pid == bad_label_patient and k == windows - 1:
                mask[0, 0, 0] = 3
            sl = slice(0, d - 1) if pid == odd_shape_patient else slice(None)
            hu.append(np.clip(img, -1000, 400).astype(np.int16)[sl])
            masks.append(mask[sl])
            organs.append(org[sl])
            affine = np.array([[0, 0, -spacing[0], 0], [0, -spacing[1], 0, 0], [spacing[2], 0, 0, k * d * spacing[2]],
                               [0, 0, 0, 1]], float)
            metas.append({"id": f"{pid}_w{k:03d}", "patient": pid, "split": split, "index": k, "z_range": [k * d, (k + 1) * d],
                          "affine": affine.tolist(), "spacing": list(spacing),
                          "organ_voxels": {"liver": 0, "kidney": 0, "spleen": 0, "pancreas": int(organ.sum() - tumour.sum()),
                                           "tumor": int(tumour.sum())},
                          "source_image": f"{pid}.nii.gz", "source_labels": f"{pid}_seg.nii.gz", "labels_are_predictions": False})
        folder = root / "patients" / pid
        folder.mkdir(parents=True)
        np.save(folder / "image.npy", np.stack(hu))
        np.save(folder / "mask.npy", np.stack(masks))
        np.save(folder / "organs.npy", np.stack(organs))
        (folder / "meta.json").write_text(json.dumps({"windows": metas}))
        manifest_windows += metas
    config = {"spacing": list(spacing), "size": [h, w], "depth": d, "stride": d, "organ": "pancreas", "require": [],
              "split": 1.0, "seed": seed}
    manifest = {"format": "lad-prepared", "version": 1, "config": config, "seed": seed, "splits": splits,
                "windows": manifest_windows, "dropped": []}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "fingerprint.json").write_text(json.dumps({"window_shape": [d, h, w], "target_spacing": list(spacing),
                                                       "n_windows": {"train": sum(m["split"] == "train" for m in manifest_windows)}}))
    return root


class WindowsDataset(torch.utils.data.Dataset):
    """A plain ``torch.utils.data.Dataset`` (not a ``PreparedDataset``) over the training windows of a prepared
    folder, as a user's own data would be: items ``image`` / ``mask`` (and ``organs`` with ``organs=True``),
    the ``spacing`` attribute, nothing else (no path, manifest or split)."""

    def __init__(self, prepared: Path, *, organs: bool = False, spacing: bool = True):
        from lad.data.dataset import PreparedDataset

        self._ds, self._organs = PreparedDataset(prepared, split="train"), organs
        if spacing:
            self.spacing = tuple(self._ds.config["spacing"])

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict:
        it = self._ds[i]
        return {k: it[k] for k in (("image", "mask", "organs") if self._organs else ("image", "mask"))}


# 4 steps per part, one image grid / preview and a checkpoint at the end of each (seconds on 2 cores)
HANDMADE_RUN_SETTINGS = ["vqgan_train.steps=4", "diffusion_train.steps=4", "logging.image_every=4"]


@pytest.fixture(scope="session")
def handmade_prepared(tmp_path_factory):
    """3 patients x 2 windows of 8 x 32 x 32, written by hand (no ``lad prepare``)."""
    return write_prepared(tmp_path_factory.mktemp("handmade") / "prepared")


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory):
    """Five phantom subjects prepared with the tiny preset (8 x 32 x 32 windows)."""
    from lad.data.phantom import write_phantom_dataset
    from lad.data.prepare import load_prepare_config, prepare_dataset

    root = tmp_path_factory.mktemp("tiny")
    write_phantom_dataset(root / "raw", 5, seed=0, tumor_fraction=0.6, spacing=(6.0, 6.0, 5.0), size=(64, 64))
    prepare_dataset("abdomenct1k", root / "raw", root / "prepared", load_prepare_config("tiny"))
    return root / "prepared"


@pytest.fixture(scope="session")
def tiny_run(tiny_prepared, tmp_path_factory):
    """A fully trained tiny run (VQ-GAN + diffusion, variant full)."""
    from lad.training.config import resolve_train_config
    from lad.training.diffusion_trainer import train_diffusion
    from lad.training.vqgan_trainer import train_vqgan

    run = tmp_path_factory.mktemp("run") / "run"
    cfg = resolve_train_config("tiny")
    train_vqgan(tiny_prepared, run, cfg)
    train_diffusion(tiny_prepared, run, cfg)
    return run


@pytest.fixture(scope="session")
def handmade_run(handmade_prepared, tmp_path_factory):
    """Both parts trained on the hand-written dataset with the tiny preset (variant full)."""
    from lad.training.config import resolve_train_config
    from lad.training.diffusion_trainer import train_diffusion
    from lad.training.vqgan_trainer import train_vqgan

    run = tmp_path_factory.mktemp("hrun") / "run"
    cfg = resolve_train_config("tiny", HANDMADE_RUN_SETTINGS)
    train_vqgan(handmade_prepared, run, cfg)
    train_diffusion(handmade_prepared, run, cfg)
    return run

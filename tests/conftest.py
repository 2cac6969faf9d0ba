"""Shared fixtures: a tiny phantom dataset, prepared with the tiny preset, and a trained tiny run."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("LAD_NO_PROGRESS", "1")


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

"""Explicit seeding: randomness only through seeds and generators."""

from __future__ import annotations

import random

import numpy as np

__all__ = ["seed_everything", "derive_seed"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) global generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from several parts (e.g. ``derive_seed(base_seed, sample_index)``)."""
    ss = np.random.SeedSequence([abs(hash_str(p)) if isinstance(p, str) else int(p) for p in parts])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def hash_str(s: str) -> int:
    """Deterministic (process-independent) integer hash of a string."""
    import hashlib

    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")

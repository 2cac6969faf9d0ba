"""argparse ``type=`` helpers: numbers are checked when the command line is parsed, before anything runs.

A bad value ends the command with argparse's one-line usage error (exit 2) that names the option;
``float("nan")`` and ``float("inf")`` parse as floats, so every float option goes through ``finite_float``.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

__all__ = ["finite_float", "positive_int", "nonneg_int"]


def finite_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Callable[[str], float]:
    """A float type that refuses NaN, inf and values outside ``[lo, hi]`` (``(lo, hi]`` when ``lo_open``)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo:g}, got {text}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi:g}, got {text}")
        return v

    parse.__name__ = "number"
    return parse


def _int(text: str, minimum: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
    return v


def positive_int(text: str) -> int:
    """An int >= 1 (counts, sizes, steps)."""
    return _int(text, 1)


def nonneg_int(text: str) -> int:
    """An int >= 0 (retries)."""
    return _int(text, 0)


def check_device(device: str) -> None:
    """Refuse a ``--device`` that cannot run here (one line, before anything is read or written)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device}: not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: only cpu and cuda are supported")

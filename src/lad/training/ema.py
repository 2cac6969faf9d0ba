"""Exponential moving average of the diffusion weights (the release: decay 0.995; the paper names no EMA).

``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` (PyTorch's own EMA, foreach
updates) rather than a hand-written class: ``ema = decay * ema + (1 - decay) * w``, the first update
copies the weights. ``use_buffers=True`` averages buffers as well, so the EMA copy is a complete module
that ``save_pretrained`` can write. Its ``state_dict`` (``module.*`` plus ``n_averaged``) is what the
resume checkpoint stores; ``ema_step`` decides from the step alone what happens, so a resumed run
continues the same EMA.
"""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["make_ema", "ema_step"]


def make_ema(model: nn.Module, *, decay: float) -> AveragedModel:
    """An EMA copy of ``model`` (same device); update with ``ema_step`` (or ``ema.update_parameters(model)``),
    use ``ema.module``."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def ema_step(ema: AveragedModel, model: nn.Module, step: int, *, every: int = 1, start: int = 0) -> None:
    """The EMA's share of optimiser step ``step`` (0-based), the release's schedule: on every ``every``-th
    step, before ``start`` the EMA is reset to a copy of the weights, from ``start`` on it is averaged.

    ``every=1, start=0`` averages after every step from the first (lad's demo/tiny presets); the release
    uses ``every=10, start=2000`` (the paper presets)."""
    if every < 1 or start < 0:
        raise ValueError(f"EMA every must be >= 1 and start >= 0, got every={every}, start={start}")
    if step % every:
        return
    if step < start:
        ema.n_averaged.zero_()  # the next update copies the weights
    ema.update_parameters(model)

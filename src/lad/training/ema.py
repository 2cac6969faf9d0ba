"""Exponential moving average of the diffusion weights (paper 4.1.3: EMA 0.995).

``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` (PyTorch's own EMA, foreach
updates) rather than a hand-written class: ``ema = decay * ema + (1 - decay) * w`` after every
optimiser step, the first update copies the weights. ``use_buffers=True`` averages buffers as well, so
the EMA copy is a complete module that ``save_pretrained`` can write. Its ``state_dict`` (``module.*``
plus ``n_averaged``) is what the resume checkpoint stores.
"""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["make_ema"]


def make_ema(model: nn.Module, *, decay: float) -> AveragedModel:
    """An EMA copy of ``model`` (same device); update with ``ema.update_parameters(model)``, use ``ema.module``."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

"""Noise schedulers, kept apart from the models (``set_timesteps`` / ``step`` / ``add_noise``).

MONAI 1.6 ships DDPM and DDIM schedulers with the cosine schedule the release uses, so we wrap
them rather than rewrite them. The wrapper adds what sampling at scale needs:

* ``step(..., generator=[g_0, g_1, ...])``: one generator per sample, so a sample's noise does not
  depend on the batch it is in (sharded and resumed generation equal a single run);
* ``save_pretrained`` / ``from_pretrained`` with ``scheduler_config.json``, like the models;
* schedule names of the paper's vocabulary: ``"cosine"`` and ``"linear"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from monai.networks.schedulers import DDIMScheduler as _MonaiDDIM
from monai.networks.schedulers import DDPMScheduler as _MonaiDDPM

from lad.utils.atomic import write_json

__all__ = ["DDPMScheduler", "DDIMScheduler", "load_scheduler", "CONFIG_NAME"]

CONFIG_NAME = "scheduler_config.json"
_SCHEDULES = {"cosine": "cosine", "linear": "linear_beta"}


class _Base:
    kind = ""

    def __init__(self, *, num_train_timesteps: int = 300, schedule: str = "cosine", beta_start: float = 1e-4,
                 beta_end: float = 2e-2, clip_sample: bool = False, prediction_type: str = "epsilon"):
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {list(_SCHEDULES)}, got {schedule!r}")
        self.config = {"num_train_timesteps": num_train_timesteps, "schedule": schedule, "beta_start": beta_start,
                       "beta_end": beta_end, "clip_sample": clip_sample, "prediction_type": prediction_type}
        args = {"beta_start": beta_start, "beta_end": beta_end} if schedule == "linear" else {}
        self._impl = self._make(num_train_timesteps, _SCHEDULES[schedule], clip_sample, prediction_type, args)

    @property
    def num_train_timesteps(self) -> int:
        return self.config["num_train_timesteps"]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._impl.alphas_cumprod

    @property
    def timesteps(self) -> torch.Tensor:
        return self._impl.timesteps

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``sqrt(a_t) x0 + sqrt(1 - a_t) noise`` per sample; ``timesteps`` (B,) long."""
        a = self.alphas_cumprod.to(original_samples.device, original_samples.dtype)[timesteps]
        a = a.view(-1, *([1] * (original_samples.ndim - 1)))
        return a.sqrt() * original_samples + (1 - a).sqrt() * noise

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        n = min(int(num_inference_steps), self.num_train_timesteps)
        if n < 1:
            raise ValueError(f"need at least one sampling step, got {num_inference_steps}")
        self._impl.set_timesteps(n, device=device)

    def _step_one(self, model_output, timestep, sample, generator):
        raise NotImplementedError

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """One reverse step; returns the previous sample. A list of generators gives per-sample noise."""
        t = int(timestep)
        if generator is None or isinstance(generator, torch.Generator):
            return self._step_one(model_output, t, sample, generator)
        if len(generator) != sample.shape[0]:
            raise ValueError(f"need one generator per sample: {len(generator)} for a batch of {sample.shape[0]}")
        return torch.cat([self._step_one(model_output[i : i + 1], t, sample[i : i + 1], g) for i, g in enumerate(generator)])

    def save_pretrained(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        write_json(Path(path) / CONFIG_NAME, {"_class": type(self).__name__, **self.config})

    @classmethod
    def from_pretrained(cls, path: str | Path):
        f = Path(path) / CONFIG_NAME
        if not f.exists():
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME}")
        cfg = json.loads(f.read_text())
        cfg.pop("_class", None)
        cfg.pop("eta", None)
        return cls(**cfg)


class DDPMScheduler(_Base):
    """Ancestral DDPM sampling (Ho et al. 2020), 300 steps and the cosine schedule by default (the release's)."""

    kind = "ddpm"

    def _make(self, n, schedule, clip, pred, args):
        return _MonaiDDPM(num_train_timesteps=n, schedule=schedule, clip_sample=clip, prediction_type=pred, **args)

    def _step_one(self, model_output, timestep, sample, generator):
        return self._impl.step(model_output, timestep, sample, generator=generator)[0]


class DDIMScheduler(_Base):
    """DDIM (Song et al. 2021): few-step sampling of a model trained with DDPM; ``eta=0`` is deterministic."""

    kind = "ddim"

    def __init__(self, *, eta: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.eta = float(eta)

    def _make(self, n, schedule, clip, pred, args):
        return _MonaiDDIM(num_train_timesteps=n, schedule=schedule, clip_sample=clip, prediction_type=pred,
                          set_alpha_to_one=True, **args)

    def _step_one(self, model_output, timestep, sample, generator):
        return self._impl.step(model_output, timestep, sample, eta=self.eta, generator=generator)[0]


def load_scheduler(path: str | Path, sampler: str = "ddpm", **overrides):
    """A scheduler of kind ``sampler`` (ddpm | ddim) with the training schedule saved in ``path``."""
    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}.get(sampler)
    if cls is None:
        raise ValueError(f"unknown sampler {sampler!r}; choose ddpm or ddim")
    cfg = json.loads((Path(path) / CONFIG_NAME).read_text())
    cfg.pop("_class", None)
    cfg.pop("eta", None)
    return cls(**cfg, **overrides)

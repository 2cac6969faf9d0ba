"""Noise schedulers, kept apart from the models (diffusers/MONAI style: ``set_timesteps / step / add_noise``).

The release trains a 300-step DDPM with the cosine schedule (Nichol & Dhariwal 2021) and
epsilon-prediction. ``DDPMScheduler`` samples it ancestrally; ``DDIMScheduler`` (Song et al. 2021)
samples the same model in a few steps (``eta=0``: deterministic).

What is reused and what is written here, and why:

* the beta tables use the formulas of MONAI's ``NoiseSchedules`` ("cosine" is Nichol & Dhariwal's, betas
  clipped at ``beta_max``: 0.999 by default, as Nichol & Dhariwal and MONAI; the public release clips at
  0.9999, which the paper presets use) computed in float64 (MONAI's float32 cosine table
  gives the first steps' coefficients only 3 correct digits: see ``_betas``);
* the steps are written here. MONAI 1.6's ``DDPMScheduler.step`` always uses the posterior from t to
  t - 1, so after ``set_timesteps(n < T)`` it steps to a noise level the next call does not expect;
  its ``DDIMScheduler`` spaces the timesteps with ``round(linspace(T - 1, 0, n))`` but steps to
  ``t - T // n`` (300 steps, n = 50: 299 -> 293 while the next timestep is 293, but 268 -> 262 while the
  next is 262 or 263 depending on rounding), and both index CPU tables with Python ints and branch on
  ``timestep > 0`` (a device sync for a CUDA timestep). Here the previous noise level of every timestep
  comes from a table built by ``set_timesteps``, so any spacing is exact, and everything stays on the
  sample's device (tensor indexing, no ``.item()``, no data-dependent branch).

Extras the sampler needs: ``step(..., generator=[g_0, g_1, ...])`` draws each sample's noise from its
own generator (a sample does not depend on the batch it is in); per-sample timesteps ``(B,)``;
``save_pretrained`` / ``from_pretrained`` with ``scheduler_config.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from lad.utils.atomic import write_json
from lad.utils.log import get_logger

__all__ = ["DDPMScheduler", "DDIMScheduler", "load_scheduler", "CONFIG_NAME", "SCHEDULES", "PREDICTION_TYPES"]

CONFIG_NAME = "scheduler_config.json"
SCHEDULES = ("cosine", "linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
logger = get_logger(__name__)

Timestep = int | torch.Tensor
Generators = torch.Generator | Sequence[torch.Generator] | None


def _betas(schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float,
           beta_max: float = 0.999) -> torch.Tensor:
    """(T,) float64 betas.

    Same formulas as MONAI's ``NoiseSchedules`` ("cosine", "linear_beta", "scaled_linear_beta"), but in
    float64: MONAI builds the cosine table in float32, where beta_0 = 1 - abar(1) / abar(0) ~ 4e-5 keeps
    only 3 significant digits (relative error ~1e-3 in the first posterior coefficients). ``beta_max`` clips
    the cosine betas (only the last one or two steps reach it: beta_{T-1} = 1 unclipped)."""
    n = num_train_timesteps
    if schedule == "cosine":  # Nichol & Dhariwal 2021, s = 0.008, betas clipped at beta_max
        x = torch.linspace(0, n, n + 1, dtype=torch.float64)
        abar = torch.cos(((x / n) + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(0.0, beta_max)
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2  # scaled_linear


def _expand(coef: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) or (1,) -> (B, 1, ..., 1) for broadcasting against an ``ndim`` sample."""
    return coef.reshape(-1, *([1] * (ndim - 1)))


def _randn_like(sample: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like ``sample``; a list of generators gives one per sample."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
    if len(generator) != sample.shape[0]:
        raise ValueError(f"need one generator per sample: {len(generator)} for a batch of {sample.shape[0]}")
    return torch.stack([torch.randn(sample.shape[1:], generator=g, device=sample.device, dtype=sample.dtype)
                        for g in generator])


class _Scheduler:
    """Shared schedule tables, ``add_noise``, timesteps and save/load."""

    def __init__(self, *, num_train_timesteps: int = 300, schedule: str = "cosine", beta_start: float = 1e-4,
                 beta_end: float = 2e-2, clip_sample: bool = False, prediction_type: str = "epsilon",
                 clip_sample_range: float = 1.0, beta_max: float = 0.999):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")
        if int(num_train_timesteps) < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        self.config = {"num_train_timesteps": int(num_train_timesteps), "schedule": schedule,
                       "beta_start": float(beta_start), "beta_end": float(beta_end),
                       "clip_sample": bool(clip_sample), "prediction_type": prediction_type,
                       "clip_sample_range": float(clip_sample_range), "beta_max": float(beta_max)}
        if self.config["clip_sample_range"] <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range}")
        if not 0.0 < self.config["beta_max"] < 1.0:
            raise ValueError(f"beta_max must be in (0, 1), got {beta_max}")
        betas = _betas(schedule, self.num_train_timesteps, beta_start, beta_end, self.config["beta_max"])
        self._betas64 = betas
        self._abar64 = torch.cumprod(1.0 - betas, dim=0)
        self.num_inference_steps = self.num_train_timesteps
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1)
        self._prev64 = self._prev_table(self.timesteps)
        self._cache: dict = {}

    # ---------------------------------------------------------------- tables
    @property
    def num_train_timesteps(self) -> int:
        return self.config["num_train_timesteps"]

    @property
    def betas(self) -> torch.Tensor:
        """(T,) float32 CPU."""
        return self._betas64.float()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float32 CPU, ``alpha_bar_t`` for t = 0 .. T - 1 (strictly decreasing, in (0, 1))."""
        return self._abar64.float()

    def _prev_table(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(T,) float64: ``alpha_bar`` of the noise level a step from t lands on (1.0 = clean sample).

        Listed timesteps step to the next listed one; others to t - 1 (the full chain)."""
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self._abar64[:-1]])
        ts = timesteps.cpu().long()
        prev[ts] = torch.cat([self._abar64[ts[1:]], torch.ones(1, dtype=torch.float64)])
        return prev

    def _tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_bar, alpha_bar_prev) on ``device`` in ``dtype``, copied once per device/dtype."""
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = (self._abar64.to(device=device, dtype=dtype), self._prev64.to(device=device, dtype=dtype))
        return self._cache[key]

    @staticmethod
    def _index(table: torch.Tensor, t: Timestep) -> torch.Tensor:
        """``table[t]`` as a (1,) or (B,) tensor without a host sync (python int or tensor ``t``)."""
        if isinstance(t, torch.Tensor):
            return torch.index_select(table, 0, t.to(table.device, non_blocking=True).reshape(-1).long())
        return table.narrow(0, int(t), 1)

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    # ---------------------------------------------------------------- forward process
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Timestep) -> torch.Tensor:
        """``sqrt(a_t) x0 + sqrt(1 - a_t) noise`` with ``a_t = alpha_bar[t]``.

        ``original_samples``, ``noise``: (B, ...) float; ``timesteps``: (B,) long (any device) or an int.
        Returns (B, ...) in the samples' dtype, on their device."""
        dt = self._compute_dtype(original_samples)
        a = _expand(self._index(self._tables(original_samples.device, dt)[0], timesteps), original_samples.ndim)
        return (a.sqrt() * original_samples + (1 - a).sqrt() * noise).to(original_samples.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: Timestep) -> torch.Tensor:
        """v-prediction target ``sqrt(a_t) noise - sqrt(1 - a_t) x0`` (same shapes as ``add_noise``)."""
        dt = self._compute_dtype(sample)
        a = _expand(self._index(self._tables(sample.device, dt)[0], timesteps), sample.ndim)
        return (a.sqrt() * noise - (1 - a).sqrt() * sample).to(sample.dtype)

    def _x0_eps(self, model_output: torch.Tensor, sample: torch.Tensor, a_t: torch.Tensor):
        """(predicted x0, predicted epsilon) from the model output; with ``clip_sample`` x0 is clipped to
        [-clip_sample_range, clip_sample_range] and epsilon made consistent with it (as diffusers)."""
        pred = self.config["prediction_type"]
        s, r = a_t.sqrt(), (1 - a_t).sqrt()
        if pred == "epsilon":
            x0, eps = (sample - r * model_output) / s, model_output
        elif pred == "sample":
            x0, eps = model_output, (sample - s * model_output) / r
        else:  # v_prediction
            x0, eps = s * sample - r * model_output, s * model_output + r * sample
        if self.config["clip_sample"]:
            c = self.config["clip_sample_range"]
            x0 = x0.clamp(-c, c)
            eps = (sample - s * x0) / r
        return x0, eps

    # ---------------------------------------------------------------- reverse process
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Sample in ``n`` steps: ``timesteps`` = ``round(linspace(T - 1, 0, n))`` (descending, unique),
        a (n,) long tensor on ``device``. ``n > T`` is reduced to T (with a warning)."""
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"need at least one sampling step, got {num_inference_steps}")
        if n > self.num_train_timesteps:
            logger.warning("%d sampling steps requested for a %d-step model; using %d", n, self.num_train_timesteps,
                           self.num_train_timesteps)
            n = self.num_train_timesteps
        ts = torch.linspace(self.num_train_timesteps - 1, 0, n, dtype=torch.float64).round().long()
        self.num_inference_steps = n
        self._prev64 = self._prev_table(ts)
        self._cache = {}
        self.timesteps = ts.to(device) if device is not None else ts

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor,
             generator: Generators = None) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- save / load
    def _saved_config(self) -> dict:
        return {"_class": type(self).__name__, **self.config}

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``path/scheduler_config.json`` (atomically)."""
        Path(path).mkdir(parents=True, exist_ok=True)
        write_json(Path(path) / CONFIG_NAME, self._saved_config())

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides):
        """The scheduler saved in ``path`` (a folder holding ``scheduler_config.json``) as ``cls``."""
        return cls(**{**_read_config(path, cls), **overrides})


def _read_config(path: str | Path, cls) -> dict:
    f = Path(path) / CONFIG_NAME
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no scheduler config (expected a folder written by save_pretrained)")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    cfg.pop("_class", None)
    if cls is not DDIMScheduler:
        cfg.pop("eta", None)
    return cfg


class DDPMScheduler(_Scheduler):
    """Ancestral DDPM sampling (Ho et al. 2020), 300 steps and the cosine schedule by default (the release's).

    With ``set_timesteps(n < T)`` each step uses the posterior between the two listed noise levels
    (beta = 1 - a_t / a_prev; "respacing", Nichol & Dhariwal 2021); with all T steps it is the usual chain.
    """

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor,
             generator: Generators = None) -> torch.Tensor:
        """One reverse step ``x_t -> x_prev ~ q(x_prev | x_t, x0_pred)``.

        Args:
            model_output: (B, ...) the model's prediction (epsilon, x0 or v, per ``prediction_type``).
            timestep: the current t (int, 0-dim or (B,) long tensor); the step lands on the next timestep
                of ``timesteps`` (clean at the last one, where no noise is added: the variance is 0).
            sample: (B, ...) float x_t.
            generator: a generator, one per sample (list), or None (global RNG). Noise is drawn at every
                step, the last included, so the random stream does not depend on t.
        Returns:
            (B, ...) x_prev in the sample's dtype, on its device.
        """
        dt = self._compute_dtype(sample)
        abar, abar_prev = self._tables(sample.device, dt)
        a_t = _expand(self._index(abar, timestep), sample.ndim)
        a_p = _expand(self._index(abar_prev, timestep), sample.ndim)
        x = sample.to(dt)
        x0, _ = self._x0_eps(model_output.to(dt), x, a_t)
        beta = 1 - a_t / a_p
        mean = (a_p.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_p) / (1 - a_t)) * x
        var = (1 - a_p) / (1 - a_t) * beta
        noise = _randn_like(x, generator)
        return (mean + var.sqrt() * noise).to(sample.dtype)


class DDIMScheduler(_Scheduler):
    """DDIM (Song et al. 2021): few-step sampling of a model trained with DDPM; ``eta=0`` is deterministic,
    ``eta=1`` with all T steps is the DDPM chain."""

    def __init__(self, *, eta: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)

    def _saved_config(self) -> dict:
        return {**super()._saved_config(), "eta": self.eta}

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor,
             generator: Generators = None) -> torch.Tensor:
        """One DDIM step (eq. 12 of Song et al.) from t to the next timestep of ``timesteps``.

        Shapes and arguments as ``DDPMScheduler.step``; no random numbers are drawn when ``eta == 0``."""
        dt = self._compute_dtype(sample)
        abar, abar_prev = self._tables(sample.device, dt)
        a_t = _expand(self._index(abar, timestep), sample.ndim)
        a_p = _expand(self._index(abar_prev, timestep), sample.ndim)
        x = sample.to(dt)
        x0, eps = self._x0_eps(model_output.to(dt), x, a_t)
        prev = a_p.sqrt() * x0
        if self.eta > 0:
            sigma = self.eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
            prev = prev + (1 - a_p - sigma**2).clamp_min(0).sqrt() * eps + sigma * _randn_like(x, generator)
        else:
            prev = prev + (1 - a_p).sqrt() * eps
        return prev.to(sample.dtype)


def load_scheduler(path: str | Path, sampler: str = "ddpm", **overrides):
    """A scheduler of kind ``sampler`` (ddpm | ddim) with the training schedule saved in ``path``."""
    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}.get(sampler)
    if cls is None:
        raise ValueError(f"unknown sampler {sampler!r}; choose ddpm or ddim")
    return cls.from_pretrained(path, **overrides)

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

Two few-step samplers, ours (the paper samples with DDPM-300):

* ``DPMSolverMultistepScheduler``: DPM-Solver++(2M) (Lu et al. 2022), a second-order multistep solver of
  the same model's probability-flow ODE, on the same respaced timesteps as DDIM (``--sampler dpmpp2m``);
* ``RectifiedFlowScheduler``: rectified flow (Liu et al. 2023; MAISI-v2's objective), a training
  objective of its own (``diffusion_train.prediction: rectified_flow``) with its Euler sampler
  (``--sampler euler``). The DDPM samplers cannot sample a rectified-flow model nor Euler a DDPM one:
  ``check_sampler`` refuses the mix.

``load_scheduler`` reads back whichever class a folder holds; ``sampling_scheduler`` makes the sampler
of a training schedule.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from lad.utils.atomic import write_json
from lad.utils.log import get_logger

__all__ = ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "RectifiedFlowScheduler", "load_scheduler",
           "sampling_scheduler", "check_sampler", "CONFIG_NAME", "SCHEDULES", "PREDICTION_TYPES", "RECTIFIED_FLOW", "SAMPLERS"]

CONFIG_NAME = "scheduler_config.json"
SCHEDULES = ("cosine", "linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
RECTIFIED_FLOW = "rectified_flow"
SAMPLERS = ("ddpm", "ddim", "dpmpp2m", "euler")
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


def _read_raw(path: str | Path) -> tuple[Path, dict]:
    f = Path(path) / CONFIG_NAME
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no scheduler config (expected a folder written by save_pretrained)")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{f}: expected a JSON object, got {type(cfg).__name__}")
    return f, cfg


def _read_config(path: str | Path, cls) -> dict:
    f, cfg = _read_raw(path)
    saved = cfg.pop("_class", "DDPMScheduler")
    if (saved == "RectifiedFlowScheduler") != (cls is RectifiedFlowScheduler):
        raise ValueError(f"{f}: holds a {saved} ({'a rectified-flow' if saved == 'RectifiedFlowScheduler' else 'a DDPM'} "
                         f"schedule), which {cls.__name__} cannot load; use lad.schedulers.load_scheduler")
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


class DPMSolverMultistepScheduler(_Scheduler):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), ours: a deterministic second-order multistep solver of
    the probability-flow ODE of a model trained with DDPM (epsilon, v or x0 prediction), in its data
    (x0) form, on the same respaced timesteps as DDIM (``set_timesteps``: ``round(linspace(T - 1, 0, n))``).

    With ``alpha = sqrt(alpha_bar)``, ``sigma = sqrt(1 - alpha_bar)``, ``lambda = log(alpha / sigma)`` and
    ``h = lambda_next - lambda_t``, one step from t to the next listed level is
    ``x_next = (sigma_next / sigma_t) x_t - alpha_next (exp(-h) - 1) D``, where
    ``D = (1 + 1 / (2 r)) x0_t - 1 / (2 r) x0_prev`` (``r = h_prev / h``), except on the first step (no
    history) and the last two, where ``D`` is the x0 estimate at t (first order: exactly DDIM's step). The
    last two: Lu et al.'s "lower order final" (their code and diffusers' use first order for the final steps of
    short schedules). The respaced grid ends with t = 0 (sigma ~ 0.006, lambda ~ 4.4 with the cosine table)
    and then the clean sample, so its last two steps are the final step of their grids (which end with the
    clean sample) split in two; the second-order extrapolation over the large lambda jump onto t = 0
    (h / h_prev ~ 4 at 10 steps) overshoots: with it, the 10-step result of an exact Gaussian-data oracle was
    further from the ODE's endpoint than DDIM's (tests/test_samplers.py checks the opposite now holds).

    The scheduler keeps the previous step's x0 estimate (per sample, on the sample's device) between calls:
    one trajectory per ``set_timesteps``; the history is cleared by ``set_timesteps`` and after the last step.
    x0 clipping (``clip_sample``) applies to each estimate, as in DDIM.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._reset()

    def _reset(self) -> None:
        self._history: tuple[torch.Tensor, torch.Tensor] | None = None  # (x0 estimate, lambda) of the previous step
        self._step_index = 0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        self._reset()

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor,
             generator: Generators = None) -> torch.Tensor:
        """One DPM-Solver++(2M) step from t to the next timestep of ``timesteps``.

        Shapes and arguments as ``DDPMScheduler.step``; deterministic (``generator`` is accepted and unused).
        Call it once per listed timestep, in order (the multistep history assumes it)."""
        dt = self._compute_dtype(sample)
        abar, abar_prev = self._tables(sample.device, dt)
        a_t = _expand(self._index(abar, timestep), sample.ndim)
        a_p = _expand(self._index(abar_prev, timestep), sample.ndim)
        x = sample.to(dt)
        x0, _ = self._x0_eps(model_output.to(dt), x, a_t)
        alpha_t, sigma_t, alpha_p, sigma_p = a_t.sqrt(), (1 - a_t).sqrt(), a_p.sqrt(), (1 - a_p).sqrt()
        lam_t = torch.log(alpha_t / sigma_t)
        d = x0
        if self._history is not None and self._step_index < self.num_inference_steps - 2:
            x0_prev, lam_prev = self._history
            lam_p = torch.log(alpha_p / sigma_p)
            d = x0 + (lam_p - lam_t) / (2 * (lam_t - lam_prev)) * (x0 - x0_prev)
        # -alpha_p (exp(-h) - 1) = alpha_p - sigma_p alpha_t / sigma_t: finite at sigma_p = 0 (the clean sample)
        prev = (sigma_p / sigma_t) * x + (alpha_p - sigma_p * alpha_t / sigma_t) * d
        self._history = (x0, lam_t)
        self._step_index += 1
        if self._step_index >= self.num_inference_steps:
            self._reset()
        return prev.to(sample.dtype)


class RectifiedFlowScheduler:
    """Rectified flow (Liu et al. 2023; MAISI-v2's objective), ours: a straight path between data and noise,
    a velocity-predicting network, and its Euler sampler (``--sampler euler``).

    Convention: MONAI's ``RFlowScheduler`` (used for ``add_noise``; its path, velocity and step, followed
    exactly), with its time index shifted by one. For the network's integer timestep t in {0, ..., T - 1}:

    * noise level ``s = (t + 1) / T`` in {1/T, ..., 1} (s = 1: pure noise);
    * ``x_s = (1 - s) x0 + s eps`` (MONAI's ``add_noise`` at its timestep t + 1);
    * the network predicts the velocity ``v = x0 - eps`` (MONAI's and MAISI's target ``images - noise``: it
      points from noise to data, ``dx_s / ds = -v``); the x0 estimate is ``x_s + s v``;
    * Euler step from s to the next listed level s' < s: ``x_s' = x_s + (s - s') v`` (MONAI's ``step``).

    Why the shift: MONAI's timestep t means s = t / T and its sampler starts at t = T (s = 1), a value its
    discrete training draw ``floor(U[0, 1) T)`` never produces and outside the [0, T) range of the
    denoiser's time embedding (the DDPM's). With s = (t + 1) / T training and sampling use the DDPM's integers
    0 .. T - 1: training draws ``t ~ U{0, ..., T - 1}`` (MONAI's uniform discrete draw, made by
    ``diffusion_loss`` with the caller's generator), and t = T - 1 is pure noise as alpha_bar(T - 1) ~ 0 is for
    the DDPM. ``set_timesteps(n)`` lists ``round(T (1 - i / n)) - 1``, i = 0 .. n - 1 (MONAI's grid, shifted):
    n equal steps in s when n divides T, the last one landing on s = 0 (the clean sample).

    Written here rather than taken from MONAI: the step (MONAI's takes one Python-int timestep and the next one,
    reads them with ``float()`` (a host sync for a device tensor) and returns a tuple; here per-sample (B,)
    timesteps and the next level from a table on the sample's device, as the DDPM schedulers), the timestep grid
    (MONAI casts it through float16, exact only up to T = 2048) and save/load. Deterministic: ``step`` accepts
    per-sample generators and draws nothing. Classifier-free guidance (eq. 4) applies to v unchanged: v is
    affine in the model's output and the weights (1 + w, -w) sum to one.
    """

    def __init__(self, *, num_train_timesteps: int = 300, prediction_type: str = RECTIFIED_FLOW):
        from monai.networks.schedulers import RFlowScheduler

        if prediction_type != RECTIFIED_FLOW:
            raise ValueError(f"RectifiedFlowScheduler predicts the rectified-flow velocity: prediction_type must be "
                             f"{RECTIFIED_FLOW!r}, got {prediction_type!r}")
        if int(num_train_timesteps) < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        self.config = {"num_train_timesteps": int(num_train_timesteps), "prediction_type": RECTIFIED_FLOW}
        self._monai = RFlowScheduler(num_train_timesteps=self.num_train_timesteps, use_discrete_timesteps=True)
        self.set_timesteps(self.num_train_timesteps)

    @property
    def num_train_timesteps(self) -> int:
        return self.config["num_train_timesteps"]

    def noise_level(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``s = (t + 1) / T`` (float64) of integer timesteps t."""
        return (torch.as_tensor(timesteps).double() + 1) / self.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Sample in ``n`` Euler steps: ``timesteps`` = ``round(T (1 - i / n)) - 1`` for i = 0 .. n - 1 (descending,
        unique), a (n,) long tensor on ``device``. ``n > T`` is reduced to T (with a warning)."""
        n, T = int(num_inference_steps), self.num_train_timesteps
        if n < 1:
            raise ValueError(f"need at least one sampling step, got {num_inference_steps}")
        if n > T:
            logger.warning("%d sampling steps requested for a %d-step model; using %d", n, T, T)
            n = T
        ts = torch.tensor([int(round((1.0 - i / n) * T)) - 1 for i in range(n)], dtype=torch.long)  # as MONAI's grid
        # ds[t] = s(t) - s(next level): listed timesteps step to the next listed one (the last to s = 0), others by 1 / T
        s = self.noise_level(torch.arange(T))
        nxt = s - 1.0 / T
        nxt[ts] = torch.cat([self.noise_level(ts[1:]), torch.zeros(1, dtype=torch.float64)])
        self._ds64 = s - nxt
        self._cache: dict = {}
        self.num_inference_steps = n
        self.timesteps = ts.to(device) if device is not None else ts

    def _ds(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = self._ds64.to(device=device, dtype=dtype)
        return self._cache[key]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Timestep) -> torch.Tensor:
        """``(1 - s) x0 + s noise`` with ``s = (t + 1) / T`` (MONAI's ``add_noise`` at timestep t + 1).

        ``original_samples``, ``noise``: (B, C, *spatial) float with 2 or 3 spatial axes (MONAI's); ``timesteps``:
        (B,) long (on the samples' device) or an int. Returns (B, ...) in the samples' dtype, on their device."""
        t = torch.as_tensor(timesteps, device=original_samples.device).reshape(-1)
        out = self._monai.add_noise(original_samples, noise, t + 1)
        return out.to(original_samples.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: Timestep) -> torch.Tensor:
        """The training target ``v = x0 - noise`` (the same at every timestep; ``timesteps`` is for the interface)."""
        return sample - noise

    def step(self, model_output: torch.Tensor, timestep: Timestep, sample: torch.Tensor,
             generator: Generators = None) -> torch.Tensor:
        """One Euler step ``x + (s_t - s_next) v`` from t to the next timestep of ``timesteps``.

        Args:
            model_output: (B, ...) the predicted velocity ``v = x0 - eps``.
            timestep: the current t (int, 0-dim or (B,) long tensor); the last listed one steps to s = 0.
            sample: (B, ...) float x_s.
            generator: accepted for the interface; nothing is drawn.
        Returns:
            (B, ...) the sample at the next level, in the sample's dtype, on its device.
        """
        dt = _Scheduler._compute_dtype(sample)
        ds = _expand(_Scheduler._index(self._ds(sample.device, dt), timestep), sample.ndim)
        return (sample.to(dt) + ds * model_output.to(dt)).to(sample.dtype)

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``path/scheduler_config.json`` (atomically)."""
        Path(path).mkdir(parents=True, exist_ok=True)
        write_json(Path(path) / CONFIG_NAME, {"_class": type(self).__name__, **self.config})

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "RectifiedFlowScheduler":
        return cls(**{**_read_config(path, cls), **overrides})


_SAMPLER_CLASSES = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmpp2m": DPMSolverMultistepScheduler,
                    "euler": RectifiedFlowScheduler}
_CLASSES = {c.__name__: c for c in _SAMPLER_CLASSES.values()}


def check_sampler(prediction_type: str, sampler: str) -> None:
    """Refuse a sampler that cannot sample a model trained with ``prediction_type``: ``euler`` integrates a
    rectified-flow model only; ``ddpm``, ``ddim`` and ``dpmpp2m`` sample DDPM-trained models only."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if prediction_type == RECTIFIED_FLOW and sampler != "euler":
        raise ValueError(f"sampler {sampler!r} samples models trained with DDPM (epsilon, v or x0 prediction); this model was "
                         f"trained with rectified flow: use --sampler euler (sampling.sampler: euler)")
    if prediction_type != RECTIFIED_FLOW and sampler == "euler":
        raise ValueError(f"sampler 'euler' integrates a rectified-flow model; this model was trained with DDPM "
                         f"({prediction_type!r} prediction): use --sampler ddpm, ddim or dpmpp2m")


def sampling_scheduler(config: dict, sampler: str, **overrides):
    """The scheduler of kind ``sampler`` (ddpm | ddim | dpmpp2m | euler) for the training schedule ``config``
    (a scheduler's ``config`` or a saved ``scheduler_config.json``); ``check_sampler`` refuses a mismatch."""
    cfg = dict(config)
    cfg.pop("_class", None)
    check_sampler(cfg.get("prediction_type", "epsilon"), sampler)
    cls = _SAMPLER_CLASSES[sampler]
    if cls is not DDIMScheduler:
        cfg.pop("eta", None)
    return cls(**{**cfg, **overrides})


def load_scheduler(path: str | Path, sampler: str | None = None, **overrides):
    """The scheduler saved in ``path``: as saved (``sampler=None``), or the sampler of kind ``sampler``
    (ddpm | ddim | dpmpp2m | euler) with that training schedule."""
    f, cfg = _read_raw(path)
    if sampler is not None:
        return sampling_scheduler(cfg, sampler, **overrides)
    name = cfg.pop("_class", "DDPMScheduler")
    cls = _CLASSES.get(name)
    if cls is None:
        raise ValueError(f"{f}: unknown scheduler class {name!r}; expected one of {sorted(_CLASSES)}")
    if cls is not DDIMScheduler:
        cfg.pop("eta", None)
    return cls(**{**cfg, **overrides})

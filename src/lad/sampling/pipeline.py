"""The Lad sampling pipeline: masks in, CT volumes out (paper section 3.4, Figure 2(c)).

```python
import lad, torch
pipe = lad.LadPipeline.from_pretrained("runs/demo").to("cpu")        # a run folder or an exported pipeline
volumes = pipe(masks, generator=[torch.Generator().manual_seed(s) for s in (0, 1)])  # (B, 1, D, H, W) in [0, 1]
pipe.save_pretrained("export/")                                       # only what sampling needs
```

The denoising loop is the ten visible lines of ``__call__``. Every sample draws its noise from its
own generator (``seeds=[...]`` or ``generator=[...]``, one per mask), so a sample does not depend on
which batch it was in (this is what makes sharded and resumed generation equal a single run).
Sampler, steps and guidance not given come from the pipeline's sampling defaults (the run's
``sampling`` section, ``RUN/config.yaml``, or the export's ``pipeline_config.json``).

An exported pipeline (``save_pretrained``, docs/contracts.md "Exported pipeline") holds ``model_index.json``,
``pipeline_config.json``, ``latent_stats.json`` and the folders ``vqgan/``, ``denoiser/`` (the EMA weights a run
samples with), ``condition/`` (conditional variants) and ``scheduler/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lad.utils.log import get_logger, progress

__all__ = ["LadPipeline", "load_run_parts", "load_export_parts", "load_sampling_defaults", "is_export", "MODEL_INDEX",
           "PIPELINE_CONFIG"]

log = get_logger(__name__)

MODEL_INDEX = "model_index.json"
PIPELINE_CONFIG = "pipeline_config.json"
EXPORT_FORMAT, EXPORT_VERSION = "lad-pipeline", 1


def _read_json(path: Path, what: str, fix: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt {what} ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: corrupt {what} (not a JSON object); {fix}")
    return data


def _latent_stats(folder: Path, fix: str) -> dict:
    """``folder/latent_stats.json``, checked against ``folder/vqgan`` (the VQ-GAN its latents came from)."""
    from lad.training.latents import file_hash

    stats_path = folder / "latent_stats.json"
    if not stats_path.exists():
        raise FileNotFoundError(f"{stats_path}: missing latent scaling (written by `lad train diffusion`)")
    stats = _read_json(stats_path, "latent scaling", fix)
    if stats.get("vqgan_hash") and stats["vqgan_hash"] != file_hash(folder / "vqgan" / "model.safetensors"):
        raise ValueError(f"{folder / 'vqgan'}: the VQ-GAN changed after the diffusion model was trained on its latents "
                         f"({stats_path} names another VQ-GAN); {fix}")
    return stats


def is_export(path: str | Path) -> bool:
    """True for a folder written by ``LadPipeline.save_pretrained`` (it holds ``model_index.json``)."""
    return (Path(path) / MODEL_INDEX).is_file()


def load_sampling_defaults(path: str | Path):
    """The sampling defaults (``lad.training.config.SamplingConfig``) of a run folder (the ``sampling`` section of
    ``RUN/config.yaml``) or of an exported pipeline (``pipeline_config.json``); the dataclass defaults when absent."""
    import yaml

    from lad.config import ConfigError, from_dict
    from lad.training.config import SamplingConfig

    path = Path(path)
    if is_export(path):
        f = path / PIPELINE_CONFIG
        saved = _read_json(f, "pipeline config", "export the pipeline again").get("sampling") if f.exists() else None
    else:
        f = path / "config.yaml"
        try:
            saved = (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("sampling") if f.exists() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{f}: not valid YAML ({e})") from None
    return from_dict(SamplingConfig, saved or {}, _where=f"{f}: sampling")


def load_run_parts(run: str | Path, *, device: str | torch.device = "cpu", ema: bool = True) -> dict:
    """Load every trained part of a run folder (docs/contracts.md "Run folder")."""
    from lad.models.condition import ConditionExtractor
    from lad.models.denoiser import LatentDenoiser
    from lad.models.vqgan import VQGAN
    from lad.schedulers import load_scheduler
    from lad.training.latents import file_hash

    run = Path(run)
    if not (run / "vqgan").is_dir():
        raise FileNotFoundError(f"{run}: no trained VQ-GAN (run `lad train vqgan --run {run}` first; or give an exported "
                                f"pipeline, a folder with {MODEL_INDEX})")
    den_dir = run / ("denoiser_ema" if ema and (run / "denoiser_ema").is_dir() else "denoiser")
    if not den_dir.is_dir():
        raise FileNotFoundError(f"{run}: no trained denoiser (run `lad train diffusion --run {run}` first)")
    stats = _latent_stats(run, f"retrain it: lad train diffusion --run {run} --overwrite")
    parts = {
        "vqgan": VQGAN.from_pretrained(run / "vqgan", map_location=device).to(device).eval(),
        "denoiser": LatentDenoiser.from_pretrained(den_dir, map_location=device).to(device).eval(),
        "scheduler": load_scheduler(run / "scheduler"),  # as trained: DDPM or rectified flow
        "latent_stats": stats,
        "condition": None,
        "checkpoint_hash": file_hash(den_dir / "model.safetensors"),
        "sampling": load_sampling_defaults(run),
    }
    cond_dir = run / ("condition" if den_dir.name == "denoiser_ema" else "condition_raw")
    if cond_dir.is_dir():  # the EMA extractor goes with the EMA denoiser, the raw one with the raw
        parts["condition"] = ConditionExtractor.from_pretrained(cond_dir, map_location=device).to(device).eval()
    return parts


def load_export_parts(folder: str | Path, *, device: str | torch.device = "cpu") -> dict:
    """Load an exported pipeline (``LadPipeline.save_pretrained``; docs/contracts.md "Exported pipeline")."""
    from lad.models.condition import ConditionExtractor
    from lad.models.denoiser import LatentDenoiser
    from lad.models.vqgan import VQGAN
    from lad.schedulers import DDIMScheduler, DDPMScheduler
    from lad.training.latents import file_hash

    folder = Path(folder)
    fix = "export the pipeline again (LadPipeline.save_pretrained)"
    index = _read_json(folder / MODEL_INDEX, "pipeline index", fix)
    if index.get("format") != EXPORT_FORMAT or int(index.get("version", 0)) > EXPORT_VERSION:
        raise ValueError(f"{folder / MODEL_INDEX}: not a lad pipeline of format version <= {EXPORT_VERSION} "
                         f"(format {index.get('format')!r}, version {index.get('version')!r})")
    for name in ("vqgan", "denoiser", "scheduler") + (("condition",) if index.get("condition") else ()):
        if not (folder / name).is_dir():
            raise FileNotFoundError(f"{folder / name}: missing (the pipeline's {name}); {fix}")
    scheduler_cls = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}.get(index["scheduler"][1], DDPMScheduler)
    return {
        "vqgan": VQGAN.from_pretrained(folder / "vqgan", map_location=device).to(device).eval(),
        "denoiser": LatentDenoiser.from_pretrained(folder / "denoiser", map_location=device).to(device).eval(),
        "scheduler": scheduler_cls.from_pretrained(folder / "scheduler"),
        "latent_stats": _latent_stats(folder, fix),
        "condition": (ConditionExtractor.from_pretrained(folder / "condition", map_location=device).to(device).eval()
                      if index.get("condition") else None),
        "checkpoint_hash": index.get("checkpoint_hash") or file_hash(folder / "denoiser" / "model.safetensors"),
        "sampling": load_sampling_defaults(folder),
    }


class LadPipeline:
    """VQ-GAN + Condition Extractor + latent denoiser + scheduler + latent scaling, ready to sample.

    ``latent_stats``: the ``latent_stats.json`` mapping (the scaling, ``latent_shape``, ``image_shape``, ``spacing``,
    ``organ``, ``fingerprint``); ``sampling``: the default sampler, steps and guidance
    (``lad.training.config.SamplingConfig``; its defaults, DDIM-50 at w = 1, when None).
    """

    def __init__(self, *, vqgan, denoiser, scheduler, latent_stats: dict, condition=None, device="cpu", checkpoint_hash: str = "",
                 sampling=None):
        from lad.training.config import SamplingConfig
        from lad.training.latents import LatentScaler

        self.vqgan = vqgan
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.condition = condition
        self.device = torch.device(device)
        self.checkpoint_hash = checkpoint_hash
        self.latent_stats = latent_stats
        self.scaler = LatentScaler.from_dict(latent_stats).to(self.device)
        self.sampling = sampling if sampling is not None else SamplingConfig()
        self.latent_shape = tuple(latent_stats["latent_shape"])  # (C, d, h, w)
        self.image_shape = tuple(latent_stats["image_shape"])  # (D, H, W)

    @classmethod
    def from_run(cls, run: str | Path, *, device: str | torch.device = "cpu", ema: bool = True) -> "LadPipeline":
        """The pipeline of a run folder (``ema``: the EMA denoiser and condition extractor, as ``lad sample`` uses)."""
        return cls(**load_run_parts(run, device=device, ema=ema), device=device)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu", ema: bool = True) -> "LadPipeline":
        """The pipeline saved in ``path``: an exported pipeline (``save_pretrained``) or a run folder (``lad train``;
        ``ema`` as in ``from_run``)."""
        path = Path(path)
        if is_export(path):
            return cls(**load_export_parts(path, device=device), device=device)
        return cls.from_run(path, device=device, ema=ema)

    def save_pretrained(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Export what sampling needs into ``folder`` (docs/contracts.md "Exported pipeline"); returns it.

        Written under a temporary name and renamed into place, so a killed export leaves no half folder. An
        existing non-empty ``folder`` is refused unless ``overwrite``. Loads back with ``from_pretrained(folder)``
        and samples bit for bit as this pipeline does.
        """
        from lad import __version__
        from lad.config import to_dict
        from lad.training.latents import file_hash
        from lad.utils.atomic import OutputExistsError, atomic_dir, write_json

        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise OutputExistsError(f"{folder}: exists and is not a folder")
        if folder.is_dir() and any(folder.iterdir()) and not overwrite:
            raise OutputExistsError(f"{folder}: exists and is not empty; pass overwrite=True to replace it or choose another folder")
        with atomic_dir(folder) as tmp:
            self.vqgan.save_pretrained(tmp / "vqgan")
            self.denoiser.save_pretrained(tmp / "denoiser")
            if self.condition is not None:
                self.condition.save_pretrained(tmp / "condition")
            self.scheduler.save_pretrained(tmp / "scheduler")
            # the scaling belongs to the VQ-GAN saved beside it
            stats = {**self.latent_stats, **self.scaler.to_dict(), "vqgan_hash": file_hash(tmp / "vqgan" / "model.safetensors")}
            write_json(tmp / "latent_stats.json", stats)
            write_json(tmp / PIPELINE_CONFIG, {"sampling": to_dict(self.sampling)})
            write_json(tmp / MODEL_INDEX, {
                "_class_name": type(self).__name__, "_lad_version": __version__, "format": EXPORT_FORMAT,
                "version": EXPORT_VERSION, "vqgan": ["lad", "VQGAN"], "denoiser": ["lad", "LatentDenoiser"],
                "condition": ["lad", "ConditionExtractor"] if self.condition is not None else None,
                "scheduler": ["lad.schedulers", type(self.scheduler).__name__], "checkpoint_hash": self.checkpoint_hash,
            })
        return folder

    def to(self, device: str | torch.device) -> "LadPipeline":
        """Move every part to ``device``; returns self (as ``nn.Module.to``)."""
        self.device = torch.device(device)
        for part in (self.vqgan, self.denoiser, self.condition):
            if part is not None:
                part.to(self.device)
        self.scaler.to(self.device)
        return self

    def _unscale(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents back to the VQ-GAN's space (``lad.training.latents.LatentScaler``, RUN/latent_stats.json)."""
        return self.scaler.unscale(z)

    def _generators(self, n: int, seeds: Sequence[int] | None, generator) -> list[torch.Generator]:
        """One generator per sample from ``seeds`` (each seeds its own generator on the pipeline's device) or from
        ``generator`` (a list of one per mask, or one generator shared by the whole batch)."""
        if (seeds is None) == (generator is None):
            raise ValueError("pass seeds=[one int per mask] or generator= (a torch.Generator, or a list of one per mask), "
                             "exactly one of them")
        if seeds is not None:
            if len(seeds) != n:
                raise ValueError(f"need one seed per mask: {len(seeds)} seeds for {n} masks")
            return [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        gens = [generator] * n if isinstance(generator, torch.Generator) else list(generator)
        if len(gens) != n:
            raise ValueError(f"need one generator per mask: {len(gens)} generators for {n} masks")
        for g in gens:
            if not isinstance(g, torch.Generator):
                raise ValueError(f"generator= takes torch.Generator objects, got {type(g).__name__}")
            if g.device.type != self.device.type:
                raise ValueError(f"a generator on {g.device} for a pipeline on {self.device}: create it with "
                                 f"torch.Generator(device={str(self.device)!r}) (or move the pipeline with .to())")
        return gens

    @torch.no_grad()
    def conditions(self, masks: torch.Tensor) -> torch.Tensor | None:
        """Condition vectors ``(B, cond_dim)`` for Lad masks ``(B, 1, D, H, W)`` uint8 in {0, 1, 2}."""
        if self.condition is None:
            return None
        from lad.models.condition import encode_mask
        from lad.topology import betti_vectors, normalize_betti

        mask_latent = encode_mask(self.vqgan, masks.to(self.device)) if self.condition.config["use_content"] else None
        betti = None
        if self.condition.config["use_structure"]:
            vec = betti_vectors(masks[:, 0].cpu().numpy())
            betti = torch.as_tensor(normalize_betti(vec), device=self.device)
        return self.condition(mask_latent, betti)

    def spatial(self, masks: torch.Tensor) -> torch.Tensor | None:
        """The spatial condition map ``(B, 2, d, h, w)`` of a denoiser that takes one (ours), else None."""
        if not getattr(self.denoiser, "spatial_channels", 0):
            return None
        from lad.models.condition import spatial_condition

        return spatial_condition(masks.to(self.device), self.latent_factors)

    # small public pieces for loops other than ``__call__`` (latent inpainting, lad.sampling.inpaint)
    @property
    def latent_factors(self) -> tuple[int, int, int]:
        """The VQ-GAN's down-sampling per axis ``(D/d, H/h, W/w)``."""
        return tuple(s // l for s, l in zip(self.image_shape, self.latent_shape[1:]))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` float in [0, 1] -> the scaled latent ``(B, C, d, h, w)`` the denoiser works on
        (the VQ-GAN's pre-quantisation latent, scaled as in training; ``decode`` inverts it)."""
        return self.scaler.scale(self.vqgan.encode(images.to(self.device, torch.float32)))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent ``(B, C, d, h, w)`` -> ``(B, 1, D, H, W)`` float32 in [0, 1], as ``__call__`` decodes."""
        return self.vqgan.decode_latent(self._unscale(z)).clamp(0.0, 1.0)

    def make_scheduler(self, sampler: str):
        """The sampling scheduler of kind ``sampler`` with the run's schedule and x0 clipping (as ``__call__``)."""
        return self._make_scheduler(sampler)

    @torch.no_grad()
    def __call__(
        self,
        masks: torch.Tensor,
        *,
        seeds: Sequence[int] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Generate one CT volume per mask.

        masks: ``(B, 1, D, H, W)`` uint8 in {0, 1, 2} on the model's grid. Randomness, exactly one of: ``seeds``, one
        int per sample (each seeds its own generator); ``generator``, a list of one ``torch.Generator`` per mask (a
        sample then does not depend on its batch; ``seeds=[s]`` equals ``generator=[torch.Generator().manual_seed(s)]``)
        or one generator for the whole batch (diffusers' convention: the samples then depend on the batch).
        guidance / sampler / steps: None takes the pipeline's sampling defaults (``self.sampling``: the run's
        ``sampling`` section; paper presets DDPM-300, demo and tiny DDIM-50, ours; w = 1 in every preset).
        Returns ``(B, 1, D, H, W)`` float32 in [0, 1] (HU [-1000, 400]) on the pipeline's device.
        """
        from lad.models.guidance import guided_epsilon

        if masks.ndim != 5 or tuple(masks.shape[2:]) != self.image_shape:
            raise ValueError(f"masks must be (B, 1, {', '.join(map(str, self.image_shape))}), got {tuple(masks.shape)}")
        gens = self._generators(masks.shape[0], seeds, generator)
        guidance = self.sampling.guidance if guidance is None else guidance
        sampler = self.sampling.sampler if sampler is None else sampler
        steps = self.sampling.steps if steps is None else steps
        scheduler = self._make_scheduler(sampler)
        scheduler.set_timesteps(steps)
        cond, spatial = self.conditions(masks), self.spatial(masks)
        null = self.condition.null_cond if self.condition is not None else None
        z = torch.stack([torch.randn(self.latent_shape, generator=g, device=self.device) for g in gens])
        for t in progress(scheduler.timesteps, desc="denoising", leave=False, disable=not show_progress):
            tt = torch.full((z.shape[0],), int(t), device=self.device, dtype=torch.long)
            eps = guided_epsilon(self.denoiser, z, tt, cond, null, guidance_scale=guidance, spatial=spatial)
            z = scheduler.step(eps, t, z, generator=gens)
        recon = self.vqgan.decode_latent(self._unscale(z))
        return recon.clamp(0.0, 1.0)

    def _make_scheduler(self, sampler: str):
        """The scheduler of kind ``sampler`` (ddpm | ddim | dpmpp2m for DDPM runs, euler for rectified-flow runs;
        ``lad.schedulers.check_sampler`` refuses the other pairs) with the run's training schedule."""
        from lad.schedulers import RECTIFIED_FLOW, sampling_scheduler

        cfg = dict(self.scheduler.config)
        # Clip each x0 estimate to the training latents' range (diffusers' clip_sample). With the release's
        # cosine schedule alpha_bar(T-1) = 2.7e-8, so the first step's x0 = (z - sqrt(1 - a) eps) / sqrt(a)
        # multiplies the epsilon error by ~6000: without the clip a short-trained demo model produced no body
        # outline from pure noise (docs/sampling.md has the measurement). Rectified flow has no such
        # amplification (its step adds the velocity times ds <= 1) and no clip.
        abs_max = self.latent_stats.get("scaled_abs_max")
        if abs_max is not None and not cfg.get("clip_sample") and cfg.get("prediction_type") != RECTIFIED_FLOW:
            cfg.update(clip_sample=True, clip_sample_range=float(abs_max))
        return sampling_scheduler(cfg, sampler)

    def to_hu(self, volumes: torch.Tensor) -> np.ndarray:
        """[0, 1] volumes -> HU float32 numpy (the inverse of the preprocessing's scaling)."""
        from lad.data.labels import unit_to_hu

        return unit_to_hu(volumes.detach().cpu().numpy())

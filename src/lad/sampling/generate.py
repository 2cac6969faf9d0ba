"""``lad sample``: many synthetic volumes from augmented masks, resumable and shardable.

For sample ``j`` (``0 <= j < n``): seed ``derive_seed(seed, j)``, source mask ``j % len(masks)``,
Locality Condition Augmentation drawn from that seed, conditions through the Condition Extractor,
classifier-free guidance, decoding, then the NIfTI files and, last, the sample's record (see
``lad.sampling.writer``). Sampler, steps and guidance not given come from the run's ``sampling``
section (``RUN/config.yaml``: the paper presets sample with DDPM-300, the demo and tiny presets with
our DDIM-50). ``run`` is a run folder or an exported pipeline (``LadPipeline.save_pretrained``): both
load through ``LadPipeline.from_pretrained`` and sample through ``LadPipeline.__call__``. A run folder holding an HA-GAN
(``lad train hagan``: ``RUN/hagan/``) is sampled with ``lad.sampling.hagan.HAGANPipeline`` instead: unconditional,
no sampler, steps or guidance (recorded as ``sampler: "hagan"``); the drawn (augmented) mask is written beside each
sample, as for V0.

Optional selection (``quality_check``, off by default; not in the paper): a sample whose median HU
inside the conditioned organ lies outside the range seen in the training data is redrawn, up to
``max_retries`` times. It biases every metric toward plausible-looking samples, so when it is on the
manifest records every redraw, ``selection_summary`` gives the rejection rate, and ``lad evaluate``
writes it into metrics.json and the report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lad.sampling.augment import NO_AUGMENTATION, AugmentConfig, augment_mask
from lad.sampling.hagan import is_hagan_run
from lad.sampling.masks import MaskItem, MaskSource
from lad.sampling.writer import SampleFolder, parse_shard, shard_indices
from lad.utils.log import get_logger, progress
from lad.utils.seed import derive_seed

__all__ = ["SampleSettings", "generate_samples", "resolve_settings", "selection_summary", "quality_range", "median_hu_ok"]

log = get_logger(__name__)


@dataclasses.dataclass
class SampleSettings:
    """Everything that decides the content of a sample folder (saved as ``sampling.json``)."""

    n: int = 16
    augment: str = "paper"  # "paper" | "none"
    guidance: float | None = None
    """w of eq. (4); None: the run's ``sampling.guidance`` (1.0 in every shipped preset)."""
    sampler: str | None = None
    """"ddpm" | "ddim" | "dpmpp2m" (DDPM runs) or "euler" (rectified-flow runs); None: the run's ``sampling.sampler``
    (paper presets: ddpm; demo, tiny: ddim, ours)."""
    steps: int | None = None
    """Timesteps evenly spaced over the training steps (at most all of them), for either sampler; None: the
    run's ``sampling.steps`` (paper presets: 300; demo, tiny: 50)."""
    seed: int = 0
    format: str = "nifti"  # "nifti" | "npy"
    max_retries: int = 3
    quality_check: bool = False
    """Median-HU selection (redraws up to ``max_retries``); not in the paper, off by default."""


def resolve_settings(settings: SampleSettings, run: str | Path) -> SampleSettings:
    """``settings`` with ``sampler``, ``steps`` and ``guidance`` left None taken from the ``sampling`` section of
    ``RUN/config.yaml`` (or an exported pipeline's ``pipeline_config.json``; ``lad.training.config.SamplingConfig``,
    its defaults for a run saved without one)."""
    from lad.sampling.pipeline import load_sampling_defaults

    run_cfg = load_sampling_defaults(run)
    keys = ("sampler", "steps", "guidance")
    return dataclasses.replace(settings, **{k: getattr(run_cfg, k) for k in keys if getattr(settings, k) is None})


def selection_summary(folder: str | Path) -> dict[str, Any]:
    """What the median-HU selection did in a sample folder: ``{"quality_check", "max_retries", "draws",
    "rejected", "rejection_rate", "kept_out_of_range"}`` (rate = rejected draws / all draws; 0 when off)."""
    folder = SampleFolder(folder)
    settings = json.loads((folder.root / SampleFolder.SETTINGS).read_text())
    quality = [r.get("quality") or {} for r in folder.read_manifest()]
    rejected = sum(int(q.get("redraws", 0)) for q in quality)
    draws = len(quality) + rejected
    on = bool(settings.get("quality_check", False))
    return {"quality_check": on, "max_retries": int(settings.get("max_retries", 0)) if on else 0, "draws": draws,
            "rejected": rejected, "rejection_rate": rejected / draws if draws else 0.0,
            "kept_out_of_range": sum(1 for q in quality if on and q.get("in_range") is False)}


def quality_range(fingerprint: dict | None, organ: str = "pancreas") -> tuple[float, float] | None:
    """Range of the organ's HU in the training data, from the prepared dataset's fingerprint."""
    if not fingerprint:
        return None
    per = fingerprint.get("hu_percentiles_per_organ", {}).get(organ)
    if not per:
        return None
    lo = per.get("0.5", per.get("p0.5"))
    hi = per.get("99.5", per.get("p99.5"))
    return (float(lo), float(hi)) if lo is not None and hi is not None else None


def median_hu_ok(hu: np.ndarray, mask: np.ndarray, hu_range: tuple[float, float] | None) -> tuple[bool, float | None]:
    """Median HU inside the conditioned organ (labels 1, 2) and whether it lies in ``hu_range``."""
    inside = mask > 0
    if hu_range is None or not inside.any():
        return True, None
    med = float(np.median(hu[inside]))
    return hu_range[0] <= med <= hu_range[1], med


def _write_sample(folder: SampleFolder, j: int, hu: np.ndarray, mask: np.ndarray, affine: np.ndarray, fmt: str) -> dict[str, str]:
    from lad.utils.atomic import atomic_path

    paths = folder.sample_paths(j, fmt)
    if fmt == "npy":
        for key, arr in (("ct", np.clip(hu, -1000, 400).astype(np.int16)), ("mask", mask.astype(np.uint8))):
            with atomic_path(paths[key], suffix=".npy") as tmp:
                np.save(tmp, arr)
    else:
        from lad.data.io import write_nifti

        write_nifti(np.clip(np.rint(hu), -1000, 400).astype(np.int16), affine, paths["ct"])
        write_nifti(mask.astype(np.uint8), affine, paths["mask"])
    return {k: str(p.relative_to(folder.root)) for k, p in paths.items()}


def generate_samples(
    run: str | Path,
    masks: str | Path,
    out: str | Path,
    settings: SampleSettings,
    *,
    shard: str | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    overwrite: bool = False,
    augment_config: AugmentConfig | None = None,
    stop_after: int | None = None,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Generate ``settings.n`` samples into ``out`` (this process's shard only); returns a summary.

    ``run``: a run folder or an exported pipeline. ``stop_after`` (tests) stops after that many new samples, as a
    killed run would. ``progress_bar=False`` (``--no-progress``): no bar.
    """
    from lad.sampling.pipeline import LadPipeline
    from lad.schedulers import SAMPLERS, check_sampler
    from lad.utils import distributed as ddist

    if settings.augment not in ("paper", "none"):
        raise ValueError(f"--augment must be paper or none, got {settings.augment!r}")
    if settings.format not in ("nifti", "npy"):
        raise ValueError(f"--format must be nifti or npy, got {settings.format!r}")
    if settings.n < 1:
        raise ValueError(f"--n must be at least 1, got {settings.n}")
    for name, value, low in (("--batch-size", batch_size, 1), ("--max-retries", settings.max_retries, 0)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be a whole number >= {low}, got {value}")
    shard_ik = parse_shard(shard)
    # torchrun without --shard: one shard per rank, on GPU LOCAL_RANK; a Gloo group (CPU) only for barriers, with a
    # long timeout (ranks finish their shards at different times)
    torchrun = shard is None and ddist.env_world()[1] > 1
    dev = ddist.init_distributed(device, backend="gloo", timeout_min=24 * 60) if torchrun else ddist.local_device(device)
    if is_hagan_run(run):  # the HA-GAN baseline (lad train hagan): unconditional, no sampler
        pipe = _hagan_pipeline(run, settings, dev)
        settings = dataclasses.replace(settings, sampler="hagan")
    else:
        settings = resolve_settings(settings, run)  # unset sampler / steps / guidance: the run's sampling section
        if settings.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {settings.sampler!r}")
        if not math.isfinite(settings.guidance):
            raise ValueError(f"--guidance must be a finite number, got {settings.guidance}")
        if int(settings.steps) != settings.steps or settings.steps < 1:
            raise ValueError(f"--steps must be a whole number >= 1, got {settings.steps}")
        pipe = LadPipeline.from_pretrained(run, device=str(dev))
        check_sampler(pipe.scheduler.config["prediction_type"], settings.sampler)  # euler for rectified flow, else the others
        max_steps = int(pipe.scheduler.config["num_train_timesteps"])
        if settings.steps > max_steps:
            raise ValueError(f"--steps {settings.steps}: the model was trained with {max_steps} timesteps, so at most "
                             f"{max_steps} sampling steps can run")
    stats = pipe.latent_stats
    source = MaskSource(masks, shape=pipe.image_shape, spacing=stats.get("spacing"))
    folder = SampleFolder(out)
    saved = {**dataclasses.asdict(settings), "run": str(Path(run).resolve()), "masks": str(Path(masks).resolve()),
             "checkpoint_hash": pipe.checkpoint_hash, "masks_fingerprint": source.fingerprint()}
    if not torchrun or ddist.get_rank() == 0:  # the other ranks wait for rank 0's open below
        folder.check(saved, overwrite=overwrite)  # every refusal before the folder is created or changed
    lock = folder.lock(shard_ik)
    try:
        if torchrun and not ddist.get_rank() == 0:
            ddist.barrier()  # rank 0 creates (or, with --overwrite, clears) the folder first
        folder.open(saved, overwrite=overwrite)
        if torchrun and ddist.get_rank() == 0:
            ddist.barrier()
        return _generate(pipe, source, folder, settings, shard_ik, batch_size, augment_config, stop_after, torchrun, out,
                         progress_bar)
    finally:
        folder.unlock(lock)


def _hagan_pipeline(run, settings: SampleSettings, dev):
    from lad.sampling.hagan import HAGANPipeline

    given = [f"--{k}" for k in ("sampler", "steps", "guidance") if getattr(settings, k) is not None]
    if given:
        raise ValueError(f"{run}: an HA-GAN run (unconditional GAN) has no {', '.join(given)}; leave them out")
    return HAGANPipeline.from_run(run, device=str(dev))


def _generate(pipe, source: MaskSource, folder: SampleFolder, settings: SampleSettings, shard_ik: tuple[int, int],
              batch_size: int, augment_config: AugmentConfig | None, stop_after: int | None, torchrun: bool, out,
              progress_bar: bool = True) -> dict[str, Any]:
    from lad.utils import distributed as ddist

    stats = pipe.latent_stats
    aug_cfg = augment_config or AugmentConfig(elastic_reference_size=256)
    hu_range = quality_range(stats.get("fingerprint"), stats.get("organ", "pancreas"))
    todo = [j for j in shard_indices(settings.n, shard_ik) if not folder.is_done(j)]
    if stop_after is not None:
        todo = todo[:stop_after]
    t0, done, redrawn = time.perf_counter(), 0, 0
    bar = progress(total=len(todo), desc="sampling", unit="vol", disable=not progress_bar)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        items: list[MaskItem] = [source[j % len(source)] for j in batch]
        seeds = [derive_seed(settings.seed, j) for j in batch]
        conds, records = [], []
        for item, s in zip(items, seeds):
            if settings.augment == "paper":
                m, rec = augment_mask(item.mask, aug_cfg, seed=s)
            else:
                m, rec = item.mask, dict(NO_AUGMENTATION)
            conds.append(m)
            records.append(rec)
        mask_t = torch.as_tensor(np.stack(conds)[:, None])
        attempts = [0] * len(batch)
        pending = list(range(len(batch)))
        results: dict[int, tuple[np.ndarray, float | None, bool]] = {}
        while pending:
            sub_seeds = [derive_seed(seeds[k], attempts[k]) if attempts[k] else seeds[k] for k in pending]
            vols = pipe(mask_t[pending], seeds=sub_seeds, guidance=settings.guidance, sampler=settings.sampler, steps=settings.steps)
            hu = pipe.to_hu(vols)[:, 0]
            still = []
            for row, k in enumerate(pending):
                ok, med = median_hu_ok(hu[row], conds[k], hu_range)
                if ok or not settings.quality_check or attempts[k] >= settings.max_retries:
                    results[k] = (hu[row], med, ok)
                else:
                    attempts[k] += 1
                    redrawn += 1
                    still.append(k)
            pending = still
        for k, j in enumerate(batch):
            hu_k, med, ok = results[k]
            files = _write_sample(folder, j, hu_k, conds[k], items[k].affine, settings.format)
            folder.write_record(j, {
                "id": f"sample_{j:06d}", "index": j, "seed": seeds[k], "source_mask": items[k].source,
                "source_id": items[k].id, "augmentation": records[k], "sampler": settings.sampler,
                "steps": settings.steps, "guidance": settings.guidance, "checkpoint_hash": pipe.checkpoint_hash,
                "quality": {"check": settings.quality_check, "median_hu": med, "in_range": ok, "range": hu_range,
                            "redraws": attempts[k]},
                "files": files,
            })
            done += 1
        bar.update(len(batch))
    bar.close()
    if torchrun:  # every shard finished: rank 0 writes the manifest once, from all records
        ddist.barrier()
        total = folder.rebuild_manifest() if ddist.get_rank() == 0 else len(list(folder.records.glob("sample_*.json")))
    else:
        total = folder.rebuild_manifest()
    secs = time.perf_counter() - t0
    summary = {"written": done, "redrawn": redrawn, "finished_total": total, "requested": settings.n,
               "seconds": round(secs, 2), "seconds_per_volume": round(secs / max(done, 1), 3)}
    how = "HA-GAN" if settings.sampler == "hagan" else f"{settings.sampler.upper()}-{settings.steps}, w = {settings.guidance:g}"
    log.info("sampled %d volumes (%s; %d median-HU redraws) in %.1f s; %d/%d finished in %s", done, how, redrawn, secs,
             total, settings.n, out)
    return summary

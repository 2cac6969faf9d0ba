"""``lad ablate``: the paper's claim in one command (Table 2): train V0, V1, V2, V3 and full on one
prepared dataset with one budget, sample each, evaluate all together into one comparison table.

Resumable: each variant's run and samples are skipped when finished (the trainers and the sampler
resume by themselves), so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lad.utils.log import get_logger

__all__ = ["run_ablation"]

log = get_logger(__name__)


def run_ablation(data: str | Path, out: str | Path, *, preset: str = "demo", variants: Sequence[str] = ("V0", "V1", "V2", "V3", "full"),
                 overrides: list[str] | None = None, n_samples: int = 16, steps: int = 50, seed: int = 0, device: str = "cpu",
                 features: str = "random-resnet10", segmenter: str | Path | None = None, n_pairs: int = 100) -> dict:
    """Train, sample and evaluate every variant; returns the evaluation results (``out/report.html``)."""
    from lad.evaluation.evaluate import evaluate
    from lad.sampling.generate import SampleSettings, generate_samples
    from lad.training.config import resolve_train_config
    from lad.training.diffusion_trainer import train_diffusion
    from lad.training.vqgan_trainer import train_vqgan

    out = Path(out)
    synthetic = {}
    for v in variants:
        cfg = resolve_train_config(preset, overrides, variant=v, seed=seed)
        run = out / "runs" / v
        if not (run / "vqgan" / "model.safetensors").exists():
            train_vqgan(data, run, cfg, resume=True, device=device)
        if not (run / "denoiser_ema" / "model.safetensors").exists():
            train_diffusion(data, run, cfg, resume=True, device=device)
        samples = out / "samples" / v
        generate_samples(run, data, samples, SampleSettings(n=n_samples, steps=steps, seed=seed), device=device)
        synthetic[v] = samples
        log.info("ablation: %s done", v)
    return evaluate(data, synthetic, out / "evaluation", features=features, n_pairs=n_pairs, seed=seed, device=device,
                    segmenter=segmenter, overwrite=True)

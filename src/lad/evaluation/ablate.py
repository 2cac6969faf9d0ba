"""``lad ablate``: the paper's claim in one command (Table 2): train V0, V1, V2, V3 and full on one
prepared dataset with one budget, sample each, evaluate all together into one comparison table.

With ``priors_data`` the same variants are also trained on other prepared versions of the same
windows whose masks come from segmenters of different quality (``lad priors predict`` + ``lad prepare
--priors``): the paper's remark that mask presence matters more than mask precision becomes a measured
row per segmenter (each set is named ``<variant>@<name>``; its segmenter Dice, when the prepared
dataset's manifest or a ``segmenter_dice`` entry gives it, is reported beside it).

Resumable: each variant's run and samples are skipped when finished (the trainers and the sampler
resume by themselves), so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lad.utils.log import get_logger

__all__ = ["run_ablation"]

log = get_logger(__name__)


def _check_same_windows(data: Path, other: Path, name: str) -> None:
    """``other`` must hold the same windows as ``data`` (only the masks may differ)."""
    from lad.data.dataset import PreparedDataset

    a, b = PreparedDataset(data, split=None, organ_labels=False), PreparedDataset(other, split=None, organ_labels=False)
    if a.shape != b.shape:
        raise ValueError(f"{other}: priors dataset {name!r} has windows of shape {b.shape}, but {data} has {a.shape}; "
                         "prepare both with the same preset")
    if {w["patient"] for w in a.windows} != {w["patient"] for w in b.windows}:
        log.warning("priors dataset %r (%s) does not hold the same patients as %s: the rows compare different data", name, other, data)


def run_ablation(data: str | Path, out: str | Path, *, preset: str = "demo", variants: Sequence[str] = ("V0", "V1", "V2", "V3", "full"),
                 overrides: list[str] | None = None, n_samples: int = 16, steps: int | None = None, seed: int = 0, device: str = "cpu",
                 features: str = "random-resnet10", segmenter: str | Path | None = None, n_pairs: int = 100,
                 priors_data: dict[str, str | Path] | None = None) -> dict:
    """Train, sample and evaluate every variant; returns the evaluation results (``out/report.html``).

    ``priors_data``: ``{name: prepared folder}`` of the same windows with masks from other sources (e.g. priors
    of a weak and of a strong segmenter); every variant is also trained on each, sampled from its own masks,
    and evaluated against the real held-out windows of ``data``.
    """
    from lad.evaluation.evaluate import evaluate
    from lad.sampling.generate import SampleSettings, generate_samples
    from lad.training.config import resolve_train_config
    from lad.training.diffusion_trainer import train_diffusion
    from lad.training.vqgan_trainer import train_vqgan

    out = Path(out)
    sources: dict[str, Path] = {"": Path(data)}
    for name, folder in (priors_data or {}).items():
        if not name or "@" in name or "/" in name:
            raise ValueError(f"priors dataset name {name!r}: use a plain name such as 'weak' (no '@' or '/')")
        _check_same_windows(Path(data), Path(folder), name)
        sources[name] = Path(folder)
    synthetic = {}
    for v in variants:
        cfg = resolve_train_config(preset, overrides, variant=v, seed=seed)
        for name, source in sources.items():
            key = v if not name else f"{v}@{name}"
            run = out / "runs" / key
            if not (run / "vqgan" / "model.safetensors").exists():
                train_vqgan(source, run, cfg, resume=True, device=device)
            if not (run / "denoiser_ema" / "model.safetensors").exists():
                train_diffusion(source, run, cfg, resume=True, device=device)
            samples = out / "samples" / key
            generate_samples(run, source, samples, SampleSettings(n=n_samples, steps=steps, seed=seed), device=device)
            synthetic[key] = samples
            log.info("ablation: %s done", key)
    return evaluate(data, synthetic, out / "evaluation", features=features, n_pairs=n_pairs, seed=seed, device=device,
                    segmenter=segmenter, overwrite=True)

"""``lad ablate``: the paper's claim in one command (Table 2): train V0, V1, V2, V3 and full on one
prepared dataset with one budget, sample each, evaluate all together into one comparison table.

With ``priors_data`` the same variants are also trained on other prepared versions of the same
windows whose masks come from segmenters of different quality (``lad priors predict`` + ``lad prepare
--priors``): the paper's remark that mask presence matters more than mask precision becomes a measured
row per segmenter (each set is named ``<variant>@<name>``; its segmenter Dice, when the prepared
dataset's manifest or a ``segmenter_dice`` entry gives it, is reported beside it).

Evidence (the comparison is only as good as its spread):

- ``seeds=N``: each variant is trained N times (seeds ``seed .. seed+N-1``, same budget); the tables give
  the mean, the std and every seed's value, and a 95 % interval of the mean (Student t over seeds; with
  one seed the bootstrap interval over samples from ``lad evaluate``). A row is marked significantly
  different from the first variant only when the two intervals do not overlap.
- ``masks``: every model samples from the original training masks (``augment="none"``) and from
  augmented masks (``"paper"``): the two columns of the paper's Table 2.
- ``guidance``: one trained model per variant and seed, the classifier-free guidance scale swept at
  sampling time (Table 3).

Outputs beside ``OUT/evaluation/``: ``OUT/ablation.csv`` (long format: one line per variant, guidance,
masks and metric), ``OUT/ablation.md`` and ``OUT/ablation.png`` (Table 2 style: FID / localized FID per
variant, both mask columns, at w = 1 when swept, else the first value) and, for a sweep, ``OUT/guidance.md`` and
``OUT/guidance.png`` (metric against w per variant, Table 3 style).

Resumable: each variant's run and samples are skipped when finished (the trainers and the sampler
resume by themselves), so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lad.utils.atomic import atomic_path, write_text
from lad.utils.log import get_logger

__all__ = ["run_ablation", "summarise", "MASK_SOURCES", "TABLE_METRICS"]

MASK_SOURCES = {"augmented": "paper", "original": "none"}  # column -> SampleSettings.augment
TABLE_METRICS = ("fid", "fid_localized", "mmd", "mmd_localized")
_LABELS = {"fid": "FID", "fid_localized": "FID loc.", "mmd": "MMD", "mmd_localized": "MMD loc."}

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
                 priors_data: dict[str, str | Path] | None = None, seeds: int = 1, guidance: Sequence[float] = (1.0,),
                 masks: Sequence[str] = ("augmented", "original"), n_boot: int = 200, progress_bar: bool = True) -> dict:
    """Train, sample and evaluate every variant; returns the evaluation results (``out/report.html``) with
    ``results["ablation"]`` = the summary rows (``summarise``) also written as CSV / Markdown / PNG.

    ``priors_data``: ``{name: prepared folder}`` of the same windows with masks from other sources (e.g. priors
    of a weak and of a strong segmenter); every variant is also trained on each, sampled from its own masks,
    and evaluated against the real held-out windows of ``data``.
    ``seeds``: trainings per variant (seeds ``seed .. seed + seeds - 1``); ``guidance``: the w values sampled
    from each trained model; ``masks``: ``augmented`` and/or ``original`` (sample columns).
    Set names: ``<variant>[@<priors>][ s<seed>][ w=<w>][ (original masks)]`` (the parts only when they vary).
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
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    unknown = [m for m in masks if m not in MASK_SOURCES]
    if unknown or not masks:
        raise ValueError(f"--masks: expected a subset of {list(MASK_SOURCES)}, got {list(masks)}")
    guidance = [float(w) for w in guidance]
    if not guidance or any(w < 0 for w in guidance):
        raise ValueError(f"--guidance: expected non-negative scales, got {guidance}")
    synthetic, index = {}, {}
    for v in variants:
        for name, source in sources.items():
            key = v if not name else f"{v}@{name}"
            for s in range(seed, seed + seeds):
                cfg = resolve_train_config(preset, overrides, variant=v, seed=s)
                run = out / "runs" / (key if seeds == 1 else f"{key}/seed{s}")
                if not (run / "vqgan" / "model.safetensors").exists():
                    train_vqgan(source, run, cfg, resume=True, device=device, progress_bar=progress_bar)
                if not (run / "denoiser_ema" / "model.safetensors").exists():
                    train_diffusion(source, run, cfg, resume=True, device=device, progress_bar=progress_bar)
                for w in guidance:
                    for m in masks:
                        set_name = (key + (f" s{s}" if seeds > 1 else "") + (f" w={w:g}" if len(guidance) > 1 else "")
                                    + (" (original masks)" if m == "original" else ""))
                        folder = set_name.replace(" ", "_").replace("(", "").replace(")", "")
                        settings = SampleSettings(n=n_samples, steps=steps, seed=s, guidance=w, augment=MASK_SOURCES[m])
                        generate_samples(run, source, out / "samples" / folder, settings, device=device, progress_bar=progress_bar)
                        synthetic[set_name] = out / "samples" / folder
                        index[set_name] = {"variant": key, "seed": s, "guidance": w, "masks": m}
            log.info("ablation: %s done", key)
    res = evaluate(data, synthetic, out / "evaluation", features=features, n_pairs=n_pairs, seed=seed, device=device,
                   segmenter=segmenter, overwrite=True, n_boot=n_boot, progress_bar=progress_bar)
    rows = summarise(res, index)
    res["ablation"] = rows
    _write_tables(out, rows, guidance, masks)
    return res


def _t975(df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def summarise(results: dict[str, Any], index: dict[str, dict[str, Any]], metrics: Sequence[str] = TABLE_METRICS) -> list[dict]:
    """One row per (variant, guidance, masks, metric): mean, std (ddof 1), per-seed values, 95 % interval,
    and ``significant``: the interval does not overlap the first variant's (same guidance, masks, metric).

    The interval is the Student-t interval of the mean over seeds when there are two or more seeds, else
    the set's bootstrap interval over samples (``<metric>_ci95`` from ``lad evaluate``).
    """
    groups: dict[tuple, list[tuple[int, dict]]] = {}
    for set_name, meta in index.items():
        groups.setdefault((meta["variant"], meta["guidance"], meta["masks"]), []).append((meta["seed"], results["sets"][set_name]))
    rows = []
    for (variant, w, m), members in groups.items():
        members.sort(key=lambda t: t[0])
        for metric in metrics:
            vals = np.array([e[metric] for _, e in members], np.float64)
            mean = float(vals.mean())
            std = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
            if len(vals) > 1:
                half = _t975(len(vals) - 1) * std / np.sqrt(len(vals))
                ci, basis = [mean - half, mean + half], f"t interval over {len(vals)} seeds"
            else:
                ci, basis = list(members[0][1].get(f"{metric}_ci95") or [float("nan")] * 2), "bootstrap over samples"
            rows.append({"variant": variant, "guidance": w, "masks": m, "metric": metric, "mean": mean, "std": std,
                         "ci95": [float(c) for c in ci], "interval": basis, "seeds": [s for s, _ in members],
                         "per_seed": vals.tolist(), "n_samples": members[0][1]["n"]})
    first = rows[0]["variant"] if rows else None
    base = {(r["guidance"], r["masks"], r["metric"]): r for r in rows if r["variant"] == first}
    for r in rows:
        b = base.get((r["guidance"], r["masks"], r["metric"]))
        if r["variant"] == first or b is None or not np.isfinite(r["ci95"] + b["ci95"]).all():
            r["significant"] = None
        else:
            r["significant"] = bool(r["ci95"][0] > b["ci95"][1] or r["ci95"][1] < b["ci95"][0])
    return rows


def _cell(r: dict) -> str:
    txt = f"{r['mean']:.4g}"
    if np.isfinite(r["std"]):
        txt += f" ± {r['std']:.2g}"
    if np.isfinite(r["ci95"]).all():
        txt += f" [{r['ci95'][0]:.4g}, {r['ci95'][1]:.4g}]"
    if len(r["per_seed"]) > 1:
        txt += " (" + ", ".join(f"{v:.4g}" for v in r["per_seed"]) + ")"
    return txt + (" *" if r["significant"] else "")


def _markdown(rows: list[dict], w: float | None, masks: Sequence[str], by_guidance: bool) -> str:
    sel = [r for r in rows if w is None or r["guidance"] == w]
    cols = [(metric, m) for metric in TABLE_METRICS for m in masks]
    head = (["variant"] + (["w"] if by_guidance else [])
            + [f"{_LABELS[metric]} ({m} masks)" for metric, m in cols])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["variant"], r["guidance"]) for r in sel))
    look = {(r["variant"], r["guidance"], r["masks"], r["metric"]): r for r in sel}
    for variant, g in keys:
        cells = [variant] + ([f"{g:g}"] if by_guidance else [])
        cells += [_cell(look[(variant, g, m, metric)]) if (variant, g, m, metric) in look else "" for metric, m in cols]
        lines.append("| " + " | ".join(cells) + " |")
    r0 = sel[0] if sel else None
    note = (f"\nmean ± std over seeds [95 % interval: {r0['interval']}] (per-seed values); * = interval does not overlap "
            f"the first variant's ({keys[0][0]}); N = {r0['n_samples']} samples per set.\n") if r0 else ""
    return "\n".join(lines) + "\n" + note


def _plot(path: Path, rows: list[dict], masks: Sequence[str], guidance: Sequence[float], sweep: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric in zip(axes, ("fid", "fid_localized")):
        for j, m in enumerate(masks):
            for i, v in enumerate(variants):
                sel = sorted((r for r in rows if r["variant"] == v and r["masks"] == m and r["metric"] == metric),
                             key=lambda r: r["guidance"])
                if not sel:
                    continue
                if sweep:
                    x = [r["guidance"] for r in sel]
                    ax.errorbar(x, [r["mean"] for r in sel], yerr=_yerr(sel), marker="o", capsize=3,
                                ls="-" if j == 0 else "--", label=f"{v} ({m})")
                else:
                    r = sel[0]
                    ax.errorbar([i + 0.15 * (j - (len(masks) - 1) / 2)], [r["mean"]], yerr=_yerr([r]), marker="os"[j % 2],
                                capsize=3, color=f"C{j}", label=f"{m} masks" if i == 0 else None)
                    ax.scatter([i + 0.15 * (j - (len(masks) - 1) / 2)] * len(r["per_seed"]), r["per_seed"], s=8,
                               color=f"C{j}", alpha=0.5)
        if sweep:
            ax.set_xlabel("guidance scale w")
        else:
            ax.set_xticks(range(len(variants)), variants)
        ax.set_title(f"{_LABELS[metric]}: mean and 95 % interval", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def _yerr(sel: list[dict]) -> np.ndarray:
    lo = [max(0.0, r["mean"] - r["ci95"][0]) if np.isfinite(r["ci95"][0]) else 0.0 for r in sel]
    hi = [max(0.0, r["ci95"][1] - r["mean"]) if np.isfinite(r["ci95"][1]) else 0.0 for r in sel]
    return np.array([lo, hi])


def _write_tables(out: Path, rows: list[dict], guidance: Sequence[float], masks: Sequence[str]) -> None:
    buf = io.StringIO()
    fields = ["variant", "guidance", "masks", "metric", "mean", "std", "ci95_low", "ci95_high", "interval", "significant",
              "n_seeds", "seeds", "per_seed", "n_samples"]
    wr = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    wr.writeheader()
    for r in rows:
        wr.writerow({**{k: r[k] for k in ("variant", "guidance", "masks", "metric", "mean", "std", "interval", "significant",
                                          "n_samples")},
                     "ci95_low": r["ci95"][0], "ci95_high": r["ci95"][1], "n_seeds": len(r["seeds"]),
                     "seeds": ";".join(map(str, r["seeds"])), "per_seed": ";".join(f"{v:.6g}" for v in r["per_seed"])})
    write_text(out / "ablation.csv", buf.getvalue())
    w0 = 1.0 if 1.0 in guidance else guidance[0]  # the paper's Table 2 samples at w = 1
    write_text(out / "ablation.md", f"Table 2 style, guidance w = {w0:g}\n\n" + _markdown(rows, w0, masks, False))
    _plot(out / "ablation.png", [r for r in rows if r["guidance"] == w0], masks, guidance, sweep=False)
    if len(guidance) > 1:
        write_text(out / "guidance.md", "Table 3 style: guidance sweep\n\n" + _markdown(rows, None, masks, True))
        _plot(out / "guidance.png", rows, masks, guidance, sweep=True)

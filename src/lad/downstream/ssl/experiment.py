"""``run_ssl`` (``lad downstream ssl``): does (synthetic) data help SSL-ALPNet? Several seeds, Dice per organ.

OUT layout::

    config.yaml            the resolved preset (after --set)
    settings.json          data, synthetic folder, --train, --synthetic-fraction, --setting, --runs, preset, backbone
    run_000/               one seed: checkpoints/, tb/, train_log.jsonl, model/, dice.json (written last)
        <organ>/           setting 2 only: one model per test organ (its slices excluded from training)
    results.json           Dice per organ per run, mean and std per organ, mean over organs, preset, backbone
    dice.png               Figure-6-style bar chart (mean +- std over runs)
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from lad.config import apply_overrides, load_preset, save_config, to_dict
from lad.downstream.ssl.data import (TEST_ORGANS, Scan, SlicePool, build_slice_pool, iter_prepared_scans, organ_binary, prepared_scans,
                                    synthetic_scans)
from lad.downstream.ssl.train import DataConfig, EvalConfig, ModelConfig, TrainConfig
from lad.utils.atomic import atomic_path, write_json
from lad.utils.log import get_logger
from lad.utils.seed import derive_seed

__all__ = ["SSLExperimentConfig", "load_ssl_config", "run_ssl", "plot_dice", "plot_comparison"]

log = get_logger(__name__)

RANDOM_INIT = "random init (no pretrained weights)"


@dataclasses.dataclass
class SSLExperimentConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    seed: int = 0


def load_ssl_config(preset: str = "demo", overrides: list[str] | None = None) -> SSLExperimentConfig:
    """Preset ``paper`` / ``demo`` / ``tiny`` (``src/lad/configs/downstream-ssl-*.yaml``) or a YAML path, plus ``--set``."""
    cfg = apply_overrides(load_preset(SSLExperimentConfig, "downstream-ssl", preset), overrides)
    bad = [o for o in cfg.eval.organs if o not in TEST_ORGANS]
    if bad or not cfg.eval.organs:
        raise ValueError(f"eval.organs must be a non-empty subset of {list(TEST_ORGANS)}, got {list(cfg.eval.organs)}")
    return cfg


def _check_args(train: str, synthetic, synthetic_fraction: float, setting: int, runs: int) -> None:
    if train not in ("real", "synthetic", "real+synthetic"):
        raise ValueError(f"--train must be real, synthetic or real+synthetic, got {train!r}")
    if train != "real" and synthetic is None:
        raise ValueError(f"--train {train} needs --synthetic SAMPLES_DIR (a `lad sample` output folder)")
    if train == "real+synthetic" and not 0.0 < synthetic_fraction < 1.0:
        raise ValueError(f"--synthetic-fraction must be in (0, 1) for real+synthetic, got {synthetic_fraction}")
    if setting not in (1, 2):
        raise ValueError(f"--setting must be 1 or 2, got {setting}")
    if setting == 2 and train != "real":
        raise ValueError("--setting 2 excludes training slices that contain the test organ, which needs organ labels for "
                         "every training slice; synthetic volumes only carry their conditioning mask (organ of interest and "
                         "tumour), so setting 2 is available with --train real only")
    if runs < 1:
        raise ValueError(f"--runs must be >= 1, got {runs}")


def _split_support(scans: list[Scan], organ: str, notes: list[str]) -> tuple[Scan, list[Scan]]:
    """Support = the first test scan (by id) containing ``organ``; queries = the other scans containing it."""
    having = [s for s in scans if organ_binary(s.organs, organ).any()]
    if not having:
        raise ValueError(f"no test scan has {organ} voxels: the prepared data carry no {organ} labels in the test split; "
                         f"evaluate the other organs with --set eval.organs=[...] or prepare data with {organ} labels")
    if len(having) == 1:
        notes.append(f"{organ}: a single labeled test scan ({having[0].id}) serves as support and query "
                     "(optimistic: the query contains the support slices)")
        log.warning("%s: only test scan %s has %s; it is used as both support and query", organ, having[0].id, organ)
        return having[0], having
    return having[0], having[1:]


def _exclude_organ(pool: SlicePool, labels: np.ndarray | None, organ: str) -> SlicePool:
    if labels is None:
        raise ValueError("--setting 2 needs organ labels for the training split (the prepared dataset has none)")
    has = organ_binary(labels, organ).reshape(len(labels), -1).any(axis=1)
    log.info("setting 2 (%s): %d of %d training slices excluded", organ, int(has.sum()), len(has))
    return pool.subset(~has)


def plot_dice(results: dict, path: Path) -> None:
    """Figure-6-style bar chart: Dice per organ and their mean, bars = mean over runs, error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    organs = list(results["dice_mean"])
    names = organs + ["mean"]
    means = [results["dice_mean"][o] for o in organs] + [results["mean_over_organs"]["mean"]]
    stds = [results["dice_std"][o] for o in organs] + [results["mean_over_organs"]["std"]]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    bars = ax.bar(names, means, yerr=stds, capsize=4, color=[colors[i % len(colors)] for i in range(len(names))])
    for b, m, sd in zip(bars, means, stds):
        ax.text(b.get_x() + b.get_width() / 2, m + sd + 0.02, f"{m:.3f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Dice (1-shot)")
    n = len(results["runs"])
    ax.set_title(f"SSL-ALPNet, train={results['train']}, setting {results['setting']}\n"
                 f"preset {results['preset']}, {n} run(s), backbone: {results['backbone']}", fontsize=9)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_comparison(outs: list[str | Path], path: str | Path, labels: list[str] | None = None) -> dict:
    """Figure 6 proper: several ``lad downstream ssl`` outputs (e.g. real / synthetic / real+synthetic) as grouped
    bars per organ and their mean (error bars = std over runs). Refuses results from different presets, settings
    or organ sets, which are not comparable. Returns ``{label: results}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {}
    for i, o in enumerate(outs):
        f = Path(o) / "results.json"
        if not f.exists():
            raise FileNotFoundError(f"{f}: no results (run `lad downstream ssl` into {o} first)")
        r = json.loads(f.read_text())
        res[labels[i] if labels else f"{r['train']} ({Path(o).name})"] = r
    first = next(iter(res.values()))
    for k in ("preset", "setting", "organs", "backbone_pretrained"):
        bad = [n for n, r in res.items() if r[k] != first[k]]
        if bad:
            raise ValueError(f"results differ in {k} ({bad} vs {first[k]!r}): not comparable in one chart")
    names = list(first["organs"]) + ["mean"]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 1, 3.8))
    width = 0.8 / len(res)
    for j, (label, r) in enumerate(res.items()):
        m = [r["dice_mean"][o] for o in first["organs"]] + [r["mean_over_organs"]["mean"]]
        sd = [r["dice_std"][o] for o in first["organs"]] + [r["mean_over_organs"]["std"]]
        ax.bar(np.arange(len(names)) + (j - (len(res) - 1) / 2) * width, m, width, yerr=sd, capsize=3, label=label)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Dice (1-shot)")
    ax.set_title(f"SSL-ALPNet, setting {first['setting']}, preset {first['preset']}", fontsize=9)
    ax.legend(fontsize=8)
    with atomic_path(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return res


def run_ssl(data: str | Path, out: str | Path, cfg: SSLExperimentConfig, *, train: str = "real",
            synthetic: str | Path | None = None, synthetic_fraction: float = 0.2, setting: int = 1, runs: int = 5,
            preset: str = "custom", backbone_weights: str | Path | None = None, resume: bool = False,
            overwrite: bool = False, device: str = "cpu") -> dict:
    """Train SSL-ALPNet ``runs`` times (seeds ``cfg.seed + r``) on ``train`` data and evaluate 1-shot Dice on the
    labeled test split of ``data``; writes ``OUT/results.json`` and ``OUT/dice.png`` and returns the results."""
    import torch

    from lad.downstream.ssl.alpnet import ALPNet
    from lad.downstream.ssl.protocol import alpnet_predictor, evaluate_organ
    from lad.downstream.ssl.train import train_alpnet
    from lad.training.common import resolve_device
    from lad.utils.atomic import prepare_output_dir

    t0 = time.perf_counter()
    _check_args(train, synthetic, synthetic_fraction, setting, runs)
    if resume and overwrite:
        raise ValueError("pass either --resume or --overwrite, not both")
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: prepared dataset folder does not exist")
    if synthetic is not None and not Path(synthetic).is_dir():
        raise FileNotFoundError(f"{synthetic}: synthetic sample folder does not exist")
    if backbone_weights is not None and not Path(backbone_weights).is_file():
        raise FileNotFoundError(f"{backbone_weights}: backbone weights file does not exist")
    dev = resolve_device(device)
    organs = list(cfg.eval.organs)
    backbone = f"pretrained: {Path(backbone_weights).resolve()}" if backbone_weights else RANDOM_INIT
    settings = {"data": str(data.resolve()), "synthetic": str(Path(synthetic).resolve()) if synthetic else None, "train": train,
                "synthetic_fraction": synthetic_fraction if train == "real+synthetic" else (1.0 if train == "synthetic" else 0.0),
                "setting": setting, "runs": runs, "preset": preset, "backbone": backbone, "organs": organs}

    # read and check every input before creating anything
    notes: list[str] = []
    test = prepared_scans(data, "test")
    if not test:
        raise ValueError(f"{data}: the test split has no windows; the 1-shot evaluation needs labeled test scans "
                         "(prepare with a train/test split, e.g. split: 0.8)")
    supports = {o: _split_support(test, o, notes) for o in organs}
    pools: dict[str, SlicePool] = {}
    real_labels = None
    sp = dict(size=cfg.data.image_size, min_size=cfg.data.superpixel_min_size, sigma=cfg.data.superpixel_sigma,
              scale=cfg.data.superpixel_scale, threshold_hu=cfg.data.body_threshold_hu, min_body_fraction=cfg.data.min_body_fraction)
    if train in ("real", "real+synthetic"):
        pools["real"], real_labels = build_slice_pool(iter_prepared_scans(data, "train"), "real", **sp)
        if len(pools["real"].counts) == 0:
            raise ValueError(f"{data}: the train split has no windows (or no slice with a body above {cfg.data.body_threshold_hu} HU)")
    if train in ("synthetic", "real+synthetic"):
        pools["synthetic"], _ = build_slice_pool(synthetic_scans(synthetic), "synthetic", **sp)
    out = prepare_output_dir(out, overwrite=overwrite, resume=resume)
    sfile = out / "settings.json"
    if resume and sfile.exists():
        import yaml

        old = json.loads(sfile.read_text())
        diff = sorted(k for k in settings if k != "runs" and old.get(k) != settings[k])
        cfile = out / "config.yaml"
        if cfile.exists() and yaml.safe_load(cfile.read_text()) != yaml.safe_load(yaml.safe_dump(to_dict(cfg))):
            diff.append("config (--preset / --set)")
        if diff:
            raise ValueError(f"{out}: --resume with different settings ({', '.join(diff)}) than the run was started with; "
                             "resume with the same options or start a new OUT folder")
    save_config(cfg, out / "config.yaml")
    write_json(sfile, settings)
    log.info("SSL-ALPNet: train=%s setting=%d runs=%d preset=%s backbone: %s", train, setting, runs, preset, backbone)
    fraction = settings["synthetic_fraction"]

    run_results = []
    for r in range(runs):
        seed = cfg.seed + r
        rdir = out / f"run_{r:03d}"
        done = rdir / "dice.json"
        if done.exists():
            run_results.append(json.loads(done.read_text()))
            log.info("run %d already finished (%s)", r, done)
            continue
        groups = [(None, organs)] if setting == 1 else [(o, [o]) for o in organs]
        dice, detail = {}, {}
        for excluded, group in groups:
            mdir = rdir if excluded is None else rdir / excluded
            run_pools = pools if excluded is None else {"real": _exclude_organ(pools["real"], real_labels, excluded)}
            if (mdir / "model" / "model.safetensors").exists():
                model = ALPNet.from_pretrained(mdir / "model", device=str(dev)).to(dev)
            else:
                torch.manual_seed(derive_seed(seed, "ssl-global"))
                model = train_alpnet(run_pools, mdir, model_cfg=cfg.model, train_cfg=cfg.train, data_cfg=cfg.data, seed=seed,
                                     synthetic_fraction=fraction, device=dev, backbone_weights=backbone_weights,
                                     resume=resume)
            predictor = alpnet_predictor(model, dev, cfg.eval.batch_size)
            for o in group:
                support, queries = supports[o]
                res = evaluate_organ(predictor, support, queries, o, size=cfg.data.image_size, n_part=cfg.eval.n_part)
                dice[o], detail[o] = res["dice"], res
        rec = {"run": r, "seed": seed, "dice": dice, "mean": float(np.mean([dice[o] for o in organs])), "detail": detail}
        write_json(done, rec)
        log.info("run %d: %s", r, ", ".join(f"{o} {dice[o]:.3f}" for o in organs))
        run_results.append(rec)

    table = np.array([[rr["dice"][o] for o in organs] for rr in run_results])
    ddof = 1 if len(run_results) > 1 else 0
    means = table.mean(axis=1)
    results = {
        "method": "SSL-ALPNet (Ouyang et al. 2022), 1-shot",
        "preset": preset, "backbone": backbone, "backbone_pretrained": backbone_weights is not None,
        "train": train, "synthetic_fraction": fraction, "setting": setting,
        "iterations": cfg.train.iterations, "image_size": cfg.data.image_size, "architecture": cfg.model.backbone,
        "organs": organs,
        "runs": [{"run": rr["run"], "seed": rr["seed"], "dice": rr["dice"], "mean": rr["mean"]} for rr in run_results],
        "dice_mean": {o: float(table[:, i].mean()) for i, o in enumerate(organs)},
        "dice_std": {o: float(table[:, i].std(ddof=ddof)) for i, o in enumerate(organs)},
        "mean_over_organs": {"mean": float(means.mean()), "std": float(means.std(ddof=ddof))},
        "std": "sample standard deviation over runs (ddof=1); 0 for a single run",
        "evaluation": {"support": {o: {"scan": supports[o][0].id, "queries": [q.id for q in supports[o][1]]} for o in organs},
                       "n_part": cfg.eval.n_part, "pooling_window_test": cfg.model.test_window},
        "notes": notes, "data": settings["data"], "synthetic": settings["synthetic"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "results.json", results)
    plot_dice(results, out / "dice.png")
    log.info("SSL-ALPNet (%s, backbone: %s): mean Dice over organs %.3f +- %.3f; results in %s", preset, backbone,
             results["mean_over_organs"]["mean"], results["mean_over_organs"]["std"], out / "results.json")
    return results

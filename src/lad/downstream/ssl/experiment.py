"""``run_ssl`` (``lad downstream ssl``): does (synthetic) data help SSL-ALPNet? Several seeds, Dice per organ.

OUT layout::

    config.yaml            the resolved preset (after --set)
    settings.json          data, synthetic folder, --train, the synthetic set composition (volumes, ratio, mode,
                           episode fraction and the resulting synthetic share of episodes), test scans, --setting,
                           --runs, preset, backbone
    run_000/               one seed: checkpoints/, tb/, train_log.jsonl, model/, dice.json (written last)
        <organ>/           setting 2 only: one model per test organ (its slices excluded from training)
    results.json           Dice per organ per run, mean and std per organ, mean over organs, preset, backbone
    dice.png               Figure-6-style bar chart (mean +- std over runs)

A sweep over synthetic set sizes (``--synthetic-volumes 0,8,16``) puts each size's ``run_XXX``, ``results.json``
and ``dice.png`` in ``synthetic_NNNNN/`` and writes ``results.json`` (``sweep``: Dice per size), ``sweep.csv``,
``sweep.md`` and ``sweep.png`` at the top.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from lad.config import resolve_config, save_config, to_dict
from lad.downstream.ssl.data import (TEST_ORGANS, Scan, SlicePool, build_slice_pool, iter_prepared_scans, organ_binary,
                                    prepared_scans)
from lad.downstream.ssl.train import DataConfig, EvalConfig, ModelConfig, SSLTrainConfig
from lad.utils.atomic import atomic_path, write_json
from lad.utils.log import get_logger
from lad.utils.seed import derive_seed

__all__ = ["SSLExperimentConfig", "load_ssl_config", "run_ssl", "plot_dice", "plot_comparison"]

log = get_logger(__name__)

RANDOM_INIT = "random init (no pretrained weights)"


@dataclasses.dataclass
class SSLExperimentConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: SSLTrainConfig = dataclasses.field(default_factory=SSLTrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    seed: int = 0


def load_ssl_config(preset: str = "demo", overrides: list[str] | None = None) -> SSLExperimentConfig:
    """Preset ``paper`` / ``demo`` / ``tiny`` (``src/lad/configs/downstream-ssl-*.yaml``) or a YAML path, plus ``--set``."""
    cfg = resolve_config(SSLExperimentConfig, "downstream-ssl", preset, overrides=overrides)
    bad = [o for o in cfg.eval.organs if o not in TEST_ORGANS]
    if bad or not cfg.eval.organs:
        raise ValueError(f"eval.organs must be a non-empty subset of {list(TEST_ORGANS)}, got {list(cfg.eval.organs)}")
    return cfg


TEST_SCANS = ("original", "windows")


def _check_args(train: str, synthetic, volumes: list[int] | None, ratio: float | None, episode_fraction: float | None,
                setting: int, runs: int, test_scans: str) -> None:
    if train not in ("real", "synthetic", "real+synthetic"):
        raise ValueError(f"--train must be real, synthetic or real+synthetic, got {train!r}")
    if train != "real" and synthetic is None:
        raise ValueError(f"--train {train} needs --synthetic SAMPLES_DIR (a `lad sample` output folder)")
    if train == "real" and (volumes or ratio is not None or episode_fraction is not None):
        raise ValueError("--synthetic-volumes / --synthetic-ratio / --synthetic-episode-fraction need --train "
                         "real+synthetic (or --train synthetic for --synthetic-volumes)")
    if volumes is not None and ratio is not None:
        raise ValueError("give the synthetic set size either as --synthetic-volumes N or as --synthetic-ratio R, not both")
    if ratio is not None and (train != "real+synthetic" or ratio <= 0):
        raise ValueError(f"--synthetic-ratio is the synthetic set size over the real one (> 0, for --train real+synthetic), "
                         f"got {ratio} with --train {train}")
    if episode_fraction is not None and (train != "real+synthetic" or not 0.0 < episode_fraction < 1.0):
        raise ValueError(f"--synthetic-episode-fraction must be in (0, 1) with --train real+synthetic, got {episode_fraction} "
                         f"with --train {train}")
    if train == "synthetic" and volumes is not None and 0 in volumes:
        raise ValueError("--train synthetic with --synthetic-volumes 0 has nothing to train on")
    if setting not in (1, 2):
        raise ValueError(f"--setting must be 1 or 2, got {setting}")
    if setting == 2 and train != "real":
        raise ValueError("--setting 2 excludes training slices that contain the test organ, which needs organ labels for "
                         "every training slice; synthetic volumes only carry their conditioning mask (organ of interest and "
                         "tumour), so setting 2 is available with --train real only")
    if runs < 1:
        raise ValueError(f"--runs must be >= 1, got {runs}")
    if test_scans not in TEST_SCANS:
        raise ValueError(f"--test-scans must be one of {list(TEST_SCANS)}, got {test_scans!r}")


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
    syn = f" ({results['synthetic_volumes']} synthetic volumes)" if results.get("synthetic_volumes") else ""
    ax.set_title(f"SSL-ALPNet, train={results['train']}{syn}, setting {results['setting']}\n"
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
        if "sweep" in r:
            raise ValueError(f"{o} holds a synthetic set-size sweep; compare its synthetic_NNNNN/ folders instead")
        res[labels[i] if labels else f"{r['train']} ({Path(o).name})"] = r
    first = next(iter(res.values()))
    for k in ("preset", "setting", "organs", "backbone_pretrained", "test_scans"):
        bad = [n for n, r in res.items() if r.get(k) != first.get(k)]
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


def _synthetic_sizes(train: str, volumes: list[int] | None, ratio: float | None, episode_fraction: float | None,
                     n_real_windows: int, available: int) -> tuple[list[int], float | None]:
    """The synthetic set sizes to train with and the ratio they came from (None when given as counts or "all")."""
    if train == "real":
        return [0], None
    if volumes is not None:
        sizes = volumes
    elif train == "real+synthetic" and (ratio is not None or episode_fraction is None):
        # paper section 4.3.2: synthetic volumes "approximately 20 % the size of the training set"
        ratio = 0.2 if ratio is None else ratio
        sizes = [max(1, int(round(ratio * n_real_windows)))]
    else:
        sizes = [available]
    if sizes[-1] > available:
        raise ValueError(f"{sizes[-1]} synthetic volumes asked"
                         + (f" ({ratio} x {n_real_windows} real training windows)" if ratio is not None and volumes is None else "")
                         + f", but the synthetic folder holds {available}; sample more or ask for fewer (--synthetic-volumes)")
    return sizes, (ratio if volumes is None else None)


def _episode_share(pools: dict[str, SlicePool], episode_fraction: float | None) -> float:
    """Probability that an episode comes from a synthetic slice: ``episode_fraction`` when given, else the synthetic
    share of the training slices (every slice of the composed set equally likely)."""
    if "synthetic" not in pools or len(pools["synthetic"].indices("synthetic")) == 0:
        return 0.0
    if "real" not in pools:
        return 1.0
    if episode_fraction is not None:
        return float(episode_fraction)
    n_syn, n_real = len(pools["synthetic"].indices("synthetic")), len(pools["real"].indices("real"))
    return n_syn / (n_syn + n_real)


def run_ssl(data: str | Path, out: str | Path, cfg: SSLExperimentConfig, *, train: str = "real",
            synthetic: str | Path | None = None, synthetic_volumes: int | str | list[int] | None = None,
            synthetic_ratio: float | None = None, synthetic_episode_fraction: float | None = None,
            test_scans: str = "original", setting: int = 1, runs: int = 5, preset: str = "custom",
            backbone_weights: str | Path | None = None, resume: bool = False, overwrite: bool = False,
            device: str = "cpu", progress_bar: bool = True) -> dict:
    """Train SSL-ALPNet ``runs`` times (seeds ``cfg.seed + r``) on ``train`` data and evaluate 1-shot Dice on the
    labeled test scans of ``data``; writes ``OUT/results.json`` and ``OUT/dice.png`` and returns the results.

    The synthetic share is a set composition (paper section 4.3.2): the training set is the real training
    windows plus N synthetic volumes (``synthetic_volumes``, or ``synthetic_ratio`` x the number of real
    training windows, default 0.2) and every slice of it is equally likely in an episode.
    ``synthetic_episode_fraction`` instead draws each episode from the synthetic volumes with that
    probability. A list of sizes (``"0,8,16"``) trains each (``OUT/synthetic_NNNNN/``) and writes the sweep
    (``sweep.csv``, ``sweep.md``, ``sweep.png``; ``results.json`` ``sweep``). ``test_scans``: ``original`` (the
    whole original CT of every test patient, read through the prepare manifest; a missing file is an error
    naming it) or ``windows`` (the test patients' prepared windows put back together)."""
    from lad.data.dataset import PreparedDataset
    from lad.downstream.ssl.data import iter_synthetic_scans, original_scans, synthetic_records
    from lad.downstream.sweep import parse_volumes
    from lad.utils.atomic import prepare_output_dir

    t0 = time.perf_counter()
    volumes = parse_volumes(synthetic_volumes)
    _check_args(train, synthetic, volumes, synthetic_ratio, synthetic_episode_fraction, setting, runs, test_scans)
    if resume and overwrite:
        raise ValueError("pass either --resume or --overwrite, not both")
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: prepared dataset folder does not exist")
    if synthetic is not None and not Path(synthetic).is_dir():
        raise FileNotFoundError(f"{synthetic}: synthetic sample folder does not exist")
    if backbone_weights is not None and not Path(backbone_weights).is_file():
        raise FileNotFoundError(f"{backbone_weights}: backbone weights file does not exist")
    organs = list(cfg.eval.organs)
    backbone = f"pretrained: {Path(backbone_weights).resolve()}" if backbone_weights else RANDOM_INIT

    # read and check every input before creating anything
    notes: list[str] = []
    if test_scans == "original":
        test = list(original_scans(data, "test", organs))
    else:
        test = prepared_scans(data, "test")
        notes.append("test scans: the test patients' prepared windows put back together (--test-scans windows), not their "
                     "whole CT volumes; organs outside the windows are missing")
        log.warning("test scans are the prepared windows (--test-scans windows): most of each organ outside the pancreas "
                    "windows is missing from the evaluation")
    if not test:
        raise ValueError(f"{data}: the test split has no windows; the 1-shot evaluation needs labeled test scans "
                         "(prepare with a train/test split, e.g. split: 0.8)")
    supports = {o: _split_support(test, o, notes) for o in organs}
    sp = dict(size=cfg.data.image_size, min_size=cfg.data.superpixel_min_size, sigma=cfg.data.superpixel_sigma,
              scale=cfg.data.superpixel_scale, threshold_hu=cfg.data.body_threshold_hu, min_body_fraction=cfg.data.min_body_fraction,
              progress_bar=progress_bar)
    real_pool, real_labels, n_real_windows = None, None, 0
    if train in ("real", "real+synthetic"):
        n_real_windows = len(PreparedDataset(data, split="train", organ_labels=False))
        real_pool, real_labels = build_slice_pool(iter_prepared_scans(data, "train"), "real", **sp)
        if len(real_pool.counts) == 0:
            raise ValueError(f"{data}: the train split has no windows (or no slice with a body above {cfg.data.body_threshold_hu} HU)")
    records = synthetic_records(synthetic) if train != "real" else []
    sizes, ratio = _synthetic_sizes(train, volumes, synthetic_ratio, synthetic_episode_fraction, n_real_windows, len(records))
    # one seeded order of the folder's volumes; a set of N volumes is its first N (sets of a sweep are nested)
    order = [records[i] for i in np.random.default_rng([int(cfg.seed), 43]).permutation(len(records))]
    syn_pool = None
    if sizes[-1] > 0:
        syn_pool, _ = build_slice_pool(iter_synthetic_scans(order[: sizes[-1]]), "synthetic", **sp)
    plans = []
    for n in sizes:
        pools = {} if real_pool is None else {"real": real_pool}
        if n > 0:
            pools["synthetic"] = syn_pool.first_scans(n)
        plans.append({"synthetic_volumes": n, "synthetic_ids": [sid for sid, _ in order[:n]], "pools": pools,
                      "episode_synthetic_share": _episode_share(pools, synthetic_episode_fraction),
                      "n_real_slices": 0 if real_pool is None else len(real_pool.indices("real")),
                      "n_synthetic_slices": len(pools["synthetic"].indices("synthetic")) if n > 0 else 0})
    mode = None if train == "real" else ("episode" if synthetic_episode_fraction is not None else "set")
    settings = {"data": str(data.resolve()), "synthetic": str(Path(synthetic).resolve()) if synthetic else None, "train": train,
                "synthetic_mode": mode, "synthetic_volumes": sizes if train != "real" else [],
                "synthetic_ratio": ratio, "synthetic_episode_fraction": synthetic_episode_fraction,
                "episode_synthetic_share": {str(p["synthetic_volumes"]): p["episode_synthetic_share"] for p in plans},
                "n_real_windows": n_real_windows, "test_scans": test_scans, "setting": setting, "runs": runs,
                "preset": preset, "backbone": backbone, "organs": organs}
    out = prepare_output_dir(out, overwrite=overwrite, resume=resume)
    sfile = out / "settings.json"
    if resume and sfile.exists():
        import yaml

        from lad.training.common import changed_keys

        old = json.loads(sfile.read_text())
        diff = changed_keys(old, settings, keys=sorted(settings), ignore=("runs",))
        cfile = out / "config.yaml"
        if cfile.exists() and yaml.safe_load(cfile.read_text()) != yaml.safe_load(yaml.safe_dump(to_dict(cfg))):
            diff.append("config (--preset / --set)")
        if diff:
            raise ValueError(f"{out}: --resume with different settings ({', '.join(diff)}) than the run was started with; "
                             "resume with the same options or start a new OUT folder")
    save_config(cfg, out / "config.yaml")
    write_json(sfile, settings)
    log.info("SSL-ALPNet: train=%s setting=%d runs=%d preset=%s backbone: %s", train, setting, runs, preset, backbone)

    sweep = len(sizes) > 1
    common = dict(cfg=cfg, organs=organs, setting=setting, runs=runs, supports=supports, real_labels=real_labels,
                  backbone_weights=backbone_weights, resume=resume, device=device, progress_bar=progress_bar)
    per_size = []
    for plan in plans:
        sub = out / f"synthetic_{plan['synthetic_volumes']:05d}" if sweep else out
        run_results = _train_and_evaluate(sub, plan["pools"], plan["episode_synthetic_share"], **common)
        res = _summarise(run_results, organs)
        res.update({"method": "SSL-ALPNet (Ouyang et al. 2022), 1-shot", "preset": preset, "backbone": backbone,
                    "backbone_pretrained": backbone_weights is not None, "train": train, "synthetic_mode": mode,
                    "synthetic_volumes": plan["synthetic_volumes"], "synthetic_ratio": ratio,
                    "synthetic_episode_fraction": synthetic_episode_fraction,
                    "episode_synthetic_share": plan["episode_synthetic_share"], "n_real_windows": n_real_windows,
                    "n_real_slices": plan["n_real_slices"], "n_synthetic_slices": plan["n_synthetic_slices"],
                    "synthetic_ids": plan["synthetic_ids"], "setting": setting, "test_scans": test_scans,
                    "iterations": cfg.train.iterations, "image_size": cfg.data.image_size, "architecture": cfg.model.backbone,
                    "evaluation": {"support": {o: {"scan": supports[o][0].id, "queries": [q.id for q in supports[o][1]]}
                                               for o in organs},
                                   "test_scans": test_scans, "n_part": cfg.eval.n_part, "pooling_window_test": cfg.model.test_window},
                    "notes": notes, "data": settings["data"], "synthetic": settings["synthetic"]})
        res["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(sub / "results.json", res)
        plot_dice(res, sub / "dice.png")
        log.info("SSL-ALPNet (%s, %d synthetic volumes, backbone: %s): mean Dice over organs %.3f +- %.3f", preset,
                 plan["synthetic_volumes"], backbone, res["mean_over_organs"]["mean"], res["mean_over_organs"]["std"])
        per_size.append(res)
    if not sweep:
        return per_size[0]
    results = {k: v for k, v in per_size[0].items() if k not in ("runs", "dice_mean", "dice_std", "mean_over_organs",
                                                               "synthetic_volumes", "synthetic_ids", "episode_synthetic_share",
                                                               "n_synthetic_slices")}
    results["synthetic_volumes"] = sizes
    results["sweep"] = [{k: r[k] for k in ("synthetic_volumes", "episode_synthetic_share", "n_real_slices", "n_synthetic_slices",
                                           "dice_mean", "dice_std", "mean_over_organs", "runs")}
                        | {"folder": f"synthetic_{r['synthetic_volumes']:05d}"} for r in per_size]
    results["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "results.json", results)
    _write_sweep(results, out)
    return results


def _train_and_evaluate(out: Path, pools: dict[str, SlicePool], fraction: float, *, cfg: SSLExperimentConfig, organs: list[str],
                        setting: int, runs: int, supports: dict, real_labels, backbone_weights, resume: bool, device: str,
                        progress_bar: bool = True) -> list[dict]:
    """``runs`` seeds of one training set into ``out/run_XXX`` (finished runs, ``dice.json``, are read back)."""
    import torch

    from lad.downstream.ssl.alpnet import ALPNet
    from lad.downstream.ssl.protocol import alpnet_predictor, evaluate_organ
    from lad.downstream.ssl.train import train_alpnet
    from lad.training.common import resolve_device

    dev = resolve_device(device)
    run_results = []
    for r in range(runs):
        seed = cfg.seed + r
        rdir = out / f"run_{r:03d}"
        done = rdir / "dice.json"
        if done.exists():
            run_results.append(json.loads(done.read_text()))
            log.info("%s already finished", rdir)
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
                                     resume=resume, progress_bar=progress_bar)
            predictor = alpnet_predictor(model, dev, cfg.eval.batch_size)
            for o in group:
                support, queries = supports[o]
                res = evaluate_organ(predictor, support, queries, o, size=cfg.data.image_size, n_part=cfg.eval.n_part)
                dice[o], detail[o] = res["dice"], res
        rec = {"run": r, "seed": seed, "dice": dice, "mean": float(np.mean([dice[o] for o in organs])), "detail": detail}
        write_json(done, rec)
        log.info("run %d: %s", r, ", ".join(f"{o} {dice[o]:.3f}" for o in organs))
        run_results.append(rec)
    return run_results


def _summarise(run_results: list[dict], organs: list[str]) -> dict:
    table = np.array([[rr["dice"][o] for o in organs] for rr in run_results])
    ddof = 1 if len(run_results) > 1 else 0
    means = table.mean(axis=1)
    return {"organs": organs,
            "runs": [{"run": rr["run"], "seed": rr["seed"], "dice": rr["dice"], "mean": rr["mean"]} for rr in run_results],
            "dice_mean": {o: float(table[:, i].mean()) for i, o in enumerate(organs)},
            "dice_std": {o: float(table[:, i].std(ddof=ddof)) for i, o in enumerate(organs)},
            "mean_over_organs": {"mean": float(means.mean()), "std": float(means.std(ddof=ddof))},
            "std": "sample standard deviation over runs (ddof=1); 0 for a single run"}


def _write_sweep(results: dict, out: Path) -> None:
    """``sweep.csv`` / ``sweep.md`` (Dice mean and std per organ and over organs, per synthetic set size) and ``sweep.png``."""
    from lad.downstream.sweep import plot_sweep, write_table

    organs = results["organs"]
    rows = []
    for s in results["sweep"]:
        row = {"synthetic_volumes": s["synthetic_volumes"], "episode_synthetic_share": s["episode_synthetic_share"],
               "runs": len(s["runs"])}
        for o in organs:
            row[f"{o}_mean"], row[f"{o}_std"] = s["dice_mean"][o], s["dice_std"][o]
        row["mean"], row["mean_std"] = s["mean_over_organs"]["mean"], s["mean_over_organs"]["std"]
        rows.append(row)
    cols = ["synthetic_volumes", "episode_synthetic_share", "runs"] + [f"{o}_{k}" for o in organs for k in ("mean", "std")] + \
        ["mean", "mean_std"]
    title = (f"SSL-ALPNet 1-shot Dice by synthetic set size (train={results['train']}, setting {results['setting']}, "
             f"preset {results['preset']}, backbone: {results['backbone']}, {results['n_real_windows']} real training windows)")
    write_table(rows, cols, out / "sweep.csv", out / "sweep.md", title=title)
    xs = [s["synthetic_volumes"] for s in results["sweep"]]
    series = {o: (xs, [s["dice_mean"][o] for s in results["sweep"]], [s["dice_std"][o] for s in results["sweep"]]) for o in organs}
    series["mean"] = (xs, [s["mean_over_organs"]["mean"] for s in results["sweep"]],
                      [s["mean_over_organs"]["std"] for s in results["sweep"]])
    plot_sweep(series, out / "sweep.png", title=f"SSL-ALPNet, train={results['train']}, preset {results['preset']}, "
               f"{len(results['sweep'][0]['runs'])} run(s)\nbackbone: {results['backbone']}", ylabel="Dice (1-shot)")

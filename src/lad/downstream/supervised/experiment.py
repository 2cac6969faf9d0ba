"""``run_supervised``: real-only vs real + k x synthetic segmentation training at several real-data sizes.

For each size n in ``real_sizes`` (the first n training patients of a seeded order, so subsets are
nested) two MONAI networks are trained with the same initialisation, steps and schedule: one on the
real windows of those patients, one on the same windows plus ``k`` synthetic volumes per real window
(``synthetic_multiple``, the supplement's 3x; their conditioning masks as labels). With
``synthetic_volumes`` (a list such as 0, 8, 16) one network per number of synthetic volumes is trained
instead (a set-size sweep). Each is evaluated on the stitched test patients with sliding-window
inference (overlap 0.5) and the metrics of ``lad.downstream.supervised.metrics``, and, with
``ood_test``, on the patients of another prepared dataset (out-of-distribution, reported separately as
in the supplement's Table 5).

Output folder::

    experiment.json                the settings (a rerun with --resume must match them)
    config.yaml                    the resolved SupervisedConfig
    models/real{n:04d}_{arm}/      arm = real | real+synthetic
        data.json                  the real windows and synthetic samples it was trained on
        checkpoints/ tb/           resume checkpoints, TensorBoard scalars
        model/                     the trained Segmenter (config.json + model.safetensors)
        metrics.json               written last: per-patient and aggregated test metrics (finished)
    results.json                   every size x arm with the preset name, N and the metric definitions
    scaling.png                    the scaling curves, one panel per metric (scaling_ood.png: out of distribution)
    sweep.csv sweep.md sweep.png   every size x arm as a table, and DSC against the number of synthetic volumes
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lad.config import resolve_config, save_config, to_dict
from lad.priors.train import train_transforms
from lad.utils.atomic import write_json
from lad.utils.log import get_logger, progress

__all__ = ["SupervisedConfig", "load_supervised_config", "run_supervised", "ARMS"]

log = get_logger(__name__)

ARMS = ("real", "real+synthetic")
NUM_CLASSES = 3  # Lad mask: background, organ of interest, tumour


@dataclasses.dataclass
class SupervisedConfig:
    network: str = "segresnet"
    network_kwargs: dict = dataclasses.field(default_factory=lambda: {"init_filters": 16})
    roi_size: tuple[int, int, int] = (96, 96, 96)
    batch_size: int = 2
    steps: int = 250000
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5
    lr_schedule: str = "poly"
    pos_ratio: float = 1.0
    intensity_jitter: float = 0.1
    flip_prob: float = 0.1
    hu_window: tuple[float, float] = (-175.0, 250.0)
    sw_overlap: float = 0.5
    sw_batch_size: int = 2
    nsd_tolerance_mm: dict = dataclasses.field(default_factory=lambda: {"organ": 2.0, "tumor": 2.0})
    early_tumor_diameter_mm: float = 20.0
    min_detect_voxels: int = 1
    synthetic_multiple: float = 3.0
    checkpoint_every: int = 5000
    keep_last: int = 2
    log_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr_schedule not in ("poly", "constant"):
            raise ValueError(f"lr_schedule must be 'poly' or 'constant', got {self.lr_schedule!r}")
        if not 0 <= self.sw_overlap < 1:
            raise ValueError(f"sw_overlap must be in [0, 1), got {self.sw_overlap}")
        if self.hu_window[1] <= self.hu_window[0]:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {self.hu_window}")
        missing = {"organ", "tumor"} - set(self.nsd_tolerance_mm)
        if missing:
            raise ValueError(f"nsd_tolerance_mm needs tolerances (mm) for organ and tumor, missing {sorted(missing)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not self.synthetic_multiple > 0:
            raise ValueError(f"synthetic_multiple (synthetic volumes per real window) must be > 0, got {self.synthetic_multiple}")


def load_supervised_config(preset: str, overrides: list[str] | None = None) -> SupervisedConfig:
    """Preset ``paper`` | ``demo`` | ``tiny`` (or a YAML path) with ``--set`` overrides."""
    return resolve_config(SupervisedConfig, "downstream-supervised", preset, overrides=overrides)


# ----------------------------------------------------------------------------------------------- training


def _lr_at(cfg: SupervisedConfig, step: int) -> float:
    """Learning rate of ``step``: constant, or nnU-Net's poly decay ``lr * (1 - step / steps) ** 0.9``."""
    return cfg.lr if cfg.lr_schedule == "constant" else cfg.lr * (1 - step / cfg.steps) ** 0.9


def train_model(items, folder: Path, cfg: SupervisedConfig, *, spacing, window_shape, device: torch.device,
                resume: bool, desc: str, stop_after: int | None = None, progress_bar: bool = True):
    """Train a ``Segmenter`` (3 classes) on ``items`` (``SegItem``); checkpoints in ``folder/checkpoints``.

    Returns the model, or None when ``stop_after`` ended the run early (tests use it to simulate a kill).
    """
    from monai.losses import DiceCELoss
    from monai.utils import convert_to_tensor

    from lad.priors.segmenter import Segmenter
    from lad.training.common import CheckpointManager, Logger, batch_indices, seed_step

    roi = tuple(int(min(r, s)) for r, s in zip(cfg.roi_size, window_shape))
    torch.manual_seed(cfg.seed)  # the same initial weights for every size and arm
    model = Segmenter(network=cfg.network, network_kwargs=dict(cfg.network_kwargs), spacing=tuple(spacing),
                      roi_size=roi, num_classes=NUM_CLASSES).to(device)
    try:  # one clear error before training when the network cannot take crops this small (e.g. BasicUNet at 8 slices)
        model.eval()  # no running-statistics update from this probe
        with torch.no_grad():
            model(torch.zeros(1, 1, *roi, device=device))
    except RuntimeError as e:
        raise ValueError(f"network {cfg.network!r} cannot process crops of {roi} (D, H, W) (window {tuple(window_shape)}): "
                         f"{str(e).splitlines()[0]}; use larger windows/roi_size or another network") from None
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # nnU-Net's Dice + CE: Dice over the foreground classes only, computed over the whole batch ("batch dice");
    # with background in the Dice a small organ (0.3% of the voxels here) stayed at Dice 0 after 300 demo steps
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    ckpt = CheckpointManager(folder / "checkpoints", cfg.keep_last)
    start = 0
    if resume:
        state = ckpt.load_latest({"model": model}, {"opt": opt}, device)
        start = int(state["step"]) if state else 0
    tf = train_transforms(cfg, window_shape)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    tb = Logger(folder / "tb", enabled=True, jsonl=folder / "train_log.jsonl")
    model.train()
    bar = progress(range(start, end), total=end - start, desc=desc, unit="step", disable=not progress_bar)
    for step in bar:
        seed_step(cfg.seed, step, "supervised")
        tf.set_random_state(seed=int(np.random.SeedSequence([cfg.seed, step]).generate_state(1)[0] % (2**31)))
        lr = _lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        xs, ys = [], []
        for i in batch_indices(step, cfg.batch_size, len(items), cfg.seed):
            image, label = items[int(i)].load(cfg.hu_window)
            sample = tf({"image": image, "label": label.astype(np.float32)})[0]
            # plain tensors: a MetaTensor routes every network op through __torch_function__ (much slower)
            xs.append(convert_to_tensor(sample["image"], track_meta=False))
            ys.append(convert_to_tensor(sample["label"], track_meta=False))
        x, y = torch.stack(xs).to(device).float(), torch.stack(ys).to(device)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tb.accumulate({"loss": loss})
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            means = tb.flush(step + 1, "train", {"lr": lr})
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{means['loss']:.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or step + 1 == end:
            ckpt.save(step + 1, {"model": model}, {"opt": opt})
    tb.close()
    if end < cfg.steps:
        return None
    return model


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_model(model, patients, cfg: SupervisedConfig, device: torch.device, desc: str = "evaluate", *,
                   progress_bar: bool = True) -> dict:
    """Sliding-window prediction (overlap ``cfg.sw_overlap``) of each stitched test patient; per-patient and aggregated metrics."""
    from lad.downstream.supervised.data import apply_hu_window
    from lad.downstream.supervised.metrics import aggregate, patient_metrics

    model.eval()
    per = []
    for p in progress(patients, desc=desc, unit="patient", disable=not progress_bar):
        x = torch.from_numpy(apply_hu_window(p.hu, cfg.hu_window)[None, None]).to(device)
        pred = model.predict(x, overlap=cfg.sw_overlap, sw_batch_size=cfg.sw_batch_size)[0].cpu().numpy()
        pred[p.gap_slices] = 0
        per.append(patient_metrics(p.patient, pred, p.mask, p.spacing, tolerance_mm=dict(cfg.nsd_tolerance_mm),
                                   min_detect_voxels=cfg.min_detect_voxels))
    return {"summary": aggregate(per, early_diameter_mm=cfg.early_tumor_diameter_mm), "patients": [m.to_dict() for m in per]}


# --------------------------------------------------------------------------------------------- experiment


def _pick_synthetic(samples, real_patients: Sequence[str], test_patients: set[str], window_patient: dict[str, str],
                    prepared: Path, count: int, seed: int):
    """Up to ``count`` samples: conditioned on the subset's own windows first, then on other training windows or
    unknown sources (seeded order); never one conditioned on a test patient's window (label leakage)."""
    own, other, leaked = [], [], []
    mine = set(real_patients)
    for s in samples:
        pid = None
        src = Path(str(s.source_path).rsplit(":", 1)[0]) if s.source_path else None
        # same dataset: the same folder, or one of the same name (a relative path recorded from another working dir)
        if s.source_id and src is not None and (src.resolve() == Path(prepared).resolve() or src.name == Path(prepared).name):
            pid = window_patient.get(s.source_id)
        if pid in test_patients:
            leaked.append(s)
        elif pid in mine:
            own.append(s)
        else:
            other.append(s)
    rng = np.random.default_rng([int(seed), 7])
    ordered = [own[i] for i in rng.permutation(len(own))] + [other[i] for i in rng.permutation(len(other))]
    return ordered[:count], len(leaked)


def _parse_sizes(real_sizes) -> list[int]:
    if isinstance(real_sizes, str):
        try:
            real_sizes = [int(v) for v in real_sizes.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--real-sizes expects comma-separated integers such as 2,4,8; got {real_sizes!r}") from None
    sizes = sorted({int(v) for v in real_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--real-sizes must be positive integers, got {list(real_sizes)!r}")
    return sizes


def _check_settings(out: Path, settings: dict, resume: bool) -> None:
    from lad.training.common import changed_keys

    f = out / "experiment.json"
    if resume and f.exists():
        old = json.loads(f.read_text())
        keys = ("data", "synthetic", "synthetic_multiple", "synthetic_volumes", "ood_test", "config")
        diff = changed_keys(old, settings, keys=keys)
        if diff:
            raise ValueError(f"{f}: --resume with different settings ({', '.join(diff)}); resume with the original "
                             "--data/--synthetic/--synthetic-multiple/--synthetic-volumes/--ood-test/--preset/--set or use a new --out")


def _load_ood(ood_test, data: Path, train, spacing, progress_bar: bool = True) -> tuple[Path, list]:
    """The out-of-distribution test set: every patient of another prepared dataset, stitched; it must be on the
    training grid's spacing with the same organ of interest (the model segments at the training resolution)."""
    from lad.data.dataset import PreparedDataset
    from lad.downstream.supervised.data import axis_spacing, stitch_test_patients
    from lad.training.common import validate_dataset

    ood = Path(ood_test).resolve()
    if ood == data:
        raise ValueError(f"--ood-test {ood} is the training dataset itself; give another prepared dataset "
                         "(e.g. TotalSegmentator prepared with the same spacing when training on AbdomenCT-1K)")
    ds = PreparedDataset(ood, split=None, organ_labels=False)
    if len(ds) == 0:
        raise ValueError(f"--ood-test {ood}: the prepared dataset has no windows")
    validate_dataset(ds, progress_bar=progress_bar)
    sp = axis_spacing(ds.windows[0]["affine"])
    if not np.allclose(sp, spacing, rtol=1e-3, atol=1e-3):
        raise ValueError(f"--ood-test {ood}: windows at {tuple(round(v, 4) for v in sp)} mm (D, H, W), but the training data "
                         f"at {tuple(round(float(v), 4) for v in spacing)} mm; prepare it with the training data's spacing "
                         "(`lad prepare --spacing ...`)")
    organ, train_organ = ds.config.get("organ", "pancreas"), train.config.get("organ", "pancreas")
    if organ != train_organ:
        raise ValueError(f"--ood-test {ood}: organ of interest {organ!r}, the training data's is {train_organ!r}")
    return ood, stitch_test_patients(ds)


def _arms(synthetic, volumes: list[int] | None) -> list[tuple[str, int | None]]:
    """``(arm name, synthetic volumes)``: None = ``synthetic_multiple`` x the real windows."""
    if synthetic is None:
        return [("real", 0)]
    if volumes is None:
        return [("real", 0), ("real+synthetic", None)]
    return [("real" if v == 0 else f"real+{v}synthetic", v) for v in volumes]


def run_supervised(data: str | Path, out: str | Path, cfg: SupervisedConfig, *, synthetic: str | Path | None = None,
                   synthetic_multiple: float | None = None, synthetic_volumes: str | Sequence[int] | None = None,
                   real_sizes: Sequence[int] | str = (2, 4, 8), ood_test: str | Path | None = None, preset: str = "custom",
                   device: str = "cpu", resume: bool = False, overwrite: bool = False, progress_bar: bool = True) -> dict:
    """Run the experiment into ``out`` (see the module docstring); returns the ``results.json`` content.

    ``synthetic_multiple``: synthetic volumes per real training window (default: ``cfg.synthetic_multiple``, 3);
    ``synthetic_volumes``: numbers of synthetic volumes (e.g. ``"0,8,16"``), one model each per real size,
    instead of the multiple; ``ood_test``: a prepared dataset evaluated as out-of-distribution test set."""
    from lad.data.dataset import PreparedDataset
    from lad.downstream.supervised.data import (axis_spacing, load_synthetic_samples, order_patients, real_items,
                                                stitch_test_patients, SegItem)
    from lad.downstream.sweep import parse_volumes
    from lad.training.common import resolve_device, validate_dataset
    from lad.utils.atomic import prepare_output_dir

    if resume and overwrite:
        raise ValueError("pass either --resume or --overwrite, not both")
    data, out = Path(data).resolve(), Path(out)
    dev = resolve_device(device)
    sizes = _parse_sizes(real_sizes)
    volumes = parse_volumes(synthetic_volumes)
    if volumes is not None and synthetic_multiple is not None:
        raise ValueError("give either --synthetic-multiple or --synthetic-volumes, not both")
    if volumes is not None and synthetic is None and volumes != [0]:
        raise ValueError("--synthetic-volumes needs --synthetic SAMPLES_DIR")
    multiple = float(cfg.synthetic_multiple if synthetic_multiple is None else synthetic_multiple)
    train = PreparedDataset(data, split="train", organ_labels=False)
    test = PreparedDataset(data, split="test", organ_labels=False)
    if len(train) == 0:
        raise ValueError(f"{data}: the training split has no windows (empty training set); prepare more patients or a "
                         "split < 1.0 with `lad prepare`")
    if len(test) == 0:
        raise ValueError(f"{data}: the test split has no windows; prepare with a split < 1.0 so test patients exist")
    validate_dataset(train, progress_bar=progress_bar)
    validate_dataset(test, progress_bar=progress_bar)
    order = order_patients(train, cfg.seed)
    if sizes[-1] > len(order):
        raise ValueError(f"--real-sizes {sizes}: the training split of {data} has only {len(order)} patients")
    spacing = axis_spacing(train.windows[0]["affine"])
    samples = []
    if synthetic is not None:
        if volumes is None and not multiple > 0:
            raise ValueError(f"--synthetic-multiple must be > 0 with --synthetic, got {multiple}")
        samples = load_synthetic_samples(synthetic, shape=train.shape, spacing=spacing)
    window_patient = {w["id"]: w["patient"] for w in PreparedDataset(data, split=None, organ_labels=False).windows}
    test_ids = {w["patient"] for w in test.windows}
    if samples and not _pick_synthetic(samples, [], test_ids, window_patient, data, len(samples), cfg.seed)[0]:
        raise ValueError(f"{synthetic}: every synthetic sample is conditioned on a test patient's mask of {data}; "
                         "training on them would leak test labels (sample from the training split's masks)")
    ood_path, ood_patients = (None, []) if ood_test is None else _load_ood(ood_test, data, train, spacing, progress_bar)
    arms = _arms(synthetic, volumes)
    if synthetic is None:
        log.info("no --synthetic folder: training the real-only arm only")
    settings = {"format": "lad-downstream-supervised", "data": str(data), "synthetic": None if synthetic is None else str(Path(synthetic).resolve()),
                "synthetic_multiple": multiple if synthetic is not None and volumes is None else 0,
                "synthetic_volumes": volumes, "ood_test": None if ood_path is None else str(ood_path), "preset": preset,
                "real_sizes": sizes, "config": to_dict(cfg)}
    out = prepare_output_dir(out, overwrite=overwrite, resume=resume)
    _check_settings(out, settings, resume)
    write_json(out / "experiment.json", settings)
    save_config(cfg, out / "config.yaml")

    patients = stitch_test_patients(test)
    runs = []
    for n in sizes:
        chosen = order[:n]
        real = real_items(train, chosen)
        for arm, n_syn in arms:
            name = f"real{n:04d}_{arm}"
            folder = out / "models" / name
            items, note = list(real), None
            used_syn: list[str] = []
            want = int(round(multiple * len(real))) if n_syn is None else n_syn
            if want > 0:
                picked, leaked = _pick_synthetic(samples, chosen, test_ids, window_patient, data, want, cfg.seed)
                if leaked:
                    log.warning("%s: %d synthetic samples are conditioned on test-patient masks; left out (label leakage)",
                                synthetic, leaked)
                if len(picked) < want:
                    asked = f"{multiple:g} x {len(real)} real windows" if n_syn is None else "--synthetic-volumes"
                    note = f"capped: {len(picked)} synthetic volumes available, {want} asked ({asked})"
                    log.warning("%s: %s", name, note)
                items += [SegItem(id=s.id, kind="synthetic", source=s) for s in picked]
                used_syn = [s.id for s in picked]
            record = {"real_patients": n, "arm": arm, "synthetic_volumes": want, "n_real_windows": len(real),
                      "n_synthetic": len(used_syn), "n_train_volumes": len(items), "synthetic_note": note}
            if (folder / "metrics.json").exists():
                if not resume:  # prepare_output_dir refused non-empty folders already; this is a safety net
                    raise FileExistsError(f"{folder}: finished model exists; pass --resume or --overwrite")
                log.info("%s: finished, skipped", name)
                runs.append({**record, **json.loads((folder / "metrics.json").read_text())["summary_record"]})
                continue
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / "data.json", {"real_patients": chosen, "real_windows": [it.id for it in real],
                                              "synthetic": used_syn, "note": note})
            t0, c0 = time.perf_counter(), time.process_time()
            model = train_model(items, folder, cfg, spacing=spacing, window_shape=train.shape, device=dev, resume=resume,
                                desc=name, progress_bar=progress_bar)
            train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
            model.save_pretrained(folder / "model", extra={"trained_steps": cfg.steps, "hu_window": list(cfg.hu_window),
                                                           "labels": {"background": 0, "organ": 1, "tumor": 2},
                                                           "arm": arm, "real_patients": n})
            ev = evaluate_model(model, patients, cfg, dev, desc=f"{name} test", progress_bar=progress_bar)
            rec = {**{k: v for k, v in record.items() if k not in ("real_patients", "arm")}, "metrics": ev["summary"],
                   "train_seconds": round(train_s, 1), "train_cpu_seconds": round(train_cpu, 1)}
            extra = {}
            if ood_patients:
                ev_ood = evaluate_model(model, ood_patients, cfg, dev, desc=f"{name} ood test", progress_bar=progress_bar)
                rec["metrics_ood"] = ev_ood["summary"]
                extra["patients_ood"] = ev_ood["patients"]
            _log_final(folder, ev["summary"], cfg.steps, ood=rec.get("metrics_ood"))
            write_json(folder / "metrics.json", {"summary_record": rec, "patients": ev["patients"], **extra})
            runs.append({**record, **rec})
    results = {"format": "lad-downstream-supervised-results", "preset": preset, "data": str(data),
               "synthetic": settings["synthetic"], "synthetic_multiple": settings["synthetic_multiple"],
               "synthetic_volumes": volumes,
               "n_test_patients": len(patients), "n_test_with_tumor": sum(bool((p.mask == 2).any()) for p in patients),
               "ood_test": settings["ood_test"], "n_ood_patients": len(ood_patients),
               "n_ood_with_tumor": sum(bool((p.mask == 2).any()) for p in ood_patients),
               "network": cfg.network, "steps": cfg.steps, "spacing_mm_dhw": list(spacing), "window_shape": list(train.shape),
               "definitions": {"nsd_tolerance_mm": dict(cfg.nsd_tolerance_mm),
                               "early_tumor_diameter_mm": cfg.early_tumor_diameter_mm,
                               "min_detect_voxels": cfg.min_detect_voxels, "sw_overlap": cfg.sw_overlap,
                               "hu_window": list(cfg.hu_window), "components": "scipy.ndimage.label, 26-connectivity",
                               "doc": "docs/downstream-supervised.md"},
               "runs": runs}
    write_json(out / "results.json", results)
    plot_scaling(results, out / "scaling.png")
    if ood_patients:
        plot_scaling(results, out / "scaling_ood.png", key="metrics_ood")
    write_sweep(results, out)
    log.info("supervised scaling experiment (%s preset) written to %s", preset, out)
    return results


SWEEP_METRICS = [("dice", "organ", "dsc_organ"), ("dice", "tumor", "dsc_tumor"), ("nsd", "organ", "nsd_organ"),
                 ("nsd", "tumor", "nsd_tumor"), ("patient_sensitivity", None, "patient_sensitivity"),
                 ("tumor_sensitivity", None, "tumor_sensitivity"), ("early_tumor_sensitivity", None, "early_tumor_sensitivity"),
                 ("patient_specificity", None, "patient_specificity")]


def write_sweep(results: dict, out: Path) -> None:
    """Every size x arm as ``sweep.csv`` / ``sweep.md`` (all metrics, in and out of distribution) and ``sweep.png``
    (tumour and organ DSC against the number of synthetic volumes, one line per real size)."""
    from lad.downstream.sweep import plot_sweep, write_table

    ood = results.get("n_ood_patients", 0) > 0
    rows = []
    for r in sorted(results["runs"], key=lambda r: (r["real_patients"], r["synthetic_volumes"])):
        row = {"real_patients": r["real_patients"], "arm": r["arm"], "n_real_windows": r["n_real_windows"],
               "synthetic_volumes": r["n_synthetic"]}
        for key, cls, col in SWEEP_METRICS:
            row[col] = metric_value(r["metrics"], key, cls)
            if ood:
                row[f"ood_{col}"] = metric_value(r["metrics_ood"], key, cls)
        rows.append(row)
    cols = ["real_patients", "arm", "n_real_windows", "synthetic_volumes"] + [c for _, _, c in SWEEP_METRICS] + (
        [f"ood_{c}" for _, _, c in SWEEP_METRICS] if ood else [])
    write_table(rows, cols, out / "sweep.csv", out / "sweep.md",
                title=f"Supervised scaling ({results['network']}, preset {results['preset']}, {results['n_test_patients']} "
                      f"test patients" + (f", {results['n_ood_patients']} out-of-distribution" if ood else "") + "); "
                      "metrics in [0, 1], empty / n/a = undefined on this test set")
    series = {}
    for n in sorted({r["real_patients"] for r in rows}):
        mine = [r for r in rows if r["real_patients"] == n]
        xs = [r["synthetic_volumes"] for r in mine]
        series[f"{n} real: DSC tumour"] = (xs, [r["dsc_tumor"] for r in mine], None)
        series[f"{n} real: DSC organ"] = (xs, [r["dsc_organ"] for r in mine], None)
        if ood:
            series[f"{n} real: DSC tumour (OOD)"] = (xs, [r["ood_dsc_tumor"] for r in mine], None)
    plot_sweep(series, out / "sweep.png", ylabel="DSC",
               title=f"Supervised segmentation by synthetic set size ({results['network']}, preset {results['preset']})")


def _log_final(folder: Path, summary: dict, step: int, ood: dict | None = None) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(folder / "tb"))
    for prefix, summ in (("test", summary), ("test_ood", ood)):
        if summ is None:
            continue
        for key in ("dice", "nsd"):
            for cls, v in summ[key].items():
                if v["mean"] is not None:
                    w.add_scalar(f"{prefix}/{key}_{cls}", v["mean"], step)
        for key in ("patient_sensitivity", "tumor_sensitivity", "early_tumor_sensitivity", "patient_specificity"):
            if summ[key]["value"] is not None:
                w.add_scalar(f"{prefix}/{key}", summ[key]["value"], step)
    w.close()


PANELS = [("dice", "organ", "DSC organ"), ("dice", "tumor", "DSC tumour"), ("nsd", "organ", "NSD organ"),
          ("nsd", "tumor", "NSD tumour"), ("patient_sensitivity", None, "patient-level sensitivity"),
          ("tumor_sensitivity", None, "tumour-level sensitivity"), ("early_tumor_sensitivity", None, "early-tumour sensitivity"),
          ("patient_specificity", None, "specificity")]


def metric_value(metrics: dict, key: str, cls: str | None) -> float:
    """One number of a run's metrics (NaN when undefined)."""
    v = metrics[key][cls]["mean"] if cls else metrics[key]["value"]
    return math.nan if v is None else float(v)


def plot_scaling(results: dict, path: Path, key: str = "metrics") -> None:
    """Scaling curves: x = real training patients, one line per arm, one panel per metric (PNG, atomically);
    ``key`` = ``metrics`` (in-distribution test set) or ``metrics_ood`` (out-of-distribution)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lad.utils.atomic import atomic_path

    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    colours = {"real": "tab:gray", "real+synthetic": "tab:red"}
    sizes = sorted({r["real_patients"] for r in results["runs"]})
    arms = list(dict.fromkeys(r["arm"] for r in sorted(results["runs"], key=lambda r: r.get("synthetic_volumes", 0))))
    metrics_key = key
    for ax, (key, cls, title) in zip(axes.ravel(), PANELS):
        drawn = False
        for j, arm in enumerate(arms):
            runs = sorted((r for r in results["runs"] if r["arm"] == arm), key=lambda r: r["real_patients"])
            xs = [r["real_patients"] for r in runs]
            ys = [100 * metric_value(r[metrics_key], key, cls) for r in runs]
            label = f"real + {results['synthetic_multiple']:g}x synthetic" if arm == "real+synthetic" else arm
            ax.plot(xs, ys, "o-", color=colours.get(arm, f"C{j}"), label=label)
            drawn = drawn or any(not math.isnan(y) for y in ys)
        if not drawn:
            ax.text(0.5, 0.5, "not defined on this test set", ha="center", va="center", transform=ax.transAxes, color="0.4")
        if len(sizes) > 1:
            ax.set_xscale("log", base=2)  # sizes usually double (the paper's 60, 120, 278, ...)
        ax.set_xticks(sizes, [str(v) for v in sizes])
        ax.minorticks_off()
        ax.set_title(title)
        ax.set_xlabel("# real training patients")
        ax.set_ylim(-5, 105)
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    tol = results["definitions"]["nsd_tolerance_mm"]
    test = (f"{results['n_ood_patients']} out-of-distribution test patients ({Path(results['ood_test']).name})"
            if metrics_key == "metrics_ood" else f"{results['n_test_patients']} test patients")
    fig.suptitle(f"Supervised scaling ({results['network']}, preset {results['preset']}, {test}; NSD tolerance organ "
                 f"{tol['organ']} mm / tumour {tol['tumor']} mm; "
                 f"early <= {results['definitions']['early_tumor_diameter_mm']} mm)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)

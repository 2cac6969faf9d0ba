"""``lad demo``: the whole method end to end on the embedded phantom data.

Stages (each resumable; ``--from STAGE`` re-runs that stage and everything after it):

1. ``phantom``   procedural abdominal CT (no download)
2. ``prepare``   the paper's preprocessing with the demo preset (64 x 64 x 16 windows at 6 x 6 x 5 mm)
3. ``train``     Lad (variant full: Locality Loss + content + structure conditions): VQ-GAN, then diffusion
4. ``sample``    synthetic volumes from augmented masks, DDIM, guidance w = 1
5. ``baseline``  V0 (Medical Diffusion: no Locality Loss, no condition) on the same budget, and its samples
6. ``segmenter`` an organ segmenter on the real training windows, for the conditioning-fidelity Dice
7. ``evaluate``  both against the held-out phantom windows; ``DIR/report.html``

The numbers are illustrative (tiny models, phantom data); the same commands with the paper presets
are the real thing.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from pathlib import Path

from lad.utils.log import get_logger

__all__ = ["run_demo", "STAGES"]

log = get_logger(__name__)

STAGES = ("phantom", "prepare", "train", "sample", "baseline", "segmenter", "evaluate")

_PRESETS = {
    # preset: (phantom subjects, phantom spacing, phantom size, prepare preset, train preset, samples, sampler steps, MS-SSIM pairs)
    "demo": dict(n=30, spacing=(3.0, 3.0, 2.5), size=(128, 128), prepare="demo", train="demo", samples=16, steps=50, pairs=100,
                 segmenter="demo"),
    "tiny": dict(n=6, spacing=(6.0, 6.0, 5.0), size=(64, 64), prepare="tiny", train="tiny", samples=4, steps=5, pairs=6,
                 segmenter="tiny"),
}


def _done(out: Path, stage: str) -> Path:
    return out / ".stages" / f"{stage}.done"


def run_demo(out: str | Path, *, preset: str = "demo", start: str | None = None, seed: int = 0, device: str = "cpu") -> Path:
    """Run (or resume) the demo into ``out``; returns the path of ``report.html``."""
    from lad.data.phantom import write_phantom_dataset
    from lad.data.prepare import load_prepare_config, prepare_dataset
    from lad.evaluation.evaluate import evaluate
    from lad.sampling.generate import SampleSettings, generate_samples
    from lad.training.config import resolve_train_config
    from lad.training.diffusion_trainer import train_diffusion
    from lad.training.vqgan_trainer import train_vqgan

    if preset not in _PRESETS:
        raise ValueError(f"--preset must be one of {list(_PRESETS)}, got {preset!r}")
    if start is not None and start not in STAGES:
        raise ValueError(f"--from must be one of {STAGES}, got {start!r}")
    p = _PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"preset": preset, "seed": seed}
    sfile = out / "demo_settings.json"
    if sfile.exists() and json.loads(sfile.read_text()) != settings:
        raise FileExistsError(f"{out}: holds a demo run with other settings {json.loads(sfile.read_text())}; use another --out")
    sfile.write_text(json.dumps(settings))
    if start is not None:
        for s in STAGES[STAGES.index(start):]:
            _done(out, s).unlink(missing_ok=True)
    timings: dict[str, float] = json.loads((out / ".stages" / "timings.json").read_text()) if (out / ".stages" / "timings.json").exists() else {}

    def stage(name, fn):
        if _done(out, name).exists():
            log.info("demo: %s already done (use --from %s to redo it)", name, name)
            return
        log.info("demo: stage %s", name)
        t0 = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        _done(out, name).parent.mkdir(parents=True, exist_ok=True)
        _done(out, name).write_text("ok")
        (out / ".stages" / "timings.json").write_text(json.dumps(timings))

    def clean(*paths):
        for q in paths:
            shutil.rmtree(out / q, ignore_errors=True)

    cfg_full = resolve_train_config(p["train"], variant="full", seed=seed)
    cfg_v0 = resolve_train_config(p["train"], variant="V0", seed=seed)
    sample = SampleSettings(n=p["samples"], steps=p["steps"], sampler="ddim", guidance=1.0, seed=seed)

    stage("phantom", lambda: write_phantom_dataset(out / "phantom", p["n"], seed, spacing=p["spacing"], size=p["size"],
                                                   preview=True, overwrite=True))
    stage("prepare", lambda: (clean("prepared"), prepare_dataset("abdomenct1k", out / "phantom", out / "prepared",
                                                                 load_prepare_config(p["prepare"]))))

    def train(run, cfg):
        clean(run)
        train_vqgan(out / "prepared", out / run, cfg, device=device)
        train_diffusion(out / "prepared", out / run, cfg, device=device)

    stage("train", lambda: train("run-lad", cfg_full))
    stage("sample", lambda: (clean("samples-lad"), generate_samples(out / "run-lad", out / "prepared", out / "samples-lad", sample,
                                                                    device=device, batch_size=4)))

    def baseline():
        train("run-v0", cfg_v0)
        clean("samples-v0")
        generate_samples(out / "run-v0", out / "prepared", out / "samples-v0", sample, device=device, batch_size=4)

    stage("baseline", baseline)

    def segmenter():
        from lad.priors.train import load_segmenter_config, train_segmenter

        clean("segmenter")
        train_segmenter(out / "prepared", out / "segmenter", load_segmenter_config(p["segmenter"], [f"seed={seed}"]), device=device)

    stage("segmenter", segmenter)

    def evaluation():
        clean("evaluation")
        evaluate(out / "prepared", {"V0 (Medical Diffusion)": out / "samples-v0", "Lad": out / "samples-lad"},
                 out / "evaluation", n_pairs=p["pairs"], seed=seed, device=device, segmenter=out / "segmenter")
        _write_demo_report(out, preset, cfg_full, sample, timings)

    stage("evaluate", evaluation)
    report = out / "report.html"
    log.info("demo report: %s", report)
    return report


def _curves_png(out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lad.evaluation.report import _png

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for run, name, color in (("run-lad", "Lad", "#d62728"), ("run-v0", "V0", "#1f77b4")):
        for ax, part, key in ((axes[0], "vqgan", "l1"), (axes[1], "diffusion", "diffusion")):
            f = out / run / "logs" / f"{part}.jsonl"
            if not f.exists():
                continue
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if key in r]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], color=color, label=name)
            ax.set_title(f"{part}: {key} loss")
            ax.set_xlabel("step")
    for ax in axes:
        ax.legend(fontsize=8)
    return _png(fig)


def _write_demo_report(out: Path, preset: str, cfg, sample, timings: dict) -> None:
    """``DIR/report.html``: the evaluation report with the pipeline's settings and training curves first."""
    from lad.config import to_dict
    from lad.evaluation.report import write_report

    results = json.loads((out / "evaluation" / "metrics.json").read_text())
    curves = _curves_png(out)
    preface = (
        "<p class=warn>Illustrative numbers: tiny models trained for minutes on procedural phantom CT. "
        "The same commands with the paper presets (<code>--preset paper-abdomenct1k</code>) are the real experiment.</p>"
        f"<h2>Pipeline</h2><p>preset <code>{preset}</code>; stage times (s): <code>{html.escape(json.dumps(timings))}</code>; "
        f"sampling: {sample.sampler.upper()}-{sample.steps}, guidance w = {sample.guidance}, augmentation {sample.augment}.</p>"
        f"<details><summary>training config (Lad)</summary><pre>{html.escape(json.dumps(to_dict(cfg), indent=1))}</pre></details>"
        f"<h2>Training curves</h2><img src='data:image/png;base64,{curves}'>"
    )
    from lad.data.dataset import PreparedDataset
    from lad.evaluation.evaluate import load_synthetic
    from lad.evaluation.features import FeatureExtractor
    from lad.evaluation.crops import max_bounding_box

    ds_test = PreparedDataset(out / "prepared", split="test")
    ds_train = PreparedDataset(out / "prepared", split="train")
    real = ([ds_test[i]["image"] for i in range(len(ds_test))], [ds_test[i]["mask"][0] for i in range(len(ds_test))])
    if len(real[0]) < 2:
        real = ([ds_train[i]["image"] for i in range(len(ds_train))], [ds_train[i]["mask"][0] for i in range(len(ds_train))])
    box = max_bounding_box([ds_train[i]["mask"][0] for i in range(len(ds_train))])
    fx = FeatureExtractor.from_spec("random-resnet10")
    sets = {name: load_synthetic(Path(e["path"])) for name, e in results["sets"].items()}
    embeds = {"real": fx.extract(real[0], cache_dir=out / "evaluation" / "feature_cache")}
    embeds.update({name: fx.extract(v[0], cache_dir=out / "evaluation" / "feature_cache") for name, v in sets.items()})
    write_report(out, results, embeds, sets, real, box, title="lad demo: Lad vs Medical Diffusion (V0) on phantom CT",
                 preface=preface)

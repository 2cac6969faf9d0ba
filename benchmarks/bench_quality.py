"""Quality against training budget: the demo recipe at 1x, 2x, 4x ... its training steps.

For each budget multiple ``k`` the Lad model (VQ-GAN + diffusion, ``--preset``) is trained with every
training step count multiplied by ``k`` (the discriminators' start scales with it), samples are drawn
as the demo draws them, and the demo's checks are computed against the held-out windows: the VQ-GAN's
held-out MAE inside the body (HU) and codes used, anatomy present fraction (liver, kidney, spleen),
body and spine fractions, organ HU W1 and the conditioning-fidelity Dice, each beside the held-out
real windows' own value (the ceiling). One JSON line per budget, and ``quality_vs_budget.png``.

It reuses a finished demo folder (``--demo DIR``: its prepared data and segmenter; written by
``lad demo``) so the data and the judge are the demo's own::

    lad demo --out /tmp/demo
    python benchmarks/bench_quality.py --demo /tmp/demo --work /tmp/quality --budgets 1,2,4

CPU seconds are the process's (all threads); wall seconds depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import context, emit

KEYS = ("vqgan_heldout_mae_hu", "vqgan_codes_used", "lad_anatomy_present_fraction", "lad_body_ok_fraction",
        "lad_bone_ok_fraction", "lad_organ_hu_w1", "lad_fidelity_dice")


def scaled_config(preset: str, k: float, seed: int, overrides: list[str]):
    """The preset with every training step count (and the discriminators' start) multiplied by ``k``."""
    import dataclasses

    from lad.training.config import resolve_train_config

    cfg = resolve_train_config(preset, overrides, variant="full", seed=seed)
    vt, dt = cfg.vqgan_train, cfg.diffusion_train
    vt = dataclasses.replace(vt, steps=max(1, round(vt.steps * k)), disc_start=round(vt.disc_start * k))
    dt = dataclasses.replace(dt, steps=max(1, round(dt.steps * k)))
    log = dataclasses.replace(cfg.logging, checkpoint_every=max(vt.steps, dt.steps))
    return dataclasses.replace(cfg, vqgan_train=vt, diffusion_train=dt, logging=log)


def run_budget(demo: Path, work: Path, k: float, args) -> dict:
    from lad.demo import _PRESETS
    from lad.evaluation.evaluate import evaluate
    from lad.sampling.generate import SampleSettings, generate_samples
    from lad.training.diffusion_trainer import train_diffusion
    from lad.training.vqgan_trainer import train_vqgan

    cfg = scaled_config(args.preset, k, args.seed, args.set)
    run, samples, ev = work / f"run-x{k:g}", work / f"samples-x{k:g}", work / f"evaluation-x{k:g}"
    p = _PRESETS.get(args.preset, _PRESETS["demo"])
    t0, c0 = time.perf_counter(), time.process_time()
    if not (run / "denoiser_ema").exists():
        train_vqgan(demo / "prepared", run, cfg, device=args.device, overwrite=True, progress_bar=False)
        train_diffusion(demo / "prepared", run, cfg, device=args.device, overwrite=True, progress_bar=False)
    train_wall, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    generate_samples(run, demo / "prepared", samples, SampleSettings(n=p["samples"], steps=p["steps"], sampler="ddim",
                                                                   guidance=1.0, seed=args.seed),
                     device=args.device, batch_size=4, overwrite=True)
    features = demo / "features"  # the demo's in-domain feature network, when it has one
    evaluate(demo / "prepared", {"Lad": samples}, ev, n_pairs=p["pairs"], seed=args.seed, device=args.device,
             segmenter=demo / "segmenter", overwrite=True,
             **({"features": str(features)} if features.is_dir() else {}))
    m = json.loads((ev / "metrics.json").read_text())
    e, real = m["sets"]["Lad"], m["real"]
    rec = e.get("vqgan_reconstruction") or json.loads((run / "vqgan_reconstruction.json").read_text())
    row = {"budget": k, "vqgan_steps": cfg.vqgan_train.steps, "diffusion_steps": cfg.diffusion_train.steps,
           "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1),
           "vqgan_heldout_mae_hu": rec.get("mae_body_hu"), "vqgan_heldout_bias_hu": rec.get("bias_body_hu"),
           "vqgan_codes_used": rec.get("codes_used"),
           "lad_anatomy_present_fraction": (e.get("anatomy") or {}).get("mean_liver_kidney_spleen"),
           "lad_body_ok_fraction": e.get("body_ok_fraction"), "lad_bone_ok_fraction": e.get("bone_ok_fraction"),
           "lad_organ_hu_w1": e["hu_w1"]["organ"], "lad_body_hu_w1": e["hu_w1"]["body"],
           "lad_fidelity_dice": (e.get("fidelity_dice") or {}).get("organ"),
           "real_anatomy_present_fraction": (real.get("anatomy") or {}).get("mean_liver_kidney_spleen"),
           "real_fidelity_dice": (real.get("fidelity_dice") or {}).get("organ"), "n": e["n"], "n_real": real["n"],
           "fid": e["fid"], "fid_ci95": e.get("fid_ci95"), "fid_vs_half": (e.get("vs_half") or {}).get("fid"),
           "real_floor_fid": (real.get("floor") or {}).get("fid")}
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["budget"] for r in rows]
    panels = (("vqgan_heldout_mae_hu", "VQ-GAN held-out MAE in body (HU)", 25.0, None),
              ("lad_anatomy_present_fraction", "anatomy present (liver/kidney/spleen)", 0.8, "real_anatomy_present_fraction"),
              ("lad_bone_ok_fraction", "spine present", 15 / 16, None),
              ("lad_organ_hu_w1", "organ HU W1 (HU)", 30.0, None),
              ("lad_fidelity_dice", "fidelity Dice", None, "real_fidelity_dice"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0))
    for ax, (key, title, target, ceiling) in zip(axes, panels):
        ax.plot(x, [r.get(key) for r in rows], "o-", color="#d62728", label="Lad")
        if ceiling:
            ax.plot(x, [r.get(ceiling) for r in rows], "--", color="gray", label="held-out real")
        if target is not None:
            ax.axhline(target, color="green", lw=0.8, ls=":", label="target")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{v:g}x" for v in x])
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("training budget (x demo)", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, required=True, help="a finished `lad demo` folder (prepared data + segmenter)")
    ap.add_argument("--work", type=Path, required=True, help="folder for the runs, samples and evaluations (reused on re-run)")
    ap.add_argument("--budgets", default="1,2,4", help="training budget multiples of the preset")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides (as lad train --set)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in (float(v) for v in args.budgets.split(",")):
        row = run_budget(args.demo, args.work, k, args)
        emit("quality_vs_budget", **row, **context(args.device))
        rows.append(row)
        (args.work / "quality.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot(rows, args.work / "quality_vs_budget.png")


if __name__ == "__main__":
    main()

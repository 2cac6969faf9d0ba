"""``lad downstream ssl``: SSL-ALPNet few-shot organ segmentation trained on real, synthetic or real+synthetic data."""

from __future__ import annotations

import argparse

from lad.cli._args import finite_float, positive_int


def register(parts: argparse._SubParsersAction) -> None:
    p = parts.add_parser(
        "ssl", help="SSL-ALPNet: self-supervised few-shot organ segmentation (paper 4.3)",
        description="Train SSL-ALPNet (superpixel self-supervision, adaptive local prototype pooling) on real, synthetic "
        "or real+synthetic volumes and evaluate 1-shot Dice for liver, kidney, spleen and pancreas on the labeled test "
        "split of --data. Writes OUT/results.json (Dice per organ per run, mean and std) and OUT/dice.png. "
        "See docs/downstream-ssl.md.")
    p.add_argument("--data", required=True, metavar="PREPARED_DIR", help="prepared dataset (train split: training "
                   "images; test split: labeled scans for the 1-shot evaluation)")
    p.add_argument("--synthetic", metavar="SAMPLES_DIR", help="`lad sample` output folder (for --train synthetic / real+synthetic)")
    p.add_argument("--train", required=True, choices=["real", "synthetic", "real+synthetic"], help="training volumes")
    p.add_argument("--synthetic-volumes", metavar="N[,N...]",
                   help="number of synthetic volumes in the training set (their slices join the real ones; every slice "
                   "equally likely), or a comma-separated list for a set-size sweep, e.g. 0,8,16 (one model set per size, "
                   "sweep.csv/.md/.png). Default with real+synthetic: --synthetic-ratio 0.2; with synthetic: all volumes")
    p.add_argument("--synthetic-ratio", type=finite_float(0.0), metavar="R",
                   help="real+synthetic: N = round(R x the number of real training windows) synthetic volumes (default 0.2, "
                   "the paper's 'about 20%% of the training set')")
    p.add_argument("--synthetic-episode-fraction", "--synthetic-fraction", dest="synthetic_episode_fraction", type=finite_float(0.0, 1.0),
                   metavar="P", help="real+synthetic: instead of the set composition, draw each training episode from the "
                   "synthetic volumes with probability P (--synthetic-fraction is the old name)")
    p.add_argument("--test-scans", choices=["original", "windows"], default="original",
                   help="original (default): the whole original CT of each test patient, read through the prepare manifest "
                   "(an unreachable file is an error naming it); windows: the test patients' prepared windows put back "
                   "together (most of each organ outside the pancreas windows is missing)")
    p.add_argument("--setting", type=int, choices=[1, 2], default=1,
                   help="1: all training slices; 2: training slices containing the test organ excluded (one model per organ)")
    p.add_argument("--runs", type=positive_int, default=5, help="training runs with seeds seed..seed+runs-1 (default 5)")
    p.add_argument("--preset", default="demo", help="paper | demo | tiny | a YAML file (default demo)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--backbone-weights", metavar="PATH", help="local torchvision DeepLabV3/ResNet checkpoint for the backbone "
                   "(e.g. deeplabv3_resnet101_coco.pth); default: random init (no pretrained weights)")
    p.add_argument("--seed", type=int, help="base seed (default: the preset's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value, e.g. --set train.iterations=500")
    p.add_argument("--resume", action="store_true", help="continue an interrupted OUT folder (finished runs are kept)")
    p.add_argument("--overwrite", action="store_true", help="delete OUT first")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lad.cli import progress_bar
    from lad.downstream.ssl import load_ssl_config, run_ssl

    overrides = ([f"seed={args.seed}"] if args.seed is not None else []) + list(args.overrides)  # --set wins
    cfg = load_ssl_config(args.preset, overrides)
    preset = Path(args.preset).stem if args.preset.endswith((".yaml", ".yml")) else args.preset
    res = run_ssl(args.data, args.out, cfg, train=args.train, synthetic=args.synthetic, synthetic_volumes=args.synthetic_volumes,
                  synthetic_ratio=args.synthetic_ratio, synthetic_episode_fraction=args.synthetic_episode_fraction,
                  test_scans=args.test_scans, setting=args.setting, runs=args.runs, preset=preset, backbone_weights=args.backbone_weights,
                  resume=args.resume, overwrite=args.overwrite, device=args.device, progress_bar=progress_bar(args))
    for r in res.get("sweep", [res]):
        syn = f", {r['synthetic_volumes']} synthetic volumes" if res["train"] != "real" else ""
        print(f"SSL-ALPNet 1-shot Dice (preset {res['preset']}, backbone: {res['backbone']}{syn}, {len(r['runs'])} run(s)):")
        for o in res["organs"]:
            print(f"  {o:9s} {r['dice_mean'][o]:.3f} +- {r['dice_std'][o]:.3f}")
        print(f"  {'mean':9s} {r['mean_over_organs']['mean']:.3f} +- {r['mean_over_organs']['std']:.3f}")
    chart = "sweep.png, sweep.csv, sweep.md" if "sweep" in res else "dice.png"
    print(f"results: {Path(args.out) / 'results.json'}, chart: {Path(args.out) / chart}")
    return 0

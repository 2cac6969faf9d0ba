"""``lad features train``: the in-domain feature network for ``lad evaluate --features FEATURES_DIR``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="train the in-domain 3D feature network used by `lad evaluate --features`",
                       description="Features that know CT: a small 3D ResNet trained to segment the organ labels of the "
                       "prepared TRAINING windows (never the held-out test split).")
    parts = p.add_subparsers(dest="part", metavar="ACTION")
    t = parts.add_parser("train", help="train the feature network on a prepared dataset's training windows",
                         description="Writes FEATURES_DIR/model (config.json + model.safetensors), config.yaml, "
                         "train_log.jsonl and metrics.json (training Dice per organ). Use it with "
                         "`lad evaluate --features FEATURES_DIR`.")
    t.add_argument("--data", required=True, help="prepared dataset (only its train split is read)")
    t.add_argument("--out", required=True, help="FEATURES_DIR")
    t.add_argument("--preset", default="demo", help="tiny | demo | paper | a YAML file")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--device", default="cpu")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run_train)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def run_train(args: argparse.Namespace) -> int:
    from lad.cli import progress_bar
    from lad.evaluation.ct_features import load_feature_train_config, train_features

    cfg = load_feature_train_config(args.preset, args.overrides)
    s = train_features(args.data, args.out, cfg, device=args.device, overwrite=args.overwrite, progress_bar=progress_bar(args))
    dice = ", ".join(f"{k} {v:.3f}" for k, v in s["train_dice"].items())
    print(f"feature network: {args.out} ({s['n_windows']} training windows, {s['steps']} steps, {s['seconds']:.0f} s); "
          f"training Dice: {dice}")
    return 0

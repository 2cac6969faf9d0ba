"""``lad priors train`` / ``lad priors predict``: organ masks ("priors") for unlabeled CT."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("priors", help="train an organ segmenter / predict organ masks for unlabeled CT",
                       description="The paper's priors: organ masks predicted for unlabeled CT, used by `lad prepare --priors`.")
    parts = p.add_subparsers(dest="part", metavar="ACTION")
    t = parts.add_parser("train", help="train a MONAI segmenter on labeled prepared data",
                         description="SegResNet (or any MONAI network by name) with DiceCE, random crops with a foreground "
                         "ratio and intensity jitter; Dice per label on the held-out split goes to OUT/metrics.json.")
    t.add_argument("--data", required=True, help="prepared dataset with organ labels")
    t.add_argument("--out", required=True, help="segmenter folder")
    t.add_argument("--network", help="MONAI network name (segresnet, unet, basicunet, swinunetr, ...)")
    t.add_argument("--preset", default="demo", help="paper | demo | tiny | a YAML file")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--device", default="cpu")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run_train)
    q = parts.add_parser("predict", help="predict organ label maps for raw CT (NIfTI/NRRD/DICOM)",
                         description="Labels on each input's own grid as LABELS/<case_id>.nii.gz plus <case_id>.json (organ "
                         "volumes in ml, flags for missing or implausibly small organs). Resumable.")
    q.add_argument("--input", required=True, help="CT folder, dataset folder (with --layout) or CSV with an image column")
    q.add_argument("--out", required=True, help="labels folder (give it to `lad prepare --priors`)")
    q.add_argument("--segmenter", help="segmenter folder from `lad priors train` (lad backend)")
    q.add_argument("--backend", choices=["lad", "totalsegmentator"], default="lad")
    q.add_argument("--layout", default="folder", choices=["folder", "abdomenct1k", "totalsegmentator", "msd", "pairs"])
    q.add_argument("--device", default="cpu")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=run_predict)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def run_train(args: argparse.Namespace) -> int:
    from lad.cli import progress_bar
    from lad.priors.train import load_segmenter_config, train_segmenter

    overrides = ([f"network={args.network}"] if args.network else []) + list(args.overrides)  # --set wins
    dice = train_segmenter(args.data, args.out, load_segmenter_config(args.preset, overrides), resume=args.resume,
                           overwrite=args.overwrite, device=args.device, progress_bar=progress_bar(args))
    print("segmenter Dice (held-out): " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from lad.cli import progress_bar
    from lad.priors.predict import predict_priors

    s = predict_priors(args.input, args.out, segmenter=args.segmenter, backend=args.backend, layout=args.layout,
                       device=args.device, overwrite=args.overwrite, progress_bar=progress_bar(args))
    print(f"predicted {s['predicted']}, skipped {s['skipped']} (finished), failed {len(s['failed'])} -> {args.out}")
    return 0 if not s["failed"] else 1

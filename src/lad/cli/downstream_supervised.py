"""``lad downstream supervised``: real vs real + k x synthetic supervised segmentation at several real-data sizes."""

from __future__ import annotations

import argparse

from lad.cli._args import finite_float


def register(parts: argparse._SubParsersAction) -> None:
    p = parts.add_parser(
        "supervised", help="tumour-scaling protocol: real vs real + k x synthetic training at several real sizes",
        description="For each --real-sizes n, train a MONAI network (SegResNet by default) on n real training patients "
        "and on the same patients plus k synthetic volumes per real window (conditioning masks as labels); evaluate "
        "on the test split (DSC, NSD, patient/tumour/early-tumour sensitivity) and write OUT/results.json and "
        "OUT/scaling.png. Each model is its own folder under OUT/models; --resume skips finished ones. "
        "See docs/downstream-supervised.md.")
    p.add_argument("--data", required=True, help="prepared dataset folder (`lad prepare`) with train and test splits")
    p.add_argument("--synthetic", help="`lad sample` output folder on the same grid (without it: the real arm only)")
    p.add_argument("--synthetic-multiple", type=finite_float(0.0), metavar="K",
                   help="synthetic volumes per real training window, the real:synthetic ratio (capped by what the folder "
                   "holds; default: the preset's synthetic_multiple, 3 = the supplement's 3x)")
    p.add_argument("--synthetic-volumes", metavar="N[,N...]",
                   help="instead of --synthetic-multiple: numbers of synthetic volumes added to each real size, one model "
                   "each (0 = real only), e.g. 0,8,16: a set-size sweep (sweep.csv/.md/.png)")
    p.add_argument("--real-sizes", default="2,4,8", help="comma-separated numbers of real training patients (default 2,4,8)")
    p.add_argument("--ood-test", metavar="PREPARED_DIR",
                   help="another prepared dataset (same spacing and organ of interest; all its patients) evaluated as an "
                   "out-of-distribution test set, reported separately (metrics_ood, scaling_ood.png)")
    p.add_argument("--preset", default="demo", help="paper | demo | tiny | a YAML file (default demo)")
    p.add_argument("--out", required=True, help="experiment output folder")
    p.add_argument("--network", help="MONAI network name (segresnet, unet, basicunet, dynunet, swinunetr, ...)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, help="seed of the patient order, synthetic choice, initial weights and batches")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set steps=500 --set nsd_tolerance_mm.tumor=5")
    p.add_argument("--resume", action="store_true", help="continue OUT: skip finished models, resume unfinished ones")
    p.add_argument("--overwrite", action="store_true", help="delete OUT first")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lad.cli import progress_bar
    from lad.downstream.supervised import load_supervised_config, run_supervised

    overrides = ([f"network={args.network}"] if args.network else []) + (
        [f"seed={args.seed}"] if args.seed is not None else []) + list(args.overrides)  # --set wins
    cfg = load_supervised_config(args.preset, overrides)
    res = run_supervised(args.data, args.out, cfg, synthetic=args.synthetic, synthetic_multiple=args.synthetic_multiple,
                         synthetic_volumes=args.synthetic_volumes, real_sizes=args.real_sizes, ood_test=args.ood_test,
                         preset=args.preset, device=args.device, resume=args.resume,
                         overwrite=args.overwrite, progress_bar=progress_bar(args))
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for r in res["runs"]:
        for test, key in (("ID ", "metrics"), ("OOD", "metrics_ood")):
            if key not in r:
                continue
            m = r[key]
            print(f"{r['real_patients']:>4} real  {r['arm']:<20} {test} DSC organ {fmt(m['dice']['organ']['mean'])}  "
                  f"DSC tumour {fmt(m['dice']['tumor']['mean'])}  "
                  f"NSD tumour {fmt(m['nsd']['tumor']['mean'])}  patient sens {fmt(m['patient_sensitivity']['value'])}  "
                  f"tumour sens {fmt(m['tumor_sensitivity']['value'])}  early sens {fmt(m['early_tumor_sensitivity']['value'])}")
    print(f"results: {args.out}/results.json, curve: {args.out}/scaling.png, table: {args.out}/sweep.md (preset {args.preset})")
    return 0

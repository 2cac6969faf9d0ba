"""``lad ablate``: train + sample + evaluate the Table 2 variants on one dataset and budget."""

from __future__ import annotations

import argparse

from lad.cli._args import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="Table 2 in one command: V0/V1/V2/V3/full trained, sampled and evaluated",
                       description="Trains each variant with the same preset and budget, samples N volumes from each, and "
                       "evaluates them together (OUT/evaluation/report.html). Resumable.")
    p.add_argument("--data", required=True, help="prepared dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="demo")
    p.add_argument("--variants", default="V0,V1,V2,V3,full", help="comma-separated subset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--n", type=positive_int, default=16, help="samples per variant")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the preset's sampling section)")
    p.add_argument("--features", default="random-resnet10")
    p.add_argument("--segmenter", help="segmenter folder for the conditioning-fidelity Dice and the anatomy-present check")
    p.add_argument("--pairs", type=positive_int, default=100)
    p.add_argument("--priors-data", action="append", default=[], metavar="NAME=PREPARED",
                   help="also train each variant on this prepared version of the same windows whose masks are priors "
                   "(e.g. from a weaker segmenter); rows are named VARIANT@NAME (repeatable)")
    p.add_argument("--seeds", type=int, default=1,
                   help="train each variant N times (seeds SEED..SEED+N-1, same budget): mean, std, per-seed values, 95 %% "
                   "intervals; a difference is marked significant only when the intervals do not overlap")
    p.add_argument("--guidance", default="1", help="comma-separated guidance scales sampled from each trained model "
                   "(e.g. 0,0.5,1,2,4: Table 3); one training per variant and seed")
    p.add_argument("--masks", default="augmented,original",
                   help="sample columns: augmented (Locality Condition Augmentation) and/or original training masks")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates of each metric's 95 %% interval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lad.cli import progress_bar
    from lad.evaluation.ablate import run_ablation

    priors = {}
    for item in args.priors_data:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--priors-data {item!r}: expected NAME=PREPARED_FOLDER")
        priors[name] = folder
    res = run_ablation(args.data, args.out, preset=args.preset, variants=[v.strip() for v in args.variants.split(",")],
                       overrides=args.overrides, n_samples=args.n, steps=args.steps, seed=args.seed, device=args.device,
                       features=args.features, segmenter=args.segmenter, n_pairs=args.pairs,
                       priors_data=priors, seeds=args.seeds, guidance=_floats(args.guidance),
                       masks=[m.strip() for m in args.masks.split(",") if m.strip()], n_boot=args.bootstrap,
                       progress_bar=progress_bar(args))
    width = max(8, *(len(n) for n in res["sets"]))
    print(f"{'variant':{width}} {'FID':>9} {'MMD':>9} {'FIDloc':>9} {'MMDloc':>9} {'MS-SSIM':>8}")
    for name, e in res["sets"].items():
        print(f"{name:{width}} {e['fid']:9.4g} {e['mmd']:9.4g} {e['fid_localized']:9.4g} {e['mmd_localized']:9.4g} {e['ms_ssim']:8.4f}")
    print(f"tables: {args.out}/ablation.md, ablation.csv, ablation.png" + (", guidance.md, guidance.png" if "," in args.guidance else ""))
    print(f"report: {args.out}/evaluation/report.html")
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--guidance {text!r}: expected comma-separated numbers such as 0,0.5,1,2,4") from None

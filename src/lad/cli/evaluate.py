"""``lad evaluate``: realism, diversity, coverage, memorisation of synthetic CT; metrics.json + report.html."""

from __future__ import annotations

import argparse

from lad.cli._args import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate synthetic volumes against real ones (FID, MMD, MS-SSIM, ...)",
                       description="Holistic and localized FID/MMD on 3D ResNet features, MS-SSIM diversity (synthetic and "
                       "real), precision/recall/density/coverage, memorisation, organ HU histograms, MDS plot, slices. "
                       "Several synthetic sets (NAME=FOLDER) give one comparison table (e.g. V0=... Lad=...).")
    p.add_argument("--real", required=True, help="prepared dataset (test split = held-out real, train = memorisation reference)")
    p.add_argument("--synthetic", "--compare", dest="synthetic", required=True, nargs="+",
                   help="lad sample folder(s), optionally NAME=FOLDER; several make one comparison table (e.g. V0=... Lad=...)")
    p.add_argument("--out", required=True, help="report folder (metrics.json, report.html)")
    p.add_argument("--features", default="random-resnet10",
                   help="FEATURES_DIR from `lad features train` (in-domain), medicalnet-resnet{10,18,34,50}:/path/weights.pth, "
                   "or random-resnetN (default; labelled 'untrained features')")
    p.add_argument("--segmenter", help="segmenter folder (lad priors train) for the conditioning-fidelity Dice and the anatomy-present check")
    p.add_argument("--pairs", type=positive_int, default=400, help="MS-SSIM pairs (default 400)")
    p.add_argument("--bootstrap", type=int, default=200, help="replicates of each metric's 95 %% bootstrap interval (0: none)")
    p.add_argument("--ellipses", choices=["least-squares", "2-sigma"], default="least-squares",
                   help="MDS figure: least-squares ellipse fits (the paper's Figure 4, default) or 2-sigma covariance ellipses")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lad.cli import progress_bar
    from lad.evaluation.evaluate import evaluate, parse_synthetic_args

    res = evaluate(args.real, parse_synthetic_args(args.synthetic), args.out, features=args.features, n_pairs=args.pairs,
                   seed=args.seed, device=args.device, overwrite=args.overwrite, segmenter=args.segmenter,
                   ellipses=args.ellipses, n_boot=args.bootstrap, progress_bar=progress_bar(args))
    for name, e in res["sets"].items():
        ci = e.get("fid_ci95")
        print(f"{name}: FID {e['fid']:.4g}{f' [{ci[0]:.4g}, {ci[1]:.4g}]' if ci else ''} MMD {e['mmd']:.4g} FIDloc {e['fid_localized']:.4g} MMDloc {e['mmd_localized']:.4g} "
              f"MS-SSIM {e['ms_ssim']:.4f} (real {res['real']['ms_ssim']:.4f}) N={e['n']}")
    print(f"report: {args.out}/report.html")
    return 0

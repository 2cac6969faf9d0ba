"""``lad phantom``: the embedded procedural abdominal CT dataset (AbdomenCT-1K layout)."""

from __future__ import annotations

import argparse

from lad.cli._args import finite_float, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="generate the procedural abdominal CT phantom dataset (no download)",
                       description="Write N procedural abdominal CT subjects (NIfTI, AbdomenCT-1K layout: Case_XXXXX_0000.nii.gz "
                       "images in HU + Case_XXXXX.nii.gz masks with 1 liver, 2 kidney, 3 spleen, 4 pancreas, 5 pancreatic "
                       "tumour), reproducible from the seed.")
    p.add_argument("out_dir")
    p.add_argument("--n", type=positive_int, default=20, help="number of subjects (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tumor-fraction", type=finite_float(0.0, 1.0), default=0.3, help="fraction of subjects with a pancreatic tumour")
    p.add_argument("--spacing", type=finite_float(0.0, lo_open=True), nargs=3, default=(1.5, 1.5, 2.5), metavar=("X", "Y", "Z"), help="mm (default 1.5 1.5 2.5)")
    p.add_argument("--size", type=positive_int, nargs=2, default=(256, 256), metavar=("H", "W"), help="in-plane grid (default 256 256)")
    p.add_argument("--workers", type=positive_int, default=1)
    p.add_argument("--preview", action="store_true", help="also write preview.png (a montage of a few subjects)")
    p.add_argument("--overwrite", action="store_true")
    from lad.cli import add_common_flags

    add_common_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from lad.cli import progress_bar
    from lad.data.phantom import write_phantom_dataset

    t0 = time.perf_counter()
    paths = write_phantom_dataset(args.out_dir, args.n, args.seed, tumor_fraction=args.tumor_fraction,
                                  spacing=tuple(args.spacing), size=tuple(args.size), preview=args.preview,
                                  overwrite=args.overwrite, workers=args.workers, progress_bar=progress_bar(args))
    print(f"wrote {len(paths)} phantom subjects to {args.out_dir} in {time.perf_counter() - t0:.1f} s"
          + (f" (preview: {args.out_dir}/preview.png)" if args.preview else ""))
    return 0

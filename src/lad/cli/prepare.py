"""``lad prepare``: raw CT (NIfTI/NRRD/DICOM; dataset layouts) -> prepared dataset folder."""

from __future__ import annotations

import argparse

from lad.cli._args import finite_float, nonneg_int, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="preprocess raw CT as the paper does (resample, crop, windows along the pancreas)",
        description="Read CT with full geometry, reorient, resample to the target spacing, crop/pad to H x W, "
        "clip HU to [-1000, 400], cut windows of depth D along the organ of interest, split by patient. "
        "Re-running resumes (finished patients are skipped). Presets: paper-abdomenct1k (default), "
        "paper-totalsegmentator, demo, tiny; explicit options override the preset.",
    )
    p.add_argument("--layout", required=True, choices=["abdomenct1k", "totalsegmentator", "msd", "pairs"])
    p.add_argument("--input", required=True, help="dataset folder (or the CSV for --layout pairs)")
    p.add_argument("--output", required=True, help="prepared dataset folder to write")
    p.add_argument("--preset", default="paper-abdomenct1k", help="paper-abdomenct1k | paper-totalsegmentator | demo | tiny | a YAML file")
    p.add_argument("--spacing", type=finite_float(0.0, lo_open=True), nargs=3, metavar=("X", "Y", "Z"), help="target spacing in mm")
    p.add_argument("--size", type=positive_int, nargs=2, metavar=("H", "W"), help="in-plane size after crop/pad")
    p.add_argument("--depth", type=positive_int, help="window depth D")
    p.add_argument("--windows", choices=["one", "sliding"],
                   help="one window per case centred on the organ (the paper's; paper presets) or overlapping windows "
                   "every --stride slices (demo, tiny)")
    p.add_argument("--stride", type=nonneg_int, help="window stride along z with --windows sliding (default D/2)")
    p.add_argument("--organ", choices=["liver", "kidney", "spleen", "pancreas"], help="organ of interest (default pancreas)")
    p.add_argument("--require", nargs="+", metavar="ORGAN",
                   help="organs that must be present and not cut short by the scan (else the volume is dropped), "
                   "e.g. liver,kidney,spleen,pancreas (the paper's TotalSegmentator filter)")
    p.add_argument("--label-map", help="pairs layout: organ=value list, e.g. liver=5,spleen=1,kidney=2+3,pancreas=7,tumor=9")
    p.add_argument("--priors", help="folder of predicted label maps (<case_id>.nii.gz) for cases without labels")
    p.add_argument("--split", type=finite_float(0.0, 1.0, lo_open=True), help="training fraction by patient (default 0.8)")
    p.add_argument("--seed", type=int, help="split seed (default 0)")
    p.add_argument("--workers", type=positive_int, default=1, help="parallel patients")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any prepare config value, e.g. --set body_threshold_hu=-400 (repeatable; unknown keys are "
                   "rejected; wins over the options above)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lad.cli import progress_bar
    from lad.data.prepare import load_prepare_config, prepare_dataset

    overrides = {
        "spacing": args.spacing, "size": args.size, "depth": args.depth, "windows": args.windows, "stride": args.stride,
        "organ": args.organ,
        "require": [o.strip() for part in args.require for o in part.split(",") if o.strip()] if args.require else None,
        "split": args.split, "seed": args.seed,
    }
    cfg = load_prepare_config(args.preset, overrides, args.overrides)
    s = prepare_dataset(args.layout, args.input, args.output, cfg, label_map=args.label_map, priors=args.priors,
                        workers=args.workers, overwrite=args.overwrite, progress_bar=progress_bar(args))
    print(f"prepared {s['kept']}/{s['patients']} patients ({s['dropped']} dropped): "
          f"{s['windows_train']} train + {s['windows_test']} test windows of {cfg.depth}x{cfg.size[0]}x{cfg.size[1]} "
          f"in {s['seconds']} s -> {args.output}")
    return 0

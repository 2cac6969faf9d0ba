"""``lad export-window``: one prepared window back to NIfTI (open it in ITK-SNAP / 3D Slicer)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-window", help="write one prepared window as NIfTI (image HU, mask, organs)",
                       description="Write a prepared window's image (HU), Lad mask and organ label map as NIfTI with its geometry.")
    p.add_argument("prepared", help="prepared dataset folder")
    p.add_argument("window_id", help="window id from manifest.json, e.g. Case_00001_w000")
    p.add_argument("--out", required=True, help="folder for the NIfTI files")
    p.add_argument("--overwrite", action="store_true", help="replace existing files of this window in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lad.data.prepare import export_window

    paths = export_window(args.prepared, args.window_id, args.out, overwrite=args.overwrite)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0

"""``lad demo``: phantom -> prepare -> train (Lad and V0) -> sample -> evaluate -> report.html."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from lad.demo import STAGES

    p = sub.add_parser("demo", help="the whole method end to end on the embedded phantom data (about 15 min on 2 CPU cores)",
                       description="Generate phantom CT, prepare it, train Lad (full) and the V0 baseline (Medical Diffusion) "
                       "on the same budget, sample from augmented masks (DDIM, w = 1), evaluate both against held-out "
                       "phantom windows and write DIR/report.html (and DIR/figures/overview.png). Every stage resumes; --from "
                       "re-runs from a stage. See docs/demo.md.")
    p.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    p.add_argument("--preset", choices=["demo", "tiny"], default="demo",
                   help="demo (about 15 min on 2 CPU cores) or tiny (about 1 min, for tests)")
    p.add_argument("--from", dest="start", choices=list(STAGES), help="re-run from this stage")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole demo (data, training, sampling)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for clusters and logs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lad.cli import progress_bar
    from lad.demo import run_demo

    report = run_demo(args.out, preset=args.preset, start=args.start, seed=args.seed, device=args.device,
                      progress_bar=progress_bar(args))
    print(f"demo finished: open {report}")
    return 0

"""``lad downstream ssl`` / ``lad downstream supervised``: does synthetic data help a segmentation model?

Each experiment's parser lives in its own module (``lad.cli.downstream_ssl``,
``lad.cli.downstream_supervised``) exposing ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

EXPERIMENTS = ["downstream_ssl", "downstream_supervised"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("downstream", help="downstream experiments: SSL-ALPNet few-shot and supervised scaling",
                       description="Train segmentation models on real, synthetic or real+synthetic data and measure "
                       "what the synthetic volumes add (paper 4.3; the tumour-scaling protocol).")
    parts = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    for name in EXPERIMENTS:
        modname = f"lad.cli.{name}"
        if importlib.util.find_spec(modname) is not None:
            importlib.import_module(modname).register(parts)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

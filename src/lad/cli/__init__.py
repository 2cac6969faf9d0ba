"""The ``lad`` command line: one thin entry per verb that calls a plain API function.

Each verb lives in ``lad/cli/<module>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit
code). Heavy imports (torch, SimpleITK) happen inside ``func`` so ``lad --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from lad import __version__
from lad.utils.atomic import OutputExistsError
from lad.utils.log import configure_logging, get_logger

# Verb modules in the order the method runs; a module not written yet is simply absent.
VERB_MODULES = [
    "phantom",
    "prepare",
    "export_window",
    "priors",
    "train",
    "sample",
    "features",
    "evaluate",
    "ablate",
    "downstream",
    "demo",
]

# Errors a user can act on: print the message alone, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, KeyError)


def _os_error_line(e: OSError) -> str:
    """``PATH: reason`` for an OS error (``[Errno 28] No space left on device: 'x'`` -> ``x: No space left on device``)."""
    if not e.strerror:
        return str(e)
    where = e.filename if e.filename is not None else None
    if where is None:
        return e.strerror
    tail = f" -> {e.filename2}" if e.filename2 is not None else ""
    return f"{where}{tail}: {e.strerror}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lad",
        description="Locality-Aware Diffusion: realistic 3D abdominal CT generation for self-supervised learning.",
    )
    parser.add_argument("--version", action="version", version=f"lad {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        modname = f"lad.cli.{name}"
        if importlib.util.find_spec(modname) is None:
            continue
        importlib.import_module(modname).register(sub)
    return parser


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """Flags every long-running verb shares."""
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for clusters and logs)")


def progress_bar(args: argparse.Namespace) -> bool:
    """The ``progress_bar`` argument a verb passes down: False with ``--no-progress`` (non-main ranks never show bars)."""
    return not getattr(args, "no_progress", False)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.verb is None else 2
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if isinstance(getattr(args, "device", None), str):
            from lad.cli._args import check_device

            check_device(args.device)
        rc = args.func(args)
    except KeyboardInterrupt:
        get_logger().error("interrupted")
        return 130
    except USER_ERRORS as e:
        if args.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        if isinstance(e, OSError) and e.strerror and not isinstance(e, OutputExistsError):
            msg = _os_error_line(e)
        print(f"lad {args.verb}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # full disk, read-only or missing folder, ...: the path and the OS's reason
        if args.verbose:
            raise
        print(f"lad {args.verb}: error: {_os_error_line(e)}", file=sys.stderr)
        return 2
    return int(rc or 0)

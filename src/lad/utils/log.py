"""Library logger and progress bars.

Library code never prints: it logs through ``get_logger`` and shows progress through ``progress``,
which is silent off the main process (``RANK`` != 0) or when its caller passes ``disable=True``. Whether
bars show is an explicit argument of every long-running function (``progress_bar: bool = True``), which
the command line sets from ``--no-progress``; no global switch or environment variable decides it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

__all__ = ["get_logger", "progress", "is_main_process", "configure_logging"]

_LOGGER_NAME = "lad"


def is_main_process() -> bool:
    """True unless this process is a non-zero rank of a distributed (torchrun) job."""
    return int(os.environ.get("RANK", "0")) == 0


def get_logger(name: str | None = None) -> logging.Logger:
    """The ``lad`` logger (or a child of it)."""
    return logging.getLogger(_LOGGER_NAME if not name else f"{_LOGGER_NAME}.{name.removeprefix('lad.')}")


def configure_logging(level: int | str = logging.INFO) -> None:
    """Attach one stderr handler to the ``lad`` logger (the CLI calls this; libraries should not)."""
    logger = logging.getLogger(_LOGGER_NAME)
    if not any(getattr(h, "_lad", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._lad = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level if is_main_process() else logging.WARNING)
    logger.propagate = False


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", disable: bool = False, **kwargs) -> Iterator[T]:
    """A tqdm progress bar; ``disable`` (the caller's ``progress_bar=False``, ``--no-progress``) or a non-main
    rank switches it off."""
    return tqdm(iterable, total=total, desc=desc, disable=disable or not is_main_process(), dynamic_ncols=True, **kwargs)

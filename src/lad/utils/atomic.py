"""Atomic outputs: everything is written under a temporary name and renamed into place.

A killed process therefore never leaves a half-written file or folder that a later step reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "atomic_dir", "write_json", "write_text", "prepare_output_dir", "OutputExistsError"]


class OutputExistsError(FileExistsError):
    """Raised when an output exists and the user did not ask to overwrite or resume it."""


_UMASK = os.umask(0)
os.umask(_UMASK)


def _publish(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries: give them the usual umask-based mode."""
    with contextlib.suppress(OSError):
        os.chmod(path, mode & ~_UMASK)


def _publish_tree(root: Path) -> None:
    """``_publish`` a folder and everything written into it: some writers (safetensors) create 0600 files."""
    _publish(root, 0o777)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            _publish(Path(dirpath) / d, 0o777)
        for f in filenames:
            p = Path(dirpath) / f
            if not p.is_symlink():
                _publish(p, 0o666)


def _named(e: OSError, final: Path, tmp: Path) -> OSError:
    """The OS error with the output's own path: a failed ``write()`` carries no file name, and the
    temporary name means nothing to the user."""
    if e.errno is None or (e.filename is not None and not str(e.filename).startswith(str(tmp))):
        return e
    out = OSError(e.errno, e.strerror or os.strerror(e.errno), str(final))
    out.__cause__ = e
    return out


def _as_os_error(e: BaseException, final: Path) -> OSError | None:
    """A writer's failure as an ``OSError`` on ``final``, when it is one underneath: safetensors reports
    ``... (os error 28)``, ``torch.save`` a ``RuntimeError`` from its zip writer when the disk is full."""
    import errno
    import re

    if isinstance(e, OSError):
        return e
    text = str(e)
    m = re.search(r"os error (\d+)", text)
    if m:
        return OSError(int(m.group(1)), os.strerror(int(m.group(1))), str(final))
    if isinstance(e, RuntimeError) and any(k in text for k in ("PytorchStreamWriter", "inline_container", "file write failed")):
        try:
            full = shutil.disk_usage(final.parent).free < (1 << 20)
        except OSError:
            full = False
        if full:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final))
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        return OSError(errno.EIO, f"could not write ({first})", str(final))
    return None


def _tmp_name(final: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it to ``final`` when the block succeeds.

    ``suffix`` keeps an extension on the temporary name for writers that infer the format from it
    (for example ``.nii.gz`` for SimpleITK / nibabel, ``.npy`` for numpy).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    if suffix:
        tmp.unlink()
        tmp = tmp.with_name(tmp.name + suffix)
    try:
        yield tmp
        _publish(tmp, 0o666)
        os.replace(tmp, final)
    except Exception as e:
        err = _as_os_error(e, final)
        if err is None:
            raise
        raise _named(err, final, tmp) from None
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; it replaces ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _publish_tree(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except Exception as e:
        err = _as_os_error(e, final)
        if err is None:
            raise
        raise _named(err, final, tmp) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically, UTF-8 whatever the locale (an ASCII locale would fail on a report's dash)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON atomically (numpy scalars and paths are converted)."""

    def default(o: Any) -> Any:
        if hasattr(o, "tolist"):
            return o.tolist()
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    write_text(path, json.dumps(obj, indent=indent, default=default) + "\n")


def prepare_output_dir(path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create an output folder, refusing to reuse a non-empty one unless told to.

    ``resume=True`` keeps the existing content (the caller skips finished work);
    ``overwrite=True`` deletes it first. Otherwise a non-empty folder raises ``OutputExistsError``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path}: exists and is not a folder")
    if path.exists() and any(path.iterdir()):
        if overwrite:
            shutil.rmtree(path)
        elif not resume:
            raise OutputExistsError(
                f"{path}: output folder exists and is not empty; pass --resume to continue it "
                "or --overwrite to replace it"
            )
    path.mkdir(parents=True, exist_ok=True)
    return path

"""Massive, resumable, shardable writing of synthetic samples.

The sample index alone decides everything about a sample: its seed (``derive_seed(seed, index)``),
its source mask (``index % len(masks)``) and so its augmentation. Therefore

* a killed run restarted with the same command writes only the missing samples;
* ``--shard i/k`` takes the indices ``j`` with ``j % k == i``; the union over shards equals one run;
* under ``torchrun`` each rank takes shard ``RANK/WORLD_SIZE`` automatically.

Per sample ``j`` the folder holds ``samples/sample_{j:06d}_ct.nii.gz`` (HU), ``..._mask.nii.gz`` (the
augmented condition) and, written last, ``records/sample_{j:06d}.json``: the sample is finished
exactly when its record exists. ``manifest.jsonl`` is rebuilt from all records (atomically) at the
end of every process, so the last shard to finish leaves the complete manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lad.utils.atomic import write_json, write_text

__all__ = ["parse_shard", "shard_indices", "SampleFolder", "finished_samples"]


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/k"`` -> ``(i, k)``; ``None`` -> the torchrun rank's shard (or ``(0, 1)``)."""
    if text is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        i, k = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard expects i/k (e.g. 0/4), got {text!r}") from None
    if not (k >= 1 and 0 <= i < k):
        raise ValueError(f"--shard {text}: need 0 <= i < k")
    return i, k


def shard_indices(n: int, shard: tuple[int, int]) -> list[int]:
    """Sample indices of one shard: ``j`` in ``range(n)`` with ``j % k == i``."""
    i, k = shard
    return list(range(i, n, k))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SampleFolder:
    """The output folder of ``lad sample``: settings, samples, per-sample records, manifest."""

    SETTINGS = "sampling.json"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.samples = self.root / "samples"
        self.records = self.root / "records"

    def _differences(self, settings: dict[str, Any]) -> list[str] | None:
        """Keys (besides ``n``) whose saved value differs from ``settings``; None when nothing is saved."""
        path = self.root / self.SETTINGS
        if not path.exists():
            return None
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{path}: corrupt settings file; pass --overwrite to start the folder again") from None
        skip = {"n"} | ({"masks_fingerprint"} - set(old))  # folders from before fingerprints: nothing to compare
        return sorted(k for k in set(old) | set(settings) if k not in skip and old.get(k) != settings.get(k))

    def check(self, settings: dict[str, Any], *, overwrite: bool = False) -> None:
        """Refuse (``FileExistsError``) a folder that ``open`` would not resume; writes nothing."""
        diff = self._differences(settings)
        if diff == ["masks_fingerprint"] and not any(self.records.glob("sample_*.json")):
            return  # no sample was finished from the old masks (e.g. a run stopped by a bad mask, now fixed)
        if diff and not overwrite:
            if diff == ["masks_fingerprint"]:
                raise FileExistsError(
                    f"{self.root}: the mask source {settings.get('masks')} changed since these samples were made (a mask "
                    "added, removed, modified or truncated); their records no longer hold: pass --overwrite to start "
                    "again, or use another --out")
            raise FileExistsError(
                f"{self.root}: holds samples made with other settings ({', '.join(diff)}); use another --out or pass --overwrite"
            )
        if diff is None and self.root.exists() and not self.root.is_dir():
            raise FileExistsError(f"{self.root}: exists and is not a folder")
        if diff is None and self.root.is_dir() and any(not p.name.startswith(".lock.") for p in self.root.iterdir()) \
                and not overwrite:
            raise FileExistsError(f"{self.root}: exists and is not a lad sample folder; use another --out or --overwrite")

    def open(self, settings: dict[str, Any], *, overwrite: bool = False) -> None:
        """Create the folder, or reuse it when it was made with the same settings (resume).

        Different settings (other run, guidance, sampler, mask source fingerprint, ...) raise
        ``FileExistsError`` unless ``overwrite``, which deletes the previous samples first.
        """
        path = self.root / self.SETTINGS
        self.check(settings, overwrite=overwrite)
        if path.exists():
            same = not self._differences(settings)
            if not same and overwrite:
                import shutil

                for p in (self.samples, self.records):
                    shutil.rmtree(p, ignore_errors=True)
        self.samples.mkdir(parents=True, exist_ok=True)
        self.records.mkdir(parents=True, exist_ok=True)
        # n may grow between runs (ask for more samples later): keep the largest
        if path.exists():
            settings = {**settings, "n": max(int(json.loads(path.read_text()).get("n", 0)), int(settings.get("n", 0)))}
        write_json(path, settings)

    def lock(self, shard: tuple[int, int]) -> Path:
        """Take ``.lock.<i>-of-<k>`` (holder's pid and host) for this shard; returns its path.

        Refuses (``FileExistsError``, naming the holder) while another live process holds a lock whose
        shard shares sample indices with ``shard`` (``i1 = i2 mod gcd(k1, k2)``); a lock left by a dead
        process on this host is taken over. Release it with ``unlock``.
        """
        import math
        import socket

        self.root.mkdir(parents=True, exist_ok=True)
        i, k = shard
        host = socket.gethostname()
        for other in self.root.glob(".lock.*-of-*"):
            try:
                oi, ok = (int(x) for x in other.name[len(".lock."):].split("-of-"))
                holder = json.loads(other.read_text())
            except (ValueError, OSError):
                continue  # half-written by a process starting right now, or removed meanwhile
            if (i - oi) % math.gcd(k, ok):
                continue  # disjoint shards may run at the same time
            pid, ohost = int(holder.get("pid", -1)), holder.get("host")
            if ohost == host and pid != os.getpid() and not _alive(pid):
                other.unlink(missing_ok=True)  # its process is gone (killed): the lock is stale
                continue
            raise FileExistsError(
                f"{other}: samples of this folder are being written by pid {pid} on host {ohost} (shard {oi}/{ok}); "
                "wait for it to finish, or delete the lock file if that process is gone")
        path = self.root / f".lock.{i}-of-{k}"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise FileExistsError(f"{path}: another process took the lock of this shard at the same time") from None
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": host}, f)
        return path

    @staticmethod
    def unlock(path: Path) -> None:
        path.unlink(missing_ok=True)

    def record_path(self, index: int) -> Path:
        return self.records / f"sample_{index:06d}.json"

    def sample_paths(self, index: int, fmt: str = "nifti") -> dict[str, Path]:
        ext = ".nii.gz" if fmt == "nifti" else ".npy"
        return {
            "ct": self.samples / f"sample_{index:06d}_ct{ext}",
            "mask": self.samples / f"sample_{index:06d}_mask{ext}",
        }

    def is_done(self, index: int) -> bool:
        return self.record_path(index).exists()

    def write_record(self, index: int, record: dict[str, Any]) -> None:
        write_json(self.record_path(index), record)

    def rebuild_manifest(self) -> int:
        """Rewrite ``manifest.jsonl`` from every finished record, sorted by index; returns the count."""
        records = sorted(self.records.glob("sample_*.json"))
        lines = [json.dumps(json.loads(p.read_text()), sort_keys=True) for p in records]
        write_text(self.root / "manifest.jsonl", "".join(line + "\n" for line in lines))
        return len(lines)

    def read_manifest(self) -> list[dict[str, Any]]:
        path = self.root / "manifest.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished_samples(folder: str | Path, keys: tuple[str, ...] = ("ct",)) -> list[tuple[dict[str, Any], dict[str, Path]]]:
    """``(record, {key: file})`` of every finished sample of a ``lad sample`` folder, in manifest order, for the
    record's ``files`` entries ``keys``. Raises ``FileNotFoundError`` for a missing folder, manifest or listed
    file and ``ValueError`` for a line that is not a sample record or a folder with no finished sample."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: synthetic samples folder does not exist (give a `lad sample` output folder)")
    manifest = folder / "manifest.jsonl"
    if not manifest.exists():
        raise FileNotFoundError(f"{folder}: not a lad sample folder (no manifest.jsonl; run `lad sample` first)")
    out = []
    for n, line in enumerate(manifest.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            files = {k: folder / rec["files"][k] for k in keys}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{manifest}: line {n + 1} is not a sample record ({e})") from None
        for f in files.values():
            if not f.exists():
                raise FileNotFoundError(f"{f}: listed in {manifest} but missing")
        out.append((rec, files))
    if not out:
        raise ValueError(f"{folder}: the samples folder holds no finished samples")
    return out

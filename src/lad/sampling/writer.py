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

__all__ = ["parse_shard", "shard_indices", "SampleFolder"]


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


class SampleFolder:
    """The output folder of ``lad sample``: settings, samples, per-sample records, manifest."""

    SETTINGS = "sampling.json"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.samples = self.root / "samples"
        self.records = self.root / "records"

    def open(self, settings: dict[str, Any], *, overwrite: bool = False) -> None:
        """Create the folder, or reuse it when it was made with the same settings (resume).

        Different settings (other run, guidance, sampler, ...) raise ``FileExistsError`` unless
        ``overwrite``, which deletes the previous samples first.
        """
        path = self.root / self.SETTINGS
        if path.exists():
            old = json.loads(path.read_text())
            same = {k: v for k, v in old.items() if k != "n"} == {k: v for k, v in settings.items() if k != "n"}
            if not same and not overwrite:
                diff = sorted(k for k in set(old) | set(settings) if k != "n" and old.get(k) != settings.get(k))
                raise FileExistsError(
                    f"{self.root}: holds samples made with other settings ({', '.join(diff)}); "
                    "use another --out or pass --overwrite"
                )
            if not same and overwrite:
                import shutil

                for p in (self.samples, self.records):
                    shutil.rmtree(p, ignore_errors=True)
        elif self.root.exists() and any(self.root.iterdir()) and not overwrite:
            raise FileExistsError(f"{self.root}: exists and is not a lad sample folder; use another --out or --overwrite")
        self.samples.mkdir(parents=True, exist_ok=True)
        self.records.mkdir(parents=True, exist_ok=True)
        # n may grow between runs (ask for more samples later): keep the largest
        if path.exists():
            settings = {**settings, "n": max(int(json.loads(path.read_text()).get("n", 0)), int(settings.get("n", 0)))}
        write_json(path, settings)

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

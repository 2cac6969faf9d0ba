"""Resume checkpoints: ``RUN/checkpoints/<part>/step_XXXXXXX/`` (atomic; keep the last N, plus ``best``).

One checkpoint folder holds

* ``<module>.safetensors`` for every module (model, discriminators, EMA copy): tensors only;
* ``<optimizer>.pt`` for every optimiser (and the fp16 ``GradScaler`` when used): ``torch.save`` of
  plain tensors / numbers / dicts, loadable with ``torch.load(weights_only=True)``;
* ``trainer_state.pt``: the step, the RNG states (torch CPU, CUDA when present, numpy, python) and the
  data-order state (seed, epoch, position in the epoch's permutation), also ``weights_only`` loadable;
* ``state.json``: the step and the running loss, human-readable.

The folder is written under a temporary name and renamed when complete (``lad.utils.atomic.atomic_dir``):
a job killed mid-write leaves the previous checkpoints intact and no half-written ``step_*`` folder.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lad.utils.atomic import atomic_dir, write_json
from lad.utils.log import get_logger

__all__ = ["CheckpointManager", "capture_rng_state", "restore_rng_state"]

log = get_logger(__name__)

_STEP = re.compile(r"step_(\d+)")


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states as ``weights_only``-loadable values (tensors, ints, lists, strings)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Save / list / load the resume checkpoints of one training part.

    ``keep_last`` step folders are kept (older ones are deleted after a new one is complete); the
    checkpoint with the lowest finite ``metric`` (a running training loss) is also kept as ``best/``.
    """

    def __init__(self, root: str | Path, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = keep_last

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        if not self.root.exists():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if p.is_dir() and (m := _STEP.fullmatch(p.name)))

    def folder(self, step: int) -> Path:
        return self.root / f"step_{step:07d}"

    def best_metric(self) -> float:
        f = self.root / "best" / "state.json"
        if not f.exists():
            return math.inf
        v = json.loads(f.read_text()).get("metric")
        return math.inf if v is None else float(v)

    def save(self, step: int, modules: dict[str, torch.nn.Module], optimizers: dict[str, Any],
             trainer_state: dict[str, Any] | None = None, metric: float | None = None) -> Path:
        """Write checkpoint ``step`` atomically; prune old ones; refresh ``best`` when ``metric`` improved."""
        final = self.folder(step)
        with atomic_dir(final) as tmp:
            for name, mod in modules.items():
                state = {k: v.detach().contiguous().cpu() for k, v in mod.state_dict().items()}
                save_file(state, str(tmp / f"{name}.safetensors"))
            for name, opt in optimizers.items():
                torch.save(opt.state_dict(), tmp / f"{name}.pt")
            torch.save({"step": step, **(trainer_state or {})}, tmp / "trainer_state.pt")
            finite = metric is not None and math.isfinite(metric)
            write_json(tmp / "state.json", {"step": step, "metric": metric if finite else None})
        if metric is not None and math.isfinite(metric) and metric < self.best_metric():
            with atomic_dir(self.root / "best") as tmp:
                shutil.copytree(final, tmp, dirs_exist_ok=True)
        if self.keep_last > 0:
            for old in self.steps()[: -self.keep_last]:
                shutil.rmtree(self.folder(old), ignore_errors=True)
        return final

    def load(self, folder: Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, Any],
             device: torch.device | str = "cpu") -> dict[str, Any]:
        """Load ``folder`` into ``modules`` / ``optimizers``; returns the trainer state (``step``, RNG, ...)."""
        for name, mod in modules.items():
            mod.load_state_dict(load_file(str(folder / f"{name}.safetensors"), device=str(device)))
        for name, opt in optimizers.items():
            opt.load_state_dict(torch.load(folder / f"{name}.pt", map_location=device, weights_only=True))
        if not (folder / "trainer_state.pt").exists():  # written before trainer states existed: step only
            return json.loads((folder / "state.json").read_text())
        return torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)

    def load_latest(self, modules: dict[str, torch.nn.Module], optimizers: dict[str, Any],
                    device: torch.device | str = "cpu") -> dict[str, Any] | None:
        """Load the newest complete checkpoint; ``None`` when there is none (training starts at step 0)."""
        steps = self.steps()
        if not steps:
            return None
        failures = []
        for step in reversed(steps):  # a corrupt newest checkpoint: fall back to the previous complete one
            folder = self.folder(step)
            try:
                state = self.load(folder, modules, optimizers, device)
            except Exception as e:  # safetensors, torch.load and JSON raise several types for damaged files
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                failures.append(f"{folder}: {reason}")
                log.warning("%s is unreadable (%s); trying the previous checkpoint", folder, reason)
                continue
            if failures:
                log.warning("resuming from %s (step %d) instead of the newest checkpoint, which is corrupt: %s",
                            folder, state["step"], "; ".join(failures))
            else:
                log.info("resuming from %s (step %d)", folder, state["step"])
            return state
        raise ValueError(f"{self.root}: every checkpoint is corrupt ({'; '.join(failures)}); pass --overwrite to "
                         "start this part again")

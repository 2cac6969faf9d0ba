"""What both trainers share: run folders, data order, resume checkpoints, logging, the NaN guard.

Determinism: the batch of step ``s`` and every random draw inside the step come from seeds derived
from ``(seed, s)``, so a resumed run needs only the weights, optimiser states and the step number
to continue bit-for-bit where the killed run stopped.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lad.utils.atomic import atomic_dir, write_json
from lad.utils.log import get_logger, is_main_process
from lad.utils.seed import derive_seed

__all__ = [
    "resolve_device", "batch_indices", "step_generator", "seed_step", "CheckpointManager", "NonFiniteGuard",
    "Logger", "autocast", "gather_batch", "check_run_part",
]

log = get_logger(__name__)


def resolve_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available on this machine (use --device cpu)")
    return dev


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Dataset indices of the batch of ``step``: a fresh permutation per epoch from ``(seed, epoch)``."""
    if n == 0:
        raise ValueError("the training split is empty")
    out = np.empty(batch_size, np.int64)
    for i in range(batch_size):
        k = step * batch_size + i
        epoch, pos = divmod(k, n)
        out[i] = np.random.default_rng([seed, epoch]).permutation(n)[pos]
    return out


def step_generator(seed: int, step: int, part: str) -> torch.Generator:
    """The CPU generator for random draws inside one training step."""
    return torch.Generator().manual_seed(derive_seed(seed, part, step))


def seed_step(seed: int, step: int, part: str) -> None:
    """Seed the global torch RNG for draws that libraries make from it (e.g. codebook restarts)."""
    torch.manual_seed(derive_seed(seed, part, "global", step))


def gather_batch(dataset, indices: Iterable[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Stack the prepared-dataset items ``indices`` into tensors on ``device``; validate masks."""
    items = [dataset[int(i)] for i in indices]
    image = torch.from_numpy(np.stack([it["image"] for it in items]))
    mask = np.stack([it["mask"] for it in items])
    if mask.max(initial=0) > 2:
        bad = [it["meta"]["id"] for it in items if it["mask"].max() > 2]
        raise ValueError(f"{dataset.path}: window(s) {bad} have mask labels outside {{0, 1, 2}}")
    return {"image": image.to(device, non_blocking=True), "mask": torch.from_numpy(mask).to(device, non_blocking=True)}


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` (fp32 = off). bf16 on these CPUs is ~400x slower: opt-in only."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_run_part(run: Path, part_dirs: list[str], *, resume: bool, overwrite: bool) -> None:
    """Refuse to train over an existing part without ``--resume`` or ``--overwrite``; ``--overwrite`` clears it."""
    existing = [d for d in part_dirs if (run / d).exists()]
    if existing and not (resume or overwrite):
        raise FileExistsError(
            f"{run}: already holds {', '.join(existing)}; pass --resume to continue or --overwrite to retrain"
        )
    if overwrite and not resume:
        for d in existing:
            shutil.rmtree(run / d) if (run / d).is_dir() else (run / d).unlink()


class CheckpointManager:
    """Resume checkpoints in ``RUN/checkpoints/<part>/step_XXXXXXX/`` (atomic; keep the last N).

    Tensors go to safetensors; optimiser states to ``torch.save`` files whose content (tensors, numbers,
    dicts) loads with ``torch.load(weights_only=True)``; the step to ``state.json``.
    """

    def __init__(self, root: Path, keep_last: int = 3):
        self.root = root
        self.keep_last = keep_last

    def steps(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name)))

    def save(self, step: int, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             extra: dict[str, Any] | None = None) -> Path:
        final = self.root / f"step_{step:07d}"
        with atomic_dir(final) as tmp:
            for name, mod in modules.items():
                state = {k: v.detach().contiguous().cpu() for k, v in mod.state_dict().items()}
                save_file(state, str(tmp / f"{name}.safetensors"))
            for name, opt in optimizers.items():
                torch.save(opt.state_dict(), tmp / f"{name}.pt")
            write_json(tmp / "state.json", {"step": step, **(extra or {})})
        for old in self.steps()[: -self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(self.root / f"step_{old:07d}", ignore_errors=True)
        return final

    def load_latest(self, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    device: torch.device) -> dict[str, Any] | None:
        steps = self.steps()
        if not steps:
            return None
        folder = self.root / f"step_{steps[-1]:07d}"
        for name, mod in modules.items():
            mod.load_state_dict(load_file(str(folder / f"{name}.safetensors"), device=str(device)))
        for name, opt in optimizers.items():
            opt.load_state_dict(torch.load(folder / f"{name}.pt", map_location=device, weights_only=True))
        state = json.loads((folder / "state.json").read_text())
        log.info("resuming from %s (step %d)", folder, state["step"])
        return state


class NonFiniteGuard:
    """Skip steps whose loss is NaN/inf; stop with a clear error after ``limit`` in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.skipped = limit, 0, 0

    def ok(self, loss: torch.Tensor, step: int) -> bool:
        if bool(torch.isfinite(loss)):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        log.warning("step %d: non-finite loss (%s); step skipped", step, float(loss.detach()))
        if self.in_a_row >= self.limit:
            raise RuntimeError(
                f"training stopped: {self.in_a_row} consecutive non-finite losses at step {step}; no checkpoint was "
                "written from this state. Lower the learning rate, use --set precision=fp32, or check the data "
                "(docs/troubleshooting.md)"
            )
        return False


class Logger:
    """TensorBoard writer on the main process only; scalars are reduced on the host every ``log_every`` steps."""

    def __init__(self, logdir: Path, enabled: bool = True, jsonl: Path | None = None):
        self.writer = None
        self.jsonl = jsonl if is_main_process() else None
        if enabled and is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(logdir))
        self._acc: dict[str, list[torch.Tensor]] = {}

    def accumulate(self, logs: dict[str, torch.Tensor]) -> None:
        for k, v in logs.items():
            self._acc.setdefault(k, []).append(v.detach().float())

    def flush(self, step: int, prefix: str, extra: dict[str, float] | None = None) -> dict[str, float]:
        means = {k: float(torch.stack(v).mean()) for k, v in self._acc.items()}  # one host sync per log interval
        self._acc.clear()
        if extra:
            means.update(extra)
        if self.writer is not None:
            for k, v in means.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
        if self.jsonl is not None:  # the same scalars as JSON lines, for reports and scripts
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"step": step, **means}) + "\n")
        return means

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, grid, step, dataformats="HW")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def slice_grid(volumes: list[torch.Tensor]) -> np.ndarray:
    """Rows of axial (middle) and coronal (middle) slices of (1, D, H, W) volumes in [0, 1] -> (H', W') float."""
    rows = []
    for v in volumes:
        v = v.detach().float().cpu().clamp(0, 1)[0]
        d, h, w = v.shape
        axial = v[d // 2].numpy()
        coronal = np.repeat(v[:, h // 2, :].flip(0).numpy(), max(1, h // max(d, 1)), axis=0)[:h]
        pad = np.zeros((h, w))
        pad[: coronal.shape[0]] = coronal
        rows.append(np.concatenate([axial, pad], axis=1))
    return np.concatenate(rows, axis=0)

"""What the trainers share besides the loop (``lad.training.loop``): devices, data order and validation,
run-folder and resume-config checks, checkpoints, logging, the NaN guard.

Determinism: the batch of step ``s`` and every random draw inside the step come from seeds derived
from ``(seed, s)``, so a resumed run needs only the weights, optimiser states and the step number
to continue bit-for-bit where the killed run stopped (the global RNG states and the data-order
state are stored in the checkpoint as well, ``lad.training.checkpoint``, and restored on resume).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from lad.training.checkpoint import CheckpointManager  # noqa: F401  (re-exported: the downstream trainers import it from here)
from lad.utils.distributed import all_reduce_mean, all_reduce_min_bool, barrier, broadcast_object, is_distributed
from lad.utils.log import get_logger, is_main_process, progress
from lad.utils.seed import derive_seed

__all__ = [
    "resolve_device", "batch_indices", "step_generator", "seed_step", "CheckpointManager", "NonFiniteGuard",
    "Logger", "autocast", "make_grad_scaler", "gather_batch", "check_run_part", "validate_dataset", "data_state",
    "save_checkpoint", "load_latest_checkpoint", "DOWNSTREAM_OF_VQGAN", "check_downstream", "remove_downstream",
    "open_training_data", "changed_keys", "check_resume_config",
]

log = get_logger(__name__)


def resolve_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available on this machine (use --device cpu)")
    return dev


def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Dataset indices of the batch of ``step``: a fresh permutation per epoch from ``(seed, epoch)``.

    A pure function of its arguments, so the data order after a resume is the uninterrupted one. Under
    torchrun ``batch_size`` is the global batch and rank ``r`` of ``w`` takes ``batch_indices(...)[r::w]``
    (``lad.training.parallel.shard_batch``).
    """
    if n == 0:
        raise ValueError("the training split is empty")
    out = np.empty(batch_size, np.int64)
    perms: dict[int, np.ndarray] = {}
    for i in range(batch_size):
        epoch, pos = divmod(step * batch_size + i, n)
        if epoch not in perms:
            perms[epoch] = _epoch_permutation(seed, epoch, n)
        out[i] = perms[epoch][pos]
    return out


def data_state(step: int, batch_size: int, n: int, seed: int) -> dict[str, int]:
    """The data-order state after ``step`` steps (stored in resume checkpoints): seed, epoch, position."""
    epoch, pos = divmod(step * batch_size, n)
    return {"seed": seed, "epoch": epoch, "position": pos, "batch_size": batch_size, "num_windows": n}


def step_generator(seed: int, step: int, part: str) -> torch.Generator:
    """The CPU generator for random draws inside one training step."""
    return torch.Generator().manual_seed(derive_seed(seed, part, step))


def seed_step(seed: int, step: int, part: str) -> None:
    """Seed the global torch RNG for draws that libraries make from it (e.g. codebook restarts)."""
    torch.manual_seed(derive_seed(seed, part, "global", step))


def gather_batch(dataset, indices: Iterable[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Stack the items ``indices`` of ``dataset`` (a ``PreparedDataset`` or any Dataset of such items) into tensors
    on ``device``; validate masks and shapes."""
    indices = [int(i) for i in indices]
    items = [dataset[i] for i in indices]
    where = getattr(dataset, "path", None) or f"<{type(dataset).__name__}>"

    def ids(bad):
        return [it["meta"]["id"] if isinstance(it.get("meta"), dict) and "id" in it["meta"] else i for i, it in bad]

    shapes = {tuple(np.shape(it["image"])) for it in items} | {tuple(np.shape(it["mask"])) for it in items}
    if len(shapes) > 1:
        raise ValueError(f"{where}: items {ids(zip(indices, items))} have images/masks of different shapes {sorted(shapes)}; "
                         "every window must have one (1, D, H, W) shape")
    image = torch.from_numpy(np.stack([np.asarray(it["image"], dtype=np.float32) for it in items]))
    mask = np.stack([it["mask"] for it in items])
    if mask.max(initial=0) > 2:
        bad = ids([(i, it) for i, it in zip(indices, items) if np.max(it["mask"]) > 2])
        raise ValueError(f"{where}: window(s) {bad} have mask labels outside {{0, 1, 2}}")
    return {"image": image.to(device, non_blocking=True), "mask": torch.from_numpy(mask).to(device, non_blocking=True)}


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` (fp32 = off). bf16 on these CPUs is ~400x slower: opt-in only."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 on CUDA; a disabled (pass-through) scaler otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")


def validate_dataset(ds, divisible_by: tuple[int, ...] | None = None, *, progress_bar: bool = True) -> None:
    """Refuse a training split that would fail mid-run: no windows, mixed window shapes, mask labels
    outside {0, 1, 2}, or a window shape that the VQ-GAN compression does not divide.

    A ``PreparedDataset``: reads array headers and the (uint8) masks once, patient by patient, from their memory
    maps. Another Dataset: its first item (every batch's shapes and labels are checked again as it is loaded).
    """
    from lad.data.dataset import PreparedDataset, describe_dataset

    if not isinstance(ds, PreparedDataset):
        if len(ds) == 0:
            raise ValueError(f"<{type(ds).__name__}>: the dataset has no items")
        info = describe_dataset(ds)
        if divisible_by is not None and any(s % f for s, f in zip(info.shape, divisible_by)):
            raise ValueError(f"{info.name}: window shape {info.shape} is not divisible by the VQ-GAN compression {tuple(divisible_by)}")
        gather_batch(ds, [0], torch.device("cpu"))  # item 0's mask: present, same shape, labels in {0, 1, 2}
        return
    if len(ds) == 0:
        raise ValueError(f"{ds.path}: the {ds.split} split has no windows")
    if divisible_by is not None and any(s % f for s, f in zip(ds.shape, divisible_by)):
        raise ValueError(f"{ds.path}: window shape {tuple(ds.shape)} is not divisible by the VQ-GAN compression {tuple(divisible_by)}")
    patients = sorted({w["patient"] for w in ds.windows})
    for pid in progress(patients, desc="check data", unit="patient", disable=not progress_bar):
        arrays = ds._patient(pid)
        for key in ("image", "mask"):
            shape = tuple(arrays[key].shape[1:])
            if shape != tuple(ds.shape):
                raise ValueError(f"{ds.path / 'patients' / pid / (key + '.npy')}: windows of shape {shape}, but the dataset's "
                                 f"manifest says {tuple(ds.shape)}: mixed window shapes (re-run `lad prepare`)")
        top = int(np.max(arrays["mask"], initial=0))
        if top > 2:
            raise ValueError(f"{ds.path / 'patients' / pid / 'mask.npy'}: mask label {top} outside {{0, 1, 2}}")


def open_training_data(data, cfg, *, progress_bar: bool = True):
    """The training windows of ``data`` (a prepared dataset folder: its train split; or a Dataset object),
    validated (shapes, labels, divisible by the VQ-GAN compression ``cfg.vqgan.downsample``)."""
    from lad.data.dataset import open_dataset

    ds = open_dataset(data, split="train")
    validate_dataset(ds, tuple(cfg.vqgan.downsample), progress_bar=progress_bar)
    return ds


def changed_keys(old: dict, new: dict, *, keys=None, ignore=()) -> list[str]:
    """The keys (``keys``, default all of both) whose values differ between the settings a run was started with
    (``old``, as read back from its JSON/YAML file) and ``new``; tuples and lists compare alike (the files hold lists)."""

    def plain(v):
        return json.loads(json.dumps(v, sort_keys=True, default=list))

    keys = sorted(set(old) | set(new)) if keys is None else list(keys)
    return [k for k in keys if k not in ignore and plain(old.get(k)) != plain(new.get(k))]


def check_resume_config(run: Path, cfg, sections: tuple[str, ...]) -> None:
    """On ``--resume``, refuse a config whose ``sections`` differ from ``RUN/config.yaml`` (except ``steps``)."""
    from lad.config import to_dict
    import yaml

    for part, key in (("vqgan", "vqgan_train"), ("diffusion", "diffusion_train")):
        done = CheckpointManager(run / "checkpoints" / part).steps()
        if key in sections and done and done[-1] > getattr(cfg, key).steps:
            raise ValueError(f"{run / 'checkpoints' / part}: --resume with {key}.steps={getattr(cfg, key).steps}, but the "
                             f"newest checkpoint is already at step {done[-1]}; resume with at least that many steps")
    f = run / "config.yaml"
    if not f.exists():
        return
    saved, new = yaml.safe_load(f.read_text()) or {}, to_dict(cfg)
    defaults = to_dict(type(cfg)())  # a key the run's config predates had its default value then
    for sec in sections:
        if sec not in saved:
            continue
        a, b = saved[sec], new.get(sec)
        if not isinstance(a, dict):
            if a != b:
                raise ValueError(f"{f}: --resume with {sec}={b!r}, but the run was started with {sec}={a!r}")
            continue
        diff = changed_keys({**defaults.get(sec, {}), **a}, dict(b or {}), ignore=("steps",))
        if diff:
            raise ValueError(f"{f}: --resume with a different {sec} config (keys {diff}); resume with the run's own "
                             "config (--preset/--set as before) or start a new run")


def check_run_part(run: Path, part_dirs: list[str], *, resume: bool, overwrite: bool) -> None:
    """Refuse to train over an existing part without ``--resume`` or ``--overwrite``; ``--overwrite`` clears it."""
    if resume and overwrite:
        raise ValueError("pass either --resume or --overwrite, not both")
    existing = [d for d in part_dirs if (run / d).exists()]
    if existing and not (resume or overwrite):
        raise FileExistsError(
            f"{run}: already holds {', '.join(existing)}; pass --resume to continue or --overwrite to retrain"
        )
    if overwrite and not resume and is_main_process():  # under torchrun rank 0 deletes, the others wait
        for d in existing:
            shutil.rmtree(run / d) if (run / d).is_dir() else (run / d).unlink()
    barrier()


# What depends on the VQ-GAN's weights: trained on (or computed from) its latents.
DOWNSTREAM_OF_VQGAN = ["denoiser", "denoiser_ema", "condition", "condition_raw", "scheduler", "checkpoints/diffusion",
                       "latent_cache", "latent_stats.json"]


def check_downstream(run: Path, cfg, *, resume: bool, overwrite: bool, discard: bool) -> list[str]:
    """The diffusion parts a VQ-GAN training would invalidate (to delete once training may start).

    Raises ``FileExistsError`` naming them unless ``discard``. Nothing is invalidated when the VQ-GAN
    will not change (``resume`` with its newest checkpoint already at ``vqgan_train.steps``)."""
    existing = [d for d in DOWNSTREAM_OF_VQGAN if (run / d).exists()]
    if not any(d != "latent_cache" for d in existing) or not (resume or overwrite):  # a cache alone is keyed by the hash
        return []  # without --resume/--overwrite an existing VQ-GAN is refused by check_run_part
    done = CheckpointManager(run / "checkpoints" / "vqgan").steps()
    if resume and not overwrite and done and done[-1] >= cfg.vqgan_train.steps and (run / "vqgan").exists():
        return []
    if not discard:
        raise FileExistsError(
            f"{run}: holds a diffusion model trained on this VQ-GAN's latents ({', '.join(existing)}); a changed VQ-GAN "
            "would leave it paired with latents it never saw. Pass --discard-diffusion to delete it with this command "
            "(then retrain it: lad train diffusion), or train the VQ-GAN in a copy of the run folder")
    return existing


def remove_downstream(run: Path, parts: list[str]) -> None:
    """Delete the invalidated diffusion parts (rank 0; the others wait)."""
    if parts and is_main_process():
        log.warning("%s: deleting the diffusion model trained on the previous VQ-GAN's latents: %s", run, ", ".join(parts))
        for d in parts:
            shutil.rmtree(run / d) if (run / d).is_dir() else (run / d).unlink()
    barrier()


class NonFiniteGuard:
    """Skip steps whose loss or gradient norm is NaN/inf; stop with a clear error after ``limit`` in a row.

    The check is one boolean read back per step (as ``GradScaler`` does for fp16): the optimiser step
    must be skipped on the host, and it is negligible next to a 3D network step. Under torch.distributed
    the flag is AND-reduced over the ranks first, so all ranks skip the same steps and stop together.
    """

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.skipped = limit, 0, 0

    def ok(self, loss: torch.Tensor, step: int, grad_norm: torch.Tensor | None = None) -> bool:
        finite = torch.isfinite(loss.detach()).all()
        if grad_norm is not None:
            finite = finite & torch.isfinite(grad_norm).all()
        if bool(all_reduce_min_bool(finite)):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        what = f"loss {float(loss.detach())}" + ("" if grad_norm is None else f", gradient norm {float(grad_norm)}")
        log.warning("step %d: non-finite %s; step skipped (%d in a row)", step, what, self.in_a_row)
        if self.in_a_row >= self.limit:
            raise RuntimeError(
                f"training stopped: {self.in_a_row} consecutive non-finite losses at step {step}; no checkpoint was "
                "written from this state. Lower the learning rate, use --set precision=fp32, or check the data "
                "(docs/troubleshooting.md)"
            )
        return False


class Logger:
    """TensorBoard writer on the main process only; scalars are reduced on the host every ``log_every`` steps.

    Under torch.distributed ``flush`` (called by every rank at the same steps) averages the accumulated
    scalars over the ranks (one all-reduce per log interval), so rank 0 logs the global batch's values.
    """

    def __init__(self, logdir: Path, enabled: bool = True, jsonl: Path | None = None, device: torch.device | str = "cpu"):
        self.writer, self.device = None, device
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
        means = all_reduce_mean(means, self.device)
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


def save_checkpoint(ckpt: CheckpointManager, *args, **kwargs) -> None:
    """``ckpt.save`` on rank 0 only; every rank waits until it is complete (so any rank may read it)."""
    if is_main_process():
        ckpt.save(*args, **kwargs)
    barrier()


def load_latest_checkpoint(ckpt: CheckpointManager, modules, optimizers, device) -> dict | None:
    """The newest checkpoint, the same one on every rank: rank 0 picks the step, all ranks load that folder
    (the run folder must be on a filesystem every node sees, docs/distributed.md)."""
    if not is_distributed():
        return ckpt.load_latest(modules, optimizers, device)
    # rank 0 loads the newest readable checkpoint (falling back past corrupt ones) and tells the others which
    picked = None
    if is_main_process():
        try:
            state = ckpt.load_latest(modules, optimizers, device)
            picked = ("ok", None if state is None else int(state["step"]))
        except ValueError as e:
            picked = ("error", str(e))
    picked = broadcast_object(picked)
    if picked[0] == "error":
        raise ValueError(picked[1])
    if picked[1] is None:
        return None
    folder = ckpt.folder(picked[1])
    if is_main_process():
        return state
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: rank 0's newest checkpoint is not visible on this node; the run folder "
                                "must be on a filesystem shared by all nodes")
    return ckpt.load(folder, modules, optimizers, device)


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

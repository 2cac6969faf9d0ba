"""PyTorch distributed (``torchrun``) set-up for ``lad``: process group, device, rank helpers.

``torchrun --nproc_per_node K -m lad train ...`` (or ``-m lad sample ...``) starts K processes with
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment.
:func:`init_distributed` reads them and joins the process group: backend NCCL for a CUDA device (one
GPU per process, ``cuda`` -> ``cuda:LOCAL_RANK``), Gloo for CPU. Without those variables (a plain
``lad ...``) everything here is a no-op: rank 0 of a world of 1. Multi-node jobs need no code change
(torchrun's rendezvous fills the same variables); see docs/distributed.md.

The process group is torch's own; this module only decides its backend and device and offers the
few collectives the trainers and the sampler need (barrier, broadcast of a picklable object, mean of
logged scalars).
"""

from __future__ import annotations

import atexit
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from lad.utils.log import get_logger

__all__ = ["env_world", "is_distributed", "get_rank", "get_world_size", "local_device", "init_distributed",
           "teardown", "barrier", "broadcast_object", "all_reduce_mean", "all_reduce_min_bool"]

log = get_logger(__name__)

_OWNED = False  # whether this module created the process group (then it also destroys it)


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` outside torchrun)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_device(device: str | torch.device) -> torch.device:
    """``device`` for this process: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun.

    An explicit index (``cuda:1``) is kept as given (then every local process uses that GPU, which is
    almost never wanted with more than one process per node: a warning says so).
    """
    dev = torch.device(device)
    rank, world, local = env_world()
    if dev.type == "cuda" and world > 1:
        if dev.index is None:
            dev = torch.device("cuda", local)
        elif int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1:
            log.warning("--device %s under torchrun: every local process uses that GPU; pass --device cuda to use "
                        "GPU LOCAL_RANK per process", dev)
    return dev


def init_distributed(device: str | torch.device, *, backend: str | None = None, timeout_min: float | None = None) -> torch.device:
    """Join torchrun's process group (once per process) and return this process's device.

    ``backend``: NCCL for CUDA devices, Gloo otherwise, unless given (the sampler needs only barriers:
    Gloo). The timeout of collectives is ``timeout_min``, else ``LAD_DIST_TIMEOUT_MIN`` minutes, else 60
    (rank 0 may hold the others at a barrier while it builds the latent cache or writes a checkpoint).
    Outside torchrun (``WORLD_SIZE`` unset or 1) nothing is initialised. A process group that the
    caller initialised already (tests, notebooks) is used as it is. Registers :func:`teardown` at exit.
    """
    global _OWNED
    dev = local_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {dev}: this node has {torch.cuda.device_count()} GPU(s); use at most that many "
                             "processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(dev)
    rank, world, _ = env_world()
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return dev
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    minutes = timeout_min if timeout_min is not None else float(os.environ.get("LAD_DIST_TIMEOUT_MIN", 60))
    timeout = datetime.timedelta(minutes=minutes)
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
    if backend == "nccl":
        kwargs["device_id"] = dev  # binds the communicator to this GPU (no guessing in barrier())
    dist.init_process_group(**kwargs)
    _OWNED = True
    atexit.register(teardown)
    log.info("distributed: rank %d of %d, backend %s, device %s", rank, world, backend, dev)
    return dev


def teardown() -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    global _OWNED
    if _OWNED and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects; no-op outside a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean over ranks of each scalar (every rank must pass the same keys); one collective."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def all_reduce_min_bool(flag: torch.Tensor) -> torch.Tensor:
    """Logical AND over ranks of a boolean 0-d tensor (stays on its device; no host sync here)."""
    if not is_distributed():
        return flag
    t = flag.to(torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t[0].bool()

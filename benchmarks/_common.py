"""Helpers shared by the benchmark scripts: JSON lines with the machine's context, peak memory,
fresh child processes per figure, host-sync counting, timing.

Every figure line carries the date (UTC), the 1-minute load average when the figure started, the
torch thread count and the device, because these machines are shared: wall seconds are inflated by
other people's work, process CPU seconds are not (with ``--threads 1`` they are the single-core cost),
and ratios measured in one run are the figures to compare.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
import traceback
from typing import Any, Callable

# Operations that read a device value back on the host (a host-device synchronisation on CUDA):
# scalar reads (item / bool / int of a tensor), data-dependent output sizes (nonzero, masked_select,
# unique, bincount without a static size), and explicit copies to the CPU. On the CPU they are not
# syncs, but they are exactly the calls that would be, so counting them in a CPU profile shows whether
# a step would stall a GPU.
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::bincount",
            "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine()}


def context(device: str = "cpu") -> dict[str, Any]:
    """Load average, thread count, device and time of a figure (attach to every JSON line)."""
    import torch

    ctx = {"device": device, "threads": torch.get_num_threads(), "load_avg_1min": round(os.getloadavg()[0], 2),
           "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "torch": torch.__version__.split("+")[0]}
    if device.startswith("cuda") and torch.cuda.is_available():
        ctx["gpu"] = torch.cuda.get_device_name()
    return ctx


def emit(figure: str, **kw) -> None:
    """Print one JSON line ``{"figure": figure, ...}``."""
    print(json.dumps({"figure": figure, **kw}, default=str), flush=True)


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def cuda_peak_gb(device: str) -> float | None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return None


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step: Callable[[], Any], *, warmup: int, repeats: int, device: str = "cpu") -> dict[str, Any]:
    """Run ``warmup`` untimed then ``repeats`` timed calls; wall and process-CPU seconds (median and all)."""
    for _ in range(warmup):
        step()
    sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        step()
        sync(device)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"step_s_median": round(statistics.median(wall), 4), "step_cpu_s_median": round(statistics.median(cpu), 4),
            "step_s_all": [round(x, 3) for x in wall], "warmup_steps": warmup, "timed_steps": repeats}


def count_sync_ops(step: Callable[[], Any]) -> dict[str, int]:
    """Number of calls of each ``SYNC_OPS`` operation in one call of ``step`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts = {e.key: e.count for e in prof.key_averages() if e.key in SYNC_OPS}
    return dict(sorted(counts.items()))


def profile_top(step: Callable[[], Any], n: int = 12, device: str = "cpu") -> list[dict[str, Any]]:
    """The ``n`` operations with the most self time in one call of ``step`` (CPU, + CUDA when used)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        step()
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    ev = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    total = sum(getattr(e, key) for e in prof.key_averages()) or 1.0
    return [{"op": e.key, "self_ms": round(getattr(e, key) / 1e3, 1), "share": round(getattr(e, key) / total, 3),
             "calls": e.count} for e in ev]


def _child(fn, args, q):
    try:
        q.put(("ok", fn(*args), peak_rss_gb()))
    except BaseException as e:  # report, do not hang the parent
        q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}", peak_rss_gb()))


def in_child(fn: Callable, *args, timeout: float | None = None):
    """Run ``fn(*args)`` in a fresh spawned process (its own peak RSS); returns ``(result, peak_rss_gb)``.

    ``fn`` must be a module-level function. Raises RuntimeError on an error or after ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    try:
        status, out, peak = q.get(timeout=timeout)
    except Exception:
        p.kill()
        p.join()
        raise RuntimeError(f"timed out after {timeout} s") from None
    p.join()
    if status != "ok":
        raise RuntimeError(out)
    return out, peak


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by spawned children

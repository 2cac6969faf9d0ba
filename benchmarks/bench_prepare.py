"""Preprocessing throughput: ``lad prepare`` volumes per minute, on phantom CT and on the real CT.

Runs the real command line (``python -m lad prepare ...``) in a child process per figure and reads
the child's CPU seconds and peak RSS from ``getrusage(RUSAGE_CHILDREN)``. One JSON line per figure:
volumes/min by wall clock and by CPU time (the latter is what the shared machine does not inflate).

    .venv/bin/python benchmarks/bench_prepare.py --threads 1                        # 12 phantoms + real CT, demo + paper presets
    .venv/bin/python benchmarks/bench_prepare.py --phantom /tmp/phantom --presets demo
    .venv/bin/python benchmarks/bench_prepare.py --real /work/shared/data/real-ct --workers 2

Phantom subjects (``lad phantom``, AbdomenCT-1K layout, 1.5 x 1.5 x 2.5 mm, 256 x 256) are written to a
temporary folder unless ``--phantom`` names existing ones. The real CT is the one in
``/work/shared/data/real-ct`` (TotalSegmentator layout, 3 mm); it is read in place, never copied.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import context, emit, set_threads  # noqa: E402

REAL_CT = Path("/work/shared/data/real-ct")


def _children_usage() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime, r.ru_maxrss / 2**20


def run_prepare(layout: str, src: Path, out: Path, preset: str, workers: int, threads: int | None) -> dict:
    """One ``lad prepare`` in a child process: wall s, CPU s, peak RSS GiB of the largest child so far."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "lad", "prepare", "--layout", layout, "--input", str(src), "--output", str(out),
           "--preset", preset, "--workers", str(workers), "--no-progress"]
    cpu0, _ = _children_usage()
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    cpu1, peak = _children_usage()
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu1 - cpu0, 2), "peak_rss_gb_max_child": round(peak, 3),
            "windows": len(manifest["windows"]), "command": " ".join(["lad", *cmd[3:]])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phantom", default=None, help="folder of phantom subjects (default: write --n of them)")
    ap.add_argument("--n", type=int, default=12, help="phantom subjects to write when --phantom is not given")
    ap.add_argument("--real", default=str(REAL_CT), help="TotalSegmentator-layout folder ('' to skip)")
    ap.add_argument("--presets", nargs="+", default=["demo", "paper"], help="demo | paper | tiny (paper = the layout's paper preset)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    set_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        phantom = Path(a.phantom) if a.phantom else None
        if phantom is None:
            phantom = tmp / "phantom"
            subprocess.run([sys.executable, "-m", "lad", "phantom", str(phantom), "--n", str(a.n), "--seed", "0",
                            "--workers", str(a.workers), "--no-progress"], check=True, capture_output=True)
        sources = [("phantom", "abdomenct1k", phantom, "paper-abdomenct1k")]
        if a.real:
            sources.append(("real-ct", "totalsegmentator", Path(a.real), "paper-totalsegmentator"))
        for name, layout, src, paper in sources:
            n = len([p for p in src.iterdir() if p.is_dir()]) if layout == "totalsegmentator" else \
                len(list(src.rglob("*_0000.nii.gz")))
            for preset in a.presets:
                ctx = context("cpu")
                p = paper if preset == "paper" else preset
                r = run_prepare(layout, src, tmp / f"out-{name}-{p}", p, a.workers, a.threads)
                emit("prepare_throughput", source=name, volumes=n, preset=p, workers=a.workers,
                     volumes_per_min_wall=round(n / r["wall_s"] * 60, 2), volumes_per_min_cpu=round(n / max(r["cpu_s"], 1e-9) * 60, 2),
                     **r, **ctx)


if __name__ == "__main__":
    main()

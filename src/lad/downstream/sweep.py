"""Synthetic set-size sweeps shared by the downstream tracks: ``--synthetic-volumes 0,8,16`` parsing and the
per-size table (CSV + Markdown) and plot."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

from lad.utils.atomic import atomic_path

__all__ = ["parse_volumes", "write_table", "plot_sweep"]


def parse_volumes(value, option: str = "--synthetic-volumes") -> list[int] | None:
    """``"0,8,16"`` / ``8`` / ``[0, 8]`` -> sorted distinct non-negative ints; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{option} expects comma-separated integers such as 0,8,16; got {value!r}") from None
    elif isinstance(value, int):
        value = [value]
    sizes = sorted({int(v) for v in value})
    if not sizes or sizes[0] < 0:
        raise ValueError(f"{option} must be non-negative integers, got {value!r}")
    return sizes


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_table(rows: list[dict], columns: Sequence[str], csv_path: Path, md_path: Path, *, title: str = "") -> None:
    """``rows`` as ``csv_path`` (all columns, empty = undefined) and a Markdown table ``md_path`` (atomically)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r.get(c)) for c in columns])
    with atomic_path(Path(csv_path), suffix=".csv") as tmp:
        Path(tmp).write_text(buf.getvalue())
    lines = ([f"{title}", ""] if title else []) + ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) or "n/a" for c in columns) + " |" for r in rows]
    with atomic_path(Path(md_path), suffix=".md") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")


def plot_sweep(series: dict[str, tuple[list[float], list[float], list[float] | None]], path: Path, *, title: str,
               xlabel: str = "# synthetic volumes", ylabel: str = "Dice") -> None:
    """One line per series ``{label: (x, y, yerr or None)}`` (NaN points skipped), y in [0, 1]; PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs_all = sorted({x for xs, _, _ in series.values() for x in xs})
    for label, (xs, ys, err) in series.items():
        keep = [i for i, y in enumerate(ys) if y is not None and not math.isnan(y)]
        if not keep:
            continue
        ax.errorbar([xs[i] for i in keep], [ys[i] for i in keep], yerr=None if err is None else [err[i] for i in keep],
                    marker="o", capsize=3, label=label)
    ax.set_xticks(xs_all, [str(int(x)) for x in xs_all])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    with atomic_path(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)

"""PNG plots for a run: training curves and per-segment test metrics.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot, so the
process-wide backend and pyplot's figure registry are left alone. Files are written atomically.
"""

from __future__ import annotations

import math
import numbers
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from learn.evaluate.metrics import history_segment_names, popularity_segment_names
from learn.utils import atomic_path

__all__ = ["plot_training_curves", "plot_segments"]

BEST_KEY = "valid_ndcg_at_10"
_VALID_METRIC = re.compile(r"valid_(?:(?:ndcg|recall)_at_\d+|mrr)")
_METRIC = re.compile(r"(?P<prefix>.*?)(?:ndcg|recall)_at_\d+")
_POP_Q = re.compile(r"pop_q(\d+)")
_HIST = re.compile(r"hist_(?:le(\d+)|gt(\d+)|(\d+)_(\d+)|(\d+))")


def _new_figure(width: float, height: float, ncols: int) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _save(fig: Figure, path: str | Path) -> Path:
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return target


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _no_data(ax: Axes, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


# ------------------------------------------------------------------------------ training curves


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key`` over the epochs where it is present and finite."""
    xs, ys = [], []
    for i, row in enumerate(history):
        value = row.get(key)
        if _finite(value):
            xs.append(float(row.get("epoch", i)))
            ys.append(float(value))
    return xs, ys


def _training_figure(history: Sequence[Mapping[str, Any]]) -> Figure:
    """Two panels: losses, and valid metrics; the best epoch (max valid_ndcg_at_10) is marked."""
    if not history:
        raise ValueError("history is empty")
    keys = list(dict.fromkeys(key for row in history for key in row))
    fig, (ax_loss, ax_valid) = _new_figure(11, 4, 2)

    for ax, wanted, title in (
        (ax_loss, [k for k in keys if k.endswith("loss")], "loss"),
        (ax_valid, [k for k in keys if _VALID_METRIC.fullmatch(k)], "validation metrics"),
    ):
        drawn = False
        for key in wanted:
            xs, ys = _series(history, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if drawn:
            ax.grid(alpha=0.3)
        else:
            _no_data(ax)

    xs, ys = _series(history, BEST_KEY)
    if xs:
        best = max(range(len(ys)), key=ys.__getitem__)  # first epoch on ties
        for ax in (ax_loss, ax_valid):
            ax.axvline(xs[best], color="gray", linestyle="--", linewidth=1, label=f"best epoch {xs[best]:g}")
        ax_valid.plot([xs[best]], [ys[best]], marker="*", markersize=12, color="crimson", linestyle="none")
    for ax in (ax_loss, ax_valid):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write a PNG of per-epoch losses and valid metrics (one dict per epoch; keys may be missing)."""
    return _save(_training_figure(history), path)


# ------------------------------------------------------------------------------------- segments


def _popularity_order(segments: set[str]) -> list[str]:
    """Popularity segments in ``metrics.py`` order: pop_cold, then warm buckets least popular first."""
    q = [int(m.group(1)) for s in segments if (m := _POP_Q.fullmatch(s))]
    warm: list[str] = []
    if q:
        warm += popularity_segment_names(max(q) + 1)
    if segments & set(popularity_segment_names(3)):
        warm += popularity_segment_names(3)
    return [s for s in ["pop_cold", *warm] if s in segments]


def _history_order(segments: set[str]) -> list[str]:
    """History-length segments in ``metrics.py`` order, from the bucket bounds their names encode."""
    bounds: set[int] = set()
    for s in segments:
        m = _HIST.fullmatch(s)
        if m is None:
            continue
        le, gt, lo, hi, single = m.groups()
        if le is not None:
            bounds.add(int(le))
        elif gt is not None:
            bounds.add(int(gt))
        elif lo is not None:
            bounds.update((int(lo) - 1, int(hi)))
        else:
            bounds.update((int(single) - 1, int(single)))
    bounds.discard(-1)
    names = history_segment_names(sorted(bounds)) if bounds else []
    return [s for s in names if s in segments]


def _segments_figure(metrics: Mapping[str, Any], metric: str = "test_ndcg_at_10") -> Figure:
    """Two bar panels of ``{metric}_{segment}``: by target popularity and by history length.

    Bars follow the segment order of ``learn.evaluate.metrics``; a bar is annotated with the user
    count when ``{prefix}users_{segment}`` is present (prefix = ``metric`` before ndcg/recall).
    """
    head = f"{metric}_"
    found = {key[len(head):] for key, v in metrics.items() if key.startswith(head) and _finite(v)}
    panels = [("by target popularity", _popularity_order(found)), ("by history length", _history_order(found))]
    if not any(names for _, names in panels):
        raise ValueError(f"no segment values for {metric!r} (keys like {metric}_pop_cold) in metrics")
    m = _METRIC.fullmatch(metric)
    count_prefix = f"{m.group('prefix')}users_" if m else None

    fig, axes = _new_figure(11, 4, 2)
    for ax, (title, names) in zip(axes, panels):
        ax.set_title(f"{metric} {title}")
        if not names:
            _no_data(ax)
            continue
        values = [float(metrics[f"{head}{s}"]) for s in names]
        bars = ax.bar(names, values, color="tab:blue")
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_ylabel(metric)
        ax.grid(axis="y", alpha=0.3)
        counts = [metrics.get(f"{count_prefix}{s}") if count_prefix else None for s in names]
        if any(_finite(c) for c in counts):
            ax.bar_label(bars, labels=[f"n={int(c)}" if _finite(c) else "" for c in counts], fontsize=8)
            ax.margins(y=0.15)
    return fig


def plot_segments(metrics: Mapping[str, Any], path: str | Path, metric: str = "test_ndcg_at_10") -> Path:
    """Write a PNG of per-segment ``metric`` bars (popularity and history-length panels)."""
    return _save(_segments_figure(metrics, metric), path)

"""Run plots: valid PNGs written atomically, segment bars in metrics.py order, missing keys tolerated."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from learn.evaluate.metrics import history_segment_names, segment_metrics
from learn.tracking.plots import _segments_figure, _training_figure, plot_segments, plot_training_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > len(PNG_SIGNATURE)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert not list(path.parent.glob("*.tmp"))  # the atomic temp file is gone


def tick_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels()]


def bar_count(ax) -> int:
    return len(ax.patches)


def note_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


# ------------------------------------------------------------------------------ training curves

HISTORY = [
    {"epoch": 0, "train_loss": 2.0, "lr": 1e-3},  # no validation this epoch
    {"epoch": 1, "train_loss": 1.5, "valid_ndcg_at_10": 0.10, "valid_recall_at_10": 0.20, "valid_users": 50},
    {"epoch": 2, "train_loss": 1.2, "valid_ndcg_at_10": 0.14, "valid_recall_at_10": 0.25},
    {"epoch": 3, "train_loss": float("nan"), "valid_ndcg_at_10": 0.12},  # a diverged loss is skipped
]


def test_training_curves_png(tmp_path):
    out = plot_training_curves(HISTORY, tmp_path / "sub" / "curves.png")
    assert out == tmp_path / "sub" / "curves.png"
    assert_png(out)


def test_training_figure_content_and_best_epoch():
    fig = _training_figure(HISTORY)
    ax_loss, ax_valid = fig.axes[:2]
    lines = {line.get_label(): line for line in ax_loss.lines}
    assert list(lines["train_loss"].get_xdata()) == [0, 1, 2]
    valid = {line.get_label(): line for line in ax_valid.lines}
    assert list(valid["valid_ndcg_at_10"].get_xdata()) == [1, 2, 3]
    assert list(valid["valid_recall_at_10"].get_xdata()) == [1, 2]
    assert "valid_users" not in valid and "lr" not in lines
    for ax in (ax_loss, ax_valid):
        best = [line for line in ax.lines if line.get_label() == "best epoch 2"]
        assert len(best) == 1 and list(best[0].get_xdata()) == [2, 2]


def test_training_curves_without_validation_or_epoch_keys(tmp_path):
    history = [{"train_loss": 1.0}, {"train_loss": 0.5}]
    fig = _training_figure(history)
    ax_loss, ax_valid = fig.axes[:2]
    assert list(ax_loss.lines[0].get_xdata()) == [0, 1]  # falls back to the row index
    assert not ax_valid.lines and "no data" in note_texts(ax_valid)
    assert_png(plot_training_curves(history, tmp_path / "c.png"))


def test_training_curves_empty_history(tmp_path):
    with pytest.raises(ValueError, match="history is empty"):
        plot_training_curves([], tmp_path / "c.png")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- segments


def real_segment_metrics(history_buckets=(3, 5, 10, 20), popularity_buckets=3, prefix="test_") -> dict:
    """Segment keys exactly as the pipeline produces them (segment_metrics + prefix)."""
    rng = np.random.default_rng(0)
    n_items, n_users = 60, 400
    pop = rng.integers(0, 30, n_items)
    pop[:5] = 0  # a few cold items
    targets = rng.integers(0, n_items, n_users)
    histories = [rng.integers(0, n_items, int(L)) for L in rng.integers(0, 30, n_users)]
    ranks = rng.integers(0, 40, n_users)
    seg = segment_metrics(
        ranks, targets, histories, pop, k=10,
        popularity_buckets=popularity_buckets, history_buckets=history_buckets,
    )  # fmt: skip
    return {f"{prefix}{key}": v for key, v in seg.items()}


def test_segments_png(tmp_path):
    out = plot_segments(real_segment_metrics(), tmp_path / "segments.png")
    assert_png(out)


def test_segments_in_documented_order_with_counts():
    metrics = real_segment_metrics()
    fig = _segments_figure(metrics, "test_ndcg_at_10")
    ax_pop, ax_hist = fig.axes[:2]
    pop_names = ["pop_cold", "pop_tail", "pop_mid", "pop_head"]
    hist_names = history_segment_names([3, 5, 10, 20])
    assert tick_labels(ax_pop) == pop_names and bar_count(ax_pop) == 4
    assert tick_labels(ax_hist) == hist_names and bar_count(ax_hist) == 5
    heights = [p.get_height() for p in ax_pop.patches]
    assert heights == pytest.approx([metrics[f"test_ndcg_at_10_{s}"] for s in pop_names])
    assert note_texts(ax_pop) == [f"n={metrics[f'test_users_{s}']}" for s in pop_names]
    assert note_texts(ax_hist) == [f"n={metrics[f'test_users_{s}']}" for s in hist_names]


def test_segments_recall_and_other_bucketings():
    metrics = real_segment_metrics(history_buckets=(2, 3, 8), popularity_buckets=4, prefix="valid_")
    fig = _segments_figure(metrics, "valid_recall_at_10")
    ax_pop, ax_hist = fig.axes[:2]
    assert tick_labels(ax_pop) == ["pop_cold", "pop_q0", "pop_q1", "pop_q2", "pop_q3"]
    assert tick_labels(ax_hist) == ["hist_le2", "hist_3", "hist_4_8", "hist_gt8"]
    assert note_texts(ax_pop)[0] == f"n={metrics['valid_users_pop_cold']}"


def test_segments_missing_keys_and_other_mode_suffix_ignored():
    metrics = real_segment_metrics()
    for key in ("test_ndcg_at_10_hist_6_10", "test_ndcg_at_10_pop_mid", "test_users_pop_tail"):
        metrics.pop(key)
    metrics["test_users_hist_le3"] = float("nan")
    metrics["test_ndcg_at_10_pop_cold_excl_hist"] = 0.5  # the other history mode: not a segment here
    metrics["test_ndcg_at_10"] = 0.2
    fig = _segments_figure(metrics)
    ax_pop, ax_hist = fig.axes[:2]
    assert tick_labels(ax_pop) == ["pop_cold", "pop_tail", "pop_head"]
    assert tick_labels(ax_hist) == ["hist_le3", "hist_4_5", "hist_11_20", "hist_gt20"]
    assert note_texts(ax_pop)[1] == ""  # no count for pop_tail
    assert note_texts(ax_hist)[0] == ""


def test_segments_without_counts_or_history_panel(tmp_path):
    metrics = {"test_ndcg_at_10_pop_cold": 0.01, "test_ndcg_at_10_pop_head": 0.3, "test_ndcg_at_10_pop_tail": 0.1}
    fig = _segments_figure(metrics)
    ax_pop, ax_hist = fig.axes[:2]
    assert tick_labels(ax_pop) == ["pop_cold", "pop_tail", "pop_head"]
    assert not note_texts(ax_pop)
    assert bar_count(ax_hist) == 0 and note_texts(ax_hist) == ["no data"]
    assert_png(plot_segments(metrics, tmp_path / "s.png"))


def test_segments_nothing_to_plot(tmp_path):
    with pytest.raises(ValueError, match="no segment values"):
        plot_segments({"test_ndcg_at_10": 0.2, "test_ndcg_at_10_pop_cold": math.nan}, tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_plots_leave_pyplot_alone(tmp_path):
    plot_segments(real_segment_metrics(), tmp_path / "s.png")
    plot_training_curves(HISTORY, tmp_path / "c.png")
    if "matplotlib.pyplot" in sys.modules:  # no figure registered in pyplot's global state
        assert not sys.modules["matplotlib.pyplot"].get_fignums()

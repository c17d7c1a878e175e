"""Paired comparison of two models evaluated on the same users (leave-one-out full ranking).

Both models rank the same users' targets, so per-user metric values are paired. Uncertainty of the
mean difference comes from a paired bootstrap: users are resampled with replacement and the SAME
resample is applied to both models, which cancels the (large) between-user variance.

``compare_ranks`` returns a flat dict of floats (loggable as metrics); ``should_promote`` is the
decision rule "B is better and the whole confidence interval says so".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from learn.evaluate.metrics import _check_ranks

__all__ = [
    "BootstrapResult",
    "per_user_metrics",
    "paired_bootstrap",
    "topk_overlap",
    "compare_ranks",
    "should_promote",
    "format_comparison",
]

# resampled index matrices are built ``chunk x n_users`` at a time, capped at this many entries
_MAX_CHUNK_ENTRIES = 1 << 22


@dataclass(frozen=True)
class BootstrapResult:
    """Mean difference mean(b) - mean(a) with its percentile CI and two-sided bootstrap p-value."""

    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    n_users: int


def per_user_metrics(ranks: np.ndarray, k: int = 10) -> dict[str, np.ndarray]:
    """Per-user ``ndcg_at_{k}`` and ``recall_at_{k}`` from 0-based target ranks (float64 arrays).

    Same definitions as ``metrics_from_ranks``: its values are the means of these arrays.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = _check_ranks(ranks)
    if not np.isfinite(r).all():
        raise ValueError("ranks must be finite")
    hit = r < k
    return {
        f"ndcg_at_{k}": np.where(hit, 1.0 / np.log2(r + 2.0), 0.0),
        f"recall_at_{k}": hit.astype(np.float64),
    }


def _check_values(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-d array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN/inf values")
    return arr


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> BootstrapResult:
    """Paired bootstrap of mean(b) - mean(a) over users.

    Each resample draws n_users indices with replacement, used for both a and b. The CI is the
    (alpha/2, 1 - alpha/2) percentile interval of the resampled deltas. The p-value is two-sided:
    twice the share of resampled deltas on the other side of 0 from ``delta`` (ties at 0 count),
    capped at 1; 0.0 means fewer than 1 in ``n_resamples``.
    """
    a_arr = _check_values(a, "a")
    b_arr = _check_values(b, "b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"a and b must have the same length, got {a_arr.size} and {b_arr.size}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")

    diff = b_arr - a_arr  # the same indices for a and b: resample the paired differences
    n = diff.size
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CHUNK_ENTRIES // n)
    deltas = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        end = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(end - start, n))
        deltas[start:end] = diff[idx].mean(axis=1)

    delta = float(diff.mean())
    ci_low, ci_high = np.quantile(deltas, [alpha / 2.0, 1.0 - alpha / 2.0])
    other_side = deltas <= 0.0 if delta >= 0.0 else deltas >= 0.0
    p_value = min(1.0, 2.0 * float(other_side.mean()))
    return BootstrapResult(
        delta=delta, ci_low=float(ci_low), ci_high=float(ci_high), p_value=p_value, n_users=int(n)
    )


def topk_overlap(a_ids: np.ndarray, b_ids: np.ndarray) -> float:
    """Mean over users of |top-k(A) & top-k(B)| / k for integer id arrays of shape [U, k].

    Each row is treated as a set (a repeated id counts once).
    """
    a = np.asarray(a_ids)
    b = np.asarray(b_ids)
    for name, arr in (("a_ids", a), ("b_ids", b)):
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"{name} must be a non-empty [users, k] array, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must hold integer item ids, got dtype {arr.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"a_ids and b_ids must have the same shape, got {a.shape} and {b.shape}")

    n_users, k = a.shape
    lo = min(int(a.min()), int(b.min()))
    span = max(int(a.max()), int(b.max())) - lo + 1
    rows = np.arange(n_users, dtype=np.int64)[:, None] * span
    # one key per (user, id): intersecting the key sets intersects every row at once
    a_keys = np.unique(rows + (a.astype(np.int64) - lo))
    b_keys = np.unique(rows + (b.astype(np.int64) - lo))
    common = np.intersect1d(a_keys, b_keys, assume_unique=True)
    per_user = np.bincount(common // span, minlength=n_users)
    return float((per_user / k).mean())


def compare_ranks(
    ranks_a: np.ndarray,
    ranks_b: np.ndarray,
    k: int = 10,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Compare model B against model A on the same users' target ranks.

    Keys (K = k): a_/b_ndcg_at_K, a_/b_recall_at_K (means), delta_ndcg_at_K, delta_recall_at_K
    (B - A) with _ci_low/_ci_high (95% paired bootstrap), delta_ndcg_at_K_p_value, n_users.
    Both metrics use the same bootstrap resamples (same seed).
    """
    ra = np.asarray(ranks_a)
    rb = np.asarray(ranks_b)
    if ra.shape != rb.shape:
        raise ValueError(f"ranks_a and ranks_b must have the same shape, got {ra.shape} and {rb.shape}")
    pa = per_user_metrics(ra, k)
    pb = per_user_metrics(rb, k)
    out: dict[str, float] = {}
    for name in (f"ndcg_at_{k}", f"recall_at_{k}"):
        res = paired_bootstrap(pa[name], pb[name], n_resamples=n_resamples, seed=seed)
        out[f"a_{name}"] = float(pa[name].mean())
        out[f"b_{name}"] = float(pb[name].mean())
        out[f"delta_{name}"] = res.delta
        out[f"delta_{name}_ci_low"] = res.ci_low
        out[f"delta_{name}_ci_high"] = res.ci_high
        if name.startswith("ndcg"):
            out[f"delta_{name}_p_value"] = res.p_value
    out["n_users"] = int(ra.size)
    return out


def should_promote(result: Mapping[str, float], metric: str = "ndcg_at_10") -> bool:
    """True only when B improves ``metric`` (delta > 0) and the CI lies above 0 (ci_low > 0)."""
    try:
        delta = result[f"delta_{metric}"]
        ci_low = result[f"delta_{metric}_ci_low"]
    except KeyError as exc:
        raise KeyError(f"result has no {exc.args[0]!r}; compare_ranks(...) output expected") from None
    return bool(delta > 0 and ci_low > 0)


def format_comparison(result: Mapping[str, float], overlap: float | None = None) -> str:
    """Aligned text table of a ``compare_ranks`` result (plus top-k overlap when given)."""
    names = [key[2:] for key in result if key.startswith("a_") and f"delta_{key[2:]}" in result]
    header = ("metric", "A", "B", "delta", "95% CI", "p")
    rows = [header]
    for name in names:
        d = f"delta_{name}"
        ci = ""
        if f"{d}_ci_low" in result and f"{d}_ci_high" in result:
            ci = f"[{result[f'{d}_ci_low']:+.4f}, {result[f'{d}_ci_high']:+.4f}]"
        p = f"{result[f'{d}_p_value']:.4f}" if f"{d}_p_value" in result else ""
        rows.append((name, f"{result[f'a_{name}']:.4f}", f"{result[f'b_{name}']:.4f}", f"{result[d]:+.4f}", ci, p))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]
    if names and f"delta_{names[0]}_ci_low" in result:
        lines.append(f"promote B on {names[0]}: {'yes' if should_promote(result, names[0]) else 'no'}")
    if "n_users" in result:
        lines.append(f"users: {int(result['n_users'])}")
    if overlap is not None:
        lines.append(f"top-k overlap: {overlap:.4f}")
    return "\n".join(lines)

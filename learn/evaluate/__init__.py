"""Full-catalog ranking evaluation (NDCG@K, Recall@K, MRR, per-segment breakdowns)."""

from learn.evaluate.metrics import (
    evaluate_both_modes,
    evaluate_split,
    history_segment_names,
    metrics_from_ranks,
    popularity_edges,
    popularity_segment_names,
    sample_users,
    segment_descriptions,
    segment_metrics,
    target_ranks,
    target_ranks_both,
)

__all__ = [
    "evaluate_both_modes",
    "evaluate_split",
    "history_segment_names",
    "metrics_from_ranks",
    "popularity_edges",
    "popularity_segment_names",
    "sample_users",
    "segment_descriptions",
    "segment_metrics",
    "target_ranks",
    "target_ranks_both",
]

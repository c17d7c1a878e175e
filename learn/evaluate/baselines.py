"""No-training baselines on the frozen content vectors (``train.recipe=content_mean|content_last``):
items are their raw content vectors; a user is the mean of its history's content vectors
(``content_mean``) or its last item's (``content_last``). They are floors to beat, not recipes.
"""

from __future__ import annotations

import typing
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from learn.config import BaselineName, EvalConfig
from learn.data.sequences import EvalSplit
from learn.evaluate.metrics import evaluate_both_modes

BASELINES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    # (history vectors [B, L, d] left-aligned, real lengths [B]) -> [B, d]
    "content_mean": lambda h, n: (h * (torch.arange(h.shape[1])[None, :, None] < n[:, None, None])).sum(1)
    / n[:, None].to(h.dtype),
    "content_last": lambda h, n: h[torch.arange(len(n)), n - 1],
}
assert set(BASELINES) == set(typing.get_args(BaselineName)), "learn.config.BaselineName and BASELINES disagree"


def content_user_vectors(content: np.ndarray, split: EvalSplit, how: str, max_history: int) -> torch.Tensor:
    """One vector per evaluated user from the last ``max_history`` items of its history."""
    if how not in BASELINES:
        raise ValueError(f"unknown baseline {how!r}; known: {sorted(BASELINES)}")
    user = BASELINES[how]
    vecs = torch.as_tensor(content, dtype=torch.float32)
    hist = split.histories
    out = []
    for lo in range(0, len(hist), 4096):  # vectorised per chunk of users: [chunk, L, d] at most
        rows = np.arange(lo, min(lo + 4096, len(hist)))
        tails, n = hist.tails(rows, max_history)
        if (n == 0).any():
            raise ValueError(f"user row {lo + int(np.flatnonzero(n == 0)[0])} has an empty history")
        out.append(user(vecs[torch.from_numpy(tails.astype(np.int64))], torch.from_numpy(n)))
    return F.normalize(torch.cat(out), dim=-1)


def content_item_vectors(content: np.ndarray) -> torch.Tensor:
    return F.normalize(torch.as_tensor(content, dtype=torch.float32), dim=-1)


def evaluate_baseline(name: str, content: np.ndarray, split: EvalSplit, eval_cfg: EvalConfig, max_history: int,
                      train_popularity: np.ndarray, prefix: str, segment_k: int | None = None) -> dict[str, float]:
    """The baseline ``name``'s metrics on ``split`` (both history modes, segments at ``segment_k``,
    default the smallest of eval.ks), as for trained towers."""
    return evaluate_both_modes(
        content_user_vectors(content, split, name, max_history), content_item_vectors(content), split,
        ks=eval_cfg.ks, exclude_history=eval_cfg.exclude_history, chunk_size=eval_cfg.chunk_size,
        item_block=eval_cfg.item_block,
        train_popularity=train_popularity, prefix=prefix, segment_k=segment_k,
        popularity_buckets=eval_cfg.popularity_buckets, history_buckets=eval_cfg.history_buckets,
    )

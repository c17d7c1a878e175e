"""The served score: the towers' cosine, optionally mixed with two terms the towers cannot learn for
items they never saw as positives (``score.*`` in the config):

    score(user, item) = cos(user tower, item tower)
                        + content_weight    x cos(raw content of the user's last item, raw content of item)
                        + popularity_weight x prior(item)

``prior(item) = log(1 + training interactions of item) / log(1 + the most popular item's)``, in
[0, 1]; an item unseen in training (a cold item, any new item) has prior 0. The content term is the
untrained last-item floor (``train.recipe=content_last``): it ranks a cold item by what it is, where
full-softmax training has pushed every never-positive item down.

Both terms are one inner product over concatenated vectors, so one faiss index (which holds unit
vectors: scores are cosines) serves the mix:

    item side  [item tower (d_out) | l2-normalised raw content (d_llm) | prior, sqrt(1 - prior^2)] / sqrt(parts)
    user side  [user tower (d_out) | content_weight x l2-normalised raw content of the last item | popularity_weight, 0]
               then l2-normalised

``parts`` counts the unit-norm blocks (the towers', the content's, the prior's pair), so every item
vector has norm 1 and the inner product is the score above divided by a per-user constant: the same
ranking. A term whose weight is 0 is left out of both sides (no mix at all: the towers' vectors
unchanged).
The weights sit on the user side only, so the item side of a bundle depends on the towers, the
content and the priors alone. Several candidate weights are chosen on valid after training
(``learn.train.loop.choose_score_mix``), never on test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ScoreMix:
    content_weight: float = 0.0
    popularity_weight: float = 0.0

    def __post_init__(self) -> None:
        for key in ("content_weight", "popularity_weight"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ValueError(f"score mix {key} must be a finite number >= 0, got {value!r}")

    @property
    def enabled(self) -> bool:
        return self.content_weight > 0 or self.popularity_weight > 0

    def extra_dims(self, d_llm: int) -> int:
        """How many dimensions the mix appends to the towers' vectors."""
        return (d_llm if self.content_weight > 0 else 0) + (2 if self.popularity_weight > 0 else 0)

    @property
    def parts(self) -> int:
        return 1 + (self.content_weight > 0) + (self.popularity_weight > 0)

    def prior_of(self, items: np.ndarray) -> np.ndarray | None:
        """The priors held in served item vectors [M, width] (None without a popularity term)."""
        if self.popularity_weight <= 0:
            return None
        return np.clip(np.asarray(items)[:, -2] * np.float32(np.sqrt(self.parts)), 0.0, 1.0).astype(np.float32)

    def to_json(self) -> dict[str, float]:
        return {"content_weight": float(self.content_weight), "popularity_weight": float(self.popularity_weight)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "ScoreMix":
        """The mix of a manifest's ``score_mix`` entry (None or absent: no mix); ValueError naming ``where``."""
        if data is None:
            return cls()
        if not isinstance(data, dict) or set(data) != {"content_weight", "popularity_weight"}:
            raise ValueError(f"{where}: score_mix must be {{'content_weight': w, 'popularity_weight': w}}, got {data!r}")
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def items(self, tower: Any, content: Any, prior: Any) -> torch.Tensor:
        """Served item vectors [M, d_out + extra] from item-tower outputs [M, d_out], raw content
        [M, d_llm] and priors [M] (float32)."""
        tower = _f32(tower)
        if not self.enabled:
            return tower
        parts = [tower]
        if self.content_weight > 0:
            parts.append(F.normalize(_f32(content), dim=-1))
        if self.popularity_weight > 0:
            prior = _f32(prior).reshape(-1, 1)
            if len(prior) != len(tower):
                raise ValueError(f"{len(prior)} priors for {len(tower)} items")
            parts += [prior, (1 - prior.square()).clamp_min(0).sqrt()]
        return torch.cat(parts, 1) / float(np.sqrt(self.parts))

    def users(self, tower: Any, last_content: Any) -> torch.Tensor:
        """Served user vectors [B, d_out + extra] from user-tower outputs [B, d_out] and the raw
        content of each user's last history item [B, d_llm] (float32)."""
        tower = _f32(tower)
        if not self.enabled:
            return tower
        parts = [tower]
        if self.content_weight > 0:
            parts.append(self.content_weight * F.normalize(_f32(last_content), dim=-1))
        if self.popularity_weight > 0:
            parts += [torch.full((len(tower), 1), float(self.popularity_weight)), torch.zeros(len(tower), 1)]
        return F.normalize(torch.cat(parts, 1), dim=-1)


def _f32(x: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float().cpu()


def popularity_prior(train_popularity: np.ndarray) -> np.ndarray:
    """float32 [N] prior in [0, 1]: log1p(count) / log1p(max count); 0 for unseen items (all 0 if
    no item was seen)."""
    counts = np.asarray(train_popularity, dtype=np.float64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("train popularity must be a 1-d array of counts >= 0")
    top = np.log1p(counts.max()) if len(counts) else 0.0
    if top <= 0:
        return np.zeros(len(counts), dtype=np.float32)
    return (np.log1p(counts) / top).astype(np.float32)


def candidates(content_weights: list[float], popularity_weights: list[float]) -> list[ScoreMix]:
    """Every pair of candidate weights, the unmixed towers (0, 0) first when they are a candidate
    (ties on valid go to the earlier candidate: the simpler score)."""
    pairs = sorted({(float(c), float(p)) for c in content_weights for p in popularity_weights},
                   key=lambda cp: (cp != (0.0, 0.0), cp))
    return [ScoreMix(c, p) for c, p in pairs]


def last_items(histories: Any) -> np.ndarray:
    """Catalog index of each history's last item, for a :class:`learn.data.ragged.Ragged` of
    histories (every history non-empty)."""
    lengths = np.diff(histories.offsets)
    if (lengths == 0).any():
        raise ValueError(f"history row {int(np.flatnonzero(lengths == 0)[0])} is empty: it has no last item")
    return np.asarray(histories.values[histories.offsets[1:] - 1], dtype=np.int64)

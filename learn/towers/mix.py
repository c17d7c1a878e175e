"""The served score: the towers' cosine, optionally mixed with two terms the towers cannot learn for
items they never saw as positives (``score.*`` in the config):

    score(user, item) = cos(user tower, item tower)
                        + w(item)           x cos(raw content of the user's last item, raw content of item)
                        + popularity_weight x prior(item)
    w(item)           = cold_content_weight for an item unseen in training (prior 0), content_weight otherwise

``prior(item) = log(1 + training interactions of item) / log(1 + the most popular item's)``, in
[0, 1]; an item unseen in training (a cold item, any new item) has prior 0. The content term is the
untrained last-item floor (``train.recipe=content_last``): it ranks a cold item by what it is, where
full-softmax training has pushed every never-positive item down. Its weight is ``content_weight``
for items seen in training and ``cold_content_weight`` for unseen ones, cold items and every new
item (None, the default: ``content_weight`` for every item), so the content term can count more for
the items the towers know nothing about without changing how seen items rank among themselves.

Every term is one inner product over concatenated vectors, so one faiss index (which holds unit
vectors: scores are cosines) serves the mix. With W = max(content_weight, cold_content_weight) and
a(item) = w(item) / W in [0, 1]:

    item side  [item tower (d_out) | a x l2-normalised raw content (d_llm), sqrt(1 - a^2) | prior, sqrt(1 - prior^2)] / sqrt(parts)
    user side  [user tower (d_out) | W x l2-normalised raw content of the last item, 0 | popularity_weight, 0]
               then l2-normalised

The ``sqrt(1 - a^2)`` column is there only when the weight varies (a = 1 otherwise); the prior pair
is there with a popularity term or a varying weight (which needs each item's prior: it is stored in
the served vectors either way, and read back by :meth:`ScoreMix.prior_of`). ``parts`` counts the
unit-norm blocks (the towers', the content's, the prior's pair), so every item vector has norm 1 and
the inner product is the score above divided by a per-user constant: the same ranking. A term whose
weight is 0 is left out of both sides (no mix at all: the towers' vectors unchanged).
The user side carries W and the popularity weight; the item side depends on the towers, the
content, the priors and, when the content weight varies, the ratio of the two content weights.
Several candidate weights are chosen on valid after training (``learn.train.loop.choose_score_mix``),
never on test.

A history penalty (``history_weight`` h >= 0, ``score.history_weights``) is subtracted from the
served inner product of every item in the request's own history (the items the user already has):
the one term that is not an inner product, so it is applied after the index search (the retriever
fetches k + the history's length candidates, lowers the history items among them by h and keeps the
top k: the same top k as lowering them in the whole catalog). Chosen on valid like the weights above:
where users rarely come back to an item they have (purchases, ratings) valid picks a large h and the
slots the towers gave to history items (the user's vector sits close to its own items) go to new
ones; where they do come back it picks 0. It is in the served inner product's units (the served
vectors are unit vectors: h >= 2 puts every history item below every other item).
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
    cold_content_weight: float | None = None  # w of an item unseen in training (prior 0); None: content_weight
    history_weight: float = 0.0  # h: subtracted from the served score of the request's own history items

    def __post_init__(self) -> None:
        for key in ("content_weight", "popularity_weight", "cold_content_weight", "history_weight"):
            value = getattr(self, key)
            if value is None and key == "cold_content_weight":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ValueError(f"score mix {key} must be a finite number >= 0, got {value!r}")
        if self.cold_content_weight is not None and float(self.cold_content_weight) == float(self.content_weight):
            object.__setattr__(self, "cold_content_weight", None)  # one weight for every item: one form

    @property
    def varies(self) -> bool:
        """Whether the content weight differs between seen and unseen (cold) items."""
        return self.cold_content_weight is not None

    @property
    def unseen_content_weight(self) -> float:
        """w of an item unseen in training (the content weight when it does not vary)."""
        return self.content_weight if self.cold_content_weight is None else float(self.cold_content_weight)

    @property
    def top_content_weight(self) -> float:
        """W: the largest content weight of any item (the user side's content factor)."""
        return max(self.content_weight, self.unseen_content_weight)

    @property
    def has_content(self) -> bool:
        return self.top_content_weight > 0

    @property
    def stores_prior(self) -> bool:
        """Whether the served item vectors hold each item's prior (a popularity term or a varying weight)."""
        return self.popularity_weight > 0 or self.varies

    @property
    def enabled(self) -> bool:
        """Whether the served vectors differ from the towers' (a content or popularity term)."""
        return self.has_content or self.popularity_weight > 0

    @property
    def penalises_history(self) -> bool:
        return self.history_weight > 0

    @property
    def served(self) -> bool:
        """Whether the served score differs from the towers' cosine at all (vectors or history penalty)."""
        return self.enabled or self.penalises_history

    def extra_dims(self, d_llm: int) -> int:
        """How many dimensions the mix appends to the towers' vectors."""
        return (d_llm + self.varies if self.has_content else 0) + (2 if self.stores_prior else 0)

    @property
    def parts(self) -> int:
        return 1 + self.has_content + self.stores_prior

    def derived_columns(self, width: int) -> list[int]:
        """Columns of served item vectors [M, width] that are sqrt(1 - x^2) of another column's value."""
        cols = []
        if self.has_content and self.varies:
            cols.append(width - 1 - (2 if self.stores_prior else 0))
        if self.stores_prior:
            cols.append(width - 1)
        return cols

    def item_side_key(self) -> tuple:
        """Mixes with equal keys have equal item sides (for caching them across candidates)."""
        ratios = None if not self.varies else (self.content_weight / self.top_content_weight,
                                                self.cold_content_weight / self.top_content_weight)
        return self.has_content, self.stores_prior, ratios

    def content_factor(self, prior: Any) -> torch.Tensor:
        """a(item) = w(item) / W in [0, 1] for priors [M] (only for a varying weight): an unseen item
        has prior exactly 0 (seen ones at least log 2 / log(1 + the top count))."""
        w = torch.where(_f32(prior) <= 0, self.unseen_content_weight, float(self.content_weight))
        return (w / self.top_content_weight).clamp(0, 1)

    def prior_of(self, items: np.ndarray) -> np.ndarray | None:
        """The priors held in served item vectors [M, width] (None when the mix stores none)."""
        if not self.stores_prior:
            return None
        return np.clip(np.asarray(items)[:, -2] * np.float32(np.sqrt(self.parts)), 0.0, 1.0).astype(np.float32)

    def to_json(self) -> dict[str, float]:
        out = {"content_weight": float(self.content_weight), "popularity_weight": float(self.popularity_weight)}
        if self.varies:
            out["cold_content_weight"] = float(self.cold_content_weight)
        if self.penalises_history:
            out["history_weight"] = float(self.history_weight)
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> "ScoreMix":
        """The mix of a manifest's ``score_mix`` entry (None or absent: no mix); ValueError naming ``where``."""
        if data is None:
            return cls()
        required = {"content_weight", "popularity_weight"}
        optional = {"cold_content_weight", "history_weight"}
        if not isinstance(data, dict) or not required <= set(data) <= required | optional:
            raise ValueError(f"{where}: score_mix must be {{'content_weight': w, 'popularity_weight': w"
                             f"[, 'cold_content_weight': w][, 'history_weight': h]}}, got {data!r}")
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def items(self, tower: Any, content: Any, prior: Any) -> torch.Tensor:
        """Served item vectors [M, d_out + extra] from item-tower outputs [M, d_out], raw content
        [M, d_llm] and priors [M] (float32; needed when :attr:`stores_prior`)."""
        tower = _f32(tower)
        if not self.enabled:
            return tower
        if self.stores_prior:
            if prior is None:
                raise ValueError("this score mix needs the items' prior (learn.towers.mix.popularity_prior)")
            prior = _f32(prior).reshape(-1, 1)
            if len(prior) != len(tower):
                raise ValueError(f"{len(prior)} priors for {len(tower)} items")
        parts = [tower]
        if self.has_content:
            unit = F.normalize(_f32(content), dim=-1)
            if self.varies:
                a = self.content_factor(prior[:, 0]).reshape(-1, 1)
                parts += [a * unit, (1 - a.square()).clamp_min(0).sqrt()]
            else:
                parts.append(unit)
        if self.stores_prior:
            parts += [prior, (1 - prior.square()).clamp_min(0).sqrt()]
        return torch.cat(parts, 1) / float(np.sqrt(self.parts))

    def users(self, tower: Any, last_content: Any) -> torch.Tensor:
        """Served user vectors [B, d_out + extra] from user-tower outputs [B, d_out] and the raw
        content of each user's last history item [B, d_llm] (float32)."""
        tower = _f32(tower)
        if not self.enabled:
            return tower
        parts = [tower]
        if self.has_content:
            parts.append(self.top_content_weight * F.normalize(_f32(last_content), dim=-1))
            if self.varies:
                parts.append(torch.zeros(len(tower), 1))
        if self.stores_prior:
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


def candidates(content_weights: list[float], popularity_weights: list[float],
               cold_content_weights: list[float] | None = None,
               history_weights: list[float] | None = None) -> list[ScoreMix]:
    """Every combination of candidate weights: each (content, popularity) pair with one content
    weight for every item, and with each of ``cold_content_weights`` for unseen items, each with each
    of ``history_weights`` (default: 0 only). The unmixed towers (0, 0) come first when they are a
    candidate, then the one-weight mixes, then the varying ones, each with the smallest history weight
    first (ties on valid go to the earlier candidate: the simpler score)."""
    mixes = {ScoreMix(float(c), float(p), None if cold is None else float(cold), float(h))
             for c in content_weights for p in popularity_weights for cold in [None, *(cold_content_weights or [])]
             for h in (history_weights or [0.0])}
    return sorted(mixes, key=lambda m: (m.enabled, m.varies, m.content_weight, m.popularity_weight,
                                        m.cold_content_weight or 0.0, m.history_weight))


def penalise_history(rows: np.ndarray, scores: np.ndarray, history_rows: list[np.ndarray], weight: float,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` (rows, scores) per query after lowering each query's own history items by ``weight``.

    ``rows`` / ``scores`` [B, fetch] are an index search's results (best first, row -1 and score -inf
    where unfilled) with ``fetch`` >= k + the number of distinct rows in each query's history (
    ``history_rows[b]``): however far the history items fall, the top k after the penalty are among
    them. Returns [B, k] arrays in the same form (ties keep the search's order)."""
    out_rows = np.full((len(rows), k), -1, dtype=np.int64)
    out_scores = np.full((len(rows), k), -np.inf, dtype=np.float32)
    for b in range(len(rows)):
        s = scores[b].astype(np.float32, copy=True)
        s[(rows[b] >= 0) & np.isin(rows[b], history_rows[b])] -= np.float32(weight)
        order = np.argsort(-s, kind="stable")[:k]
        out_rows[b, : len(order)], out_scores[b, : len(order)] = rows[b][order], s[order]
    out_scores[out_rows < 0] = -np.inf
    return out_rows, out_scores


def last_items(histories: Any) -> np.ndarray:
    """Catalog index of each history's last item, for a :class:`learn.data.ragged.Ragged` of
    histories (every history non-empty)."""
    lengths = np.diff(histories.offsets)
    if (lengths == 0).any():
        raise ValueError(f"history row {int(np.flatnonzero(lengths == 0)[0])} is empty: it has no last item")
    return np.asarray(histories.values[histories.offsets[1:] - 1], dtype=np.int64)

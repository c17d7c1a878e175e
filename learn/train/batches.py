"""Training examples per recipe, drawn afresh each epoch from the users' training sequences.

pair batches             one (history, target) per user and epoch: target index uniform in
                          [first_target(L), L-1]; or, with all_positions, every position of the
                          sequence predicts its successor (full_softmax, in_batch).
dense_all_action          each sequence is cut at a point into a history part and a target part;
                          N_h history positions and N_t targets (recency-weighted) are sampled.

Every sampler takes ``rank``/``world_size`` so a DDP worker reads only its shard of users.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from learn.towers.model import pad_histories


@dataclass
class PairBatch:
    """Histories [B, L] (right-padded tokens) and for each row the position(s) that predict."""

    tokens: torch.Tensor
    positions: torch.Tensor  # [P] row-major positions in tokens whose outputs are user vectors
    rows: torch.Tensor  # [P] row of each position
    targets: torch.Tensor  # [P] catalog index each position must rank first


@dataclass
class SampledBatch(PairBatch):
    """A pair batch with the step's shared pool of sampled negatives and the logQ terms."""

    negatives: torch.Tensor  # [M] catalog indices (drawn with replacement)
    neg_log_q: torch.Tensor  # [M] log of each pool entry's expected count in the pool
    target_log_q: torch.Tensor  # [P] log of each target's expected count among the batch's targets


class NegativeSampler:
    """Draws sampled-softmax negatives: ``uniform`` over the catalog, by training ``popularity``
    (the distribution the batch's targets come from), or their even ``mixed`` mixture. The
    cumulative table is built once (O(catalog)); a draw of M items costs O(M log catalog)."""

    def __init__(self, popularity: np.ndarray, kind: str):
        counts = np.asarray(popularity, dtype=np.float64)
        if counts.sum() <= 0:
            raise ValueError("negative sampling needs at least one training interaction")
        self.target_p = counts / counts.sum()
        uniform = np.full(len(counts), 1.0 / len(counts))
        self.p = {"uniform": uniform, "popularity": self.target_p, "mixed": 0.5 * (uniform + self.target_p)}[kind]
        self.cdf = np.cumsum(self.p)
        self.cdf[-1] = 1.0

    def draw(self, m: int, rng: np.random.Generator) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cdf, rng.random(m), side="right"), len(self.cdf) - 1)

    def attach(self, batch: PairBatch, m: int, rng: np.random.Generator) -> SampledBatch:
        """``batch`` with a freshly drawn pool of ``m`` negatives and the logQ terms of every column."""
        negatives = self.draw(m, rng)
        targets = batch.targets.numpy()
        return SampledBatch(**vars(batch), negatives=torch.as_tensor(negatives, dtype=torch.long),
                            neg_log_q=torch.as_tensor(np.log(m * self.p[negatives]), dtype=torch.float32),
                            target_log_q=torch.as_tensor(np.log(len(targets) * self.target_p[targets]),
                                                         dtype=torch.float32))


@dataclass
class DenseBatch:
    hist_tokens: torch.Tensor  # [B, Lh]
    hist_pos: torch.Tensor  # [B, N_h] positions into hist_tokens (valid where hist_valid)
    hist_valid: torch.Tensor  # [B, N_h]
    tgt_tokens: torch.Tensor  # [B, Lt] target part, right-padded
    tgt_pos: torch.Tensor  # [B, N_t]
    tgt_valid: torch.Tensor  # [B, N_t]
    tgt_items: torch.Tensor  # [B, N_t] catalog indices (-1 where invalid)


def shard_users(train: list[np.ndarray], min_len: int, rank: int, world_size: int, order_rng: np.random.Generator,
                equalize: bool = True) -> np.ndarray:
    """Shuffled users with at least ``min_len`` training items, this worker's share.

    ``order_rng`` must be seeded the same on every worker (e.g. by seed and epoch) so the shards are
    disjoint; with ``equalize`` every worker gets the same count (the tail is cut) so DDP steps line up.
    """
    lengths = train.lengths() if hasattr(train, "lengths") else np.fromiter(map(len, train), np.int64, len(train))
    users = np.flatnonzero(lengths >= min_len).astype(np.int64)
    users = users[order_rng.permutation(len(users))]
    if world_size > 1:
        per = len(users) // world_size if equalize else None
        users = users[rank::world_size]
        if per is not None:
            users = users[:per]
    return users


def pair_batches(train: list[np.ndarray], *, batch_size: int, max_history: int,
                 first_target: Callable[[int], int], all_positions: bool,
                 rng: np.random.Generator, order_rng: np.random.Generator | None = None, rank: int = 0,
                 world_size: int = 1):
    users = shard_users(train, 2, rank, world_size, order_rng or rng)
    for start in range(0, len(users), batch_size):
        chunk = users[start : start + batch_size]
        hists, tgts, npos = [], [], []
        for u in chunk:
            seq = train[u]
            L = len(seq)
            if all_positions:
                # a random window of max_history + 1 items: over epochs every transition is a target
                start = int(rng.integers(0, max(1, L - max_history)))
                window = seq[start : start + max_history + 1]
                hists.append(window[:-1])
                tgts.append(window[1:])
                npos.append(len(window) - 1)
            else:
                t = int(rng.integers(first_target(L), L))
                hists.append(seq[:t][-max_history:])
                tgts.append(seq[t : t + 1])
                npos.append(1)
        tokens = pad_histories(hists, max_history)
        rows, positions, targets = [], [], []
        for r, (h, tg, n) in enumerate(zip(hists, tgts, npos)):
            first = len(h) - n  # last n positions predict
            rows.extend([r] * n)
            positions.extend(range(first, len(h)))
            targets.extend(int(x) for x in tg)
        yield PairBatch(
            tokens=tokens,
            positions=torch.tensor(positions, dtype=torch.long),
            rows=torch.tensor(rows, dtype=torch.long),
            targets=torch.tensor(targets, dtype=torch.long),
        )


def recency_weights(n: int) -> np.ndarray:
    """w_i = log(10 + i * (10000 - 10) / (n - 1)), divided by its max: later items weigh more."""
    if n == 1:
        return np.ones(1)
    w = np.log(10.0 + np.arange(n) * (10000.0 - 10.0) / (n - 1))
    return w / w.max()


def sample_targets(n: int, n_targets: int, recency: bool, rng: np.random.Generator,
                   cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Two stages over a target part of ``n`` items: a uniform subsample ``pool`` of at most ``cap``
    positions (kept in time order), then ``n_targets`` of the pool drawn without replacement,
    weighted by recency over the whole part when asked. Returns (pool, picks into pool), sorted."""
    pool = np.arange(n)
    if n > cap:
        pool = np.sort(rng.choice(n, size=cap, replace=False))
    k = min(n_targets, len(pool))
    p = None
    if recency:
        w = recency_weights(n)[pool]
        p = w / w.sum()
    return pool, np.sort(rng.choice(len(pool), size=k, replace=False, p=p))


def dense_batches(train: list[np.ndarray], *, batch_size: int, max_history: int, target_len: int, n_history: int,
                  n_targets: int, recency: bool, rng: np.random.Generator,
                  order_rng: np.random.Generator | None = None, rank: int = 0, world_size: int = 1):
    users = shard_users(train, 2, rank, world_size, order_rng or rng)
    for start in range(0, len(users), batch_size):
        chunk = users[start : start + batch_size]
        hists, tgts, hpos, tpos = [], [], [], []
        for u in chunk:
            seq = train[u]
            L = len(seq)
            cut = int(rng.integers(max(1, L // 2), L))
            h = seq[:cut][-max_history:]
            pool, picks = sample_targets(L - cut, n_targets, recency, rng, cap=target_len)
            hists.append(h)
            tgts.append(seq[cut:][pool])  # the target part the item tower reads, at most target_len
            k = min(n_history, len(h))
            hpos.append(np.sort(rng.choice(len(h), size=k, replace=False)))
            tpos.append(picks)
        B = len(chunk)
        hist_pos = torch.zeros(B, n_history, dtype=torch.long)
        hist_valid = torch.zeros(B, n_history, dtype=torch.bool)
        tgt_pos = torch.zeros(B, n_targets, dtype=torch.long)
        tgt_valid = torch.zeros(B, n_targets, dtype=torch.bool)
        tgt_items = torch.full((B, n_targets), -1, dtype=torch.long)
        for r in range(B):
            hist_pos[r, : len(hpos[r])] = torch.as_tensor(hpos[r])
            hist_valid[r, : len(hpos[r])] = True
            tgt_pos[r, : len(tpos[r])] = torch.as_tensor(tpos[r])
            tgt_valid[r, : len(tpos[r])] = True
            tgt_items[r, : len(tpos[r])] = torch.as_tensor(tgts[r][tpos[r]])
        yield DenseBatch(
            hist_tokens=pad_histories(hists, max_history),
            hist_pos=hist_pos,
            hist_valid=hist_valid,
            tgt_tokens=pad_histories(tgts, target_len),
            tgt_pos=tgt_pos,
            tgt_valid=tgt_valid,
            tgt_items=tgt_items,
        )

"""Training examples per recipe, drawn afresh each epoch from the users' training sequences.

pair batches             one (history, target) per user and epoch: target index uniform in
                          [first_target(L), L-1]; or, with all_positions, every position of a window of
                          max_history + 1 items predicts its successor (full_softmax, in_batch): one
                          random window per user and epoch (``coverage="window"``), or every user's
                          sequence cut into consecutive windows so that each training transition is a
                          target exactly once per epoch (``coverage="transitions"``: a user with L items
                          is ceil((L - 1) / max_history) batch rows; long sequences are no longer
                          sampled at one window per epoch).
dense_all_action          each sequence is cut at a point into a history part and a target part;
                          N_h history positions and N_t targets (recency-weighted) are sampled; or,
                          with all_positions, every position is a cut; optionally only targets within
                          ``target_window`` items of a position are its positives (``dense_batches``).

Every sampler takes ``rank``/``world_size`` so a DDP worker reads only its shard of users.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

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
class CandidateBatch(PairBatch):
    """A pair batch whose softmax runs over given columns: a subset of the catalog
    (``train.softmax_items=seen``) or the whole catalog with a per-column logit bias
    (``train.logit_adjustment``)."""

    candidates: torch.Tensor  # [C] catalog indices, the softmax's columns (the same tensor every step)
    target_cols: torch.Tensor  # [P] the column of each target among candidates
    column_bias: torch.Tensor  # [C] added to each column's training logit (zeros: none)

    CONSTANT: ClassVar[tuple[str, ...]] = ("candidates", "column_bias")  # the same tensors every step


@dataclass
class SampledBatch(PairBatch):
    """A pair batch with the step's shared pool of sampled negatives and the logQ terms."""

    negatives: torch.Tensor  # [M] catalog indices (drawn with replacement)
    neg_log_q: torch.Tensor  # [M] log of each pool entry's expected count in the pool
    target_log_q: torch.Tensor  # [P] log of each target's expected count among the batch's targets


class NegativeSampler:
    """Draws sampled-softmax negatives: ``uniform`` over the catalog (over the items seen in
    training with ``seen_only``: ``train.softmax_items=seen``), by training ``popularity`` (the
    distribution the batch's targets come from), or their even ``mixed`` mixture. The cumulative
    table is built once (O(catalog)); a draw of M items costs O(M log catalog)."""

    def __init__(self, popularity: np.ndarray, kind: str, seen_only: bool = False):
        counts = np.asarray(popularity, dtype=np.float64)
        if counts.sum() <= 0:
            raise ValueError("negative sampling needs at least one training interaction")
        self.target_p = counts / counts.sum()
        support = counts > 0 if seen_only else np.ones(len(counts), dtype=bool)
        uniform = support / support.sum()
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
    """One dense all-action batch: B users, each with N_h history positions and N_t targets."""

    hist_tokens: torch.Tensor  # [B, Lh]
    hist_pos: torch.Tensor  # [B, N_h] positions into hist_tokens (valid where hist_valid)
    hist_valid: torch.Tensor  # [B, N_h]
    tgt_tokens: torch.Tensor  # [B, Lt] target part, right-padded
    tgt_pos: torch.Tensor  # [B, N_t]
    tgt_valid: torch.Tensor  # [B, N_t]
    tgt_items: torch.Tensor  # [B, N_t] catalog indices (-1 where invalid)
    pair_valid: torch.Tensor  # [B, N_h, N_t] the (position, target) pairs that are positives
    pair_lag: torch.Tensor  # [B, N_h, N_t] how many items after the history position the target comes (0: no pair)
    tgt_log_q: torch.Tensor  # [B, N_t] log of each target's expected count among the batch's targets
    negatives: torch.Tensor  # [M] shared pool of sampled negatives (M = 0: in-batch only)
    neg_log_q: torch.Tensor  # [M] log of each pool entry's expected count in the pool


def sequence_lengths(train) -> np.ndarray:
    return train.lengths() if hasattr(train, "lengths") else np.fromiter(map(len, train), np.int64, len(train))


def _shard(units: np.ndarray, rank: int, world_size: int, equalize: bool) -> np.ndarray:
    if world_size > 1:
        per = len(units) // world_size if equalize else None
        units = units[rank::world_size]
        if per is not None:
            units = units[:per]
    return units


def shard_users(train: list[np.ndarray], min_len: int, rank: int, world_size: int, order_rng: np.random.Generator,
                equalize: bool = True) -> np.ndarray:
    """Shuffled users with at least ``min_len`` training items, this worker's share.

    ``order_rng`` must be seeded the same on every worker (e.g. by seed and epoch) so the shards are
    disjoint; with ``equalize`` every worker gets the same count (the tail is cut) so DDP steps line up.
    """
    users = np.flatnonzero(sequence_lengths(train) >= min_len).astype(np.int64)
    return _shard(users[order_rng.permutation(len(users))], rank, world_size, equalize)


def windows_per_user(lengths: np.ndarray, max_history: int) -> np.ndarray:
    """How many consecutive windows of ``max_history`` targets cover each sequence's L - 1 transitions."""
    return np.where(lengths >= 2, -(-(lengths - 1) // max_history), 0)


def shard_windows(train, max_history: int, rank: int, world_size: int, order_rng: np.random.Generator,
                  equalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``coverage="transitions"``: every (user, window) of the epoch, shuffled, this worker's share, as
    (users, ends): the window of ``end`` predicts targets max(1, end - max_history + 1) .. end of the
    user's sequence (the last window ends at the last item; earlier ones every max_history before)."""
    lengths = sequence_lengths(train).astype(np.int64)
    k = windows_per_user(lengths, max_history)
    users = np.repeat(np.arange(len(lengths), dtype=np.int64), k)
    first = np.repeat(np.cumsum(k) - k, k)
    ends = lengths[users] - 1 - (np.arange(len(users), dtype=np.int64) - first) * max_history
    order = _shard(order_rng.permutation(len(users)), rank, world_size, equalize)
    return users[order], ends[order]


def epoch_rows(train, max_history: int, coverage: str = "window", all_positions: bool = False) -> int:
    """Batch rows in one epoch over ``train`` (before sharding)."""
    lengths = sequence_lengths(train)
    if all_positions and coverage == "transitions":
        return int(windows_per_user(lengths, max_history).sum())
    return int((lengths >= 2).sum())


def _window(seq: np.ndarray, L: int, max_history: int, end: int | None, rng: np.random.Generator) -> np.ndarray:
    """The items of one all-positions window: the epoch's ``end`` (coverage transitions) or a random
    window of max_history + 1 items (coverage window)."""
    if end is None:
        start = int(rng.integers(0, max(1, L - max_history)))
        return seq[start : start + max_history + 1]
    return seq[max(0, end - max_history) : end + 1]


def _epoch_units(train, max_history: int, coverage: str, all_positions: bool, rank: int, world_size: int,
                 order_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    if all_positions and coverage == "transitions":
        return shard_windows(train, max_history, rank, world_size, order_rng)
    if coverage not in ("window", "transitions"):
        raise ValueError(f"coverage must be 'window' or 'transitions', got {coverage!r}")
    return shard_users(train, 2, rank, world_size, order_rng), None


def pair_batches(train: list[np.ndarray], *, batch_size: int, max_history: int,
                 first_target: Callable[[int], int], all_positions: bool,
                 rng: np.random.Generator, order_rng: np.random.Generator | None = None, rank: int = 0,
                 world_size: int = 1, coverage: str = "window"):
    users, ends = _epoch_units(train, max_history, coverage, all_positions, rank, world_size, order_rng or rng)
    for start in range(0, len(users), batch_size):
        chunk = users[start : start + batch_size]
        chunk_ends = ends[start : start + batch_size] if ends is not None else [None] * len(chunk)
        hists, tgts, npos = [], [], []
        for u, end in zip(chunk, chunk_ends):
            seq = train[u]
            L = len(seq)
            if all_positions:
                # max_history + 1 items: over epochs (window) or in every epoch (transitions) every
                # transition is a target
                window = _window(seq, L, max_history, end, rng)
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


def item_popularity(train, num_items: int) -> np.ndarray:
    """How often each catalog item occurs in ``train`` (a list of arrays, or a ragged container
    with a flat ``values`` array)."""
    values = getattr(train, "values", None)
    if not isinstance(values, np.ndarray):
        parts = [np.asarray(s) for s in train if len(s)]
        values = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return np.bincount(values.astype(np.int64, copy=False), minlength=num_items)


def dense_batches(train, *, batch_size: int, max_history: int, target_len: int, n_history: int,
                  n_targets: int, recency: bool, rng: np.random.Generator,
                  order_rng: np.random.Generator | None = None, rank: int = 0, world_size: int = 1,
                  target_window: int = 0, all_positions: bool = False, sampler: NegativeSampler | None = None,
                  num_negatives: int = 0, coverage: str = "window"):
    """Dense all-action batches. ``train``: per-user sequences (a list of arrays or any sequence-like
    container whose ``[u]`` is an array).

    cut mode (the paper's)  each sequence cut at a point uniform in [L//2, L-1]; N_h history positions of
                            the part before the cut, N_t targets (recency-weighted) of the part after it
    all_positions           every position is a cut: a window of ``max_history`` + 1 items (random, or with
                            ``coverage="transitions"`` consecutive windows covering every transition), each
                            position's positives are the items after it in the window
    ``target_window`` W > 0: a pair is a positive only if the target comes at most W items after the
    history position (W = 1: next item only); in cut mode the targets are drawn from the first W items
    after the cut and the history positions from the last W before it. 0: no limit.
    ``sampler``: the batch's targets get their logQ terms from its training popularity, and
    ``num_negatives`` > 0 draws a shared pool of negatives from it each batch (None: no correction
    terms (zeros), no pool). With W = 0, no sampler and cut mode the draws are the paper recipe's as
    they always were (the golden values of that configuration did not move).
    """
    users, ends = _epoch_units(train, max_history, coverage, all_positions, rank, world_size, order_rng or rng)
    for start in range(0, len(users), batch_size):
        chunk = users[start : start + batch_size]
        chunk_ends = ends[start : start + batch_size] if ends is not None else [None] * len(chunk)
        hists, tgts, hpos, tpos, lags = [], [], [], [], []  # lags[r]: [n_h, n_t] target minus position
        for u, end in zip(chunk, chunk_ends):
            seq = train[u]
            L = len(seq)
            if all_positions:
                window = _window(seq, L, max_history, end, rng)
                n = len(window) - 1
                hists.append(window[:-1])
                tgts.append(window[1:])
                hpos.append(np.arange(n))
                tpos.append(np.arange(n))
                lags.append(np.arange(n)[None, :] + 1 - np.arange(n)[:, None])
                continue
            cut = int(rng.integers(max(1, L // 2), L))
            h = seq[:cut][-max_history:]
            n_after = L - cut if target_window <= 0 else min(L - cut, target_window)
            pool, picks = sample_targets(n_after, n_targets, recency, rng, cap=target_len)
            hists.append(h)
            tgts.append(seq[cut:][pool])  # the target part the item tower reads, at most target_len
            lowest = 0 if target_window <= 0 else max(0, len(h) - target_window)
            k = min(n_history, len(h) - lowest)
            positions = lowest + np.sort(rng.choice(len(h) - lowest, size=k, replace=False))
            hpos.append(positions)
            tpos.append(picks)
            lags.append((len(h) - positions)[:, None] + pool[picks][None, :])
        B = len(chunk)
        n_h = n_history if not all_positions else max(1, max(len(p) for p in hpos))
        n_t = n_targets if not all_positions else max(1, max(len(p) for p in tpos))
        hist_pos = torch.zeros(B, n_h, dtype=torch.long)
        hist_valid = torch.zeros(B, n_h, dtype=torch.bool)
        tgt_pos = torch.zeros(B, n_t, dtype=torch.long)
        tgt_valid = torch.zeros(B, n_t, dtype=torch.bool)
        tgt_items = torch.full((B, n_t), -1, dtype=torch.long)
        pair_valid = torch.zeros(B, n_h, n_t, dtype=torch.bool)
        pair_lag = torch.zeros(B, n_h, n_t, dtype=torch.long)
        for r in range(B):
            nh, nt = len(hpos[r]), len(tpos[r])
            hist_pos[r, :nh] = torch.as_tensor(hpos[r])
            hist_valid[r, :nh] = True
            tgt_pos[r, :nt] = torch.as_tensor(tpos[r])
            tgt_valid[r, :nt] = True
            tgt_items[r, :nt] = torch.as_tensor(np.asarray(tgts[r])[tpos[r]])
            ok = lags[r] >= 1
            if target_window > 0:
                ok &= lags[r] <= target_window
            pair_valid[r, :nh, :nt] = torch.as_tensor(ok)
            pair_lag[r, :nh, :nt] = torch.as_tensor(np.maximum(lags[r], 0))
        tgt_log_q = torch.zeros(B, n_t)
        negatives, neg_log_q = torch.zeros(0, dtype=torch.long), torch.zeros(0)
        if sampler is not None:
            valid_items = tgt_items[tgt_valid].numpy()
            tgt_log_q[tgt_valid] = torch.as_tensor(np.log(len(valid_items) * sampler.target_p[valid_items]),
                                                   dtype=torch.float32)
            if num_negatives > 0:
                drawn = sampler.draw(num_negatives, rng)
                negatives = torch.as_tensor(drawn, dtype=torch.long)
                neg_log_q = torch.as_tensor(np.log(num_negatives * sampler.p[drawn]), dtype=torch.float32)
        yield DenseBatch(
            hist_tokens=pad_histories(hists, max_history),
            hist_pos=hist_pos,
            hist_valid=hist_valid,
            tgt_tokens=pad_histories(tgts, max_history if all_positions else target_len),
            tgt_pos=tgt_pos,
            tgt_valid=tgt_valid,
            tgt_items=tgt_items,
            pair_valid=pair_valid,
            pair_lag=pair_lag,
            tgt_log_q=tgt_log_q,
            negatives=negatives,
            neg_log_q=neg_log_q,
        )

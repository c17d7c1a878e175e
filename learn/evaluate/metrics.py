"""Full-catalog ranking metrics with one target per user.

Every user's target is ranked against ALL N catalog items by score = user . item (the caller has
already normalised/scaled the vectors). Users are scored ``chunk_size`` rows at a time against
``item_block`` items at a time (near-equal spans of the catalog), so memory is
O(chunk_size x item_block) and no [chunk_size, N] matrix exists. Each block only adds to per-user
counts, so the ranks equal those of scoring the whole catalog at once, given that a float32 matrix
product computes each entry the same way whatever its number of columns (so on CPU for products of
more than a few rows and columns; spans are near-equal, so none is tiny). The target's own score
is taken from such a product too, never from a lone dot product, which rounds differently and
would break exact ties (tests/evaluate/test_metrics.py checks equality at Scientific size).
A catalog within one block is scored exactly as before, in one product.

Rank (0-based) is pessimistic under ties:
    rank = #items scoring above the target + #OTHER items scoring exactly the target's score.
With history exclusion, the user's own history items (other than the target item itself) are
dropped from the catalog before counting (equivalent to scoring them -inf).

Both modes come out of the same scoring pass: the "excluded" rank is the "included" rank minus the
number of distinct excluded items that counted against the target.

Metric keys (one target, so Recall@K == HR@K):
    recall_at_{K}, ndcg_at_{K}  (1/log2(rank+2) if rank < K else 0), mrr (1/(rank+1))
Segment keys (see ``segment_metrics``):
    ndcg_at_{k}_{seg}, recall_at_{k}_{seg}, users_{seg}
    seg in pop_cold, pop_tail/pop_mid/pop_head (3 buckets; otherwise pop_q0..pop_q{n-1}),
           hist_le3, hist_4_5, hist_6_10, hist_11_20, hist_gt20 (from the history upper bounds).
Bucket edges for logging: ``popularity_edges`` and ``segment_descriptions``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from learn.data.ragged import Ragged
from learn.data.sequences import EvalSplit

ScoreFn = Callable[[Any], "torch.Tensor | np.ndarray"]

__all__ = [
    "target_ranks",
    "target_ranks_both",
    "metrics_from_ranks",
    "popularity_edges",
    "popularity_segment_names",
    "history_segment_names",
    "segment_descriptions",
    "segment_metrics",
    "evaluate_split",
    "evaluate_both_modes",
    "sample_users",
]


# ----------------------------------------------------------------------------------------- ranks


def _chunk_scores(user_chunk: torch.Tensor, item_emb_f32: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """[c, d] x [b, d] -> [c, b] float32 dot products (into ``out`` when given). Kept separate so
    tests can spy on it."""
    return torch.mm(user_chunk.to(device=item_emb_f32.device, dtype=torch.float32), item_emb_f32.T, out=out)


def _reused(buf: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype, device) -> torch.Tensor:
    """A contiguous [shape] view of ``buf``, (re)allocated only when it is too small: a block's
    output lands in pages already touched instead of a fresh allocation per block."""
    n = shape[0] * shape[1]
    flat = torch.empty(n, dtype=dtype, device=device) if buf is None or buf.numel() < n else buf.view(-1)
    return flat[:n].view(shape)


def _score_blocks(chunk: torch.Tensor, item_f32: torch.Tensor, spans: list[tuple[int, int]]):
    """(start, end, [c, end - start] scores) per item span, written into one reused buffer."""
    buf = None
    for a, b in spans:
        buf = _reused(buf, (len(chunk), b - a), torch.float32, item_f32.device)
        yield a, b, _chunk_scores(chunk, item_f32[a:b], out=buf)


def _item_spans(n: int, block: int) -> list[tuple[int, int]]:
    """[0, n) cut into ceil(n / block) near-equal spans, so no span is much smaller than the rest."""
    size = -(-n // max(1, -(-n // block)))
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _target_scores(chunk: torch.Tensor, item_f32: torch.Tensor, tgt: torch.Tensor, block: int) -> torch.Tensor:
    """score(user i, target i) for the chunk, each taken from a [c, <=block] product of the whole
    chunk, the same kind of call that scores the item blocks (a lone dot product may round
    differently from a matrix product, and ties must compare equal)."""
    out = torch.empty(len(tgt), dtype=torch.float32, device=item_f32.device)
    for a, b in _item_spans(len(tgt), block):
        rows = torch.arange(a, b, device=item_f32.device)
        out[a:b] = _chunk_scores(chunk, item_f32[tgt[a:b]])[rows, rows - a]
    return out


def _as_index_array(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer catalog indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _lengths(histories: Sequence[np.ndarray]) -> np.ndarray:
    if isinstance(histories, Ragged):
        return histories.lengths()
    return np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))


def _history_pairs(histories: Sequence[np.ndarray], tgt: np.ndarray, n: int,
                   where: str, keep_target: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (row, item) history pairs of a chunk, sorted by item; the target item itself left out
    unless ``keep_target``."""
    hist = histories if isinstance(histories, Ragged) else Ragged.from_arrays([np.asarray(h) for h in histories])
    if len(hist.values) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cols = _as_index_array(hist.values, "histories")
    if cols.min() < 0 or cols.max() >= n:
        raise ValueError(f"history index out of range [0, {n}) among users {where}")
    rows = hist.row_of_values()
    keep = slice(None) if keep_target else cols != tgt[rows]
    keys = np.unique(cols[keep] * len(hist) + rows[keep])
    return keys % len(hist), keys // len(hist)


def _penalised(blocks, t_score: torch.Tensor, tgt: np.ndarray, pairs: tuple[np.ndarray, np.ndarray], penalty: float):
    """``blocks`` with ``penalty`` subtracted from the score of every (row, item) pair in ``pairs`` (the
    chunk's history, target included, sorted by item), written into each block's scores, and
    ``t_score`` lowered alike where the target is one of its row's history items. Both sides subtract
    the same float32 from the same float32, so a target still ties with what it tied with before."""
    rows, cols = pairs
    dev = t_score.device
    in_hist = np.zeros(len(tgt), dtype=bool)
    in_hist[rows[cols == tgt[rows]]] = True
    t_score[torch.from_numpy(in_hist).to(dev)] -= penalty
    for a, b, scores in blocks:
        lo, hi = np.searchsorted(cols, [a, b])
        if hi > lo:
            r = torch.from_numpy(rows[lo:hi]).to(dev)
            c = torch.from_numpy(cols[lo:hi] - a).to(dev)
            scores[r, c] -= penalty
        yield a, b, scores


def _count_blocks(blocks, t_score: torch.Tensor, tgt: np.ndarray, hist_rows: np.ndarray | None,
                  hist_cols: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Pessimistic ranks of one user chunk from its item blocks ((start, end, [c, end-start] scores)).

    base[i] = #items other than the target scoring >= t_score[i]; excluded[i] = how many of the
    chunk's history pairs (sorted by item) are among them."""
    dev = t_score.device
    c = len(tgt)
    base = torch.zeros(c, dtype=torch.int64, device=dev)
    counted = None if hist_rows is None else torch.zeros(c, dtype=torch.int64, device=dev)
    tgt_order = np.argsort(tgt, kind="stable")
    tgt_sorted = tgt[tgt_order]
    ge = None
    for a, b, scores in blocks:
        ge = torch.ge(scores, t_score[:, None], out=_reused(ge, tuple(scores.shape), torch.bool, dev))
        base += ge.sum(1, dtype=torch.int32)
        # the target itself is never counted
        lo, hi = np.searchsorted(tgt_sorted, [a, b])
        r = torch.from_numpy(tgt_order[lo:hi]).to(dev)
        base[r] -= ge[r, torch.from_numpy(tgt_sorted[lo:hi] - a).to(dev)].long()
        if counted is not None:
            lo, hi = np.searchsorted(hist_cols, [a, b])
            r = torch.from_numpy(hist_rows[lo:hi]).to(dev)
            counted.index_add_(0, r, ge[r, torch.from_numpy(hist_cols[lo:hi] - a).to(dev)].long())
    base_np = base.cpu().numpy()
    return base_np, None if counted is None else base_np - counted.cpu().numpy()


def target_ranks_both(
    user_emb: Any,
    item_emb: torch.Tensor | None,
    targets: np.ndarray,
    histories: Sequence[np.ndarray] | None,
    *,
    chunk_size: int = 2048,
    item_block: int = 8192,
    score_fn: ScoreFn | None = None,
    need_included: bool = True,
    need_excluded: bool = True,
    history_penalty: float = 0.0,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Ranks with history kept and with history excluded, from one scoring pass per chunk.

    Returns (ranks_included, ranks_excluded); an entry is None when its ``need_*`` flag is False.
    See ``target_ranks`` for the arguments. ``history_penalty`` (>= 0) is subtracted from the score of
    each of a user's own history items (the target too, when it is one) before counting: the served
    score of a history penalty (``score.history_weights``, learn/towers/mix.py).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if item_block < 1:
        raise ValueError(f"item_block must be >= 1, got {item_block}")
    targets = _as_index_array(targets, "targets")
    U = len(targets)
    if user_emb is None or len(user_emb) != U:
        raise ValueError(f"user_emb has {None if user_emb is None else len(user_emb)} rows, targets {U}")
    if isinstance(history_penalty, bool) or not np.isfinite(history_penalty) or history_penalty < 0:
        raise ValueError(f"history_penalty must be a finite number >= 0, got {history_penalty!r}")
    if need_excluded or history_penalty:
        if histories is None:
            raise ValueError("histories are required to exclude or penalise history items")
        if len(histories) != U:
            raise ValueError(f"{len(histories)} histories for {U} targets")

    if score_fn is None:
        if item_emb is None:
            raise ValueError("item_emb is required unless score_fn is given")
        user_emb = torch.as_tensor(user_emb)
        item_f32 = torch.as_tensor(item_emb).detach().to(device=user_emb.device, dtype=torch.float32)
        if item_f32.ndim != 2 or user_emb.ndim != 2 or user_emb.shape[1] != item_f32.shape[1]:
            raise ValueError(f"shape mismatch: user_emb {tuple(user_emb.shape)}, item_emb {tuple(item_f32.shape)}")
        N = item_f32.shape[0]
        if not torch.isfinite(item_f32).all():
            raise ValueError("item_emb holds NaN/inf values")
        spans = _item_spans(N, item_block)
    else:
        item_f32 = None
        N = None if item_emb is None else int(item_emb.shape[0])

    incl = np.empty(U, dtype=np.int64) if need_included else None
    excl = np.empty(U, dtype=np.int64) if need_excluded else None

    with torch.inference_mode():
        for start in range(0, U, chunk_size):
            end = min(start + chunk_size, U)
            c, where = end - start, f"{start}:{end}"
            tgt = targets[start:end]
            if score_fn is None:
                chunk = user_emb[start:end].detach()
                if not torch.isfinite(chunk).all():
                    raise ValueError(f"user_emb rows {where} hold NaN/inf values")
            else:
                scores = torch.as_tensor(score_fn(user_emb[start:end])).to(torch.float32)
                if N is None:
                    N = scores.shape[-1]
                if torch.isnan(scores).any():
                    raise ValueError(f"score_fn returned NaN scores for users {where}")
                if scores.shape != (c, N):
                    raise ValueError(f"scores for users {where} have shape {tuple(scores.shape)}, expected {(c, N)}")
            if tgt.size and (tgt.min() < 0 or tgt.max() >= N):
                raise ValueError(f"target index out of range [0, {N}) among users {where}")
            tgt_t = torch.from_numpy(tgt)

            if score_fn is not None:  # the callback scores the whole catalog: one block
                if history_penalty:
                    scores = scores.clone()  # (it may be the callback's own array)
                blocks = [(0, N, scores)]
                t_score = scores.gather(1, tgt_t.to(scores.device).view(-1, 1))[:, 0]
            elif len(spans) == 1:
                scores = _chunk_scores(chunk, item_f32)
                blocks = [(0, N, scores)]
                t_score = scores.gather(1, tgt_t.to(scores.device).view(-1, 1))[:, 0]
            else:
                t_score = _target_scores(chunk, item_f32, tgt_t.to(item_f32.device), item_block)
                blocks = _score_blocks(chunk, item_f32, spans)

            pairs = (None, None)
            if history_penalty:  # the pairs with the target, for the penalty; without it, for exclusion
                rows, cols = _history_pairs(histories[start:end], tgt, N, where, keep_target=True)
                blocks = _penalised(blocks, t_score, tgt, (rows, cols), float(history_penalty))
                if excl is not None:
                    other = cols != tgt[rows]
                    pairs = rows[other], cols[other]
            elif excl is not None:
                pairs = _history_pairs(histories[start:end], tgt, N, where)
            base, excluded = _count_blocks(blocks, t_score, tgt, *pairs)
            if incl is not None:
                incl[start:end] = base
            if excl is not None:
                excl[start:end] = excluded
    return incl, excl


def target_ranks(
    user_emb: Any,
    item_emb: torch.Tensor | None,
    targets: np.ndarray,
    histories: Sequence[np.ndarray] | None,
    *,
    exclude_history: bool,
    chunk_size: int = 2048,
    item_block: int = 8192,
    score_fn: ScoreFn | None = None,
    history_penalty: float = 0.0,
) -> np.ndarray:
    """0-based pessimistic rank of each user's target among all N catalog items.

    user_emb [U, d], item_emb [N, d] (any float dtype; scored in float32 on user_emb's device),
    targets [U] catalog indices, histories: per user catalog indices (needed for exclusion).
    score_fn(user_emb[start:end]) -> [c, N] scores replaces the dot product when given (item_emb
    may then be None); user_emb may then be anything sliceable of length U, e.g. np.arange(U) to
    hand the callback the row indices of the chunk; its [c, N] scores are then counted as one block.
    """
    incl, excl = target_ranks_both(
        user_emb,
        item_emb,
        targets,
        histories,
        chunk_size=chunk_size,
        item_block=item_block,
        score_fn=score_fn,
        need_included=not exclude_history,
        need_excluded=exclude_history,
        history_penalty=history_penalty,
    )
    return excl if exclude_history else incl


# --------------------------------------------------------------------------------------- metrics


def _check_ranks(ranks: Any) -> np.ndarray:
    r = np.asarray(ranks)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-d array, got shape {r.shape}")
    if (r < 0).any():
        raise ValueError("ranks must be >= 0")
    return r.astype(np.float64)


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = (10, 50)) -> dict[str, float]:
    """{"recall_at_K", "ndcg_at_K" for each K, "mrr"} averaged over users, as python floats."""
    r = _check_ranks(ranks)
    out: dict[str, float] = {}
    for k in ks:
        hit = r < k
        out[f"recall_at_{k}"] = float(hit.mean())
        out[f"ndcg_at_{k}"] = float(np.where(hit, 1.0 / np.log2(r + 2.0), 0.0).mean())
    out["mrr"] = float((1.0 / (r + 1.0)).mean())
    return out


# -------------------------------------------------------------------------------------- segments


def popularity_edges(train_popularity: np.ndarray, n_buckets: int) -> np.ndarray:
    """Interior edges (n_buckets - 1 of them) splitting warm items (train count > 0) into quantile
    buckets of the catalog. Bucket b holds counts in (edges[b-1], edges[b]]; they depend only on the
    training data, so they are fixed per dataset and split."""
    if n_buckets < 1:
        raise ValueError(f"popularity_buckets must be >= 1, got {n_buckets}")
    pop = np.asarray(train_popularity)
    warm = pop[pop > 0].astype(np.float64)
    if warm.size == 0 or n_buckets == 1:
        return np.zeros(0, dtype=np.float64)
    return np.quantile(warm, np.arange(1, n_buckets) / n_buckets)


def popularity_segment_names(n_buckets: int) -> list[str]:
    """Warm bucket names, least popular first (pop_cold is separate)."""
    if n_buckets == 3:
        return ["pop_tail", "pop_mid", "pop_head"]
    return [f"pop_q{i}" for i in range(n_buckets)]


def _check_history_bounds(bounds: Sequence[int]) -> list[int]:
    b = [int(x) for x in bounds]
    if any(x < 0 for x in b) or any(b2 <= b1 for b1, b2 in zip(b, b[1:])):
        raise ValueError(f"history_buckets must be increasing non-negative upper bounds, got {list(bounds)}")
    return b


def history_segment_names(bounds: Sequence[int]) -> list[str]:
    """[3, 5, 10, 20] -> hist_le3, hist_4_5, hist_6_10, hist_11_20, hist_gt20. Empty -> []."""
    b = _check_history_bounds(bounds)
    if not b:
        return []
    names = [f"hist_le{b[0]}"]
    for lo, hi in zip(b, b[1:]):
        names.append(f"hist_{lo + 1}" if lo + 1 == hi else f"hist_{lo + 1}_{hi}")
    names.append(f"hist_gt{b[-1]}")
    return names


def segment_descriptions(
    train_popularity: np.ndarray,
    *,
    popularity_buckets: int = 3,
    history_buckets: Sequence[int] = (3, 5, 10, 20),
) -> dict[str, str]:
    """Human-readable definition of every segment (with the actual edges), for logging as params."""
    edges = popularity_edges(train_popularity, popularity_buckets)
    out = {"pop_cold": "train count == 0"}
    bounds = [0.0, *edges.tolist(), float("inf")]
    for name, lo, hi in zip(popularity_segment_names(popularity_buckets), bounds, bounds[1:]):
        out[name] = f"{lo:g} < train count <= {hi:g}"
    b = _check_history_bounds(history_buckets)
    hb = [-1, *b, float("inf")]
    for name, lo, hi in zip(history_segment_names(b), hb, hb[1:]):
        out[name] = f"{lo + 1:g} <= history length <= {hi:g}"
    return out


def segment_metrics(
    ranks: np.ndarray,
    targets: np.ndarray,
    histories: Sequence[np.ndarray],
    train_popularity: np.ndarray,
    *,
    k: int = 10,
    popularity_buckets: int = 3,
    history_buckets: Sequence[int] = (3, 5, 10, 20),
) -> dict[str, float]:
    """NDCG@k / Recall@k / user count per segment; empty segments are left out.

    Item segments by the TARGET's train count: pop_cold (0), then the warm quantile buckets of
    ``popularity_edges``. User segments by len(history). Edges: ``popularity_edges`` /
    ``segment_descriptions`` (same arguments give the same edges).
    """
    r = _check_ranks(ranks)
    targets = _as_index_array(targets, "targets")
    pop = np.asarray(train_popularity)
    if len(targets) != len(r) or len(histories) != len(r):
        raise ValueError(f"{len(r)} ranks, {len(targets)} targets, {len(histories)} histories")
    if targets.size and (targets.min() < 0 or targets.max() >= len(pop)):
        raise ValueError(f"target index out of range [0, {len(pop)}) of train_popularity")

    segments: list[tuple[str, np.ndarray]] = []
    tpop = pop[targets]
    cold = tpop <= 0
    segments.append(("pop_cold", cold))
    bucket = np.searchsorted(popularity_edges(pop, popularity_buckets), tpop, side="left")
    for i, name in enumerate(popularity_segment_names(popularity_buckets)):
        segments.append((name, ~cold & (bucket == i)))

    bounds = _check_history_bounds(history_buckets)
    if bounds:
        lens = _lengths(histories)
        hbucket = np.searchsorted(np.asarray(bounds), lens, side="left")
        for i, name in enumerate(history_segment_names(bounds)):
            segments.append((name, hbucket == i))

    out: dict[str, float] = {}
    for name, mask in segments:
        n = int(mask.sum())
        if n == 0:
            continue
        m = metrics_from_ranks(ranks=np.asarray(ranks)[mask], ks=(k,))
        out[f"ndcg_at_{k}_{name}"] = m[f"ndcg_at_{k}"]
        out[f"recall_at_{k}_{name}"] = m[f"recall_at_{k}"]
        out[f"users_{name}"] = n
    return out


# ------------------------------------------------------------------------------------ convenience


def _all_metrics(
    ranks: np.ndarray,
    split: EvalSplit,
    ks: Sequence[int],
    train_popularity: np.ndarray | None,
    segment_k: int | None,
    popularity_buckets: int,
    history_buckets: Sequence[int],
) -> dict[str, float]:
    out: dict[str, float] = {"users": len(ranks), **metrics_from_ranks(ranks, ks)}
    if train_popularity is not None:
        out.update(
            segment_metrics(
                ranks,
                split.targets,
                split.histories,
                train_popularity,
                k=segment_k if segment_k is not None else min(ks),
                popularity_buckets=popularity_buckets,
                history_buckets=history_buckets,
            )
        )
    return out


def evaluate_split(
    user_emb: Any,
    item_emb: torch.Tensor | None,
    split: EvalSplit,
    *,
    ks: Sequence[int] = (10, 50),
    exclude_history: bool,
    chunk_size: int = 2048,
    train_popularity: np.ndarray | None = None,
    prefix: str = "",
    segment_k: int | None = None,
    popularity_buckets: int = 3,
    history_buckets: Sequence[int] = (3, 5, 10, 20),
    score_fn: ScoreFn | None = None,
    item_block: int = 8192,
) -> dict[str, float]:
    """Rank ``split``'s targets and return prefixed metrics: {prefix}users, {prefix}recall_at_K,
    {prefix}ndcg_at_K, {prefix}mrr, plus segment keys (at segment_k, default min(ks)) when
    train_popularity is given."""
    ranks = target_ranks(
        user_emb,
        item_emb,
        split.targets,
        split.histories,
        exclude_history=exclude_history,
        chunk_size=chunk_size,
        item_block=item_block,
        score_fn=score_fn,
    )
    m = _all_metrics(ranks, split, ks, train_popularity, segment_k, popularity_buckets, history_buckets)
    return {f"{prefix}{key}": v for key, v in m.items()}


def evaluate_both_modes(
    user_emb: Any,
    item_emb: torch.Tensor | None,
    split: EvalSplit,
    *,
    ks: Sequence[int] = (10, 50),
    exclude_history: bool,
    chunk_size: int = 2048,
    train_popularity: np.ndarray | None = None,
    prefix: str = "",
    segment_k: int | None = None,
    popularity_buckets: int = 3,
    history_buckets: Sequence[int] = (3, 5, 10, 20),
    score_fn: ScoreFn | None = None,
    item_block: int = 8192,
    history_penalty: float = 0.0,
) -> dict[str, float]:
    """Like ``evaluate_split`` for both history modes from one scoring pass.

    The configured mode's keys are plain ({prefix}ndcg_at_10); the other mode's carry a suffix:
    "_excl_hist" when exclude_history=False is configured, "_incl_hist" when it is True.
    ``history_penalty``: see ``target_ranks_both``.
    """
    incl, excl = target_ranks_both(
        user_emb, item_emb, split.targets, split.histories, chunk_size=chunk_size, item_block=item_block,
        score_fn=score_fn, history_penalty=history_penalty,
    )
    return metrics_both_modes(incl, excl, split, ks=ks, exclude_history=exclude_history,
                              train_popularity=train_popularity, prefix=prefix, segment_k=segment_k,
                              popularity_buckets=popularity_buckets, history_buckets=history_buckets)


def metrics_both_modes(incl: np.ndarray, excl: np.ndarray, split: EvalSplit, *, ks: Sequence[int] = (10, 50),
                       exclude_history: bool, train_popularity: np.ndarray | None = None, prefix: str = "",
                       segment_k: int | None = None, popularity_buckets: int = 3,
                       history_buckets: Sequence[int] = (3, 5, 10, 20)) -> dict[str, float]:
    """``evaluate_both_modes``'s metrics from the two rank arrays (e.g. gathered from several workers
    that each ranked a share of ``split``'s rows, in row order)."""
    main, other, suffix = (excl, incl, "_incl_hist") if exclude_history else (incl, excl, "_excl_hist")
    args = (split, ks, train_popularity, segment_k, popularity_buckets, history_buckets)
    out = {f"{prefix}{key}": v for key, v in _all_metrics(main, *args).items()}
    out.update({f"{prefix}{key}{suffix}": v for key, v in _all_metrics(other, *args).items() if key != "users"})
    return out


def sample_users(split: EvalSplit, max_users: int | None, seed: int) -> EvalSplit:
    """A fixed seeded sample of ``max_users`` rows of ``split`` (kept in their order), or the split
    itself when max_users is 0/None or covers it. Same seed, same rows: validation during training
    (``eval.valid_max_users``) scores the same users every epoch."""
    if max_users is not None and max_users < 0:
        raise ValueError(f"eval.valid_max_users must be >= 0 (0 or null = all users), got {max_users}")
    if not max_users or max_users >= len(split):
        return split
    rows = np.sort(np.random.default_rng(seed).choice(len(split), size=max_users, replace=False))
    return split.subset(rows)

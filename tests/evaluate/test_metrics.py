"""Full-ranking metrics: checked against an independent brute-force reference and hand examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learn.data.sequences import EvalSplit
from learn.evaluate import metrics as M
from learn.evaluate import (
    evaluate_both_modes,
    evaluate_split,
    history_segment_names,
    metrics_from_ranks,
    popularity_edges,
    sample_users,
    segment_descriptions,
    segment_metrics,
    target_ranks,
)

# ------------------------------------------------------------------------------- the reference


def ref_ranks(scores: np.ndarray, targets, histories, exclude: bool) -> np.ndarray:
    """Count, item by item, the other items that score >= the target (pessimistic ties)."""
    out = []
    for u, t in enumerate(targets):
        dropped = set(int(i) for i in histories[u]) - {int(t)} if exclude else set()
        n = 0
        for j in range(scores.shape[1]):
            if j != t and j not in dropped and scores[u, j] >= scores[u, t]:
                n += 1
        out.append(n)
    return np.array(out)


def ref_metrics(ranks, ks) -> dict[str, float]:
    n = len(ranks)
    out = {}
    for k in ks:
        out[f"recall_at_{k}"] = sum(1.0 for r in ranks if r < k) / n
        out[f"ndcg_at_{k}"] = sum(1.0 / math.log2(r + 2) for r in ranks if r < k) / n
    out["mrr"] = sum(1.0 / (r + 1) for r in ranks) / n
    return out


def assert_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        assert abs(got[key] - want[key]) <= 1e-12, (key, got[key], want[key])


def tie_heavy_case(seed=0, U=23, N=17, d=3):
    """Embeddings in {-1, 0, 1}: scores are small integers, so ties are everywhere (and exact in
    every float dtype)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(-1, 2, size=(U, d))
    items = rng.integers(-1, 2, size=(N, d))
    targets = rng.integers(0, N, size=U)
    histories = []
    for u in range(U):
        h = rng.integers(0, N, size=rng.integers(0, 9))  # duplicates allowed, may be empty
        if u % 3 == 0:  # target inside the history
            h = np.append(h, targets[u])
            rng.shuffle(h)
        histories.append(h.astype(np.int64))
    return users, items, targets, histories


# ------------------------------------------------------------------------ (1) against reference


@pytest.mark.parametrize("item_block", [3, 5, 8192])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("exclude", [False, True])
def test_matches_reference_with_ties(chunk_size, exclude, item_block):
    users, items, targets, histories = tie_heavy_case()
    scores = users @ items.T
    assert any(len(set(row)) < len(row) for row in scores)  # ties really occur
    assert any(targets[u] in histories[u] for u in range(len(targets)))
    want_ranks = ref_ranks(scores, targets, histories, exclude)
    ranks = target_ranks(
        torch.tensor(users, dtype=torch.float32),
        torch.tensor(items, dtype=torch.float32),
        targets,
        histories,
        exclude_history=exclude,
        chunk_size=chunk_size,
        item_block=item_block,
    )
    assert ranks.dtype == np.int64
    np.testing.assert_array_equal(ranks, want_ranks)
    assert_close(metrics_from_ranks(ranks, ks=(1, 3, 10)), ref_metrics(want_ranks, (1, 3, 10)))


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_score_fn_matches_reference(chunk_size):
    rng = np.random.default_rng(1)
    U, N = 19, 13
    scores = rng.integers(0, 4, size=(U, N)).astype(np.float64)
    targets = rng.integers(0, N, size=U)
    histories = [np.append(rng.integers(0, N, size=3), targets[u] if u % 2 else []).astype(np.int64) for u in range(U)]
    fn = lambda rows: torch.tensor(scores[rows])  # noqa: E731 - receives np.arange slices
    for exclude in (False, True):
        ranks = target_ranks(
            np.arange(U), None, targets, histories, exclude_history=exclude, chunk_size=chunk_size, score_fn=fn
        )
        np.testing.assert_array_equal(ranks, ref_ranks(scores, targets, histories, exclude))


@pytest.mark.parametrize("configured", [False, True])
def test_both_modes_keys_and_values(configured):
    users, items, targets, histories = tie_heavy_case(seed=3)
    split = EvalSplit(users=np.arange(len(targets)), histories=histories, targets=targets)
    u, it = torch.tensor(users, dtype=torch.float32), torch.tensor(items, dtype=torch.float32)
    got = evaluate_both_modes(u, it, split, ks=(3, 10), exclude_history=configured, chunk_size=7, prefix="test_")
    scores = users @ items.T
    main = ref_metrics(ref_ranks(scores, targets, histories, configured), (3, 10))
    other = ref_metrics(ref_ranks(scores, targets, histories, not configured), (3, 10))
    suffix = "_incl_hist" if configured else "_excl_hist"
    want = {"test_users": len(targets)}
    want.update({f"test_{k}": v for k, v in main.items()})
    want.update({f"test_{k}{suffix}": v for k, v in other.items()})
    assert_close(got, want)
    # the single-mode helper agrees with the plain keys
    single = evaluate_split(u, it, split, ks=(3, 10), exclude_history=configured, chunk_size=5, prefix="test_")
    assert single == {k: v for k, v in got.items() if not k.endswith(suffix)}


# ------------------------------------------------------------------------------ (2) hand-checked


def test_hand_checked_example():
    # item scores for user +1: [3, 1, 2, 2, 0]; for user -1: [-3, -1, -2, -2, 0]
    items = torch.tensor([[3.0], [1.0], [2.0], [2.0], [0.0]])
    users = torch.tensor([[1.0], [-1.0], [1.0]])
    targets = np.array([2, 4, 4])
    histories = [np.array([0, 2]), np.array([1]), np.array([], dtype=np.int64)]
    # u0: item0 above, item3 tied -> 2; excluding item0 (target 2 stays) -> 1
    # u1: target is the top item -> 0; u2: all 4 others above -> 4
    incl = target_ranks(users, items, targets, histories, exclude_history=False)
    excl = target_ranks(users, items, targets, histories, exclude_history=True)
    assert incl.tolist() == [2, 0, 4]
    assert excl.tolist() == [1, 0, 4]

    m = metrics_from_ranks(incl, ks=(1, 3))
    assert m == pytest.approx(
        {"recall_at_1": 1 / 3, "ndcg_at_1": 1 / 3, "recall_at_3": 2 / 3, "ndcg_at_3": (0.5 + 1) / 3,
         "mrr": (1 / 3 + 1 + 1 / 5) / 3}, abs=1e-15)
    m = metrics_from_ranks(excl, ks=(3,))
    assert m["ndcg_at_3"] == pytest.approx((1 / math.log2(3) + 1) / 3, abs=1e-15)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 5) / 3, abs=1e-15)
    assert list(m) == ["recall_at_3", "ndcg_at_3", "mrr"]
    assert all(type(v) is float for v in m.values())


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        metrics_from_ranks(np.array([], dtype=np.int64))
    u, it = torch.ones(2, 2), torch.ones(3, 2)
    with pytest.raises(ValueError, match="histories"):
        target_ranks(u, it, np.array([0, 1]), None, exclude_history=True)
    with pytest.raises(ValueError, match="out of range"):
        target_ranks(u, it, np.array([0, 3]), None, exclude_history=False)
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(u, it * float("nan"), np.array([0, 1]), None, exclude_history=False)
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(u * float("nan"), it, np.array([0, 1]), None, exclude_history=False)
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(np.arange(2), None, np.array([0, 1]), None, exclude_history=False,
                     score_fn=lambda r: torch.full((len(r), 3), float("nan")))
    with pytest.raises(ValueError, match="item_block"):
        target_ranks(u, it, np.array([0, 1]), None, exclude_history=False, item_block=0)
    with pytest.raises(ValueError, match="history index out of range"):
        target_ranks(u, it, np.array([0, 1]), [np.array([0]), np.array([3])], exclude_history=True, item_block=2)


# ------------------------------------------------------------------------------- (3) segments


def test_segment_metrics_crafted():
    pop = np.array([0, 0, 1, 1, 2, 3, 5, 8, 13, 21])
    # warm counts [1,1,2,3,5,8,13,21]: quantiles 1/3, 2/3 -> 2.333.., 7.0
    np.testing.assert_allclose(popularity_edges(pop, 3), [7 / 3, 7.0])
    # (target item, its rank, history length) per user
    rows = [(0, 0, 1), (1, 20, 3), (2, 5, 4), (4, 1, 5), (6, 0, 25), (9, 9, 10), (7, 10, 6)]
    targets = np.array([r[0] for r in rows])
    ranks = np.array([r[1] for r in rows])
    histories = [np.zeros(r[2], dtype=np.int64) for r in rows]
    got = segment_metrics(ranks, targets, histories, pop, k=10)

    def seg(name, ranks_in):
        ndcg = sum(1 / math.log2(r + 2) for r in ranks_in if r < 10) / len(ranks_in)
        rec = sum(r < 10 for r in ranks_in) / len(ranks_in)
        return {f"ndcg_at_10_{name}": ndcg, f"recall_at_10_{name}": rec, f"users_{name}": len(ranks_in)}

    want = {}
    want.update(seg("pop_cold", [0, 20]))  # items 0, 1 never trained on
    want.update(seg("pop_tail", [5, 1]))  # counts 1, 2
    want.update(seg("pop_mid", [0]))  # count 5
    want.update(seg("pop_head", [9, 10]))  # counts 21, 8
    want.update(seg("hist_le3", [0, 20]))
    want.update(seg("hist_4_5", [5, 1]))
    want.update(seg("hist_6_10", [9, 10]))
    want.update(seg("hist_gt20", [0]))  # hist_11_20 is empty: omitted
    assert_close(got, want)
    assert got["users_pop_cold"] == 2 and "users_hist_11_20" not in got


def test_segment_edges_and_names():
    # a count equal to an edge belongs to the lower bucket: warm [1,2,3], median edge 2
    pop = np.array([0, 1, 2, 3])
    got = segment_metrics(np.zeros(3, np.int64), np.array([1, 2, 3]), [[]] * 3, pop, k=5,
                          popularity_buckets=2, history_buckets=[1, 2])
    assert got["users_pop_q0"] == 2 and got["users_pop_q1"] == 1 and "users_pop_cold" not in got
    assert got["users_hist_le1"] == 3
    assert history_segment_names([3, 5, 10, 20]) == ["hist_le3", "hist_4_5", "hist_6_10", "hist_11_20", "hist_gt20"]
    assert history_segment_names([1, 2]) == ["hist_le1", "hist_2", "hist_gt2"]
    desc = segment_descriptions(pop, popularity_buckets=2, history_buckets=[1, 2])
    assert desc["pop_q0"] == "0 < train count <= 2" and desc["hist_gt2"] == "3 <= history length <= inf"
    with pytest.raises(ValueError):
        history_segment_names([5, 3])


def test_evaluate_split_with_segments():
    users, items, targets, histories = tie_heavy_case(seed=5)
    split = EvalSplit(users=np.arange(len(targets)), histories=histories, targets=targets)
    pop = np.random.default_rng(0).integers(0, 4, size=items.shape[0])
    got = evaluate_split(torch.tensor(users), torch.tensor(items), split, ks=(10,), exclude_history=True,
                         chunk_size=4, train_popularity=pop, prefix="valid_")
    ranks = ref_ranks(users @ items.T, targets, histories, True)
    want = {"valid_users": len(targets), **{f"valid_{k}": v for k, v in ref_metrics(ranks, (10,)).items()}}
    want.update({f"valid_{k}": v for k, v in segment_metrics(ranks, targets, histories, pop, k=10).items()})
    assert_close(got, want)
    # every user lands in exactly one popularity segment and one history segment
    assert sum(v for k, v in got.items() if k.startswith("valid_users_pop")) == len(targets)
    assert sum(v for k, v in got.items() if k.startswith("valid_users_hist")) == len(targets)


# -------------------------------------------------------------------------- (4) bounded memory


def test_scoring_is_chunked(monkeypatch):
    rows_seen = []
    real = M._chunk_scores

    def spy(user_chunk, item_emb, out=None):
        rows_seen.append(user_chunk.shape[0])
        return real(user_chunk, item_emb, out)

    monkeypatch.setattr(M, "_chunk_scores", spy)
    users, items, targets, histories = tie_heavy_case(U=50)
    split = EvalSplit(users=np.arange(50), histories=histories, targets=targets)
    evaluate_both_modes(torch.tensor(users), torch.tensor(items), split, ks=(10,), exclude_history=False, chunk_size=7)
    # one pass serves both modes; no call ever sees more than chunk_size users
    assert max(rows_seen) <= 7 and sum(rows_seen) == 50 and len(rows_seen) == 8

    # item blocks: every product is at most [chunk_size, item_block], never [chunk, N]
    shapes = []
    monkeypatch.setattr(M, "_chunk_scores",
                        lambda u, it, out=None: shapes.append((len(u), len(it))) or real(u, it, out))
    items50 = np.random.default_rng(0).integers(-1, 2, size=(50, 3))
    targets50 = np.random.default_rng(1).integers(0, 50, size=50)
    want = ref_ranks(users @ items50.T, targets50, histories, True)
    got = target_ranks(torch.tensor(users), torch.tensor(items50), targets50, histories, exclude_history=True,
                       chunk_size=7, item_block=16)
    np.testing.assert_array_equal(got, want)
    # per chunk: 4 item spans of 13/13/13/11 (near-equal, none tiny) plus one target-score product
    assert max(r for r, _ in shapes) <= 7 and max(n for _, n in shapes) <= 16
    assert sorted({n for _, n in shapes if n > 7}) == [11, 13] and len(shapes) == 8 * 5

    seen_fn = []
    target_ranks(np.arange(50), None, targets, histories, exclude_history=True, chunk_size=16,
                 score_fn=lambda r: seen_fn.append(len(r)) or torch.zeros(len(r), 17))
    assert seen_fn == [16, 16, 16, 2]


# ------------------------------------------- (5) streaming equals the dense evaluation it replaced


def dense_ranks_both(user_emb, item_emb, targets, histories, *, chunk_size=2048, **_):
    """The dense evaluation as it was before item blocks (scores [chunk, N] at once), kept verbatim
    as the reference the streaming ranks must equal bit for bit (bench/eval_scale.py times it)."""
    targets = np.asarray(targets, dtype=np.int64)
    user_emb = torch.as_tensor(user_emb)
    item_f32 = torch.as_tensor(item_emb).to(device=user_emb.device, dtype=torch.float32)
    U, N = len(targets), item_f32.shape[0]
    incl, excl = np.empty(U, np.int64), np.empty(U, np.int64)
    with torch.inference_mode():
        for start in range(0, U, chunk_size):
            end = min(start + chunk_size, U)
            c = end - start
            scores = user_emb[start:end].to(torch.float32) @ item_f32.T
            tgt = targets[start:end]
            t_score = scores.gather(1, torch.from_numpy(tgt).to(scores.device).view(-1, 1))
            base = ((scores >= t_score).sum(1, dtype=torch.int32) - 1).cpu().numpy().astype(np.int64)
            incl[start:end] = base
            hist = [np.asarray(h) for h in histories[start:end]]
            lens = np.fromiter((len(h) for h in hist), dtype=np.int64, count=c)
            if lens.sum() == 0:
                excl[start:end] = base
                continue
            cols = np.concatenate([h for h in hist if len(h)]).astype(np.int64)
            rows = np.repeat(np.arange(c, dtype=np.int64), lens)
            keep = cols != tgt[rows]
            keys = np.unique(rows[keep] * N + cols[keep])
            rows, cols = keys // N, keys % N
            r_t, c_t = torch.from_numpy(rows).to(scores.device), torch.from_numpy(cols).to(scores.device)
            counted = (scores[r_t, c_t] >= t_score[r_t, 0]).cpu().numpy()
            excl[start:end] = base - np.bincount(rows[counted], minlength=c)
    return incl, excl


def scientific_sized_case(U=8000, N=4400, d=64, seed=0):
    """Random unit vectors at Scientific's size, with exact ties: 10% of the items duplicate
    another item's vector and a third of the users' targets are such duplicated items."""
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((N, d)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    dup = rng.choice(N, size=N // 10, replace=False)
    src = rng.integers(0, N, size=len(dup))
    items[dup] = items[src]
    users = rng.standard_normal((U, d)).astype(np.float32)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    targets = np.where(rng.random(U) < 1 / 3, rng.choice(np.concatenate([dup, src]), size=U), rng.integers(0, N, U))
    histories = []
    for u in range(U):
        h = rng.integers(0, N, size=rng.integers(0, 30))
        if u % 4 == 0:
            h = np.append(h, targets[u])  # the target inside its own history
        histories.append(h.astype(np.int64))
    pop = np.where(rng.random(N) < 0.1, 0, rng.integers(1, 60, size=N))  # some cold items
    split = EvalSplit(users=np.arange(U), histories=histories, targets=targets)
    return torch.from_numpy(users), torch.from_numpy(items), split, pop


@pytest.fixture(scope="module")
def scientific_sized():
    users, items, split, pop = scientific_sized_case()
    scores = users @ items.T
    t = scores.gather(1, torch.from_numpy(split.targets).view(-1, 1))
    assert ((scores == t).sum(1) > 1).sum() > 1000  # exact ties with the target really occur
    return users, items, split, pop


@pytest.mark.parametrize("chunk_size,item_block", [(2048, 8192), (2048, 1000), (500, 600)])
def test_streaming_ranks_equal_dense_at_scientific_size(scientific_sized, chunk_size, item_block):
    users, items, split, _ = scientific_sized
    old_incl, old_excl = dense_ranks_both(users, items, split.targets, split.histories, chunk_size=chunk_size)
    assert (old_excl < old_incl).any()
    incl, excl = M.target_ranks_both(users, items, split.targets, split.histories, chunk_size=chunk_size,
                                     item_block=item_block)
    np.testing.assert_array_equal(incl, old_incl)
    np.testing.assert_array_equal(excl, old_excl)


def test_streaming_metrics_equal_dense_at_scientific_size(scientific_sized, monkeypatch):
    users, items, split, pop = scientific_sized
    kw = dict(ks=(10, 50), chunk_size=2048, train_popularity=pop, prefix="test_")
    new = {mode: evaluate_both_modes(users, items, split, exclude_history=mode, item_block=1000, **kw)
           for mode in (False, True)}
    monkeypatch.setattr(M, "target_ranks_both", dense_ranks_both)  # today's evaluation, dense
    for mode in (False, True):
        old = evaluate_both_modes(users, items, split, exclude_history=mode, **kw)
        assert new[mode] == old  # same keys, same values, bit for bit
        other = "_incl_hist" if mode else "_excl_hist"
        assert {"test_ndcg_at_10_pop_cold", "test_recall_at_10_pop_head", "test_users_hist_le3",
                "test_ndcg_at_10_hist_gt20", f"test_mrr{other}", f"test_ndcg_at_10_pop_tail{other}"} <= set(old)


def test_sample_users():
    users, items, targets, histories = tie_heavy_case(U=40)
    split = EvalSplit(users=np.arange(100, 140), histories=histories, targets=targets)
    assert sample_users(split, None, 0) is split and sample_users(split, 0, 0) is split
    assert sample_users(split, 40, 0) is split and sample_users(split, 1000, 0) is split
    a, b, other = sample_users(split, 10, 3), sample_users(split, 10, 3), sample_users(split, 10, 4)
    assert len(a) == 10 and np.array_equal(a.users, b.users) and not np.array_equal(a.users, other.users)
    rows = a.users - 100
    assert np.all(np.diff(rows) > 0)  # original order kept
    np.testing.assert_array_equal(a.targets, targets[rows])
    assert all(np.array_equal(h, histories[r]) for h, r in zip(a.histories, rows))
    with pytest.raises(ValueError, match="eval.valid_max_users"):
        sample_users(split, -1, 0)


# ------------------------------------------------------------------------------ (6) low precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    users, items, targets, histories = tie_heavy_case(seed=7)
    for exclude in (False, True):
        ranks = target_ranks(torch.tensor(users, dtype=dtype), torch.tensor(items, dtype=dtype), targets, histories,
                             exclude_history=exclude, chunk_size=6)
        np.testing.assert_array_equal(ranks, ref_ranks(users @ items.T, targets, histories, exclude))
    # real-valued half vectors: runs, and ranks are valid positions in the catalog
    g = torch.Generator().manual_seed(0)
    r = target_ranks(torch.randn(30, 8, generator=g).to(dtype), torch.randn(40, 8, generator=g).to(dtype),
                     np.arange(30), None, exclude_history=False, chunk_size=8)
    assert r.min() >= 0 and r.max() <= 39


@pytest.mark.parametrize("item_block", [3, 8192])
@pytest.mark.parametrize("penalty", [0.5, 1.0, 100.0])
def test_history_penalty_matches_reference(penalty, item_block):
    """The served history penalty: each user's own items (the target too, when it is one) lowered before
    counting, in both history modes; integer scores and penalties keep the ties exact."""
    users, items, targets, histories = tie_heavy_case(seed=3)
    scores = (users @ items.T).astype(np.float64)
    lowered = scores.copy()
    for u, h in enumerate(histories):
        lowered[u, np.unique(h).astype(int)] -= penalty
    incl, excl = M.target_ranks_both(torch.tensor(users, dtype=torch.float32), torch.tensor(items, dtype=torch.float32),
                                     targets, histories, chunk_size=5, item_block=item_block, history_penalty=penalty)
    np.testing.assert_array_equal(incl, ref_ranks(lowered, targets, histories, False))
    np.testing.assert_array_equal(excl, ref_ranks(lowered, targets, histories, True))
    assert not np.array_equal(incl, ref_ranks(scores, targets, histories, False))  # it moved something
    # the callback path too, without writing into the callback's own array
    fn_scores = torch.tensor(scores, dtype=torch.float32)
    before = fn_scores.clone()
    got = target_ranks(np.arange(len(targets)), None, targets, histories, exclude_history=False, chunk_size=4,
                       score_fn=lambda rows: fn_scores[rows], history_penalty=penalty)
    np.testing.assert_array_equal(got, incl)
    assert torch.equal(fn_scores, before)
    with pytest.raises(ValueError, match="history_penalty"):
        target_ranks(users, items, targets, histories, exclude_history=False, history_penalty=-1.0)
    with pytest.raises(ValueError, match="histories are required"):
        target_ranks(users, items, targets, None, exclude_history=False, history_penalty=1.0)

"""dense_all_action: its loss against explicit formulas (pair mask, logQ terms, pool), its sampling
(cuts, windows, lags, pools; lists and ragged containers alike), its config knobs, and the finding
that a horizon longer than the evaluated next item costs next-item quality (on Scientific,
bench/dense_probe.py measures it together with the cost of uncorrected in-batch negatives)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from learn.config import ConfigError, EvalConfig, TrainConfig, load_config
from learn.data.ragged import Ragged
from learn.towers.losses import dense_all_action_loss, in_batch_softmax_loss
from learn.train.batches import NegativeSampler, dense_batches, item_popularity
from learn.train.fit import fit
from learn.train.loop import evaluate_model
from learn.train.recipes import compute_loss
from tests.train.test_loop import model_for, synthetic

ROOT = Path(__file__).resolve().parents[2]


def unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def explicit_loss(hist, hv, tgt, tv, items, scale, pair_valid, tgt_log_q=None, pool=None, pool_items=None,
                  pool_log_q=None):
    """The loss written as loops: each positive pair against the other users' targets (minus the
    user's own items, minus items already in the pool) and the pool (minus the user's own items)."""
    B, H, T = hv.shape[0], hv.shape[1], tv.shape[1]
    pool_set = set(pool_items.tolist()) if pool_items is not None else set()
    losses = []
    for b in range(B):
        own = {int(items[b, t]) for t in range(T) if tv[b, t]}
        for h in range(H):
            if not hv[b, h]:
                continue

            def logit(c, k):
                s = scale * hist[b, h] @ tgt[c, k]
                return s - tgt_log_q[c, k] if tgt_log_q is not None else s

            negs = [logit(c, k) for c in range(B) for k in range(T)
                    if c != b and tv[c, k] and int(items[c, k]) not in own and int(items[c, k]) not in pool_set]
            if pool is not None:
                for m in range(len(pool_items)):
                    if int(pool_items[m]) not in own:
                        s = scale * hist[b, h] @ pool[m]
                        negs.append(s - pool_log_q[m] if pool_log_q is not None else s)
            for t in range(T):
                if tv[b, t] and pair_valid[b, h, t]:
                    pos = logit(b, t)
                    losses.append(-(pos - torch.logsumexp(torch.stack([pos] + negs), 0)))
    return torch.stack(losses).mean()


def test_loss_with_pair_mask_logq_and_pool_matches_explicit_loops():
    torch.manual_seed(4)
    B, H, T, M, d, s = 3, 3, 3, 5, 8, 7.0
    hist, tgt, pool = unit(B, H, d), unit(B, T, d), unit(M, d)
    hv = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    tv = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    items = torch.tensor([[1, 2, 3], [4, 1, -1], [7, 9, -1]])
    pair_valid = torch.rand(B, H, T) > 0.3
    pair_valid[:, 0, 0] = True
    tgt_log_q = torch.randn(B, T, dtype=torch.float64)
    pool_items = torch.tensor([9, 2, 11, 12, 11])  # 9: user 2's target; 2: user 0's
    pool_log_q = torch.randn(M, dtype=torch.float64)
    got = dense_all_action_loss(hist, hv, tgt, tv, items, s, pair_valid, tgt_log_q, pool, pool_items, pool_log_q)
    want = explicit_loss(hist, hv, tgt, tv, items, s, pair_valid, tgt_log_q, pool, pool_items, pool_log_q)
    assert torch.allclose(got, want)
    # each part changes the loss (the test sees it)
    assert not torch.allclose(got, dense_all_action_loss(hist, hv, tgt, tv, items, s, pair_valid))
    assert not torch.allclose(dense_all_action_loss(hist, hv, tgt, tv, items, s),
                              dense_all_action_loss(hist, hv, tgt, tv, items, s, pair_valid))


def test_whole_catalog_pool_without_correction_is_softmax_over_catalog_minus_own_targets():
    torch.manual_seed(5)
    B, H, T, N, d, s = 3, 2, 2, 12, 8, 10.0
    catalog = unit(N, d)
    items = torch.tensor([[0, 3], [5, 3], [7, 8]])
    tv = torch.ones(B, T, dtype=torch.bool)
    hv = torch.ones(B, H, dtype=torch.bool)
    hist = unit(B, H, d)
    got = dense_all_action_loss(hist, hv, catalog[items], tv, items, s, None, None, catalog, torch.arange(N))
    losses = []
    for b in range(B):
        own = set(items[b].tolist())
        for h in range(H):
            scores = s * catalog @ hist[b, h]
            for t in range(T):
                keep = [j for j in range(N) if j not in own or j == int(items[b, t])]
                losses.append(-(scores[items[b, t]] - torch.logsumexp(scores[keep], 0)))
    assert torch.allclose(got, torch.stack(losses).mean())


def test_one_position_one_target_per_user_is_the_in_batch_loss():
    torch.manual_seed(6)
    B, d = 6, 8
    u, v = unit(B, d), unit(B, d)
    t = torch.tensor([5, 7, 5, 9, 1, 2])
    ones = torch.ones(B, 1, dtype=torch.bool)
    dense = dense_all_action_loss(u.unsqueeze(1), ones, v.unsqueeze(1), ones, t.unsqueeze(1), 20.0)
    assert torch.allclose(dense, in_batch_softmax_loss(u, v, t, 20.0, owners=torch.arange(B)))


def _history(b, r):
    return (b.hist_tokens[r][b.hist_tokens[r] > 0] - 1).tolist()


@pytest.mark.parametrize("window", [0, 1, 3])
def test_cut_mode_lags_are_positions_in_the_sequence(window):
    # item value = its position in the user's sequence (+ 1000 * user), so lags can be read off the items
    train = [np.arange(30) + 1000 * u for u in range(8)]
    rng = np.random.default_rng(3)
    for b in dense_batches(train, batch_size=4, max_history=12, target_len=6, n_history=4, n_targets=4, recency=True,
                           rng=rng, target_window=window):
        for r in range(b.hist_tokens.shape[0]):
            hist = _history(b, r)
            nh, nt = int(b.hist_valid[r].sum()), int(b.tgt_valid[r].sum())
            assert nh and nt
            pos_items = np.array(hist)[b.hist_pos[r, :nh].numpy()] % 1000
            tgt_items = b.tgt_items[r, :nt].numpy() % 1000
            lag = tgt_items[None, :] - pos_items[:, None]
            assert (lag >= 1).all()
            assert np.array_equal(b.pair_lag[r, :nh, :nt].numpy(), lag)
            ok = b.pair_valid[r, :nh, :nt].numpy()
            assert np.array_equal(ok, lag <= window if window else np.ones_like(ok))
            if window:
                assert tgt_items.max() - max(hist) % 1000 <= window  # targets drawn from the first W after the cut


def test_all_positions_mode_every_position_predicts_the_items_after_it_within_the_window():
    train = [np.array([4, 8, 15, 16, 23, 42]), np.array([1, 2, 3])]
    (b,) = list(dense_batches(train, batch_size=2, max_history=10, target_len=10, n_history=10, n_targets=10,
                              recency=True, rng=np.random.default_rng(0), order_rng=np.random.default_rng(1),
                              all_positions=True, target_window=2))
    for r in range(2):
        hist = _history(b, r)
        seq = train[0] if hist[0] == 4 else train[1]
        n = len(seq) - 1
        assert hist == seq[:-1].tolist()
        assert b.tgt_items[r, :n].tolist() == seq[1:].tolist()
        lag = np.arange(n)[None, :] + 1 - np.arange(n)[:, None]
        assert np.array_equal(b.pair_valid[r, :n, :n].numpy(), (lag >= 1) & (lag <= 2))
        assert not b.pair_valid[r, n:].any() and not b.pair_valid[r, :, n:].any()


def test_pool_and_logq_terms():
    train = [np.array([0, 1, 2, 3]), np.array([1, 1, 2, 5]), np.array([4, 1, 0, 2])]
    pop = item_popularity(train, 6)
    assert pop.tolist() == [2, 4, 3, 1, 1, 1]
    sampler = NegativeSampler(pop, "popularity")
    (b,) = list(dense_batches(train, batch_size=3, max_history=5, target_len=5, n_history=3, n_targets=3,
                              recency=False, rng=np.random.default_rng(0), sampler=sampler, num_negatives=7))
    assert b.negatives.shape == (7,) and b.neg_log_q.shape == (7,)
    assert torch.allclose(b.neg_log_q, torch.log(7 * torch.as_tensor(sampler.p)[b.negatives]).float())
    q = int(b.tgt_valid.sum())
    want = torch.log(q * torch.as_tensor(sampler.target_p)[b.tgt_items[b.tgt_valid]]).float()
    assert torch.allclose(b.tgt_log_q[b.tgt_valid], want)
    (plain,) = list(dense_batches(train, batch_size=3, max_history=5, target_len=5, n_history=3, n_targets=3,
                                  recency=False, rng=np.random.default_rng(0)))
    assert plain.negatives.numel() == 0 and not plain.tgt_log_q.any()


@pytest.mark.parametrize("all_positions", [False, True])
def test_a_ragged_container_gives_the_same_batches_as_a_list(all_positions):
    rng = np.random.default_rng(0)
    train = [rng.integers(0, 50, size=int(n)) for n in rng.integers(2, 20, size=25)]
    ragged = Ragged.from_arrays(train, dtype=np.int32)
    assert np.array_equal(item_popularity(train, 50), item_popularity(ragged, 50))

    def draw(data):
        return list(dense_batches(data, batch_size=8, max_history=6, target_len=4, n_history=3, n_targets=3,
                                  recency=True, rng=np.random.default_rng(1), order_rng=np.random.default_rng(2),
                                  all_positions=all_positions, target_window=2,
                                  sampler=NegativeSampler(item_popularity(data, 50), "mixed"), num_negatives=5))

    for x, y in zip(draw(train), draw(ragged), strict=True):
        for name, value in vars(x).items():
            assert torch.equal(value, getattr(y, name)), name


def test_config_knobs_and_their_combinations():
    tiny = ROOT / "conf/tiny.yaml"
    cfg = load_config(tiny, ["train.recipe=dense_all_action", "train.num_negatives=0", "train.logq_correction=false",
                             "train.target_window=2", "train.target_len=8"])
    assert cfg.train.target_window == 2 and cfg.train.num_negatives == 0
    load_config(tiny, ["train.recipe=dense_all_action", "train.all_positions=true", "train.target_window=1"])
    for overrides, named in [
        (["train.target_window=2"], ["train.target_window", "train.recipe=dense_all_action"]),
        (["train.recipe=in_batch", "train.num_negatives=8"], ["train.num_negatives", "train.recipe=sampled_softmax",
                                                              "train.recipe=dense_all_action"]),
        (["train.recipe=dense_all_action", "train.all_positions=true", "train.n_history=3"],
         ["train.n_history", "train.all_positions=true"]),
        (["train.recipe=dense_all_action", "train.all_positions=true", "model.item_tower=b"],
         ["model.item_tower", "train.all_positions=true"]),
        (["train.recipe=dense_all_action", "train.target_window=-1", "train.target_len=8"], ["train.target_window"]),
        (["train.recipe=sampled_softmax", "train.num_negatives=0"], ["train.num_negatives", "train.recipe=in_batch"]),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(tiny, overrides)
        for text in named:
            assert text in str(err.value), (overrides, str(err.value))


def _train_dense(extra, epochs=20):
    splits, content = synthetic(n_items=40, n_users=160, seed=1)
    model = model_for(content)
    tc = TrainConfig(**{"recipe": "dense_all_action", "epochs": epochs, "batch_size": 32, "lr": 3e-3, "patience": 0,
                        "n_history": 4, "n_targets": 4, "target_len": 8, **extra})
    fit(model, splits, tc, EvalConfig(ks=[10]), max_history=10, progress=False)
    return evaluate_model(model, splits.valid, EvalConfig(ks=[10]), 10)["ndcg_at_10"]


def test_a_horizon_beyond_the_next_item_costs_next_item_quality():
    """The data's only signal is the next item (i -> i + 1); the evaluation asks for the next item.
    Pairs far apart (the paper's whole target part) teach a blur of later items; the one-item
    horizon learns it well (measured: 0.29 against 0.82). Scientific shows the same at a smaller
    scale (bench/dense_probe.py)."""
    whole = _train_dense({"num_negatives": 0})
    next_only = _train_dense({"num_negatives": 0, "target_window": 1})
    every_cut = _train_dense({"num_negatives": 0, "target_window": 1, "all_positions": True})
    assert next_only > whole + 0.1, (whole, next_only)
    assert every_cut > whole + 0.1, (whole, every_cut)


def test_the_recipe_computes_the_loss_it_samples():
    """compute_loss on a dense batch equals the loss function on the towers' outputs at the sampled
    positions (tower a over the target part), with the pool and the logQ terms of the batch."""
    splits, content = synthetic()
    model = model_for(content).eval()
    tc = TrainConfig(recipe="dense_all_action", batch_size=16, n_history=3, n_targets=3, target_len=5,
                     num_negatives=6, target_window=2)
    sampler = NegativeSampler(item_popularity(splits.train, 40), tc.negative_sampler)
    (b, *_) = list(dense_batches(splits.train, batch_size=16, max_history=10, target_len=5, n_history=3, n_targets=3,
                                 recency=True, rng=np.random.default_rng(0), sampler=sampler, num_negatives=6,
                                 target_window=2))
    with torch.no_grad():
        got = compute_loss(model, b, tc)
        rows = torch.arange(b.hist_tokens.shape[0]).unsqueeze(1)
        hist = model(b.hist_tokens)[rows, b.hist_pos]
        tgt = model.target_sequence_embedding(b.tgt_tokens)[rows, b.tgt_pos]
        want = dense_all_action_loss(hist, b.hist_valid, tgt, b.tgt_valid, b.tgt_items, tc.score_scale, b.pair_valid,
                                     b.tgt_log_q, model.item_embedding(b.negatives), b.negatives, b.neg_log_q)
        uncorrected = compute_loss(model, b, TrainConfig(**{**vars(tc), "logq_correction": False}))
    assert torch.allclose(got, want)
    assert not torch.allclose(got, uncorrected)

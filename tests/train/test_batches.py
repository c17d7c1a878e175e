import numpy as np
import pytest

from learn.train.batches import dense_batches, pair_batches, recency_weights, sample_targets, shard_users


def seqs(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50, size=int(rng.integers(1, 12))) for _ in range(n)]


def test_recency_weights_formula():
    w = recency_weights(4)
    raw = np.log(10 + np.arange(4) * (10000 - 10) / 3)
    assert np.allclose(w, raw / raw.max()) and w[-1] == 1.0 and np.all(np.diff(w) > 0)


def positions(n, k, recency, rng, cap):
    pool, picks = sample_targets(n, k, recency, rng, cap=cap)
    return pool[picks]


def test_recency_sampling_prefers_recent_items():
    rng = np.random.default_rng(0)
    picks = np.concatenate([positions(40, 5, True, rng, cap=40) for _ in range(2000)])
    uniform = np.concatenate([positions(40, 5, False, rng, cap=40) for _ in range(2000)])
    assert picks.mean() > uniform.mean() + 1.0
    assert all(len(set(positions(40, 10, True, rng, cap=40))) == 10 for _ in range(20))


def test_two_stage_sampling_reaches_the_whole_target_part():
    rng = np.random.default_rng(0)
    seen = np.concatenate([positions(100, 5, True, rng, cap=20) for _ in range(500)])
    assert seen.max() >= 95 and seen.min() <= 5  # the uniform stage draws from all 100, not the first 20
    pool, picks = sample_targets(100, 5, True, rng, cap=20)
    assert len(pool) == 20 and np.all(np.diff(pool) > 0) and len(picks) == 5


def test_all_positions_windows_cover_early_transitions():
    train = [np.arange(30)]
    targets = set()
    for seed in range(300):
        for b in pair_batches(train, batch_size=4, max_history=5, first_target=lambda length: 1, all_positions=True,
                              rng=np.random.default_rng(seed)):
            targets |= set(b.targets.tolist())
    assert min(targets) == 1 and max(targets) == 29


def test_shards_are_disjoint_equal_and_cover():
    train = seqs(41)
    eligible = {u for u, s in enumerate(train) if len(s) >= 2}
    parts = [set(shard_users(train, 2, r, 2, np.random.default_rng(5))) for r in range(2)]
    assert not parts[0] & parts[1] and len(parts[0]) == len(parts[1])
    assert parts[0] | parts[1] <= eligible and len(parts[0] | parts[1]) >= len(eligible) - 1


@pytest.mark.parametrize("first", [lambda length: 1, lambda length: max(1, length // 2)], ids=["one", "half"])
def test_pair_batches_targets_follow_their_history(first):
    train = seqs()
    for b in pair_batches(train, batch_size=7, max_history=5, first_target=first, all_positions=False,
                          rng=np.random.default_rng(0)):
        for r, p, t in zip(b.rows.tolist(), b.positions.tolist(), b.targets.tolist()):
            hist = b.tokens[r][: p + 1] - 1
            assert (hist >= 0).all() and b.tokens[r][p] > 0
            # the history (last <=5 items) followed by the target is a contiguous slice of a sequence
            window = list(hist.tolist()) + [t]
            assert any(any(list(s[i : i + len(window)]) == window for i in range(len(s))) for s in train)


def test_all_positions_predict_successors():
    train = [np.array([1, 2, 3, 4])]
    (b,) = list(pair_batches(train, batch_size=4, max_history=10, first_target=lambda length: 1, all_positions=True,
                             rng=np.random.default_rng(0)))
    assert b.positions.tolist() == [0, 1, 2] and b.targets.tolist() == [2, 3, 4]


def test_dense_batches_split_history_and_targets():
    train = [np.arange(10) + 100 * u for u in range(6)]
    for b in dense_batches(train, batch_size=3, max_history=8, target_len=4, n_history=3, n_targets=2,
                           recency=True, rng=np.random.default_rng(1)):
        for r in range(b.hist_tokens.shape[0]):
            hist = (b.hist_tokens[r][b.hist_tokens[r] > 0] - 1).tolist()
            tg = b.tgt_items[r][b.tgt_valid[r]].tolist()
            assert tg and max(hist) < min(tg)  # targets come after the cut
            assert b.hist_valid[r].sum() == min(3, len(hist))

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


# ---- epoch coverage: every transition once per epoch ------------------------------------------

def _epoch_pairs(train, coverage, max_history=5, batch_size=4, seed=0, rank=0, world_size=1, dense=False):
    """(user, position in sequence, target item) of every predicting position of one epoch."""
    kw = dict(batch_size=batch_size, max_history=max_history, all_positions=True, rng=np.random.default_rng(seed),
              order_rng=np.random.default_rng(seed + 1), rank=rank, world_size=world_size, coverage=coverage)
    if dense:
        batches = dense_batches(train, target_len=8, n_history=2, n_targets=2, recency=False, target_window=1, **kw)
        return [int(t) for b in batches for t in b.tgt_items[b.tgt_valid].tolist()]
    batches = pair_batches(train, first_target=lambda length: 1, **kw)
    return [int(t) for b in batches for t in b.targets.tolist()]


def test_transitions_coverage_makes_every_transition_a_target_once_per_epoch():
    # items are unique per user (offset by user), so a target names its (user, position)
    lengths = [30, 2, 6, 7, 1, 13]
    train = [1000 * u + np.arange(n) for u, n in enumerate(lengths)]
    every = sorted(int(x) for s in train for x in s[1:])
    for dense in (False, True):
        got = _epoch_pairs(train, "transitions", dense=dense)
        assert sorted(got) == every, dense
    # one random window per user covers a 30-item user's 29 transitions only partly
    assert len(_epoch_pairs(train, "window")) < len(every)


def test_transitions_windows_keep_their_context_and_order():
    train = [np.arange(12)]
    for b in pair_batches(train, batch_size=8, max_history=5, first_target=lambda length: 1, all_positions=True,
                          rng=np.random.default_rng(0), coverage="transitions"):
        for r in range(b.tokens.shape[0]):
            row = b.tokens[r][b.tokens[r] > 0] - 1  # the window's history, in order
            assert np.all(np.diff(row.numpy()) == 1)
            mine = b.rows == r
            assert (b.targets[mine] == row[-int(mine.sum()):] + 1).all()  # each position predicts its successor


def test_transitions_shards_are_disjoint_and_steps_count_windows():
    from learn.config import TrainConfig
    from learn.train.batches import epoch_rows
    from learn.train.loop import cfg_steps_per_epoch

    train = [1000 * u + np.arange(n) for u, n in enumerate([30, 2, 6, 7, 1, 13, 11, 4])]
    parts = [_epoch_pairs(train, "transitions", rank=r, world_size=2, batch_size=3) for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    # 30 items at 5 per window: 6 windows; 13: 3; 11: 2; the other users one each (1 item: none)
    assert epoch_rows(train, 5, "transitions", all_positions=True) == 6 + 1 + 1 + 2 + 3 + 2 + 1
    assert epoch_rows(train, 5, "transitions", all_positions=False) == 7  # users with 2+ items
    cfg = TrainConfig(batch_size=4, all_positions=True, epoch_coverage="transitions")
    assert cfg_steps_per_epoch(train, cfg, 5) == 4 and cfg_steps_per_epoch(train, cfg, 5, world_size=2) == 2

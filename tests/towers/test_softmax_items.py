"""train.softmax_items=seen: the full softmax over the items that occur in training only."""

import numpy as np
import pytest
import torch

from learn.config import ConfigError, TrainConfig, load_config
from learn.towers.losses import full_softmax_loss
from learn.train.batches import CandidateBatch, NegativeSampler, PairBatch
from learn.train.recipes import compute_loss, epoch_batches
from tests.train.test_loop import model_for, synthetic


def _unseen_split(n_unseen=6):
    """The synthetic task with its last ``n_unseen`` items removed from every training sequence."""
    splits, content = synthetic()
    n = len(content)
    train = [s[s < n - n_unseen] for s in splits.train]
    return splits, content, [s for s in train if len(s) >= 2], n - n_unseen


def test_seen_batches_carry_the_training_items_as_columns():
    _, content, train, n_seen = _unseen_split()
    cfg = TrainConfig(recipe="full_softmax", batch_size=16, all_positions=True, softmax_items="seen")
    batches = list(epoch_batches(train, cfg, 10, seed=0, epoch=1, num_items=len(content)))
    seen = np.flatnonzero(np.bincount(np.concatenate(train), minlength=len(content)))
    assert seen.max() < n_seen
    for batch in batches:
        assert isinstance(batch, CandidateBatch)
        np.testing.assert_array_equal(batch.candidates.numpy(), seen)
        np.testing.assert_array_equal(batch.candidates[batch.target_cols].numpy(), batch.targets.numpy())
    plain = next(iter(epoch_batches(train, TrainConfig(recipe="full_softmax", batch_size=16, all_positions=True),
                                    10, seed=0, epoch=1, num_items=len(content))))
    assert type(plain) is PairBatch
    torch.testing.assert_close(plain.targets, batches[0].targets)  # the same draws: only the columns differ


def test_the_loss_is_the_full_softmax_with_unseen_columns_masked_and_leaves_them_untouched():
    _, content, train, n_seen = _unseen_split()
    cfg = TrainConfig(recipe="full_softmax", batch_size=16, all_positions=True, softmax_items="seen")
    batch = next(iter(epoch_batches(train, cfg, 10, seed=0, epoch=1, num_items=len(content))))
    model = model_for(content)
    model.eval()  # no dropout: the reference below runs the towers again
    loss = compute_loss(model, batch, cfg)
    with torch.no_grad():
        user = model(batch.tokens)[batch.rows, batch.positions]
        items = model.item_embedding(torch.arange(len(content)))
        logits = cfg.score_scale * user @ items.T
        logits[:, n_seen:] = float("-inf")
        reference = torch.nn.functional.cross_entropy(logits, batch.targets)
    torch.testing.assert_close(loss.detach(), reference)
    # with every item seen, the columns are the whole catalog and the loss is the plain full softmax
    assert not torch.isclose(loss.detach(), full_softmax_loss(user, items, batch.targets, cfg.score_scale))
    # unseen items never go through the item tower in training: nothing pushes them down
    calls = []
    original = model.item_embedding
    model.item_embedding = lambda ids: calls.append(ids.clone()) or original(ids)
    compute_loss(model, batch, cfg)
    assert len(calls) == 1 and calls[0].max() < n_seen and len(calls[0]) == n_seen


def test_with_every_item_seen_it_equals_the_catalog_softmax():
    splits, content = synthetic()
    base = dict(recipe="full_softmax", batch_size=16, all_positions=True)
    seen_cfg, catalog_cfg = TrainConfig(**base, softmax_items="seen"), TrainConfig(**base)
    a = next(iter(epoch_batches(splits.train, seen_cfg, 10, seed=0, epoch=1, num_items=len(content))))
    b = next(iter(epoch_batches(splits.train, catalog_cfg, 10, seed=0, epoch=1, num_items=len(content))))
    assert len(a.candidates) == len(content)
    model = model_for(content)
    model.eval()
    torch.testing.assert_close(compute_loss(model, a, seen_cfg), compute_loss(model, b, catalog_cfg))


@pytest.mark.parametrize("kind", ["uniform", "mixed"])
def test_sampled_softmax_draws_seen_items_only(kind):
    popularity = np.array([0, 3, 0, 1, 6, 0], dtype=float)
    sampler = NegativeSampler(popularity, kind, seen_only=True)
    draws = sampler.draw(100_000, np.random.default_rng(0))
    assert set(np.unique(draws)) == {1, 3, 4} and np.isclose(sampler.p.sum(), 1.0)
    assert np.all(sampler.p[[0, 2, 5]] == 0)  # logQ stays the drawing distribution's
    np.testing.assert_allclose(np.bincount(draws, minlength=6) / len(draws), sampler.p, atol=5e-3)
    _, content, train, n_seen = _unseen_split()
    cfg = TrainConfig(recipe="sampled_softmax", batch_size=16, num_negatives=64, softmax_items="seen")
    for batch in epoch_batches(train, cfg, 10, seed=0, epoch=1, num_items=len(content)):
        assert batch.negatives.max() < n_seen


def test_softmax_items_is_refused_outside_the_full_and_sampled_softmax():
    with pytest.raises(ConfigError, match=r"train\.softmax_items.*train\.recipe=full_softmax or "
                                          r"train\.recipe=sampled_softmax.*in_batch"):
        load_config("conf/default.yaml", ["train.recipe=in_batch", "train.softmax_items=seen"])
    with pytest.raises(ConfigError, match="softmax_items"):
        load_config("conf/default.yaml", ["train.softmax_items=some"])
    assert load_config("conf/default.yaml", ["train.recipe=full_softmax",
                                             "train.softmax_items=seen"]).train.softmax_items == "seen"


@pytest.mark.parametrize("softmax_items", ["catalog", "seen"])
def test_without_history_negatives_a_row_own_earlier_items_leave_its_softmax(softmax_items):
    """train.history_negatives=false: the loss is the full softmax with, per predicting position, the items
    its row has up to that position masked (its target kept, also when it is one of them)."""
    _, content, train, n_seen = _unseen_split()
    train = [np.append(s, s[0]) for s in train]  # every user comes back to its first item at the end
    cfg = TrainConfig(recipe="full_softmax", batch_size=16, all_positions=True, softmax_items=softmax_items,
                      history_negatives=False)
    batch = next(iter(epoch_batches(train, cfg, 10, seed=0, epoch=1, num_items=len(content))))
    model = model_for(content)
    model.eval()
    loss = compute_loss(model, batch, cfg)
    with torch.no_grad():
        user = model(batch.tokens)[batch.rows, batch.positions]
        logits = cfg.score_scale * user @ model.item_embedding(torch.arange(len(content))).T
        if softmax_items == "seen":
            logits[:, n_seen:] = float("-inf")
        repeats = 0
        for p, (r, pos, t) in enumerate(zip(batch.rows.tolist(), batch.positions.tolist(), batch.targets.tolist())):
            own = {int(x) - 1 for x in batch.tokens[r, : pos + 1] if x > 0}
            repeats += t in own
            logits[p, sorted(own - {t})] = float("-inf")
        reference = torch.nn.functional.cross_entropy(logits, batch.targets)
    assert repeats > 0, "precondition: some target is one of its row's own earlier items"
    torch.testing.assert_close(loss.detach(), reference)
    assert not torch.isclose(loss.detach(), compute_loss(model, batch, TrainConfig(
        recipe="full_softmax", batch_size=16, all_positions=True, softmax_items=softmax_items)))


def test_history_negatives_config_and_selection_key():
    from learn.train.fit import selection_key

    cfg = load_config("conf/tiny.yaml", ["train.recipe=full_softmax", "train.history_negatives=false"])
    assert selection_key(cfg.eval, cfg.train) == "ndcg_at_10_excl_hist"  # what such towers are trained to rank
    assert selection_key(cfg.eval) == selection_key(cfg.eval, load_config("conf/tiny.yaml").train) == "ndcg_at_10"
    with pytest.raises(ConfigError, match="train.history_negatives"):
        load_config("conf/tiny.yaml", ["train.recipe=in_batch", "train.history_negatives=false"])

"""train.logit_adjustment: the full softmax with a popularity bias on every column's training logit."""

import dataclasses

import numpy as np
import pytest
import torch

from learn.config import ConfigError, EvalConfig, TrainConfig, load_config
from learn.data.sequences import EvalSplit, Splits
from learn.train.batches import CandidateBatch, PairBatch
from learn.train.fit import fit
from learn.towers.mix import ScoreMix, popularity_prior
from learn.train.loop import batch_to, evaluate_model, training_item_bias
from learn.towers.model import pad_histories
from learn.train.recipes import compute_loss, epoch_batches
from tests.train.test_loop import model_for, synthetic

BASE = dict(recipe="full_softmax", batch_size=16, all_positions=True)


@pytest.mark.parametrize("softmax_items", ["catalog", "seen"])
def test_batches_carry_the_log_popularity_bias_of_their_columns(softmax_items):
    splits, content = synthetic()
    n = len(content)
    train = [s[s < n - 5] for s in splits.train]  # the last 5 items unseen in training
    counts = np.bincount(np.concatenate(train), minlength=n)
    cfg = TrainConfig(**BASE, softmax_items=softmax_items, logit_adjustment=0.7)
    batches = list(epoch_batches(train, cfg, 10, seed=0, epoch=1, num_items=n))
    columns = np.arange(n) if softmax_items == "catalog" else np.flatnonzero(counts)
    for batch in batches:
        assert isinstance(batch, CandidateBatch)
        np.testing.assert_array_equal(batch.candidates.numpy(), columns)
        np.testing.assert_allclose(batch.column_bias.numpy(), 0.7 * np.log1p(counts[columns]), rtol=1e-6)
        np.testing.assert_array_equal(batch.candidates[batch.target_cols].numpy(), batch.targets.numpy())
    if softmax_items == "catalog":  # an unseen item's column gets no bonus
        assert np.all(batches[0].column_bias.numpy()[n - 5:] == 0)
    plain = next(iter(epoch_batches(train, TrainConfig(**BASE), 10, seed=0, epoch=1, num_items=n)))
    assert type(plain) is PairBatch  # off (the default): the batches are unchanged
    torch.testing.assert_close(plain.targets, batches[0].targets)  # the same draws


def test_the_loss_is_the_softmax_over_the_adjusted_logits():
    splits, content = synthetic()
    n = len(content)
    counts = np.bincount(np.concatenate(splits.train), minlength=n)
    cfg = TrainConfig(**BASE, logit_adjustment=1.5)
    batch = next(iter(epoch_batches(splits.train, cfg, 10, seed=0, epoch=1, num_items=n)))
    model = model_for(content)
    model.eval()
    loss = compute_loss(model, batch, cfg)
    with torch.no_grad():
        user = model(batch.tokens)[batch.rows, batch.positions]
        logits = cfg.score_scale * user @ model.item_embedding(torch.arange(n)).T
        adjusted = logits + 1.5 * torch.log1p(torch.as_tensor(counts, dtype=torch.float32))
        reference = torch.nn.functional.cross_entropy(adjusted, batch.targets)
        plain = torch.nn.functional.cross_entropy(logits, batch.targets)
    torch.testing.assert_close(loss.detach(), reference)
    assert not torch.isclose(loss.detach(), plain)
    off = next(iter(epoch_batches(splits.train, TrainConfig(**BASE), 10, seed=0, epoch=1, num_items=n)))
    torch.testing.assert_close(compute_loss(model, off, TrainConfig(**BASE)).detach(), plain)


def _popular_item_task(n_items=30, n_users=150, seed=0):
    """Item i is followed by i + 1 (mod n), with item 0 (the popular one) inserted after half the steps."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        item, seq = int(rng.integers(1, n_items)), []
        for _ in range(int(rng.integers(6, 12))):
            seq.append(item)
            if rng.random() < 0.5:
                seq.append(0)
            item = 1 + item % (n_items - 1)
        seqs.append(np.array(seq))
    train = [s[:-2] for s in seqs]
    valid = EvalSplit(np.arange(n_users), [s[:-2] for s in seqs], np.array([s[-2] for s in seqs]))
    test = EvalSplit(np.arange(n_users), [s[:-1] for s in seqs], np.array([s[-1] for s in seqs]))
    content = torch.as_tensor(rng.normal(size=(n_items, 16)) + 2.0, dtype=torch.float32)
    return Splits("leave_one_out", train, valid, test), content


def test_adjusted_towers_give_the_popular_item_less_of_the_score():
    """What the bias is for: the towers no longer have to learn the popularity the bias explains, so
    the popular item's margin over the others shrinks."""
    splits, content = _popular_item_task()
    margins = {}
    for tau in (0.0, 1.0):
        model = model_for(content)
        cfg = TrainConfig(**{**BASE, "batch_size": 32}, epochs=12, lr=3e-3, patience=0, logit_adjustment=tau)
        fit(model, splits, cfg, EvalConfig(ks=[10]), max_history=10, progress=False)
        model.eval()
        with torch.no_grad():
            user = model.user_embedding(pad_histories(list(splits.test.histories), 10))
            scores = user @ model.item_embedding(torch.arange(len(content))).T
        margins[tau] = float((scores[:, 0] - scores[:, 1:].mean(1)).mean())
    assert margins[1.0] < margins[0.0] - 0.05, margins


def test_logit_adjustment_is_checked():
    with pytest.raises(ConfigError, match=r"train\.logit_adjustment.*train\.recipe=full_softmax.*in_batch"):
        load_config("conf/default.yaml", ["train.recipe=in_batch", "train.logit_adjustment=1"])
    with pytest.raises(ConfigError, match=r"train\.logit_adjustment.*>= 0"):
        load_config("conf/default.yaml", ["train.recipe=full_softmax", "train.logit_adjustment=-1"])
    cfg = load_config("conf/default.yaml", ["train.recipe=full_softmax", "train.logit_adjustment=0.5"])
    assert cfg.train.logit_adjustment == 0.5


def test_the_columns_and_their_bias_go_to_the_device_once_per_epoch():
    splits, content = synthetic()
    cfg = TrainConfig(**BASE, softmax_items="seen", logit_adjustment=1.0)
    a, b = list(epoch_batches(splits.train, cfg, 10, seed=0, epoch=1, num_items=len(content)))[:2]
    moved = {}
    device = torch.device("meta")  # a copy is a new tensor, as on a GPU
    a_dev, b_dev = batch_to(a, device, moved), batch_to(b, device, moved)
    assert a_dev.candidates is b_dev.candidates and a_dev.column_bias is b_dev.column_bias
    assert a_dev.candidates.device == device and a_dev.tokens.device == device
    assert a_dev.targets is not b_dev.targets  # the per-step tensors are copied every step
    other = dataclasses.replace(b, candidates=b.candidates.clone())  # another tensor: copied afresh
    assert batch_to(other, device, moved).candidates is not a_dev.candidates


def test_valid_ranks_by_the_training_score_which_the_served_prior_gives_back():
    """During training valid ranks by cosine + the bias / score_scale; the served popularity weight
    tau x log(1 + top count) / score_scale gives the same score (the README's claim)."""
    splits, content = _popular_item_task()
    n = len(content)
    cfg = TrainConfig(**{**BASE, "batch_size": 32}, epochs=3, lr=3e-3, patience=0, logit_adjustment=1.0)
    model = model_for(content)
    result = fit(model, splits, cfg, EvalConfig(ks=[10]), max_history=10, progress=False)
    bias = training_item_bias(cfg, splits.train, n)
    counts = np.bincount(np.concatenate(list(splits.train)), minlength=n)
    np.testing.assert_allclose(bias.numpy(), np.log1p(counts) / cfg.score_scale, rtol=1e-6)
    ev = EvalConfig(ks=[10])
    trained = evaluate_model(model, splits.valid, ev, 10, item_bias=bias)
    assert trained["ndcg_at_10"] == pytest.approx(result.best_valid["valid_ndcg_at_10"])
    served = ScoreMix(popularity_weight=float(np.log1p(counts.max()) / cfg.score_scale))
    mixed = evaluate_model(model, splits.valid, ev, 10, mix=served, prior=popularity_prior(counts))
    assert mixed["ndcg_at_10"] == pytest.approx(trained["ndcg_at_10"], abs=1e-6)
    assert evaluate_model(model, splits.valid, ev, 10)["ndcg_at_10"] != pytest.approx(trained["ndcg_at_10"])
    assert training_item_bias(TrainConfig(**BASE), splits.train, n) is None  # off: the cosine alone
    with pytest.raises(ConfigError, match=r"logit_adjustment.*pretrain_epochs"):
        load_config("conf/default.yaml", ["train.recipe=full_softmax", "train.logit_adjustment=1",
                                          "train.pretrain_epochs=2"])

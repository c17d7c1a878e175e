"""Content-only members beside members with item ID vectors (``model.id_members``): which members get ID
vectors and the per-group early stopping of ``learn.train.fit`` (the bundle, re-embedding and serving of such
towers: tests/towers/test_served_ids.py)."""

import numpy as np
import pytest
import torch

from learn.config import ConfigError, EvalConfig, TrainConfig, load_config
from learn.towers.model import TowerConfig, TwinTowers, id_width
from learn.train.fit import fit
from learn.train.loop import (evaluate_groups, evaluate_model, group_columns, make_optimizer, ranking_metrics, train_step,
                              training_item_bias, valid_item_biases, with_item_bias)
from learn.train.recipes import compute_loss, epoch_batches, logit_adjusted_members
from tests.export.test_bundle import D_LLM, N_ITEMS
from tests.train.test_loop import synthetic

SEEN = np.arange(N_ITEMS) % 4 != 0


def id_towers(members=3, id_members=1, seed=0, content=None, d_llm=D_LLM, n_items=N_ITEMS, seen=SEEN, dropout=0.1):
    torch.manual_seed(seed)
    content = torch.randn(n_items, d_llm) + 3.0 if content is None else content
    cfg = TowerConfig(d_llm=d_llm, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=dropout, d_out=8 * members,
                      max_len=12, members=members, num_id_items=n_items, id_members=id_members)
    return TwinTowers(cfg, content, id_known=torch.as_tensor(seen)), content


def synthetic_id_towers(dropout=0.1):
    """tests.train.test_loop's synthetic task, with towers of one content-only member and one with IDs."""
    splits, content = synthetic()
    seen = np.zeros(len(content), bool)
    seen[np.unique(np.concatenate(splits.train))] = True
    model, _ = id_towers(members=2, id_members=1, content=content, d_llm=16, n_items=len(content), seen=seen,
                         dropout=dropout)
    return splits, model


def test_only_the_last_id_members_get_id_vectors_and_the_others_ignore_them():
    model, _ = id_towers(members=3, id_members=1)
    assert [s.id_embedding is not None for s in model.stacks] == [False, False, True]
    assert model.member_groups() == [[0, 1], [2]]
    assert model.id_width == id_width(model.cfg) == 16
    assert model.id_vectors(torch.arange(N_ITEMS)).shape == (N_ITEMS, 16)
    model.eval()
    x = torch.randn(4, 5, D_LLM)
    ids = torch.randn(4, 5, 16)
    a = model.encode_vectors(x, user=True, id_vectors=ids)
    b = model.encode_vectors(x, user=True, id_vectors=2 * ids)
    width = model.cfg.d_out // 3
    torch.testing.assert_close(a[..., : 2 * width], b[..., : 2 * width])  # content members: no ID input
    assert (a[..., 2 * width:] - b[..., 2 * width:]).abs().max() > 1e-3
    # every member with IDs, as before the option existed: 0 = all
    every, _ = id_towers(members=2, id_members=0)
    assert all(s.id_embedding is not None for s in every.stacks) and every.member_groups() == [[0, 1]]
    assert every.id_width == 32
    with pytest.raises(ValueError, match="id_members"):
        id_towers(members=2, id_members=2)


def test_frozen_members_add_no_loss_term_and_get_no_gradient():
    splits, model = synthetic_id_towers(dropout=0.0)
    tc = TrainConfig(recipe="full_softmax", batch_size=32, lr=1e-2)
    batch = next(iter(epoch_batches(splits.train, tc, 10, 0, 1, num_items=model.num_items)))
    opt = make_optimizer(model, tc)
    full = train_step(model, batch, opt, None, tc)
    frozen = {k: v.clone() for k, v in model.stacks[1].state_dict().items()}
    model.frozen_members = frozenset({1})
    for p in model.stacks[1].parameters():
        p.requires_grad_(False)
    seen_stacks = []
    hook = model.stacks[1].register_forward_hook(lambda *a: seen_stacks.append(1))
    before0 = model.stacks[0].adaptor.weight.clone()
    half = train_step(model, batch, opt, None, tc)
    hook.remove()
    assert not seen_stacks  # a frozen member is not even run while training
    for k, v in model.stacks[1].state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert not torch.equal(model.stacks[0].adaptor.weight, before0)
    assert 0 < half < full  # one of two terms, still divided by both members
    model.eval()  # evaluation runs every member
    seen_stacks.clear()
    hook = model.stacks[1].register_forward_hook(lambda *a: seen_stacks.append(1))
    model.all_item_embeddings()
    assert seen_stacks


def test_groups_stop_apart_and_each_keeps_its_best_epoch(monkeypatch):
    """ID members peak at epoch 2 and stop after epoch 4 (patience 2), frozen from then on; the content
    members peak at epoch 5 and stop after 7; the result is each group at its own best epoch."""
    import learn.train.fit as fit_module

    splits, model = synthetic_id_towers()
    content_scores = iter([0.1, 0.2, 0.3, 0.35, 0.4, 0.3, 0.2])
    id_scores = iter([0.2, 0.5, 0.4, 0.3, 0.0, 0.0, 0.0])
    snapshots = {}

    def fake_groups(m, split, ev, max_history, groups, prefix="", item_bias=None, group_bias=None):
        assert groups == [[0], [1]]
        snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in m.state_dict().items()}
        return ({f"{prefix}ndcg_at_10": 0.0}, [{f"{prefix}ndcg_at_10": next(content_scores)},
                                                {f"{prefix}ndcg_at_10": next(id_scores)}])

    monkeypatch.setattr(fit_module, "evaluate_groups", fake_groups)
    tc = TrainConfig(recipe="full_softmax", epochs=10, patience=2, lr=1e-2, batch_size=32)
    result = fit(model, splits, tc, EvalConfig(ks=[10]), 10, progress=False)
    assert len(result.history) == 7 and result.stopped_early and result.best_epoch == 5
    assert [r["valid_ndcg_at_10_ids"] for r in result.history][:4] == [0.2, 0.5, 0.4, 0.3]
    assert result.history[4]["valid_ndcg_at_10_content"] == 0.4
    ids_keys = [k for k in snapshots[1] if k.startswith("stacks.1.")]
    content_keys = [k for k in snapshots[1] if k.startswith("stacks.0.")]
    for epoch in (5, 6, 7):  # frozen after epoch 4, with epoch 2's weights back
        for k in ids_keys:
            assert torch.equal(snapshots[epoch][k], snapshots[2][k]), (epoch, k)
    assert not torch.equal(snapshots[6]["stacks.0.adaptor.weight"], snapshots[5]["stacks.0.adaptor.weight"])
    state = model.state_dict()
    for k in ids_keys:
        assert torch.equal(state[k], snapshots[2][k]), k
    for k in content_keys:
        assert torch.equal(state[k], snapshots[5][k]), k
    # trainable again afterwards, and the result's valid figures are the assembled ensemble's
    assert model.frozen_members == frozenset() and all(p.requires_grad for p in model.parameters())
    got = evaluate_model(model, splits.valid, EvalConfig(ks=[10]), 10, prefix="valid_")
    assert result.best_valid["valid_ndcg_at_10"] == pytest.approx(got["valid_ndcg_at_10"])


def test_a_fit_with_content_and_id_members_learns():
    splits, model = synthetic_id_towers(dropout=0.0)
    ev = EvalConfig(ks=[10])
    before = evaluate_model(model, splits.valid, ev, 10)["ndcg_at_10"]
    result = fit(model, splits, TrainConfig(recipe="full_softmax", epochs=12, batch_size=32, lr=3e-3, patience=3),
                 ev, max_history=10, progress=False)
    assert {"valid_ndcg_at_10_content", "valid_ndcg_at_10_ids"} <= set(result.history[0])
    assert evaluate_model(model, splits.valid, ev, 10)["ndcg_at_10"] > before + 0.2


def test_id_members_settings_are_checked(tmp_path):
    base = ["data.path=demo", "model.members=4"]
    with pytest.raises(ConfigError, match="model.item_id_embedding"):
        load_config(None, base + ["model.id_members=2"])
    with pytest.raises(ConfigError, match="model.id_members"):
        load_config(None, base + ["model.item_id_embedding=true", "model.id_members=4"])
    with pytest.raises(ConfigError, match="pretrain_epochs"):
        load_config(None, base + ["model.item_id_embedding=true", "model.id_members=2", "train.pretrain_epochs=3"])
    cfg = load_config(None, base + ["model.item_id_embedding=true", "model.id_members=2"])
    assert cfg.model.id_members == 2


def test_logit_adjustment_on_the_content_members_only():
    """train.logit_adjustment_members=content: the content-only member's loss term has the adjusted
    logits, the ID member's the plain ones (each checked alone by freezing the other)."""
    splits, model = synthetic_id_towers(dropout=0.0)
    model.eval()
    base = dict(recipe="full_softmax", batch_size=32, all_positions=True)
    plain = TrainConfig(**base)
    every = TrainConfig(**base, logit_adjustment=1.5)
    content = TrainConfig(**base, logit_adjustment=1.5, logit_adjustment_members="content")
    assert logit_adjusted_members(every, model.cfg) == {0, 1} and logit_adjusted_members(content, model.cfg) == {0}
    assert logit_adjusted_members(plain, model.cfg) == frozenset()
    batch = next(iter(epoch_batches(splits.train, content, 10, 0, 1, num_items=model.num_items)))

    def loss(cfg, frozen):
        model.frozen_members = frozenset(frozen)
        return compute_loss(model, batch, cfg).detach()

    # member 0 alone (content-only): adjusted, as with every member adjusted
    torch.testing.assert_close(loss(content, {1}), loss(every, {1}))
    assert not torch.isclose(loss(content, {1}), loss(plain, {1}))
    # member 1 alone (with IDs): plain logits
    torch.testing.assert_close(loss(content, {0}), loss(plain, {0}))
    assert not torch.isclose(loss(content, {0}), loss(every, {0}))
    model.frozen_members = frozenset()
    torch.testing.assert_close(compute_loss(model, batch, content).detach(), (loss(content, {1}) + loss(content, {0})))


def test_valid_ranks_each_group_by_its_own_training_score():
    """The towers' score is the mean of the members' cosines, so with half the members adjusted the
    whole towers rank with half the bias; the content group with all of it, the ID group with none."""
    splits, model = synthetic_id_towers(dropout=0.0)
    model.eval()
    n = model.num_items
    cfg = TrainConfig(recipe="full_softmax", logit_adjustment=2.0, logit_adjustment_members="content")
    full = training_item_bias(cfg, splits.train, n)
    assert full is not None and full.max() > 0
    whole, groups = valid_item_biases(cfg, splits.train, model, [[0], [1]])
    torch.testing.assert_close(whole, full / 2)
    torch.testing.assert_close(groups[0], full)
    assert groups[1] is None
    ev = EvalConfig(ks=[10])
    got_whole, got_groups = evaluate_groups(model, splits.valid, ev, 10, [[0], [1]], item_bias=whole,
                                            group_bias=groups)
    from learn.train.loop import user_embeddings
    with torch.no_grad():
        users, items = user_embeddings(model, splits.valid.histories, 10), model.all_item_embeddings()
    want = [ranking_metrics(*with_item_bias(group_columns(users, [g], 2), group_columns(items, [g], 2), b),
                            splits.valid, ev) for g, b in ((0, full), (1, None))]
    assert got_groups == want
    assert got_whole == ranking_metrics(*with_item_bias(users, items, whole), splits.valid, ev)
    # the bias moves the content group's ranking (else the check above shows nothing)
    assert got_groups[0] != ranking_metrics(group_columns(users, [0], 2), group_columns(items, [0], 2),
                                            splits.valid, ev)


def test_logit_adjustment_members_is_checked():
    ids = ["data.path=demo", "model.members=4", "model.item_id_embedding=true", "model.id_members=2"]
    with pytest.raises(ConfigError, match="logit_adjustment_members=content.*model.id_members=0"):
        load_config(None, ["data.path=demo", "train.logit_adjustment=1", "train.logit_adjustment_members=content"])
    with pytest.raises(ConfigError, match="logit_adjustment_members=content.*train.logit_adjustment=0"):
        load_config(None, ids + ["train.logit_adjustment_members=content"])
    with pytest.raises(ConfigError, match=r"train\.logit_adjustment.*train\.recipe=full_softmax"):
        load_config(None, ids + ["train.recipe=in_batch", "train.logit_adjustment=1",
                                 "train.logit_adjustment_members=content"])
    cfg = load_config(None, ids + ["train.logit_adjustment=1", "train.logit_adjustment_members=content"])
    assert cfg.train.logit_adjustment_members == "content"

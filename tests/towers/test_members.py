"""model.members: K independently initialised stacks trained and exported as one pair of towers."""

import numpy as np
import pytest
import torch

from learn.config import ConfigError, TrainConfig, load_config
from learn.export.towers import export_towers, load_item_tower, load_twin_towers, load_user_tower
from learn.towers.model import TowerConfig, TwinTowers, member_slices, pad_histories
from learn.train.recipes import compute_loss, epoch_batches

N_ITEMS, D_LLM = 25, 16


def config(members=1, d_out=8, **kw):
    return TowerConfig(d_llm=D_LLM, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0, d_out=d_out,
                       max_len=16, members=members, **kw)


def trio(**kw):
    """A 2-member model and two one-member models holding exactly its members' weights."""
    torch.manual_seed(0)
    content = torch.randn(N_ITEMS, D_LLM) + 2.0
    pair = TwinTowers(config(2, 8, **kw), content).eval()
    a, b = TwinTowers(config(1, 4, **kw), content).eval(), TwinTowers(config(1, 4, **kw), content).eval()
    state = pair.state_dict()
    shared = {k: v for k, v in state.items() if not k.startswith("stacks.")}
    for one, member in ((a, "stacks.0."), (b, "stacks.1.")):
        one.load_state_dict({**shared, **{"stacks.0." + k[len(member):]: v for k, v in state.items()
                                          if k.startswith(member)}})
    return pair, a, b


def test_every_member_is_one_stack_module():
    names = set(TwinTowers(config(2, 8), torch.randn(N_ITEMS, D_LLM)).state_dict())
    for m in (0, 1):
        assert {f"stacks.{m}.adaptor.weight", f"stacks.{m}.head.weight",
                f"stacks.{m}.encoder.layers.0.linear1.weight"} <= names
    assert not any(n.startswith("stacks.2.") for n in names)


@pytest.mark.parametrize("user_head", ["shared", "separate"])
def test_outputs_are_the_members_concatenated_and_scores_their_mean_cosine(user_head):
    pair, a, b = trio(user_head=user_head)
    # members start from different weights: an ensemble, not copies
    assert not torch.allclose(pair.stacks[0].adaptor.weight, pair.stacks[1].adaptor.weight)
    tokens = pad_histories([np.array([3, 1, 4]), np.array([1, 5, 9, 2, 6]), np.array([7])], 16)
    with torch.no_grad():
        users, items = pair.user_embedding(tokens), pair.all_item_embeddings()
        ua, ub, ia, ib = a.user_embedding(tokens), b.user_embedding(tokens), a.all_item_embeddings(), b.all_item_embeddings()
    assert users.shape == (3, 8) and items.shape == (N_ITEMS, 8)
    torch.testing.assert_close(users.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(users @ items.T, (ua @ ia.T + ub @ ib.T) / 2, atol=1e-6, rtol=0)
    for got, want in zip(member_slices(items, 2), (ia, ib)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def _train():
    rng = np.random.default_rng(0)
    return [rng.integers(0, N_ITEMS, int(rng.integers(3, 9))) for _ in range(12)]


@pytest.mark.parametrize("recipe,extra", [("full_softmax", {"all_positions": True}), ("in_batch", {}),
                                          ("dense_all_action", {"n_history": 3, "n_targets": 3, "target_len": 5})])
def test_each_member_is_trained_on_its_own_loss(recipe, extra):
    """The ensemble's loss is the mean of the members' losses as if each were trained alone, so a
    member's gradient does not depend on the other members."""
    pair, a, b = trio()
    cfg = TrainConfig(recipe=recipe, batch_size=6, **extra)
    batch = next(iter(epoch_batches(_train(), cfg, 10, seed=0, epoch=0)))
    for m in (pair, a, b):
        m.train()
    loss = compute_loss(pair, batch, cfg)
    alone = [compute_loss(m, batch, cfg) for m in (a, b)]
    torch.testing.assert_close(loss, (alone[0] + alone[1]) / 2, atol=1e-5, rtol=0)
    loss.backward()
    alone[1].backward()
    torch.testing.assert_close(pair.stacks[1].adaptor.weight.grad, b.stacks[0].adaptor.weight.grad / 2, atol=1e-6,
                               rtol=0)


def test_exported_ensemble_matches_the_model(tmp_path):
    pair, _, _ = trio(user_head="separate")
    paths = export_towers(pair, tmp_path)
    tokens = pad_histories([np.array([3, 1, 4]), np.array([2])], 16)
    with torch.no_grad():
        want_users, want_items = pair.user_embedding(tokens), pair.all_item_embeddings()
    user, item = load_user_tower(paths["user_tower"]), load_item_tower(paths["item_tower"])
    torch.testing.assert_close(user(pair.content[tokens], (tokens > 0).sum(1)), want_users, atol=1e-5, rtol=0)
    torch.testing.assert_close(item(pair.content[1:]), want_items, atol=1e-5, rtol=0)
    again = load_twin_towers(tmp_path, pair.content[1:])
    assert again.cfg.members == 2
    torch.testing.assert_close(again.all_item_embeddings(), want_items, atol=1e-6, rtol=0)


def test_bad_member_settings_are_refused():
    with pytest.raises(ConfigError, match="model.d_out.*multiple of model.members"):
        load_config(None, ["model.members=3", "model.d_out=128"])
    with pytest.raises(ConfigError, match="item tower 'c'"):
        load_config(None, ["model.members=2", "model.item_tower=c"])
    with pytest.raises(ConfigError, match="model.members"):
        load_config(None, ["model.members=0"])
    with pytest.raises(ValueError, match="multiple of model.members"):
        TwinTowers(config(3, 8), torch.randn(N_ITEMS, D_LLM))

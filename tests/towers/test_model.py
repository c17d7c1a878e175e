from dataclasses import replace

import numpy as np
import pytest
import torch

from learn.towers.model import TowerConfig, TwinTowers, pad_histories


def make(item_tower="a", positions="none", d_llm=16, n_items=30, center=True, seed=0):
    torch.manual_seed(seed)
    content = torch.randn(n_items, d_llm) + 3.0  # a shared offset, as frozen encoders have
    cfg = TowerConfig(d_llm=d_llm, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0,
                      d_out=d_llm if item_tower == "c" else 8, positions=positions, item_tower=item_tower,
                      center_inputs=center, max_len=16)
    return TwinTowers(cfg, content).eval()


def test_pad_histories_right_pads_and_keeps_last_items():
    t = pad_histories([np.array([4, 5, 6]), np.array([1])], max_len=2)
    assert t.tolist() == [[6, 7], [2, 0]]


@pytest.mark.parametrize("positions", ["none", "learned"])
def test_attention_is_causal(positions):
    m = make(positions=positions)
    a = torch.tensor([[1, 2, 3, 4, 5]])
    b = torch.tensor([[1, 2, 3, 9, 10]])
    oa, ob = m.encode_sequence(a), m.encode_sequence(b)
    assert torch.allclose(oa[:, :3], ob[:, :3], atol=1e-6)  # the past does not see the future
    assert not torch.allclose(oa[:, 3], ob[:, 3], atol=1e-4)


def test_learned_positions_start_at_zero_and_then_tell_positions_apart():
    """Fresh learned positions change nothing (the towers start as the position-free model, as torch's
    N(0, 1) initialisation did not: it swamped the adaptor's outputs); once trained they move the users."""
    plain, learned = make(), make(positions="learned")
    assert torch.count_nonzero(learned.stacks[0].positions.weight) == 0
    missing = learned.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.endswith("positions.weight") for k in missing)
    hists = pad_histories([np.array([3, 1, 4]), np.array([4, 1, 3])], 16)
    assert torch.allclose(learned.user_embedding(hists), plain.user_embedding(hists), atol=1e-6)
    assert torch.allclose(learned.all_item_embeddings(), plain.all_item_embeddings(), atol=1e-6)
    with torch.no_grad():
        learned.stacks[0].positions.weight.normal_(0, 0.1)
    assert not torch.allclose(learned.user_embedding(hists), plain.user_embedding(hists), atol=1e-3)
    assert torch.allclose(learned.all_item_embeddings(), learned.item_embedding(torch.arange(30)), atol=1e-6)


def test_user_vector_is_last_real_position_and_padding_does_not_matter():
    m = make()
    hists = [np.array([3, 1, 4]), np.array([1, 5, 9, 2, 6])]
    batched = m.user_embedding(pad_histories(hists, 16))
    for i, h in enumerate(hists):
        alone = m.user_embedding(pad_histories([h], 16))
        assert torch.allclose(batched[i], alone[0], atol=1e-5)
    assert torch.allclose(batched.norm(dim=1), torch.ones(2), atol=1e-5)


def test_item_vector_is_the_stack_on_one_item():
    m = make()
    items = torch.tensor([0, 7, 29])
    direct = m.encode_sequence((items + 1).unsqueeze(1))[:, 0]
    assert torch.allclose(m.item_embedding(items), direct, atol=1e-6)
    assert torch.allclose(m.all_item_embeddings()[items], direct, atol=1e-6)


def test_item_tower_variants():
    a, b = make("a"), make("b")
    b.load_state_dict(a.state_dict())
    seq = torch.tensor([[1, 2, 3]])
    # b: each target sees only itself, so it equals the single-item vector
    assert torch.allclose(b.target_sequence_embedding(seq)[0, 2], b.item_embedding(torch.tensor([2]))[0], atol=1e-5)
    # a: causal over the targets, later targets differ from the single-item vector
    assert not torch.allclose(a.target_sequence_embedding(seq)[0, 2], a.item_embedding(torch.tensor([2]))[0], atol=1e-4)
    c = make("c")
    raw = (c.content[1:] - c.content_mean) / c.content_scale
    expected = raw / raw.norm(dim=1, keepdim=True)
    assert torch.allclose(c.all_item_embeddings(), expected, atol=1e-5)


def test_centring_removes_shared_component():
    m = make(center=True)
    x = m._inputs(torch.arange(1, 31).unsqueeze(0))[0]
    assert x.mean(0).abs().max() < 1e-5
    assert x.norm(dim=1).mean() == pytest.approx(1.0, abs=1e-5)


def test_variant_c_requires_matching_dims():
    with pytest.raises(ValueError, match="d_out must equal"):
        TwinTowers(TowerConfig(d_llm=16, d_out=8, item_tower="c", d_model=32, n_heads=4), torch.randn(5, 16))


def test_shared_head_maps_one_item_history_onto_its_item_vector_separate_does_not():
    shared = make()
    one = torch.tensor([[4]])  # catalog item 3
    assert torch.allclose(shared.user_embedding(one)[0], shared.item_embedding(torch.tensor([3]))[0], atol=1e-6)
    torch.manual_seed(0)
    cfg = TowerConfig(d_llm=16, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, d_out=8,
                      user_head="separate")
    sep = TwinTowers(cfg, torch.randn(30, 16)).eval()
    assert not torch.allclose(sep.user_embedding(one)[0], sep.item_embedding(torch.tensor([3]))[0], atol=1e-3)
    assert torch.allclose(sep(one)[0, 0], sep.user_embedding(one)[0])  # forward is the user side


def test_item_id_embedding_only_for_items_seen_in_training():
    torch.manual_seed(0)
    n, d_llm = 12, 16
    content = torch.randn(n, d_llm)
    known = torch.tensor([True] * 8 + [False] * 4)  # the last 4 never appear in training
    cfg = TowerConfig(d_llm=d_llm, d_model=32, n_layers=1, n_heads=2, d_ff=64, d_out=16, dropout=0.0,
                      num_id_items=n)
    with_ids = TwinTowers(cfg, content, id_known=known).eval()
    plain = TwinTowers(TowerConfig(**{**cfg.to_dict(), "num_id_items": 0}), content).eval()
    missing, unexpected = plain.load_state_dict(with_ids.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"stacks.0.id_embedding.weight", "id_known"}
    # starts as the content-only model (zero ID vectors)
    items = torch.arange(n)
    torch.testing.assert_close(with_ids.item_embedding(items), plain.item_embedding(items))
    with torch.no_grad():
        with_ids.stacks[0].id_embedding.weight[1:].normal_()  # row 0 is the "no ID" row: stays zero
    emb, ref = with_ids.item_embedding(items), plain.item_embedding(items)
    assert (emb[:8] - ref[:8]).abs().max() > 1e-3  # seen items: content + their ID vector
    torch.testing.assert_close(emb[8:], ref[8:])  # cold items: content only
    # full-softmax style loss over every item: cold items' ID rows get no gradient, not even as negatives
    with_ids.train()
    logits = with_ids.user_embedding(torch.tensor([[1, 2, 3]])) @ with_ids.item_embedding(items).T
    torch.nn.functional.cross_entropy(logits, torch.tensor([4])).backward()
    grad = with_ids.stacks[0].id_embedding.weight.grad
    assert grad.is_sparse  # a step touches only its rows (learn/train/optim.py)
    grad = grad.to_dense()
    assert grad[1:9].abs().sum() > 0 and grad[9:].abs().sum() == 0 and grad[0].abs().sum() == 0


def test_item_id_embedding_is_refused_where_it_cannot_work():
    from pathlib import Path

    from learn.config import ConfigError, load_config

    conf = Path(__file__).resolve().parents[2] / "conf/tiny.yaml"
    with pytest.raises(ConfigError, match="item_id_embedding"):
        load_config(conf, ["model.item_id_embedding=true", "train.recipe=content_last"])
    assert load_config(conf, ["model.item_id_embedding=true"]).model.item_id_embedding  # exported too
    # and trained under Ray DDP too (tests/train/test_distributed.py)
    assert load_config(conf, ["model.item_id_embedding=true", "train.backend=ray"]).train.backend == "ray"
    with pytest.raises(ValueError, match="id_known"):
        TwinTowers(TowerConfig(d_llm=4, d_model=8, n_layers=1, n_heads=2, d_ff=8, d_out=4, num_id_items=3),
                   torch.randn(3, 4))


def test_item_id_dropout_leaves_ids_out_of_training_occurrences_only():
    torch.manual_seed(0)
    n, d_llm = 6, 16
    known = torch.tensor([True] * 5 + [False])  # item 5 is cold
    cfg = TowerConfig(d_llm=d_llm, d_model=32, n_layers=1, n_heads=2, d_ff=64, d_out=16, dropout=0.0,
                      num_id_items=n, item_id_dropout=0.5)
    m = TwinTowers(cfg, torch.randn(n, d_llm), id_known=known)
    with torch.no_grad():
        m.stacks[0].id_embedding.weight[1:].normal_()
    plain = TwinTowers(TowerConfig(**{**cfg.to_dict(), "num_id_items": 0}), m.content[1:].clone())
    plain.load_state_dict(m.state_dict(), strict=False)
    m.eval()
    plain.eval()
    items = torch.arange(n)
    with_ids, content_only = m.item_embedding(items), plain.item_embedding(items)
    assert (with_ids[:5] - content_only[:5]).abs().max() > 1e-3
    torch.testing.assert_close(m.item_embedding(items), with_ids)  # evaluation: every seen item keeps its ID
    m.train()
    tokens = torch.tensor([[1]] * 4000 + [[6]] * 50)  # item 0 4,000 times, cold item 5 50 times
    out = m.encode_sequence(tokens)[:, 0]
    is_id = (out[:4000] - with_ids[0]).abs().max(1).values < 1e-5
    is_plain = (out[:4000] - content_only[0]).abs().max(1).values < 1e-5
    assert bool((is_id ^ is_plain).all())  # each occurrence: its ID vector or none, nothing in between
    assert 0.45 < is_plain.float().mean().item() < 0.55
    torch.testing.assert_close(out[4000:], content_only[5].expand(50, -1))  # cold: never an ID vector


def test_item_id_dropout_needs_item_ids_and_a_probability():
    from pathlib import Path

    from learn.config import ConfigError, load_config

    conf = Path(__file__).resolve().parents[2] / "conf/tiny.yaml"
    with pytest.raises(ConfigError, match="model.item_id_dropout=0.5 has no effect without model.item_id_embedding"):
        load_config(conf, ["model.item_id_dropout=0.5"])
    with pytest.raises(ConfigError, match="model.item_id_dropout"):
        load_config(conf, ["model.item_id_embedding=true", "model.item_id_dropout=1"])
    cfg = load_config(conf, ["model.item_id_embedding=true", "model.item_id_dropout=0.5"])
    assert TowerConfig.from_model_config(cfg.model, 16, 30).item_id_dropout == 0.5  # the bundle's config keeps it


def test_mean_history_counts_the_earlier_items_of_each_training_target_capped():
    from learn.data.ragged import Ragged
    from learn.towers.model import mean_history

    seqs = [np.array([5]), np.array([1, 2, 3]), np.arange(6)]
    # targets: none in the 1-item sequence; 1, 2 earlier items; 1, 2, 2, 2, 2 (capped at 2)
    assert mean_history(seqs, 2) == pytest.approx(12 / 7)
    assert mean_history(Ragged.from_arrays(seqs), 2) == pytest.approx(12 / 7)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 90, 200)
    brute = [min(k, 40) for n in lengths for k in range(1, n)]
    assert mean_history([np.zeros(n) for n in lengths], 40) == pytest.approx(np.mean(brute))
    assert mean_history([np.array([7])], 40) == 0.0  # no target at all


def test_auto_positions_are_learned_on_long_training_sequences_only():
    from learn.config import ModelConfig
    from learn.towers.model import resolve_positions

    m = ModelConfig(d_model=32, n_layers=1, n_heads=4, d_ff=64, d_out=8, max_len=16, positions="auto",
                    positions_min_history=3.0)
    short = [np.arange(4) % 30] * 5  # 1, 2, 3 earlier items: mean 2
    long = [np.arange(10) % 30] * 5  # mean 5
    at = [np.arange(6) % 30] * 5  # mean 3: the threshold itself turns them on
    assert resolve_positions(m, short, 40) == (replace(m, positions="none"), 2.0)
    assert resolve_positions(m, long, 40)[0].positions == "learned"
    assert resolve_positions(m, long, 2)[0].positions == "none"  # capped at max_history: mean < 2
    assert resolve_positions(m, at, 40)[0].positions == "learned"
    for fixed in ("none", "learned"):  # an explicit choice is kept
        assert resolve_positions(replace(m, positions=fixed), long if fixed == "none" else short, 40)[0].positions == fixed
    content = torch.randn(30, 16)
    torch.manual_seed(0)
    auto_short = TwinTowers.from_config(m, content, train=short, max_history=40)
    torch.manual_seed(0)
    plain = TwinTowers.from_config(replace(m, positions="none"), content)
    assert auto_short.cfg.positions == "none"  # the same towers, weight for weight, as positions=none
    assert auto_short.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in auto_short.state_dict().items())
    auto_long = TwinTowers.from_config(m, content, train=long, max_history=40)
    assert auto_long.cfg.positions == "learned" and auto_long.stacks[0].positions is not None
    with pytest.raises(ValueError, match="pass train= and max_history="):
        TwinTowers.from_config(m, content)
    with pytest.raises(ValueError, match="resolve it first"):
        TowerConfig.from_model_config(m, 16)

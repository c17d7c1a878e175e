import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from learn.export import ItemTower, UserTower, export_towers, load_item_tower, load_twin_towers, load_user_tower
from learn.towers.model import TowerConfig, TwinTowers, pad_histories
from tests.fakes import swap_catalog

N_ITEMS = 30
MAX_LEN = 12
COMBOS = [(v, p, h) for v in "abc" for p in ("none", "learned") for h in ("shared", "separate")]


def make(item_tower="a", positions="none", user_head="shared", seed=0) -> TwinTowers:
    torch.manual_seed(seed)
    content = torch.randn(N_ITEMS, 16) + 3.0
    cfg = TowerConfig(d_llm=16, d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.1,
                      d_out=16 if item_tower == "c" else 8, positions=positions, item_tower=item_tower,
                      max_len=MAX_LEN, user_head=user_head)
    model = TwinTowers(cfg, content)
    with torch.no_grad():  # non-trivial centring buffers and heads, as after training
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export each configuration once per module: {combo: (model, paths)}."""
    cache: dict = {}

    def get(combo):
        if combo not in cache:
            model = make(*combo)
            cache[combo] = model, export_towers(model, tmp_path_factory.mktemp("towers"))
        return cache[combo]

    return get


def histories(rng, batch: int, length: int) -> list[np.ndarray]:
    """``batch`` histories, one of exactly ``length`` items, the rest 1..length."""
    lens = [length] + list(rng.integers(1, length + 1, batch - 1))
    return [rng.integers(0, N_ITEMS, n) for n in lens[:batch]]


def vectors(model: TwinTowers, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw content vectors of a token batch (zeros at padding) and the lengths."""
    return model.content[tokens], (tokens > 0).sum(1)


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_exported_towers_match_the_model(exported, combo):
    model, paths = exported(combo)
    user, item = load_user_tower(paths["user_tower"]), load_item_tower(paths["item_tower"])
    rng = np.random.default_rng(1)
    longest = MAX_LEN if combo[1] == "learned" else 20  # beyond max_len when positions allow it
    for batch, length in [(1, 1), (4, 1), (1, 5), (3, 2), (5, 7), (2, longest)]:
        tokens = pad_histories(histories(rng, batch, length), longest)
        assert tokens.shape == (batch, length)
        x, lengths = vectors(model, tokens)
        got = user(x, lengths)
        assert got.shape == (batch, model.cfg.d_out)
        torch.testing.assert_close(got, model.user_embedding(tokens), atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = model.all_item_embeddings()
    torch.testing.assert_close(item(model.content[1:]), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(item(model.content[5:6]), expected[4:5], atol=1e-5, rtol=0)


def test_towers_in_process_match_model_and_leave_it_untouched():
    model = make("b", "learned", "separate").train()
    user, item = UserTower(model), ItemTower(model)
    assert model.training and model.stacks[0].encoder.training  # wrappers have their own eval flags
    assert not user.training and not user.towers.stacks[0].encoder.training
    assert user.towers.stacks[0].adaptor.weight is model.stacks[0].adaptor.weight  # weights are shared, not copied
    assert "towers.content" not in dict(user.named_buffers())
    tokens = pad_histories([np.array([1, 2, 3]), np.array([4])], MAX_LEN)
    model.eval()
    torch.testing.assert_close(user(*vectors(model, tokens)), model.user_embedding(tokens), atol=1e-6, rtol=0)
    torch.testing.assert_close(item(model.content[1:]), model.all_item_embeddings(), atol=1e-6, rtol=0)


def test_export_keeps_training_mode_and_works_under_no_grad(tmp_path):
    model = make("a", "learned").train()
    with torch.no_grad():
        paths = export_towers(model, tmp_path)
    assert model.training and model.stacks[0].encoder.layers[0].training
    model.eval()
    tokens = pad_histories([np.array([3, 1, 4, 1, 5]), np.array([9, 2])], MAX_LEN)
    got = load_user_tower(paths["user_tower"])(*vectors(model, tokens))
    torch.testing.assert_close(got, model.user_embedding(tokens), atol=1e-5, rtol=0)


def test_export_writes_config_and_catalog_free_state(exported):
    model, paths = exported(("a", "learned", "separate"))
    assert sorted(p.name for p in paths["state"].parent.iterdir()) == sorted(
        ["item_tower.pt2", "tower_config.json", "towers_state.pt", "user_tower.pt2"]
    )  # nothing half-written left behind
    assert TowerConfig(**json.loads(paths["config"].read_text())) == model.cfg
    state = torch.load(paths["state"], weights_only=True)
    assert "content" not in state and "content_mean" in state and "stacks.0.user_head.weight" in state
    ep = torch.export.load(str(paths["user_tower"]))
    assert not [k for k in (*ep.state_dict, *ep.constants) if k.endswith(".content")]
    other = torch.randn(7, 16)  # a different catalog: centring statistics stay as trained
    rebuilt = load_twin_towers(paths["state"].parent, other)
    torch.testing.assert_close(rebuilt.content_mean, model.content_mean)
    reference = copy.deepcopy(model)
    swap_catalog(reference, other)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.all_item_embeddings(), reference.all_item_embeddings())


@pytest.mark.parametrize("variant", ["a", "c"])
def test_new_items_go_through_the_item_tower(exported, variant):
    model, paths = exported((variant, "learned", "separate"))
    user, item = load_user_tower(paths["user_tower"]), load_item_tower(paths["item_tower"])
    torch.manual_seed(5)
    new = torch.randn(6, 16) + 3.0  # items that were never in the training catalog
    reference = copy.deepcopy(model)
    swap_catalog(reference, new)  # the eager model with these as its catalog
    with torch.no_grad():
        expected = reference.all_item_embeddings()
        known = model.all_item_embeddings()
    got = item(new)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(6), atol=1e-5, rtol=0)
    assert torch.cdist(got, known).min() > 1e-3
    tokens = pad_histories([np.array([0, 5, 2]), np.array([3])], MAX_LEN)  # histories of new items
    torch.testing.assert_close(user(*vectors(reference, tokens)), reference.user_embedding(tokens), atol=1e-5, rtol=0)


def test_exported_user_tower_rejects_bad_inputs(exported):
    model, paths = exported(("a", "learned", "shared"))
    user = load_user_tower(paths["user_tower"])
    with pytest.raises(Exception, match="12"):  # beyond the learned positions
        user(torch.randn(1, MAX_LEN + 1, 16), torch.tensor([MAX_LEN + 1]))
    for lengths in ([2, 0], [2, 3]):  # an empty history, a length beyond L
        with pytest.raises(RuntimeError, match="1..L"):
            user(torch.randn(2, 2, 16), torch.tensor(lengths))
        with pytest.raises(RuntimeError, match="1..L"):
            UserTower(model)(torch.randn(2, 2, 16), torch.tensor(lengths))


FRESH = textwrap.dedent(
    """
    import sys

    class NoLearn:  # the artifacts must not need the training package
        def find_spec(self, name, path=None, target=None):
            if name == "learn" or name.startswith("learn."):
                raise ImportError("learn must not be imported")

    sys.meta_path.insert(0, NoLearn())
    import torch

    case_dir = sys.argv[1]
    user = torch.export.load(case_dir + "/user_tower.pt2").module()
    item = torch.export.load(case_dir + "/item_tower.pt2").module()
    cases = torch.load(case_dir + "/cases.pt", weights_only=True)
    for x, lengths, expected in cases["user"]:
        torch.testing.assert_close(user(x, lengths), expected, atol=1e-5, rtol=0)
    for x, expected in cases["item"]:
        torch.testing.assert_close(item(x), expected, atol=1e-5, rtol=0)
    assert "learn" not in sys.modules
    print("ok", len(cases["user"]), len(cases["item"]))
    """
)


@pytest.mark.parametrize("combo", [("b", "learned", "separate"), ("c", "none", "shared")])
def test_fresh_process_reproduces_outputs_without_learn(exported, combo, tmp_path):
    model, paths = exported(combo)
    rng = np.random.default_rng(2)
    user_cases = []
    for batch, length in [(1, 1), (3, 4), (6, MAX_LEN)]:
        tokens = pad_histories(histories(rng, batch, length), MAX_LEN)
        x, lengths = vectors(model, tokens)
        user_cases.append((x, lengths, model.user_embedding(tokens).detach()))
    new = torch.randn(4, 16) + 3.0
    reference = copy.deepcopy(model)
    swap_catalog(reference, new)
    with torch.no_grad():
        item_cases = [(model.content[1:2].clone(), model.all_item_embeddings()[:1]),
                      (model.content[1:].clone(), model.all_item_embeddings()),
                      (new, reference.all_item_embeddings())]
    case_dir = paths["user_tower"].parent
    torch.save({"user": user_cases, "item": item_cases}, case_dir / "cases.pt")
    try:
        result = subprocess.run([sys.executable, "-c", FRESH, str(case_dir)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
    finally:
        (case_dir / "cases.pt").unlink()
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok 3 3"

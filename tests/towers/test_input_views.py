"""Input views (centring, ZCA and group whitening) and the MLP adaptor: fitted once on the training
catalog, kept in the weights, applied to new items unchanged by the exported towers."""

import numpy as np
import pytest
import torch

from learn.config import ConfigError, load_config
from learn.export.towers import export_towers, load_item_tower, load_twin_towers, load_user_tower
from learn.towers.model import TowerConfig, TwinTowers, pad_histories, whitening_matrix

D = 16


def catalog(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D, D, generator=g) * torch.linspace(0.1, 3.0, D)  # correlated, unequal variances
    return torch.randn(n, D, generator=g) @ mix + 5.0


def towers(views, adaptor="linear", content=None, **kw):
    torch.manual_seed(0)
    cfg = TowerConfig(d_llm=D, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0, d_out=8, max_len=12,
                      input_views=views, adaptor=adaptor, whiten_groups=4, **kw)
    return TwinTowers(cfg, catalog() if content is None else content).eval()


def test_whitening_matrix_decorrelates_to_a_shrunk_identity():
    x = catalog(4000).double()
    mean = x.mean(0, keepdim=True)
    w = whitening_matrix(x.float(), mean.float(), shrinkage=1e-9, block=512).double()  # blocks: streamed sums
    y = (x - mean) @ w
    cov = y.T @ y / (len(y) - 1)
    # white up to one scale, and that scale gives unit mean norm
    torch.testing.assert_close(cov / cov.diag().mean(), torch.eye(D, dtype=torch.float64), atol=2e-3, rtol=0)
    assert abs(float(y.norm(dim=1).mean()) - 1.0) < 1e-6
    torch.testing.assert_close(w, w.T)  # ZCA: symmetric, the rotation back to the original axes


def test_group_whitening_is_block_diagonal():
    x = catalog(2000)
    w = whitening_matrix(x, x.mean(0, keepdim=True), shrinkage=0.1, groups=4)
    off = w.clone()
    for g in range(4):
        off[g * 4:(g + 1) * 4, g * 4:(g + 1) * 4] = 0
    assert off.abs().max() == 0 and w.abs().max() > 0


def test_views_each_get_an_adaptor_and_old_weights_keep_their_keys():
    one = towers(["center"])
    assert "stacks.0.adaptor.weight" in one.state_dict() and one.stacks[0].view_adaptors is None
    three = towers(["center", "whiten", "group"], adaptor="mlp")
    keys = three.state_dict().keys()
    assert {"whiten_matrix", "group_matrix", "stacks.0.adaptor.0.weight", "stacks.0.view_adaptors.1.3.weight"} <= set(keys)
    # each view is its own input: zeroing one view's adaptor output changes the towers
    items = torch.arange(5)
    before = three.item_embedding(items)
    with torch.no_grad():
        three.stacks[0].view_adaptors[0][3].weight.zero_()
        three.stacks[0].view_adaptors[0][3].bias.zero_()
    assert not torch.allclose(before, three.item_embedding(items), atol=1e-4)


@pytest.mark.parametrize("views,adaptor", [(["whiten"], "linear"), (["whiten", "group"], "mlp"),
                                           (["center", "group"], "mlp")])
def test_padding_stays_zero_and_users_ignore_it(views, adaptor):
    m = towers(views, adaptor)
    hists = [np.array([3, 1, 4]), np.array([1, 5, 9, 2, 6])]
    batched = m.user_embedding(pad_histories(hists, 12))
    for i, h in enumerate(hists):
        torch.testing.assert_close(batched[i], m.user_embedding(pad_histories([h], 12))[0], atol=1e-5, rtol=0)
    tokens = pad_histories(hists, 12)
    for view in m.input_views(m.content[tokens], tokens > 0):
        assert float(view[tokens == 0].abs().max()) == 0.0 and float(view[tokens > 0].abs().min()) > 0.0


def test_exported_towers_carry_the_training_catalog_statistics(tmp_path):
    m = towers(["whiten", "group"], adaptor="mlp")
    paths = export_towers(m, tmp_path)
    fresh = catalog(7, seed=3)  # new items, never in the fitted catalog
    item = load_item_tower(paths["item_tower"])
    torch.testing.assert_close(item(fresh), m.encode_vectors(fresh.unsqueeze(1))[:, 0], atol=1e-5, rtol=0)
    user = load_user_tower(paths["user_tower"])
    hist = fresh[None, :4]
    torch.testing.assert_close(user(hist, torch.tensor([4])), m.encode_vectors(hist, user=True)[:, 3], atol=1e-5, rtol=0)
    # reloaded over another catalog, the weights keep the fitted statistics (not refitted on that catalog)
    again = load_twin_towers(tmp_path, fresh)
    torch.testing.assert_close(again.whiten_matrix, m.whiten_matrix)
    torch.testing.assert_close(again.item_embedding(torch.arange(7)), item(fresh), atol=1e-5, rtol=0)


def test_bad_views_are_refused_with_the_key():
    with pytest.raises(ValueError, match="whiten_groups"):
        TwinTowers(TowerConfig(d_llm=15, d_model=16, n_heads=2, d_out=8, input_views=["group"], whiten_groups=4),
                   torch.randn(20, 15))
    with pytest.raises(ValueError, match="center_inputs"):
        TwinTowers(TowerConfig(d_llm=D, d_model=16, n_heads=2, d_out=8, input_views=["whiten"], center_inputs=False),
                   catalog())


@pytest.mark.parametrize("overrides,message", [
    (["model.input_views=[whiten, whiten]"], "model.input_views"),
    (["model.input_views=[]"], "model.input_views"),
    (["model.whiten_groups=2"], "no effect unless 'group'"),
    (["model.whiten_shrinkage=0.5"], "no effect unless 'whiten' or 'group'"),
    (["model.adaptor_hidden=64"], "no effect unless model.adaptor=mlp"),
    (["model.input_views=[whiten]", "model.whiten_shrinkage=0"], "model.whiten_shrinkage"),
    (["model.input_views=[whiten]", "model.item_tower=c", "model.d_out=384"], "item_tower"),
    (["model.adaptor=deep"], "model.adaptor"),
])
def test_config_refuses_views_that_cannot_apply(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("conf/tiny.yaml", overrides)

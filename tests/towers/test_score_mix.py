"""The served score mix (learn/towers/mix.py): the concatenated vectors rank as the formula does, the
weights are chosen on valid, and a bundle (write, load, re-embed) serves what evaluation scored."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from learn.config import ConfigError, EvalConfig, load_config
from learn.data.sequences import EvalSplit
from learn.export import ArtifactError
from learn.export.bundle import load_bundle, write_bundle
from learn.export.reembed import item_vectors
from learn.towers.mix import ScoreMix, candidates, last_items, popularity_prior
from learn.train.loop import choose_score_mix, evaluate_model, mixed_vectors, user_embeddings
from tests.export.test_bundle import D_LLM, IDS, N_ITEMS, info, make_model, reseal

HISTORIES = [np.array([3, 7, 9]), np.array([11]), np.array([0, 4, 18, 22, 5]), np.array([40, 41])]


def formula(tower_u, tower_i, last_content, content, prior, mix):
    """The served score, written out term by term."""
    cos = lambda a, b: F.normalize(torch.as_tensor(a).float(), dim=-1) @ F.normalize(torch.as_tensor(b).float(), dim=-1).T
    return (torch.as_tensor(tower_u) @ torch.as_tensor(tower_i).T + mix.content_weight * cos(last_content, content)
            + mix.popularity_weight * torch.as_tensor(prior)[None, :])


@pytest.mark.parametrize("mix", [ScoreMix(0.3, 0.0), ScoreMix(0.0, 0.2), ScoreMix(0.15, 0.05)])
def test_concatenated_vectors_rank_as_the_formula(mix):
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    i = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    content = torch.randn(30, 5, generator=g) + 1.0
    last = content[torch.tensor([0, 3, 3, 7, 29, 12])]
    prior = popularity_prior(np.random.default_rng(0).integers(0, 40, 30))
    items, users = mix.items(i, content, prior), mix.users(u, last)
    assert items.shape[1] == 8 + mix.extra_dims(5) == users.shape[1]
    torch.testing.assert_close(items.norm(dim=1), torch.ones(30))  # the index holds unit vectors
    torch.testing.assert_close(users.norm(dim=1), torch.ones(6))
    served, expected = users @ items.T, formula(u, i, last, content, prior, mix)
    # the same score up to one positive factor per user: the same ranking
    factor = served / expected
    torch.testing.assert_close(factor, factor[:, :1].expand_as(factor), rtol=1e-4, atol=1e-6)
    assert (factor > 0).all()
    if mix.popularity_weight > 0:
        np.testing.assert_allclose(mix.prior_of(items.numpy()), prior, atol=1e-6)
    else:
        assert mix.prior_of(items.numpy()) is None


def test_no_mix_leaves_the_towers_vectors_and_bad_weights_are_refused():
    u = torch.randn(3, 4)
    assert torch.equal(ScoreMix().users(u, torch.randn(3, 5)), u) and ScoreMix().extra_dims(5) == 0
    for bad in (-0.1, float("nan"), True):
        with pytest.raises(ValueError, match="content_weight"):
            ScoreMix(bad, 0.0)
    with pytest.raises(ValueError, match="score_mix"):
        ScoreMix.from_json({"content_weight": 0.1}, "manifest.json")


def test_prior_candidates_and_last_items():
    prior = popularity_prior(np.array([0, 1, 10, 3]))
    assert prior[0] == 0 and prior[2] == 1 and 0 < prior[1] < prior[3] < 1
    assert popularity_prior(np.zeros(3)).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        popularity_prior(np.array([1, -1]))
    mixes = candidates([0.2, 0.0], [0.0, 0.1])
    assert mixes[0] == ScoreMix() and len(mixes) == 4  # the towers alone come first: they win ties
    assert last_items(EvalSplit(np.arange(4), HISTORIES, np.zeros(4, int)).histories).tolist() == [9, 11, 5, 41]


def split(targets=(1, 2, 3, 4)):
    return EvalSplit(np.arange(len(HISTORIES)), HISTORIES, np.array(targets))


def test_evaluation_scores_the_formula_and_choice_is_on_valid():
    model, content = make_model(0)
    mix = ScoreMix(0.2, 0.1)
    prior = popularity_prior(np.arange(N_ITEMS) % 7)
    ev = split()
    users = user_embeddings(model, ev.histories, 12)
    u, i = mixed_vectors(model, ev, users, model.all_item_embeddings(), mix, prior)
    expected = formula(users, model.all_item_embeddings(), content[[9, 11, 5, 41]], content, prior, mix)
    assert torch.equal((u @ i.T).argsort(1, descending=True)[:, :10], expected.argsort(1, descending=True)[:, :10])

    # a target the content term ranks first for each user: the content-heavy candidate must win on valid
    cos = F.normalize(torch.as_tensor(content), dim=-1)
    nearest = cos[[9, 11, 5, 41]] @ cos.T
    nearest[torch.arange(4), torch.tensor([9, 11, 5, 41])] = -2  # not the last item itself
    ev = split(nearest.argmax(1).tolist())
    eval_cfg = EvalConfig(ks=[10])
    chosen, table = choose_score_mix(model, ev, eval_cfg, 12, candidates([0, 5.0], [0]), prior)
    assert chosen == ScoreMix(5.0, 0.0) and table["score_mix_valid_ndcg_at_10_c5_p0"] > table["score_mix_valid_ndcg_at_10_c0_p0"]
    mixed = evaluate_model(model, ev, eval_cfg, 12, prefix="t_", mix=chosen, prior=prior)
    assert mixed["t_ndcg_at_10"] == pytest.approx(table["score_mix_valid_ndcg_at_10_c5_p0"])


@pytest.fixture(scope="module")
def mixed_bundle(tmp_path_factory):
    model, content = make_model(0)
    prior = popularity_prior(np.arange(N_ITEMS) % 5)  # every fifth item unseen (prior 0)
    mix = ScoreMix(0.25, 0.1)
    summary = write_bundle(model, IDS, content, tmp_path_factory.mktemp("mix") / "b", info(), mix=mix, prior=prior)
    return model, content, prior, mix, summary


def test_bundle_serves_what_evaluation_scored(mixed_bundle):
    model, content, prior, mix, summary = mixed_bundle
    bundle = load_bundle(summary.directory)
    assert bundle.mix == mix and summary.manifest["info"]["score_mix"] == mix.to_json()
    assert bundle.d_out == summary.d_out == model.cfg.d_out + D_LLM + 2
    np.testing.assert_allclose(bundle.priors, prior, atol=1e-6)
    ev = split()
    u, i = mixed_vectors(model, ev, user_embeddings(model, ev.histories, 12), model.all_item_embeddings(), mix, prior)
    np.testing.assert_allclose(bundle.item_embeddings, i.numpy(), atol=1e-5)
    served, _ = bundle.user_vectors([[IDS[j] for j in h] + ["not-in-catalog"] for h in HISTORIES], 12)
    np.testing.assert_allclose(served, u.numpy(), atol=1e-5)
    ids, _ = bundle.index.search(served, k=10)
    want = (u @ i.T).argsort(1, descending=True)[:, :10]
    assert ids.tolist() == [[IDS[j] for j in row] for row in want.tolist()]


def test_new_items_get_an_unseen_prior_and_changed_items_keep_theirs(mixed_bundle):
    model, content, prior, mix, summary = mixed_bundle
    bundle = load_bundle(summary.directory)
    assert prior[1] > 0
    ids = [IDS[0], IDS[1], "brand-new"]
    new_content = np.stack([content[0], content[1] + 0.5, content[2] * 0.9]).astype(np.float32)
    vectors, changed = item_vectors(bundle, ids, new_content)
    assert changed.tolist() == [False, True, True]
    got = mix.prior_of(vectors)
    assert got[0] == pytest.approx(prior[0], abs=1e-6) and got[1] == pytest.approx(prior[1], abs=1e-6)
    assert got[2] == 0.0
    np.testing.assert_allclose(vectors[2:], bundle.embed_items(new_content[2:]), atol=1e-6)


def test_tampered_mix_in_the_manifest_is_refused(mixed_bundle, tmp_path):
    directory = shutil.copytree(mixed_bundle[4].directory, tmp_path / "b")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["info"]["score_mix"] = {"content_weight": 0.0, "popularity_weight": 0.1}  # width disagrees
    (directory / "manifest.json").write_text(json.dumps(manifest))
    reseal(directory)
    with pytest.raises(ArtifactError, match="d_out"):
        load_bundle(directory)


def test_config_checks(tmp_path):
    cfg = load_config("conf/tiny.yaml", ["score.content_weights=[0,0.1]", "score.popularity_weights=[0.05]"])
    assert candidates(cfg.score.content_weights, cfg.score.popularity_weights) == [ScoreMix(0, 0.05), ScoreMix(0.1, 0.05)]
    for bad in (["score.content_weights=[]"], ["score.popularity_weights=[-0.1]"], ["score.content_weights=[0.1,0.1]"]):
        with pytest.raises(ConfigError, match="score."):
            load_config("conf/tiny.yaml", bad)
    # a baseline ignores the towers' settings and the mix of the file it runs with (the floors run on the freeze)
    floor = load_config("conf/scientific.yaml", ["train.recipe=content_last"])
    assert floor.train.recipe == "content_last"

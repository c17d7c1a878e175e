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
    prior = torch.as_tensor(prior)[None, :]
    cold = mix.content_weight if mix.cold_content_weight is None else mix.cold_content_weight
    weight = torch.where(prior == 0, cold, mix.content_weight)  # per item: unseen items get `cold`
    return (torch.as_tensor(tower_u) @ torch.as_tensor(tower_i).T + weight * cos(last_content, content)
            + mix.popularity_weight * prior)


@pytest.mark.parametrize("mix", [ScoreMix(0.3, 0.0), ScoreMix(0.0, 0.2), ScoreMix(0.15, 0.05),
                                 ScoreMix(0.1, 0.0, 0.6), ScoreMix(0.4, 0.05, 0.0), ScoreMix(0.0, 0.0, 0.5)])
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
    if mix.stores_prior:  # a popularity term or a varying content weight
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
    with pytest.raises(ValueError, match="cold_content_weight"):
        ScoreMix(0.1, 0.0, -1.0)
    # one weight for every item has one form: manifests written before the cold weight read the same
    assert ScoreMix(0.2, 0.1, 0.2) == ScoreMix(0.2, 0.1) and not ScoreMix(0.2, 0.1, 0.2).varies
    assert ScoreMix(0.2, 0.1).to_json() == {"content_weight": 0.2, "popularity_weight": 0.1}
    varying = ScoreMix(0.2, 0.0, 0.7)
    assert ScoreMix.from_json(varying.to_json(), "m") == varying and varying.to_json()["cold_content_weight"] == 0.7
    assert varying.extra_dims(5) == 5 + 1 + 2 and varying.parts == 3  # the pad column and the stored prior pair


def test_prior_candidates_and_last_items():
    prior = popularity_prior(np.array([0, 1, 10, 3]))
    assert prior[0] == 0 and prior[2] == 1 and 0 < prior[1] < prior[3] < 1
    assert popularity_prior(np.zeros(3)).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        popularity_prior(np.array([1, -1]))
    mixes = candidates([0.2, 0.0], [0.0, 0.1])
    assert mixes[0] == ScoreMix() and len(mixes) == 4  # the towers alone come first: they win ties
    cold = candidates([0.2, 0.0], [0.0], [0.2, 1.0])
    # each pair with one weight for every item (0.2 for cold items too is that same mix), then with 1.0 for cold items
    assert cold == [ScoreMix(), ScoreMix(0.2, 0.0), ScoreMix(0.0, 0.0, 0.2), ScoreMix(0.0, 0.0, 1.0),
                    ScoreMix(0.2, 0.0, 1.0)]
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


def test_a_cold_content_weight_wins_on_valid_when_targets_are_unseen_items():
    model, content = make_model(0)
    rng = np.random.default_rng(1)
    unseen = rng.choice(N_ITEMS, N_ITEMS // 4, replace=False)
    counts = rng.integers(1, 50, N_ITEMS)
    counts[unseen] = 0
    prior = popularity_prior(counts)
    # each user's target: the unseen item whose content is nearest the last item's
    cos = F.normalize(torch.as_tensor(content), dim=-1)
    nearest = cos[[9, 11, 5, 41]] @ cos[unseen].T
    ev = split(unseen[nearest.argmax(1).numpy()].tolist())
    eval_cfg = EvalConfig(ks=[10])
    options = candidates([0.0, 0.5], [0.0], [5.0])
    chosen, table = choose_score_mix(model, ev, eval_cfg, 12, options, prior)
    assert chosen == ScoreMix(0.0, 0.0, 5.0)
    assert table["score_mix_valid_ndcg_at_10_c0_p0_cold5"] > max(table["score_mix_valid_ndcg_at_10_c0_p0"],
                                                                 table["score_mix_valid_ndcg_at_10_c0.5_p0"])
    # the boost reaches the unseen items alone: the formula, item by item
    u, i = mixed_vectors(model, ev, user_embeddings(model, ev.histories, 12), model.all_item_embeddings(), chosen, prior)
    expected = formula(user_embeddings(model, ev.histories, 12), model.all_item_embeddings(), content[[9, 11, 5, 41]],
                       content, prior, chosen)
    assert torch.equal((u @ i.T).argsort(1, descending=True)[:, :10], expected.argsort(1, descending=True)[:, :10])


def test_cold_floor_selection_keeps_cold_targets_at_the_content_floor():
    """score.select=cold_floor: overall valid prefers the towers alone (three users whose targets
    the towers rank first), but the user with a cold target ranks worse than under the last-item
    floor there, so the boosted candidate, the best of those that reach the floor on cold, is chosen."""
    model, content = make_model(0)
    users = user_embeddings(model, split().histories, 12)
    scores = users @ model.all_item_embeddings().T
    cos = F.normalize(torch.as_tensor(content), dim=-1)
    cold_items = np.array([i for i in range(N_ITEMS) if i not in (3, 7, 9, 11, 0, 4, 18, 22, 5, 40, 41)])[:10]
    top = [int(scores[u].argmax()) for u in range(3)]
    cold_items = np.setdiff1d(cold_items, top)
    counts = np.full(N_ITEMS, 5)
    counts[cold_items] = 0
    prior = popularity_prior(counts)
    cold_target = int(cold_items[int((cos[41] @ cos[cold_items].T).argmax())])  # user 3's last item is 41
    ev = split(top + [cold_target])
    towers_rank = int((scores[3] > scores[3, cold_target]).sum())
    assert towers_rank > 1, "precondition: the towers alone rank the cold target below the floor's rank 1"
    eval_cfg = EvalConfig(ks=[10])
    options = candidates([0.0], [0.0], [5.0])
    chosen, _ = choose_score_mix(model, ev, eval_cfg, 12, options, prior)
    assert chosen == ScoreMix()  # overall: three users at rank 0 beat one
    chosen, table = choose_score_mix(model, ev, eval_cfg, 12, options, prior, cold_floor=True, train_popularity=counts)
    assert chosen == ScoreMix(0.0, 0.0, 5.0)
    floor = table["score_mix_valid_ndcg_at_10_pop_cold_floor"]
    assert table["score_mix_valid_ndcg_at_10_pop_cold_c0_p0_cold5"] >= floor > table["score_mix_valid_ndcg_at_10_pop_cold_c0_p0"]
    with pytest.raises(ValueError, match="popularity"):
        choose_score_mix(model, ev, eval_cfg, 12, options, prior, cold_floor=True)


@pytest.fixture(scope="module", params=[ScoreMix(0.25, 0.1), ScoreMix(0.1, 0.0, 0.8)], ids=["one-weight", "cold-weight"])
def mixed_bundle(tmp_path_factory, request):
    model, content = make_model(0)
    prior = popularity_prior(np.arange(N_ITEMS) % 5)  # every fifth item unseen (prior 0)
    mix = request.param
    summary = write_bundle(model, IDS, content, tmp_path_factory.mktemp("mix") / "b", info(), mix=mix, prior=prior)
    return model, content, prior, mix, summary


def test_bundle_serves_what_evaluation_scored(mixed_bundle):
    model, content, prior, mix, summary = mixed_bundle
    bundle = load_bundle(summary.directory)
    assert bundle.mix == mix and summary.manifest["info"]["score_mix"] == mix.to_json()
    assert bundle.d_out == summary.d_out == model.cfg.d_out + mix.extra_dims(D_LLM)
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
    assert cfg.score.cold_content_weights == []
    cfg = load_config("conf/tiny.yaml", ["score.content_weights=[0.1]", "score.cold_content_weights=[0.5]"])
    assert candidates(cfg.score.content_weights, cfg.score.popularity_weights,
                      cfg.score.cold_content_weights) == [ScoreMix(0.1, 0), ScoreMix(0.1, 0, 0.5)]
    for bad in (["score.content_weights=[]"], ["score.popularity_weights=[-0.1]"], ["score.content_weights=[0.1,0.1]"],
                ["score.cold_content_weights=[-1]"], ["score.cold_content_weights=[0.5,0.5]"]):
        with pytest.raises(ConfigError, match="score."):
            load_config("conf/tiny.yaml", bad)
    # a baseline ignores the towers' settings and the mix of the file it runs with (the floors run on the freeze)
    floor = load_config("conf/scientific.yaml", ["train.recipe=content_last"])
    assert floor.train.recipe == "content_last"


def test_history_penalty_form_candidates_and_manifest_json():
    penalised = ScoreMix(0.0, 0.0, None, 0.3)
    assert penalised.served and not penalised.enabled and penalised.extra_dims(5) == 0  # the vectors are the towers'
    assert penalised.to_json() == {"content_weight": 0.0, "popularity_weight": 0.0, "history_weight": 0.3}
    assert ScoreMix.from_json(penalised.to_json(), "m") == penalised
    # manifests written before the penalty read as no penalty
    assert ScoreMix.from_json({"content_weight": 0.2, "popularity_weight": 0.1}, "m").history_weight == 0.0
    with pytest.raises(ValueError, match="history_weight"):
        ScoreMix(0.0, 0.0, None, -0.5)
    with pytest.raises(ValueError, match="history_weight"):
        ScoreMix.from_json({"content_weight": 0.0, "popularity_weight": 0.0, "history_weight": "a lot"}, "m")
    mixes = candidates([0.0, 0.2], [0.0], None, [0.0, 2.0])
    # every mix with every penalty, the smaller penalty first (ties go to it)
    assert mixes == [ScoreMix(), ScoreMix(0, 0, None, 2.0), ScoreMix(0.2, 0), ScoreMix(0.2, 0, None, 2.0)]


def test_a_history_penalty_wins_on_valid_when_users_never_come_back():
    """Each valid target is the towers' best item outside the user's history: ranked below some of the
    user's own items by the towers alone, first once they are lowered."""
    model, _ = make_model(0)
    users = user_embeddings(model, split().histories, 12)
    scores = users @ model.all_item_embeddings().T
    own = torch.zeros_like(scores, dtype=torch.bool)
    for u, h in enumerate(HISTORIES):
        own[u, torch.as_tensor(h)] = True
    targets = scores.masked_fill(own, -9).argmax(1)
    above = [(scores[u, torch.as_tensor(h)] > scores[u, targets[u]]).sum().item() for u, h in enumerate(HISTORIES)]
    assert sum(above) > 0, "precondition: the towers alone put a history item above some target"
    ev = split(targets.tolist())
    prior = popularity_prior(np.ones(N_ITEMS))
    chosen, table = choose_score_mix(model, ev, EvalConfig(ks=[10]), 12, candidates([0.0], [0.0], None, [0.0, 2.0]),
                                     prior)
    assert chosen == ScoreMix(0.0, 0.0, None, 2.0)
    assert table["score_mix_valid_ndcg_at_10_c0_p0_h2"] == 1.0 > table["score_mix_valid_ndcg_at_10_c0_p0"]
    # the test metrics of the chosen score are what valid scored (history kept: every target at rank 0)
    got = evaluate_model(model, ev, EvalConfig(ks=[10]), 12, prefix="t_", mix=chosen, prior=prior,
                         towers_prefix="towers_")
    assert got["t_ndcg_at_10"] == 1.0 and got["towers_ndcg_at_10"] == table["score_mix_valid_ndcg_at_10_c0_p0"]


@pytest.mark.parametrize("mix", [ScoreMix(0.0, 0.0, None, 0.05), ScoreMix(0.1, 0.0, 0.8, 2.0)],
                         ids=["penalty-only", "mix-and-penalty"])
def test_retriever_serves_the_history_penalty_evaluation_scored(tmp_path, mix):
    from learn.serve.retriever import Retriever

    model, content = make_model(0)
    prior = popularity_prior(np.arange(N_ITEMS) % 5)
    summary = write_bundle(model, IDS, content, tmp_path / "b", info(), mix=mix, prior=prior)
    assert summary.manifest["info"]["score_mix"]["history_weight"] == mix.history_weight
    bundle = load_bundle(summary.directory)
    assert bundle.mix == mix
    histories = [[IDS[j] for j in h] for h in HISTORIES]
    retriever = Retriever.from_bundle(bundle, 12)
    got_ids, got_scores, _ = retriever.retrieve(histories, k=8)
    served, _ = bundle.user_vectors(histories, 12)
    brute = served @ bundle.item_embeddings.T
    for u, h in enumerate(HISTORIES):
        brute[u, np.unique(h)] -= np.float32(mix.history_weight)
    order = np.argsort(-brute, axis=1, kind="stable")[:, :8]
    unpenalised = np.argsort(-(served @ bundle.item_embeddings.T), axis=1, kind="stable")[:, :8]
    assert not np.array_equal(order, unpenalised), "precondition: the penalty moves some history item"
    assert got_ids == [[IDS[j] for j in row] for row in order.tolist()]
    np.testing.assert_allclose(got_scores, np.take_along_axis(brute, order, 1), atol=1e-5)
    # exclude_history still leaves the history out altogether
    excluded, _, _ = retriever.retrieve(histories, k=8, exclude_history=True)
    assert all(not set(row) & set(h) for row, h in zip(excluded, histories))


def test_history_weights_config_checks():
    cfg = load_config("conf/tiny.yaml", ["score.history_weights=[0,0.5]"])
    assert cfg.score.history_weights == [0, 0.5]
    assert load_config("conf/tiny.yaml").score.history_weights == [0.0]  # off by default
    for bad in (["score.history_weights=[-1]"], ["score.history_weights=[0.5,0.5]"], ["score.history_weights=[]"]):
        with pytest.raises(ConfigError, match="score.history_weights"):
            load_config("conf/tiny.yaml", bad)

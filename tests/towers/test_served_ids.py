"""Served item ID vectors (``model.item_id_embedding`` exported): the bundle carries each item's learned
ID vector, the exported towers take it, and new or re-embedded items are served with a zero one. Each test
runs on towers whose every member has ID vectors and on towers with content-only members beside one with
them (``model.id_members``)."""

import numpy as np
import pytest
import torch

from learn.data.sequences import EvalSplit
from learn.export import ArtifactError
from learn.export.bundle import load_bundle, rebuild_bundle, write_bundle
from learn.export.reembed import catalog_id_vectors, item_vectors
from learn.towers.mix import ScoreMix, popularity_prior
from learn.towers.model import TowerConfig, TwinTowers
from learn.train.loop import mixed_vectors, user_embeddings
from tests.export.test_bundle import D_LLM, IDS, N_ITEMS, info, reseal

HISTORIES = [np.array([3, 7, 9]), np.array([11]), np.array([0, 4, 18, 22, 5]), np.array([40, 41])]
SEEN = np.arange(N_ITEMS) % 4 != 0  # every fourth item never seen in training: no ID vector


def make_model(members: int = 2, id_members: int = 0) -> tuple[TwinTowers, np.ndarray]:
    torch.manual_seed(0)
    content = torch.randn(N_ITEMS, D_LLM) + 3.0
    cfg = TowerConfig(d_llm=D_LLM, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.1, d_out=4 * members,
                      max_len=12, members=members, num_id_items=N_ITEMS, id_members=id_members)
    model = TwinTowers(cfg, content, id_known=torch.as_tensor(SEEN))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # ID tables start at zero: make them matter
        for stack in model.stacks:
            if stack.id_embedding is not None:
                stack.id_embedding.weight[0] = 0  # the padding row, as training keeps it
    return model.eval(), content.numpy()


@pytest.fixture(scope="module", params=[(2, 0), (3, 1)], ids=["every-member", "one-of-three"])
def id_bundle(request, tmp_path_factory):
    model, content = make_model(*request.param)
    mix = ScoreMix(0.2, 0.05)
    prior = popularity_prior(SEEN.astype(int) * (1 + np.arange(N_ITEMS) % 3))
    summary = write_bundle(model, IDS, content, tmp_path_factory.mktemp("ids") / "b", info(), mix=mix, prior=prior)
    return model, content, mix, prior, summary


def test_the_bundle_serves_what_the_towers_with_ids_score(id_bundle):
    model, content, mix, prior, summary = id_bundle
    bundle = load_bundle(summary.directory)
    assert "item_id_vectors.parquet" in summary.files
    ids = model.id_vectors(torch.arange(N_ITEMS)).numpy()
    np.testing.assert_array_equal(bundle.id_vectors, ids)
    assert ids.shape[1] == model.id_width == 16 * len([s for s in model.stacks if s.id_embedding is not None])
    assert (np.abs(ids[~SEEN]).sum(1) == 0).all() and (np.abs(ids[SEEN]).sum(1) > 0).all()
    ev = EvalSplit(np.arange(4), HISTORIES, np.zeros(4, int))
    users = user_embeddings(model, ev.histories, 12)  # the training code path: token lookups
    u, i = mixed_vectors(model, ev, users, model.all_item_embeddings(), mix, prior)
    np.testing.assert_allclose(bundle.item_embeddings, i.numpy(), atol=1e-5)
    served, _ = bundle.user_vectors([[IDS[j] for j in h] for h in HISTORIES], 12)
    np.testing.assert_allclose(served, u.numpy(), atol=1e-5)
    # the ID vectors matter: without them the same content gives other vectors
    assert np.abs(bundle.embed_items(content[SEEN][:3]) - bundle.item_embeddings[SEEN][:3]).max() > 1e-3


def test_new_and_reembedded_items_get_a_zero_id_vector(id_bundle, tmp_path):
    model, content, mix, prior, summary = id_bundle
    source = load_bundle(summary.directory)
    seen = [i for i in range(N_ITEMS) if SEEN[i]][:2]
    ids = [IDS[seen[0]], IDS[seen[1]], "brand-new"]
    new_content = np.stack([content[seen[0]], content[seen[1]] + 0.5, content[5] * 0.9]).astype(np.float32)
    vectors, changed = item_vectors(source, ids, new_content)
    id_rows = catalog_id_vectors(source, ids, changed)
    np.testing.assert_array_equal(id_rows[0], source.id_vectors[seen[0]])
    assert (id_rows[1:] == 0).all()
    np.testing.assert_array_equal(vectors[0], source.item_embeddings[seen[0]])
    with pytest.raises(ValueError, match="id_vectors"):
        rebuild_bundle(source, ids, new_content, vectors, tmp_path / "r", info())
    rebuilt = load_bundle(rebuild_bundle(source, ids, new_content, vectors, tmp_path / "r", info(),
                                         id_vectors=id_rows).directory)
    np.testing.assert_array_equal(rebuilt.id_vectors, id_rows)
    # the re-embedded and the new item are served from content alone (and, here, an unseen prior)
    want = source.embed_items(new_content[1:], np.array([source.priors[seen[1]], 0.0], np.float32))
    np.testing.assert_allclose(rebuilt.item_embeddings[1:], want, atol=1e-6)


def test_a_bundle_without_its_id_vectors_is_refused(id_bundle, tmp_path):
    import json
    import shutil

    directory = shutil.copytree(id_bundle[4].directory, tmp_path / "b")
    (directory / "item_id_vectors.parquet").unlink()
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"].pop("item_id_vectors.parquet")
    (directory / "manifest.json").write_text(json.dumps(manifest))
    reseal(directory)
    with pytest.raises(ArtifactError, match="item_id_vectors"):
        load_bundle(directory)

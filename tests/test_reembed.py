"""flows/reembed.py: new, changed and removed items reach the served retriever without retraining;
idempotent; an interrupted run resumes to the same state; mismatched encoders are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from learn.config import load_config
from learn.data.demo import write_demo_snapshot
from tests.flows import run_pipeline
from learn.export.reembed import ReembedError
from tests.flows import reembed

ROOT = Path(__file__).resolve().parents[1]
NAME = "learn-retriever"
pytestmark = pytest.mark.slow  # trains a tiny model once per module, then several re-embeds


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_cache):
    """A model trained on a catalog snapshot taken before the cold-start items existed.

    Returns (make_cfg, catalog dir, full snapshot dir, trained version)."""
    tmp = tmp_path_factory.mktemp("reembed")
    base = load_config(ROOT / "conf/tiny.yaml", [])
    write_demo_snapshot(base.data.demo, tmp / "before", without_cold=True)
    write_demo_snapshot(base.data.demo, tmp / "full")

    def make_cfg(*overrides):
        return load_config(ROOT / "conf/tiny.yaml", [
            f"output_dir={tmp / 'runs'}", f"embed.cache_dir={model_cache}", f"embed.store={tmp / 'content.parquet'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", f"tracking.artifact_location={tmp / 'artifacts'}",
            f"data.path={tmp / 'catalog'}", "reembed.alias=challenger", "tracking.system_metrics=false",
            "export.plots=false", *overrides])

    shutil.copytree(tmp / "before", tmp / "catalog")
    run_pipeline(make_cfg(), progress=False)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    return make_cfg, tmp, client, served(client)


def served(client) -> str:
    return str(client.get_model_version_by_alias(NAME, "challenger").version)


def set_catalog(tmp: Path, source: Path) -> None:
    shutil.rmtree(tmp / "catalog")
    shutil.copytree(source, tmp / "catalog")


def versions(client) -> int:
    return len(client.search_model_versions(f"name = '{NAME}'"))


def test_new_items_become_servable_and_a_second_run_changes_nothing(world):
    make_cfg, tmp, client, trained = world
    # same catalog as training: nothing to publish
    same = reembed(make_cfg(), progress=False)
    assert not same.published and same.served_version == trained
    assert same.metrics["items_embedded"] == 0 and same.metrics["items_new"] == 0

    # the cold-start items appear: only they are embedded, and users whose target is one of them now get it
    set_catalog(tmp, tmp / "full")
    n_versions = versions(client)
    res = reembed(make_cfg(), progress=False)
    cold = pd.read_parquet(tmp / "full/items.parquet").shape[0] - pd.read_parquet(tmp / "before/items.parquet").shape[0]
    assert cold == 6
    assert res.published and res.source_version == trained and int(res.served_version) > int(trained)
    m = res.metrics
    assert (m["items_new"], m["items_embedded"], m["items_changed"], m["items_removed"]) == (cold, cold, 0, 0)
    assert m["items_unchanged"] == m["items_total"] - cold and m["index_items"] == m["items_total"]
    assert m["new_item_test_users"] > 0
    assert m["new_item_recall_at_10_before"] == 0.0  # the served index did not hold them
    assert m["new_item_recall_at_10_after"] > 0.0
    assert versions(client) == n_versions + 1
    assert served(client) == res.served_version
    run = client.get_run(res.run_id)
    assert run.data.tags["source_model_version"] == trained and run.data.metrics["items_embedded"] == cold

    # the alias now serves the new catalog: the retriever loaded from the registry knows the new items
    from learn.serve.retriever import load_retriever

    new_ids = sorted(set(pd.read_parquet(tmp / "full/items.parquet").item_id)
                     - set(pd.read_parquet(tmp / "before/items.parquet").item_id))
    model = load_retriever(f"models:/{NAME}@challenger")
    out = model.predict(pd.DataFrame({"history": [[new_ids[0]]]}), params={"k": 5})
    assert out["unknown_item_ids"][0] == [] and len(out["item_ids"][0]) == 5

    again = reembed(make_cfg(), progress=False)
    assert not again.published and again.metrics["items_embedded"] == 0 and again.metrics["items_removed"] == 0
    assert again.served_version == res.served_version and versions(client) == n_versions + 1


def test_changed_and_removed_items(world, tmp_path):
    make_cfg, tmp, client, _ = world
    items = pd.read_parquet(tmp / "full/items.parquet")
    changed_id, removed_id = items.item_id.iloc[0], items.item_id.iloc[1]
    items.loc[0, "title"] = items.loc[0, "title"] + " (new edition)"
    items = items[items.item_id != removed_id]
    snap = tmp_path / "snap"
    snap.mkdir()
    items.to_parquet(snap / "items.parquet", index=False)
    shutil.copy(tmp / "full/interactions.parquet", snap / "interactions.parquet")
    set_catalog(tmp, snap)
    res = reembed(make_cfg(), progress=False)
    m = res.metrics
    assert res.published
    assert (m["items_embedded"], m["items_changed"], m["items_removed"], m["items_new"]) == (1, 1, 1, 0)
    assert m["item_tower_rows"] == 1
    from learn.export.bundle import load_bundle

    bundle = load_bundle(res.bundle_dir)
    assert removed_id not in bundle.id_to_row and changed_id in bundle.id_to_row
    set_catalog(tmp, tmp / "full")  # leave the catalog as the other tests expect it


def test_interrupted_before_the_alias_moves_resumes_to_the_same_state(world, tmp_path, monkeypatch):
    make_cfg, tmp, client, _ = world
    items = pd.read_parquet(tmp / "full/items.parquet")
    items.loc[2, "title"] = items.loc[2, "title"] + " v2"
    snap = tmp_path / "snap"
    snap.mkdir()
    items.to_parquet(snap / "items.parquet", index=False)
    shutil.copy(tmp / "full/interactions.parquet", snap / "interactions.parquet")
    set_catalog(tmp, snap)
    before = served(client)
    n_versions = versions(client)

    real = mlflow.MlflowClient.set_registered_model_alias

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt("killed before the alias moved")

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", killed)
    with pytest.raises(KeyboardInterrupt):
        reembed(make_cfg(), progress=False)
    # the new version exists, but nothing serves it: clients still get the old index
    assert served(client) == before
    assert versions(client) == n_versions + 1

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", real)
    res = reembed(make_cfg(), progress=False)
    assert res.published and versions(client) == n_versions + 1  # the interrupted run's version, not a new one
    assert served(client) == res.served_version != before
    assert res.metrics["items_embedded"] == 0  # the interrupted run had stored the vector already
    set_catalog(tmp, tmp / "full")


def test_refuses_another_encoder_and_a_missing_alias(world):
    make_cfg, _, _, _ = world
    with pytest.raises(ReembedError, match="encoder mismatch.*max_tokens=64.*max_tokens=32"):
        reembed(make_cfg("embed.max_tokens=32"), progress=False)
    with pytest.raises(ReembedError, match="no alias 'nope'"):
        reembed(make_cfg("reembed.alias=nope"), progress=False)


def test_refuses_a_served_bundle_that_fails_verification(world):
    make_cfg, tmp, client, _ = world
    reembed(make_cfg(), progress=False)  # brings the alias to this catalog
    reembed(make_cfg(), progress=False)  # nothing to publish; the served bundle is in the download cache
    version = served(client)
    cached = tmp / "runs/reembed/served" / f"{NAME}-v{version}" / "artifacts/bundle/index/provenance.json"
    assert cached.is_file()
    original = cached.read_text()
    try:
        cached.write_text(original.replace('"tower_id": "', '"tower_id": "0'))
        with pytest.raises(ReembedError, match="bad bundle"):
            reembed(make_cfg(), progress=False)
    finally:
        cached.write_text(original)

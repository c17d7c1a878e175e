"""Export at scale: the streamed item tower equals the one-shot reference, the IVF index trained on a
sample reports its recall against exact search, and the retriever logged from the writer's digests
(no reload, no re-hash in the exporting process) still refuses a tampered bundle when it is loaded."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import learn.export.bundle as bundle_mod
from learn import registry
from learn.config import ExportConfig
from learn.export import ArtifactError, write_manifest
from learn.export.bundle import BundleInfo, _recall_queries, _run_item_tower, load_bundle, write_bundle
from learn.export.towers import load_item_tower
from learn.index import build_index, recall_vs_exact
from learn.index.faiss_index import ItemIndexError, VectorStream, exact_top_k, recall_of_rows
from learn.serve import load_retriever, log_retriever
from learn.towers.model import TowerConfig, TwinTowers
from tests.serve.test_retriever import tracking  # noqa: F401  (the throwaway sqlite tracking fixture)

D_LLM = 16
MAX_HISTORY = 6


def info() -> BundleInfo:
    return BundleInfo(encoder_id="enc", dataset="scale", dataset_fingerprint="fp", run_id="run", max_history=MAX_HISTORY,
                      config={"seed": 0})


def make_model(n: int, d_out: int = 8) -> tuple[TwinTowers, np.ndarray]:
    torch.manual_seed(0)
    content = torch.randn(n, D_LLM) + 3.0
    cfg = TowerConfig(d_llm=D_LLM, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.1, d_out=d_out, max_len=12)
    model = TwinTowers(cfg, content)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), content.numpy()


def ids(n: int) -> list[str]:
    return [f"sku-{i:06d}" for i in range(n)]


def read_vectors(path: Path) -> np.ndarray:
    return np.stack(pq.read_table(path).column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)


def test_streamed_item_tower_equals_the_one_shot_reference(tmp_path, monkeypatch):
    # three row groups of two tower batches each (the last one short); read back in batches that
    # straddle the groups
    monkeypatch.setattr(bundle_mod, "GROUP_ROWS", 2 * bundle_mod.BATCH)
    monkeypatch.setattr(bundle_mod, "READ_BATCH", 5000)
    n = 5 * bundle_mod.BATCH + 123
    model, content = make_model(n)
    summary = write_bundle(model, ids(n), content, tmp_path / "bundle", info())

    reference = _run_item_tower(load_item_tower(tmp_path / "bundle" / "item_tower.pt2"), content)
    streamed = read_vectors(tmp_path / "bundle" / "item_embeddings.parquet")
    np.testing.assert_array_equal(streamed, reference)  # bit for bit
    np.testing.assert_array_equal(read_vectors(tmp_path / "bundle" / "content.parquet"), content)
    for name in ("content.parquet", "item_embeddings.parquet"):
        assert pq.ParquetFile(tmp_path / "bundle" / name).num_row_groups == 3
    bundle = load_bundle(summary.directory)  # every digest written while streaming checks out on reload
    np.testing.assert_array_equal(bundle.item_embeddings, reference)
    assert bundle.item_ids == ids(n) and summary.n_items == n
    assert summary.index_kind == "flat" and summary.index_recall_at_10 == 1.0
    assert summary.hash_seconds > 0


def test_streamed_tables_refuse_bad_item_vectors_naming_the_row(tmp_path):
    model, content = make_model(50)
    content[37, 3] = np.nan
    with pytest.raises(ValueError, match="first bad row 37"):
        write_bundle(model, ids(50), content, tmp_path / "bundle", info())
    assert not any(tmp_path.iterdir())  # the temp directory went with the failure


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ivf_trained_on_a_sample_finds_the_exact_top_1(monkeypatch):
    monkeypatch.setattr("learn.index.faiss_index.TRAIN_MIN_ROWS", 1000)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 32))
    vecs = _unit(centers[rng.integers(0, 40, 20_000)] + 0.35 * rng.normal(size=(20_000, 32)))
    queries = _unit(vecs[rng.integers(0, len(vecs), 300)] + 0.2 * rng.normal(size=(300, 32)))
    index = build_index(VectorStream.of_array(vecs, batch=3000), ids(len(vecs)), kind="ivf", nlist=50, nprobe=8)
    assert index.params["train_rows"] == 64 * 50 < len(vecs)  # a sample, not the catalog
    got, _ = index.search_rows(queries, 10)
    truth = exact_top_k(VectorStream.of_array(vecs, batch=777).batches(), queries, 10)
    recall, top1 = recall_of_rows(got, truth)
    assert recall == pytest.approx(recall_vs_exact(index, vecs, queries, k=10), abs=1e-9)  # the reference
    assert top1 >= 0.9 and recall >= 0.8
    np.testing.assert_array_equal(truth[:, 0], np.argmax(queries @ vecs.T, axis=1))
    # the same seed, the same sample, the same index
    again = build_index(vecs, ids(len(vecs)), kind="ivf", nlist=50, nprobe=8)
    np.testing.assert_array_equal(again.search_rows(queries, 10)[0], got)


def test_exact_top_k_merges_batches_like_brute_force():
    rng = np.random.default_rng(1)
    vecs = _unit(rng.normal(size=(103, 8)))
    queries = _unit(rng.normal(size=(7, 8)))
    brute = np.argsort(-(queries @ vecs.T), axis=1, kind="stable")[:, :10]
    got = exact_top_k((vecs[s:s + 4] for s in range(0, len(vecs), 4)), queries, 10)  # batches smaller than k
    np.testing.assert_array_equal(got, brute)
    short = exact_top_k([vecs[:3]], queries, 5)  # fewer vectors than k: empty slots are -1
    assert (short[:, 3:] == -1).all() and set(short[0, :3]) == {0, 1, 2}
    bad = vecs.copy()
    bad[60, 2] = np.inf
    with pytest.raises(ItemIndexError, match="row 60"):
        exact_top_k((bad[s:s + 50] for s in range(0, 103, 50)), queries, 5)


def test_bundle_index_on_a_sample_records_recall_against_exact(tmp_path, monkeypatch):
    monkeypatch.setattr("learn.index.faiss_index.TRAIN_MIN_ROWS", 500)
    monkeypatch.setattr(bundle_mod, "READ_BATCH", 1500)
    n = 6000
    model, content = make_model(n)
    summary = write_bundle(model, ids(n), content, tmp_path / "bundle", info(), index_kind="ivf",
                           index_params={"nlist": 20, "nprobe": 6}, recall_queries=400, seed=3)
    bundle = load_bundle(summary.directory)
    assert bundle.index.params["train_rows"] == 64 * 20 < n
    assert bundle.manifest["info"]["index_recall_at_10_vs_flat"] == summary.index_recall_at_10
    # the in-memory reference: the same seeded queries, faiss' exact search over the whole matrix
    queries = _recall_queries(bundle.item_embeddings, 400, 3)
    assert summary.index_recall_at_10 == pytest.approx(
        recall_vs_exact(bundle.index, bundle.item_embeddings, queries, k=10), abs=1e-9)
    got, _ = bundle.index.search_rows(queries, 1)
    exact_top1 = np.argmax(queries @ bundle.item_embeddings.T, axis=1)
    assert summary.index_top1_vs_flat == pytest.approx(float(np.mean(got[:, 0] == exact_top1)), abs=1e-9)
    assert summary.index_top1_vs_flat >= 0.9 and summary.recall_queries == 400




def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"the export process called {what}")
    return refuse


def test_retriever_logged_from_digests_refuses_a_tampered_bundle(tracking, tmp_path, monkeypatch):
    uri, experiment = tracking
    model, content = make_model(60)
    stages: list[str] = []

    def stage(name):
        stages.append(name)
        return torch.no_grad()  # any context manager

    with monkeypatch.context() as m:  # logging neither loads nor re-hashes the bundle
        m.setattr("learn.serve.retriever.load_bundle", _refuse("load_bundle"))
        m.setattr("learn.export.bundle.load_bundle", _refuse("load_bundle"))
        m.setattr("learn.export.bundle.verify_manifest", _refuse("verify_manifest"))
        with mlflow.start_run(experiment_id=experiment) as run:
            exported = registry.export_trained(model, ids(60), content, tmp_path / "bundle", info(), ExportConfig(),
                                               seed=0, max_history=MAX_HISTORY, tracking_uri=uri,
                                               registered_model="scale-retriever", stages=stage)
    assert stages == ["towers", "item_tower", "index", "recall", "manifest", "mlflow"]
    assert (exported.version, exported.aliases) == ("1", ["challenger", "champion"])
    client = mlflow.MlflowClient(uri)
    tags = client.get_run(run.info.run_id).data.tags
    assert (tags["retriever_model_uri"], tags["bundle_uri"]) == (exported.model_uri, exported.bundle_uri)
    assert "bundle" not in {f.path for f in client.list_artifacts(run.info.run_id)}  # logged once: in the model
    for uri in (f"{exported.bundle_uri}/manifest.json", "models:/scale-retriever/1/artifacts/bundle/manifest.json"):
        assert mlflow.artifacts.load_dict(uri) == json.loads(json.dumps(exported.bundle.manifest))

    model_dir = Path(mlflow.artifacts.download_artifacts(exported.model_uri, dst_path=str(tmp_path / "model")))
    bundle_dir = model_dir / "artifacts" / "bundle"
    assert load_retriever(str(model_dir)).unwrap_python_model().bundle.item_ids == ids(60)

    path = bundle_dir / "item_embeddings.parquet"
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="item_embeddings.parquet: sha256 mismatch"):
        load_retriever(str(model_dir))
    # the altered file with a manifest rewritten to match: not the bundle the model was logged with
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    write_manifest(bundle_dir, list(manifest["files"]), manifest["info"])
    with pytest.raises(ArtifactError, match="manifest.json: sha256 mismatch"):
        load_retriever(str(model_dir))


def test_log_retriever_checks_the_handed_over_manifest(tracking, tmp_path):
    _, experiment = tracking
    model, content = make_model(40)
    summary = write_bundle(model, ids(40), content, tmp_path / "bundle", info())
    stale = json.loads(json.dumps(summary.manifest))
    stale["info"]["n_items"] = 41
    truncated = tmp_path / "bundle" / "content.parquet"
    with mlflow.start_run(experiment_id=experiment):
        with pytest.raises(ArtifactError, match="not the manifest handed over"):
            log_retriever(summary.directory, max_history=MAX_HISTORY, manifest=stale)
        truncated.write_bytes(truncated.read_bytes()[:-10])
        with pytest.raises(ArtifactError, match="content.parquet: .* bytes, manifest.json records"):
            log_retriever(summary.directory, max_history=MAX_HISTORY, manifest=summary.manifest)
        with pytest.raises(ArtifactError, match="content.parquet: sha256 mismatch"):  # no manifest: re-hashed
            log_retriever(summary.directory, max_history=MAX_HISTORY)

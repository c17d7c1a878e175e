"""The pipeline against a real `mlflow server` over HTTP: artifacts, registry, retriever, A/B."""

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from learn.evaluate.ab import ComparisonError
from learn.export.manifest import ArtifactError, verify_manifest
from tests.flows import compare_models, run_pipeline
from tests.servers import start_mlflow_server, stop_process_group


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with a sqlite backend and served local artifacts; stopped after."""
    previous_uri = mlflow.get_tracking_uri()
    url, proc = start_mlflow_server(tmp_path)
    yield url
    stop_process_group(proc, timeout_s=30)  # its own session: the server and its workers, nothing else
    mlflow.set_tracking_uri(previous_uri)


@pytest.mark.slow
def test_pipeline_over_http_logs_bundle_registers_retriever_and_compares(mlflow_server, tiny_cfg, tmp_path):
    over_http = ["tracking.artifact_location=null", f"tracking.tracking_uri={mlflow_server}"]
    # A is all but untrained (one epoch at a vanishing learning rate), B is trained: B clearly wins
    first = run_pipeline(tiny_cfg(*over_http, "train.epochs=1", "train.lr=1e-7"), progress=False)
    second = run_pipeline(tiny_cfg(*over_http, "train.epochs=4", "model.d_model=64", "model.d_out=64",
                                   "model.d_ff=128", "train.all_positions=true"), progress=False)

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(second.run_id)
    assert run.data.metrics["test_ndcg_at_10"] == pytest.approx(second.metrics["test_ndcg_at_10"])
    assert run.data.metrics["index_recall_at_10_vs_flat"] == 1.0
    assert run.data.params["export.index_kind"] == "auto"
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == "demo"
    # the bundle and the plots came back through the server, checksums intact
    # (logged once, inside the run's retriever model: the run's tag bundle_uri names it)
    bundle = Path(mlflow.artifacts.download_artifacts(run.data.tags["bundle_uri"], dst_path=str(tmp_path / "dl"),
                                                      tracking_uri=mlflow_server))
    manifest = verify_manifest(bundle)
    assert manifest["info"]["run_id"] == second.run_id
    assert {"user_tower.pt2", "item_tower.pt2", "item_embeddings.parquet", "index/index.faiss"} <= set(
        manifest["files"])
    plots = {f.path for f in client.list_artifacts(second.run_id, "plots")}
    assert {"plots/training_curves.png", "plots/segments_ndcg_at_10.png"} <= plots
    # a corrupted download is refused
    (bundle / "item_embeddings.parquet").write_bytes(b"not parquet")
    with pytest.raises(ArtifactError, match="item_embeddings.parquet"):
        verify_manifest(bundle)

    # each run registered a version; the newest holds the alias challenger
    version = client.get_model_version_by_alias("learn-retriever", "challenger")
    assert version.run_id == second.run_id
    mlflow.set_tracking_uri(mlflow_server)
    retriever = mlflow.pyfunc.load_model("models:/learn-retriever@challenger")
    catalog = pd.read_parquet(bundle / "content.parquet")["item_id"].tolist()
    out = retriever.predict(pd.DataFrame({"history": [catalog[:3], [catalog[5], "no-such-item"]]}),
                            params={"k": 5})
    assert [len(ids) for ids in out["item_ids"]] == [5, 5]
    assert list(out["unknown_item_ids"][1]) == ["no-such-item"]

    # A/B on the same users: trained B beats untrained A by a margin the CI resolves -> promoted
    result = compare_models(first.run_id, "models:/learn-retriever@challenger", tracking_uri=mlflow_server,
                            n_resamples=500, promote=True)
    assert result["a_ndcg_at_10"] == pytest.approx(first.metrics["test_ndcg_at_10"], abs=1e-6)
    assert result["b_ndcg_at_10"] == pytest.approx(second.metrics["test_ndcg_at_10"], abs=1e-6)
    assert 0 < result["delta_ndcg_at_10_ci_low"] <= result["delta_ndcg_at_10"] <= result["delta_ndcg_at_10_ci_high"]
    assert result["promoted"] == 1.0
    assert client.get_model_version_by_alias("learn-retriever", "champion").version == version.version
    # the other way round B (the untrained first version) is worse: not promoted, champion stays
    first_version = client.get_run(first.run_id).data.tags["registered_model_version"]
    assert first_version != version.version
    reverse = compare_models(second.run_id, f"models:/learn-retriever/{first_version}", tracking_uri=mlflow_server,
                             n_resamples=500, promote=True, log=False)
    assert reverse["delta_ndcg_at_10"] < 0 and reverse["promoted"] == 0.0
    assert client.get_model_version_by_alias("learn-retriever", "champion").version == version.version
    logged = client.get_run(result["comparison_run_id"]).data.metrics
    assert logged["delta_recall_at_10"] == pytest.approx(result["delta_recall_at_10"])
    with pytest.raises(ComparisonError, match="does not exist"):
        compare_models("0" * 32, second.run_id, tracking_uri=mlflow_server, log=False)
    with pytest.raises(ComparisonError, match="does not resolve"):
        compare_models(first.run_id, "models:/learn-retriever@nobody", tracking_uri=mlflow_server, log=False)
    json.dumps(result)  # plain numbers only: what the flow prints and logs

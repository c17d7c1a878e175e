import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils

from learn.export.bundle import BundleInfo, load_bundle, write_bundle
from learn.serve import Retriever, load_retriever, log_retriever
from learn.towers.model import TowerConfig, TwinTowers, pad_histories

N_ITEMS = 50
MAX_HISTORY = 6
IDS = [f"sku-{i:02d}" for i in range(N_ITEMS)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model, bundle directory, in-process retriever) for a small random model."""
    torch.manual_seed(0)
    content = torch.randn(N_ITEMS, 16) + 3.0
    cfg = TowerConfig(d_llm=16, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.1, d_out=8, max_len=12)
    model = TwinTowers(cfg, content)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    directory = tmp_path_factory.mktemp("serve") / "bundle"
    write_bundle(model, IDS, content.numpy(), directory,
                 BundleInfo(encoder_id="test", dataset="test", dataset_fingerprint="test", run_id="test",
                            max_history=MAX_HISTORY, config=None))
    return model, directory, Retriever.from_bundle(directory, max_history=MAX_HISTORY)


def random_rows(seed: int, n: int = 8) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, N_ITEMS, int(rng.integers(1, 10)))) for _ in range(n)]


def brute_force(model: TwinTowers, rows: list[list[int]], k: int, exclude: bool) -> tuple[list, list]:
    """Top-k ids and scores from the model's own user and item vectors, by a full matrix product."""
    users = model.user_embedding(pad_histories(rows, MAX_HISTORY)).detach().numpy()
    scores = users @ model.all_item_embeddings().numpy().T
    if exclude:
        for b, r in enumerate(rows):
            scores[b, r] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ids = [[IDS[i] for i in t if np.isfinite(s[i])] for t, s in zip(top, scores)]
    return ids, [[float(s[i]) for i in t if np.isfinite(s[i])] for t, s in zip(top, scores)]


def frame(rows: list[list[int]]) -> pd.DataFrame:
    return pd.DataFrame({"history": [[IDS[i] for i in r] for r in rows]})


@pytest.mark.parametrize(("k", "exclude"), [(5, False), (5, True), (N_ITEMS + 10, False), (N_ITEMS - 3, True)])
def test_predict_matches_brute_force(served, k, exclude):
    model, _, retriever = served
    rows = random_rows(k + exclude)
    out = retriever.predict(None, frame(rows), params={"k": k, "exclude_history": exclude})
    assert list(out.columns) == ["item_ids", "scores", "unknown_item_ids"]
    ids, scores = brute_force(model, rows, k, exclude)
    assert out["item_ids"].tolist() == ids
    for got, want in zip(out["scores"], scores):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert out["unknown_item_ids"].tolist() == [[] for _ in rows]
    for r, got in zip(rows, out["item_ids"]):
        assert len(got) == min(k, N_ITEMS - (len(set(r)) if exclude else 0))
        if exclude:
            assert not {IDS[i] for i in r} & set(got)


def test_default_params_and_history_items_kept_without_exclusion(served):
    _, _, retriever = served
    out = retriever.predict(None, pd.DataFrame({"history": [[IDS[3]] * 4]}))
    assert len(out["item_ids"][0]) == 10
    assert IDS[3] in out["item_ids"][0]  # a one-item history's own item ranks high when not excluded
    excluded = retriever.predict(None, pd.DataFrame({"history": [[IDS[3]] * 4]}), params={"exclude_history": True})
    assert IDS[3] not in excluded["item_ids"][0]


def test_unknown_ids_are_reported_not_fatal(served, caplog):
    _, _, retriever = served
    histories = [[IDS[1], "ghost-1", IDS[2]], ["ghost-2", "ghost-2"], [], [IDS[1], IDS[2]]]
    with caplog.at_level(logging.WARNING, logger="learn.serve.retriever"):
        out = retriever.predict(None, pd.DataFrame({"history": histories}), params={"k": 4})
    assert out["unknown_item_ids"].tolist() == [["ghost-1"], ["ghost-2", "ghost-2"], [], []]
    assert out["item_ids"][0] == out["item_ids"][3] and len(out["item_ids"][0]) == 4  # unknown id skipped
    assert out["item_ids"][1] == [] and out["scores"][1] == []  # nothing known: no results
    assert out["item_ids"][2] == [] and out["scores"][2] == []
    assert "3 history item id(s) (2 distinct)" in caplog.text and "2 histories have no known item" in caplog.text


def test_bad_input(served):
    _, _, retriever = served
    with pytest.raises(ValueError, match="'history' column"):
        retriever.predict(None, pd.DataFrame({"items": [[IDS[0]]]}))
    with pytest.raises(ValueError, match="row 0 must be a list"):
        retriever.predict(None, pd.DataFrame({"history": [IDS[0]]}))
    with pytest.raises(ValueError, match="'k'"):
        retriever.predict(None, frame([[1]]), params={"k": 0})
    with pytest.raises(ValueError, match="unknown params"):
        retriever.predict(None, frame([[1]]), params={"top_k": 3})
    with pytest.raises(RuntimeError, match="no bundle"):
        Retriever().predict(None, frame([[1]]))
    with pytest.raises(ValueError, match="max_history"):
        Retriever.from_bundle(load_bundle(served[1]), max_history=0)


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A throwaway sqlite tracking + registry store; the previous URIs are restored afterwards."""
    old_tracking, old_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # mlflow.set_*_uri also export MLFLOW_*_URI (and set_registry_uri(None) clears neither):
    # setting the variables through monkeypatch makes the teardown remove them again
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("retriever-test", artifact_location=(tmp_path / "artifacts").as_uri())
    try:
        yield uri, experiment
    finally:
        if mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(old_tracking)
        registry_utils._registry_uri = old_registry


LOAD_AND_PREDICT = textwrap.dedent("""
    import json, sys
    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model(sys.argv[1])
    import learn
    out = model.predict(pd.DataFrame({"history": json.loads(sys.argv[2])}), params={"k": 7, "exclude_history": True})
    print(json.dumps({"learn": learn.__file__, "rows": out.to_dict(orient="list")}))
""")


def test_log_and_load_with_mlflow(served, tracking, tmp_path):
    uri, experiment = tracking
    _, directory, retriever = served
    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_retriever(directory)
    with mlflow.start_run(experiment_id=experiment):
        info = log_retriever(directory, registered_model_name="learn-retriever", max_history=MAX_HISTORY)
    assert info.registered_model_version == 1
    version = MlflowClient().get_model_version("learn-retriever", "1")
    assert version.run_id == info.run_id
    assert info.metadata["tower_id"] == load_bundle(directory).tower_id

    histories = [[IDS[i] for i in r] for r in random_rows(3)] + [[IDS[4], "ghost"], ["ghost"]]
    expected = retriever.predict(None, pd.DataFrame({"history": histories}), params={"k": 7, "exclude_history": True})

    in_process = load_retriever(info.model_uri).predict(pd.DataFrame({"history": histories}),
                                                        params={"k": 7, "exclude_history": True})
    pd.testing.assert_frame_equal(in_process, expected)

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, "models:/learn-retriever/1", json.dumps(histories)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "/code/learn/" in result["learn"]  # the package shipped with the model was used
    got = result["rows"]
    assert got["item_ids"] == expected["item_ids"].tolist()
    assert got["unknown_item_ids"] == expected["unknown_item_ids"].tolist()
    for g, e in zip(got["scores"], expected["scores"]):
        np.testing.assert_allclose(g, e, atol=1e-6, rtol=0)


def test_logged_model_has_no_pickle_and_a_damaged_code_file_is_refused(served, tracking, tmp_path):
    """Logged from code: nothing to unpickle; a cut or altered model file gives a named error that
    names the file (never a raw EOFError or, for a file cut before set_model, the previous model)."""
    from mlflow.exceptions import MlflowException

    from learn.export.manifest import ArtifactError

    _, experiment = tracking
    with mlflow.start_run(experiment_id=experiment):
        info = log_retriever(served[1], max_history=MAX_HISTORY)
    model_dir = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model")))
    assert not [p for p in model_dir.rglob("*") if p.suffix in (".pkl", ".pickle")]
    code = model_dir / "retriever_model.py"
    original = code.read_bytes()
    assert load_retriever(str(model_dir)).unwrap_python_model().bundle is not None

    code.write_bytes(b"")  # runs fine, sets no model: MLflow alone would return the one loaded above
    with pytest.raises(ArtifactError, match="retriever_model.py: sha256 mismatch"):
        load_retriever(str(model_dir))
    code.write_bytes(original[: len(original) // 2])  # cut inside its docstring: does not even compile
    with pytest.raises(MlflowException, match="retriever_model.py"):
        load_retriever(str(model_dir))
    code.write_bytes(original.replace(b"Retriever()", b"Retriever(3)"))  # altered, still runs
    with pytest.raises(ArtifactError, match="retriever_model.py: sha256 mismatch"):
        load_retriever(str(model_dir))
    code.write_bytes(original)
    assert load_retriever(str(model_dir)).unwrap_python_model().max_history == MAX_HISTORY

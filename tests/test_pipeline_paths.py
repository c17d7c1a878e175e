"""End-to-end paths the other pipeline tests do not take: the production entry point on Ray, in_batch
over every position of a sequence, and evaluation with the user's own history excluded."""

import mlflow
import numpy as np
import pytest

from learn.data.load import load_sequences
from learn.export.bundle import load_bundle
from tests.flows import run_pipeline

REQUIRED = ["test_recall_at_10", "test_ndcg_at_10", "test_recall_at_50", "test_ndcg_at_50", "test_mrr"]


@pytest.mark.slow
def test_production_entry_point_on_ray_matches_the_local_run(ray_local, tiny_cfg, demo_store):
    """As infra/k8s/rayjob.yaml runs it (embed.executor=ray_data train.backend=ray): items embedded on a
    Ray Data actor pool into a fresh store, towers trained by DDP over two Ray Train workers with the
    scale objective (sampled_softmax; its negatives drawn alike on every rank) and validated by both
    ranks, each on half the users. Without dropout the DDP gradient is the one-process gradient, so
    the metrics are the local run's."""
    same = ["train.epochs=2", "model.dropout=0", "train.recipe=sampled_softmax", "train.num_negatives=32"]
    cfg = tiny_cfg(*same, "embed.executor=ray_data", "train.backend=ray", "train.num_workers=2")
    on_ray = run_pipeline(cfg, progress=False)
    local = run_pipeline(tiny_cfg(*same, f"embed.store={demo_store}", "tracking.enabled=false",
                                  "export.enabled=false"), progress=False).metrics

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    run = client.get_run(on_ray.run_id)
    assert run.data.params["train.backend"] == "ray" and run.data.params["embed.executor"] == "ray_data"
    assert run.data.metrics["embed_items_embedded"] == run.data.metrics["data_items"] > 0  # on the actors
    assert len(client.get_metric_history(on_ray.run_id, "train_loss")) == 2  # rank 0 logged each epoch
    assert client.get_model_version_by_alias("learn-retriever", "challenger").run_id == on_ray.run_id
    for key in REQUIRED + ["best_valid_ndcg_at_10", "best_valid_mrr"]:
        assert on_ray.metrics[key] == pytest.approx(local[key], abs=1e-5), key
    assert on_ray.metrics["best_epoch"] == local["best_epoch"]


@pytest.mark.slow
def test_in_batch_over_all_positions_end_to_end(tiny_cfg, demo_store):
    """in_batch with train.all_positions puts several positions of one user in a batch (masked as each
    other's negatives, see tests/towers/test_losses.py): it trains, and differently from one target."""
    def run(*overrides):
        cfg = tiny_cfg("train.recipe=in_batch", "train.epochs=3", "tracking.enabled=false", "export.enabled=false",
                       f"embed.store={demo_store}", *overrides)
        return run_pipeline(cfg, progress=False).metrics

    one, every = run(), run("train.all_positions=true")
    assert every["epochs_run"] == 3 and 0 < every["test_users"]
    assert np.isfinite([every[k] for k in REQUIRED]).all()
    assert (every["best_valid_ndcg_at_10"], every["test_mrr"]) != (one["best_valid_ndcg_at_10"], one["test_mrr"])
    floor = run_pipeline(tiny_cfg("train.recipe=content_last", "tracking.enabled=false", f"embed.store={demo_store}"),
                         progress=False).metrics
    assert every["best_valid_ndcg_at_10"] > floor["best_valid_ndcg_at_10"]


def _ranks(scores: np.ndarray, targets: np.ndarray, histories, exclude_history: bool) -> np.ndarray:
    """Pessimistic 0-based rank of each target by an explicit loop; excluding history drops the user's
    earlier items (never the target itself) from the competitors."""
    out = []
    for row, target, history in zip(scores, targets, histories):
        above = row >= row[target]
        above[target] = False
        if exclude_history:
            above[np.asarray(history)] = False
        out.append(int(above.sum()))
    return np.asarray(out)


def _metrics(ranks: np.ndarray) -> dict[str, float]:
    out = {"mrr": float(np.mean(1 / (ranks + 1)))}
    for k in (10, 50):
        out[f"recall_at_{k}"] = float(np.mean(ranks < k))
        out[f"ndcg_at_{k}"] = float(np.mean(np.where(ranks < k, 1 / np.log2(ranks + 2), 0)))
    return out


@pytest.mark.slow
def test_exclude_history_end_to_end(tiny_cfg, demo_store):
    """eval.exclude_history=true: the plain keys hold the history-excluded metrics, `_incl_hist` the
    others, both equal to a direct computation on the exported towers."""
    cfg = tiny_cfg("eval.exclude_history=true", "train.epochs=2", "tracking.enabled=false",
                   f"embed.store={demo_store}")
    result = run_pipeline(cfg, progress=False)
    m = result.metrics
    assert not any(key.endswith("_excl_hist") for key in m)

    bundle = load_bundle(result.output_dir / "bundle")
    _, data = load_sequences(cfg.data)
    test = data.split(cfg.data.split, cfg.data.time_cut, cfg.seed).test
    ids = [str(i) for i in data.item_ids]
    assert list(bundle.item_ids) == ids
    users, unknown = bundle.user_vectors([[ids[i] for i in h] for h in test.histories], cfg.data.max_history)
    assert not any(unknown) and len(users) == m["test_users"]
    scores = users @ np.asarray(bundle.item_embeddings).T
    excluded = _ranks(scores, test.targets, test.histories, exclude_history=True)
    included = _ranks(scores, test.targets, test.histories, exclude_history=False)
    assert (excluded <= included).all() and (excluded < included).any()  # history items do outrank targets
    for key, value in _metrics(excluded).items():
        assert m[f"test_{key}"] == pytest.approx(value, abs=1e-6), key
    for key, value in _metrics(included).items():
        assert m[f"test_{key}_incl_hist"] == pytest.approx(value, abs=1e-6), key

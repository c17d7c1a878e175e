"""The A/B flow across a catalog change, as a user runs it: train on a snapshot without the cold-start
items (v1: champion, as a first version), re-embed the full catalog into the champion (v2), train on
the full catalog (v3: challenger), compare champion with challenger on the challenger's data; and the
leak case (evaluating on the older data that the challenger trained past) refused."""

from __future__ import annotations

import mlflow
import pytest

from learn.data.demo import write_demo_snapshot
from tests.flows import run_pipeline
from tests.flows import reembed
from learn.evaluate.ab import ComparisonError
from tests.flows import compare_models

NAME = "learn-retriever"
pytestmark = pytest.mark.slow  # two tiny trainings, a re-embedding, three comparisons


def test_compare_champion_and_challenger_across_a_catalog_change(tiny_cfg, tmp_path):
    before, full = tmp_path / "before", tmp_path / "full"
    demo = tiny_cfg().data.demo
    write_demo_snapshot(demo, before, without_cold=True)
    write_demo_snapshot(demo, full)
    cold = demo.cold_items

    def cfg(path, *overrides):
        return tiny_cfg(f"data.path={path}", "train.epochs=1", "export.plots=false",
                        "tracking.system_metrics=false", *overrides)

    uri = cfg(before).tracking.tracking_uri
    client = mlflow.MlflowClient(tracking_uri=uri)
    alias = lambda a: str(client.get_model_version_by_alias(NAME, a).version)  # noqa: E731

    run_pipeline(cfg(before), progress=False)
    assert (alias("champion"), alias("challenger")) == ("1", "1")  # the first version serves at once
    re = reembed(cfg(full, "reembed.alias=champion"), progress=False)
    assert re.published and alias("champion") == "2"
    third = run_pipeline(cfg(full), progress=False)
    assert (alias("champion"), alias("challenger")) == ("2", "3")  # a later version is challenger only

    # the re-embedded bundle carries the served model's training config and max_history
    info = {v: mlflow.artifacts.load_dict(f"models:/{NAME}/{v}/artifacts/bundle/manifest.json")["info"]
            for v in ("1", "2")}
    assert info["2"]["config"] == info["1"]["config"] and info["2"]["max_history"] == info["1"]["max_history"]
    assert info["2"]["dataset_fingerprint"] == info["1"]["dataset_fingerprint"]
    assert info["2"]["source_model_version"] == "1" and info["2"]["n_items"] == info["1"]["n_items"] + cold

    result = compare_models(f"models:/{NAME}@champion", f"models:/{NAME}@challenger", tracking_uri=uri,
                            n_resamples=200)
    assert result["eval_data_path"] == str(full)
    assert result["eval_dataset_fingerprint"] == client.get_run(third.run_id).data.tags["dataset_fingerprint"]
    # both bundles hold the full catalog: every user is scored over all items
    assert result["catalog_a"] == result["catalog_b"] == result["catalog_common"] == result["catalog_eval"]
    assert result["n_users"] == result["users_eval"] > 0
    assert result["users_dropped_target_a"] == result["users_dropped_target_b"] == 0
    # B was evaluated on its own test split: its score is the pipeline's
    assert result["b_ndcg_at_10"] == pytest.approx(third.metrics["test_ndcg_at_10"], abs=1e-6)
    logged = client.get_run(result["comparison_run_id"])
    assert logged.data.params["data"] == str(full)
    assert logged.data.metrics["catalog_common"] == result["catalog_common"]
    assert logged.data.metrics["users_eval"] == result["users_eval"]

    # v1 (old catalog) against its re-embedding (v2): evaluated on v2's training data (v1's), the
    # same towers over the common (old) catalog score alike
    same = compare_models(f"models:/{NAME}/1", f"models:/{NAME}/2", tracking_uri=uri, n_resamples=50, log=False)
    assert same["eval_data_path"] == str(before)
    assert (same["catalog_a"], same["catalog_b"], same["catalog_common"]) == (
        result["catalog_eval"] - cold, result["catalog_eval"], result["catalog_eval"] - cold)
    assert same["delta_ndcg_at_10"] == pytest.approx(0.0, abs=1e-6)

    # the older data as evaluation set: the challenger trained on (some of) its held-out targets
    with pytest.raises(ComparisonError, match=rf"B \(models:/{NAME}@challenger\) was trained on the evaluation "
                                              rf"targets of \d+ of \d+ users: its training data {full}"):
        compare_models(f"models:/{NAME}@champion", f"models:/{NAME}@challenger", data=str(before),
                       tracking_uri=uri, log=False)
    # a target the champion cannot embed: v1 on the full data drops the users whose target is a cold item
    dropped = compare_models(f"models:/{NAME}/1", f"models:/{NAME}/3", tracking_uri=uri, n_resamples=50,
                             log=False)
    assert dropped["catalog_common"] == dropped["catalog_a"] == result["catalog_eval"] - cold
    assert dropped["users_dropped_target_a"] > 0 and dropped["users_dropped_target_b"] == 0
    assert dropped["n_users"] == dropped["users_eval"] - dropped["users_dropped_target_a"] \
        - dropped["users_dropped_no_history_a"] - dropped["users_dropped_no_history_b"]

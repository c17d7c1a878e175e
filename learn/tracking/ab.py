"""A/B comparison of two logged retrievers on the same split and users, and promotion.

A reference is a run id (its logged `retriever`) or a model URI (``models:/learn-retriever@champion``,
``models:/learn-retriever/3``). Both bundles must come from the same dataset (fingerprint and item
order); the split is rebuilt from A's saved config, so both are scored on exactly the same users.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from learn.tracking.mlflow_run import resolve_uri


class ComparisonError(ValueError):
    """A reference does not resolve, or the two models cannot be compared."""


@dataclass
class Resolved:
    ref: str
    model_uri: str
    run_id: str
    registered: tuple[str, str] | None  # (name, version) when the reference is a registered version


def resolve_reference(client, ref: str) -> Resolved:
    """Turn a run id or a ``models:/`` URI into the model URI to load, its run and its registry entry."""
    from mlflow.exceptions import MlflowException

    if ref.startswith("models:/"):
        body = ref[len("models:/"):]
        try:
            if "@" in body:
                name, alias = body.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, version = body.rsplit("/", 1)
                mv = client.get_model_version(name, version)
        except (MlflowException, ValueError) as exc:
            raise ComparisonError(f"model reference {ref!r} does not resolve: {exc}") from None
        return Resolved(ref, ref, mv.run_id, (mv.name, str(mv.version)))
    try:
        client.get_run(ref)
    except MlflowException:
        raise ComparisonError(f"run {ref!r} does not exist in the tracking store") from None
    versions = client.search_model_versions(f"run_id='{ref}'")
    registered = (versions[0].name, str(versions[0].version)) if versions else None
    return Resolved(ref, f"runs:/{ref}/retriever", ref, registered)


def _load_bundle(model_uri: str):
    import mlflow

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as exc:  # noqa: BLE001 - mlflow raises several types for a missing model
        raise ComparisonError(f"cannot load the retriever at {model_uri}: {exc}") from None
    return model.unwrap_python_model().bundle


def _eval_split(bundle, which: str):
    from learn.config import config_from_dict
    from learn.data.load import item_texts, load_dataset
    from learn.data.sequences import build_sequences

    info = bundle.manifest["info"]
    cfg = config_from_dict(info["config"], "the bundle's saved config")
    raw = load_dataset(cfg.data)
    data = build_sequences(raw, item_texts(raw, cfg.data.text_template), cfg.data.unsorted_timestamps)
    splits = data.split(cfg.data.split, cfg.data.time_cut, cfg.seed)
    return cfg, data, (splits.valid if which == "valid" else splits.test)


def compare_models(a_ref: str, b_ref: str, *, split: str = "test", k: int = 10, n_resamples: int = 2000,
                   seed: int = 0, exclude_history: bool | None = None, tracking_uri: str | None = None,
                   experiment: str = "learn-compare", promote: bool = False, log: bool = True) -> dict[str, Any]:
    """Score A and B on the same users, bootstrap the paired differences, log a comparison run.

    ``promote`` moves the alias `champion` to B's registered version only when B's NDCG@k is better
    with the whole 95% interval above zero.
    """
    import mlflow

    from learn.evaluate.compare import compare_ranks, format_comparison, should_promote, topk_overlap
    from learn.evaluate.metrics import target_ranks

    uri = resolve_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    a, b = resolve_reference(client, a_ref), resolve_reference(client, b_ref)
    bundle_a, bundle_b = _load_bundle(a.model_uri), _load_bundle(b.model_uri)
    info_a, info_b = bundle_a.manifest["info"], bundle_b.manifest["info"]
    if info_a.get("dataset_fingerprint") != info_b.get("dataset_fingerprint"):
        raise ComparisonError(
            f"A ({a_ref}) and B ({b_ref}) were trained on different data (dataset fingerprints "
            f"{info_a.get('dataset_fingerprint')} vs {info_b.get('dataset_fingerprint')}); compare runs of one dataset")
    cfg, data, ev = _eval_split(bundle_a, split)
    ids = [str(i) for i in data.item_ids]
    for name, bundle in (("A", bundle_a), ("B", bundle_b)):
        if list(bundle.item_ids) != ids:
            raise ComparisonError(f"{name}'s item table does not match the dataset's catalog order")
    if exclude_history is None:
        exclude_history = cfg.eval.exclude_history
    histories = [[ids[i] for i in h] for h in ev.histories]
    ranks, top = {}, {}
    for name, bundle in (("a", bundle_a), ("b", bundle_b)):
        users, unknown = bundle.user_vectors(histories, cfg.data.max_history)
        if any(unknown):
            raise ComparisonError(f"model {name.upper()} does not know {sum(map(len, unknown))} history items")
        ranks[name] = target_ranks(users, np.asarray(bundle.item_embeddings), ev.targets, ev.histories,
                                   exclude_history=exclude_history, chunk_size=cfg.eval.chunk_size)
        top[name] = bundle.index.search_rows(users.astype(np.float32), k)[0]
    result = compare_ranks(ranks["a"], ranks["b"], k=k, n_resamples=n_resamples, seed=seed)
    result[f"top{k}_overlap"] = topk_overlap(top["a"], top["b"])
    metric = f"ndcg_at_{k}"
    promoted = False
    if promote:
        if b.registered is None:
            raise ComparisonError(f"B ({b_ref}) is not a registered model version, so it cannot be promoted")
        if should_promote(result, metric):
            client.set_registered_model_alias(b.registered[0], "champion", b.registered[1])
            promoted = True
    result["promoted"] = float(promoted)
    if log:
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=f"compare {a_ref} vs {b_ref}"[:250]) as run:
            mlflow.log_params({"a": a_ref, "b": b_ref, "a_run_id": a.run_id, "b_run_id": b.run_id, "split": split,
                               "k": k, "n_resamples": n_resamples, "seed": seed,
                               "exclude_history": exclude_history, "promote": promote})
            mlflow.log_metrics({key: float(v) for key, v in result.items()})
            mlflow.set_tags({"dataset": data.name, "dataset_fingerprint": info_a.get("dataset_fingerprint")})
            result["comparison_run_id"] = run.info.run_id
    print(format_comparison(result, result[f"top{k}_overlap"]))
    if promote:
        print(f"champion -> {b.registered[0]} version {b.registered[1]}" if promoted
              else f"not promoted: B's {metric} gain is not above zero with 95% confidence")
    return result

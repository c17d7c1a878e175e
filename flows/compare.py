"""A/B: score two logged retrievers (run ids or models:/ URIs) on one evaluation dataset, with paired
bootstrap confidence intervals over users; optionally promote B to `champion`.

    python flows/compare.py models:/learn-retriever@champion models:/learn-retriever@challenger [--promote]
    python flows/compare.py <run id A> <run id B> --data <dataset dir> --split valid
    python flows/compare.py --online <assignment log dir> [--out exposures.parquet]

The evaluation dataset is B's saved training data unless ``--data`` names another; both models are
ranked over the catalog both (and the data) hold, on the users both can score, and a model trained
on an evaluation target is refused. The rules are in learn/evaluate/ab.py.

``--online`` reads the assignment log of the online service (flows/serve.py, serve.log_dir) instead:
per-variant request, user and version counts and the overlap of the two variants' returned lists
(learn/serve/assignments.py, ``summarize``); ``--out`` writes one row per returned item (time,
request id, user hash, variant, version, rank, item id), to join with click data hashed by
``learn.serve.routing.user_hash`` under the service's salt.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import mlflow  # noqa: E402

from learn import registry  # noqa: E402
from learn.data.load import load_sequences  # noqa: E402
from learn.data.schema import DataError  # noqa: E402
from learn.evaluate.ab import ComparisonError, check_no_leak, common_catalog_ranks, saved_config, split_of  # noqa: E402
from learn.evaluate.compare import compare_ranks, format_comparison, should_promote, topk_overlap  # noqa: E402
from learn.export.manifest import ArtifactError  # noqa: E402
from learn.serve.assignments import AssignmentLogError, exposures, format_summary, read_assignments, summarize  # noqa: E402
from learn.utils import atomic_path  # noqa: E402


def compare_models(a_ref: str, b_ref: str, *, data: str | None = None, split: str = "test", k: int = 10,
                   n_resamples: int = 2000, seed: int = 0, exclude_history: bool | None = None,
                   tracking_uri: str | None = None, experiment: str = "learn-compare", promote: bool = False,
                   log: bool = True) -> dict[str, Any]:
    """Returns the metrics of ``compare_ranks``, ``top{k}_overlap``, the user and catalog counts,
    ``promoted`` and the evaluation dataset (``eval_dataset``, ``eval_data_path``,
    ``eval_dataset_fingerprint``). ``promote`` moves `champion` to B's registered version only when
    B's NDCG@k is better with the whole 95% interval above zero."""
    # the two registered (or logged) bundles
    client = registry.client(tracking_uri)
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        refs = {"a": registry.resolve(client, a_ref), "b": registry.resolve(client, b_ref)}
    except registry.RegistryError as exc:
        raise ComparisonError(str(exc)) from None
    who = {"a": f"A ({a_ref})", "b": f"B ({b_ref})"}
    with tempfile.TemporaryDirectory(prefix="learn-compare-") as tmp:
        bundles = {}
        for m, ref in refs.items():
            try:
                bundles[m] = registry.fetch_bundle(ref, Path(tmp) / m, progress=False)
            except (registry.RegistryError, ArtifactError) as exc:
                raise ComparisonError(f"cannot load the retriever of {who[m]}: {exc}") from None
    cfgs = {m: saved_config(bundles[m], who[m]) for m in bundles}

    # one evaluation dataset and split, which neither model may have trained on
    ev_cfg = cfgs["b"] if data is None else replace(cfgs["b"], data=replace(cfgs["b"].data, path=data))
    _, ev_data = load_sequences(ev_cfg.data)
    ev_splits = split_of(ev_cfg, ev_data)
    ev = ev_splits.valid if split == "valid" else ev_splits.test
    ev_fingerprint = ev_data.fingerprint()  # one pass over every sequence
    ev_name = f"{ev_data.name} at {ev_cfg.data.path} (fingerprint {ev_fingerprint}, {split} split)"
    for m in bundles:
        check_no_leak(bundles[m], cfgs[m], who[m], ev_cfg, ev_data, ev_splits, ev, ev_name, ev_fingerprint)
    if exclude_history is None:
        exclude_history = ev_cfg.eval.exclude_history

    # both ranked over the common catalog, paired over users
    ranks, top, counts = common_catalog_ranks(bundles, ev, ev_data, k, exclude_history, ev_cfg.eval, ev_name)
    result: dict[str, Any] = compare_ranks(ranks["a"], ranks["b"], k=k, n_resamples=n_resamples, seed=seed)
    result[f"top{k}_overlap"] = topk_overlap(top["a"], top["b"])
    result.update({key: float(v) for key, v in counts.items()})

    # promotion: the one alias move of this flow
    metric, b = f"ndcg_at_{k}", refs["b"]
    promoted = False
    if promote:
        if b.registered is None:
            raise ComparisonError(f"{who['b']} is not a registered model version, so it cannot be promoted")
        if should_promote(result, metric):
            registry.move_alias(client, b.registered[0], registry.CHAMPION, b.registered[1])
            promoted = True
    result["promoted"] = float(promoted)

    dataset = {"eval_dataset": ev_data.name, "eval_data_path": str(ev_cfg.data.path),
               "eval_dataset_fingerprint": ev_fingerprint}
    if log:
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=f"compare {a_ref} vs {b_ref}"[:250]) as run:
            mlflow.log_params({"a": a_ref, "b": b_ref, "a_run_id": refs["a"].run_id, "b_run_id": b.run_id,
                               "data": dataset["eval_data_path"], "split": split, "k": k,
                               "n_resamples": n_resamples, "seed": seed, "exclude_history": exclude_history,
                               "promote": promote})
            mlflow.log_metrics(result)
            mlflow.set_tags({"dataset": ev_data.name, "dataset_fingerprint": dataset["eval_dataset_fingerprint"]})
            result["comparison_run_id"] = run.info.run_id
    result.update(dataset)
    print(f"evaluated on {ev_name}: {counts['users_scored']} of {len(ev)} users, {counts['catalog_common']} "
          f"of {counts['catalog_eval']} items served by both; "
          f"{', '.join(f'{key} {v}' for key, v in counts.items() if key.startswith('users_'))}")
    print(format_comparison(result, result[f"top{k}_overlap"]))
    if promote:
        print(f"champion -> {b.registered[0]} version {b.registered[1]}" if promoted
              else f"not promoted: B's {metric} gain is not above zero with 95% confidence")
    return result


def compare_online(log_dir: str, *, out: str | None = None, tracking_uri: str | None = None,
                   experiment: str = "learn-compare", log: bool = True) -> dict[str, Any]:
    """The summary of the assignment log at ``log_dir`` (``summarize``); ``out`` also writes the
    exposure table (Parquet, atomically); ``log`` records the counts as a run in ``experiment``."""
    table = read_assignments(log_dir)
    result = summarize(table)
    if out is not None:
        import pyarrow.parquet as pq

        with atomic_path(out) as tmp:
            pq.write_table(exposures(table), tmp)
        result["exposures_path"] = str(Path(out).absolute())
    if log:
        client = registry.client(tracking_uri)
        mlflow.set_tracking_uri(client.tracking_uri)
        mlflow.set_experiment(experiment)
        metrics = {key: float(v) for key, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, v in result["variants"].items():
            metrics.update({f"{name}_{key}": float(v[key]) for key in ("requests", "users", "anonymous", "items",
                                                                         "mean_list_length")})
        with mlflow.start_run(run_name=f"online {Path(log_dir).name}"[:250]) as run:
            mlflow.log_params({"online_log_dir": str(Path(log_dir).absolute()), "first_time": result["first_time"],
                               "last_time": result["last_time"]})
            mlflow.log_metrics({k: v for k, v in metrics.items() if v == v})  # NaN (a variant absent) left out
            mlflow.log_dict(result, "online_summary.json")
            result["comparison_run_id"] = run.info.run_id
    print(format_summary(result))
    if out is not None:
        print(f"exposures ({sum(len(x) for x in table.column('item_ids').to_pylist())} rows) -> {result['exposures_path']}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", nargs="?", help="run id or models:/<name>@<alias> | models:/<name>/<version> (the champion)")
    p.add_argument("b", nargs="?", help="run id or model URI of the challenger")
    p.add_argument("--online", metavar="LOG_DIR", default=None,
                   help="summarise the online service's assignment log instead (no A and B)")
    p.add_argument("--out", default=None, help="--online: write the exposure table (Parquet) here")
    p.add_argument("--data", default=None, help="evaluation dataset; default: B's saved training data")
    p.add_argument("--split", choices=["test", "valid"], default="test")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples over users")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude-history", choices=["true", "false"], default=None,
                   help="default: the evaluation config's (B's) eval.exclude_history")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--experiment", default="learn-compare")
    p.add_argument("--promote", action="store_true",
                   help="set alias champion on B when its NDCG@k gain has a 95%% CI above zero")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.online is not None:
        if args.a or args.b or args.promote or args.data:
            p.error("--online reads a log: give no models, --data or --promote with it")
        try:
            compare_online(args.online, out=args.out, tracking_uri=args.tracking_uri, experiment=args.experiment)
        except AssignmentLogError as exc:
            print(f"compare error: {exc}", file=sys.stderr)
            return 2
        return 0
    if not (args.a and args.b):
        p.error("give two models A and B (or --online <log dir>)")
    if args.out:
        p.error("--out goes with --online")
    try:
        compare_models(args.a, args.b, data=args.data, split=args.split, k=args.k, n_resamples=args.resamples,
                       seed=args.seed, tracking_uri=args.tracking_uri, experiment=args.experiment,
                       exclude_history=None if args.exclude_history is None else args.exclude_history == "true",
                       promote=args.promote)
    except (ComparisonError, DataError, ArtifactError) as exc:
        print(f"compare error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

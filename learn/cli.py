"""Command-line entry points.

    learn run --config conf/default.yaml [key=value ...]      the full pipeline
    learn data download --category Industrial_and_Scientific --dest data/raw
    learn data demo-snapshot --out data/demo-catalog [--without-cold]
"""

from __future__ import annotations

import argparse
import sys

from learn.config import ConfigError, load_config
from learn.data.schema import DataError


def _flow_args(argv: list[str], prog: str, description: str, example: str):
    """(parsed args, Config) for a flow taking --config, --no-progress and key=value overrides;
    (args, None) after printing the error when the config is bad."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", default="conf/default.yaml", help="YAML config (default: conf/default.yaml)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    args = p.parse_args(argv)
    try:
        return args, load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return args, None


def pipeline_main(argv: list[str], prog: str = "full_pipeline.py") -> int:
    args, cfg = _flow_args(argv, prog, "Run the LEARN pipeline.", "seed=1 data.path=<dir>")
    if cfg is None:
        return 2
    from learn.pipeline import run_pipeline

    try:
        result = run_pipeline(cfg, progress=not args.no_progress)
    except DataError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        return 3
    print(f"run {result.run_id or '(tracking off)'}; outputs in {result.output_dir}")
    return 0


def reembed_main(argv: list[str], prog: str = "reembed.py") -> int:
    args, cfg = _flow_args(
        argv, prog, "Embed new and changed catalog items with the served retriever's encoder and item tower, "
                    "publish a new index version and move the alias onto it.",
        "data.path=<catalog> reembed.alias=champion")
    if cfg is None:
        return 2
    from learn.reembed import ReembedError, reembed

    try:
        result = reembed(cfg, progress=not args.no_progress)
    except DataError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        return 3
    except ReembedError as exc:
        print(f"reembed error: {exc}", file=sys.stderr)
        return 4
    state = "published" if result.published else "unchanged"
    print(f"run {result.run_id}; {result.registered_model}@{result.alias} serves version {result.served_version} "
          f"({state}; read version {result.source_version})")
    return 0


def compare_main(argv: list[str], prog: str = "compare.py") -> int:
    p = argparse.ArgumentParser(
        prog=prog, description="A/B: score two logged retrievers on the same split and users, with paired "
                               "bootstrap confidence intervals; optionally promote B to `champion`.")
    p.add_argument("a", help="run id or models:/<name>@<alias> | models:/<name>/<version>")
    p.add_argument("b", help="run id or model URI of the challenger")
    p.add_argument("--split", choices=["test", "valid"], default="test")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples over users")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude-history", choices=["true", "false"], default=None,
                   help="default: the mode A was trained with (eval.exclude_history)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--experiment", default="learn-compare")
    p.add_argument("--promote", action="store_true",
                   help="set alias champion on B when its NDCG@k gain has a 95%% CI above zero")
    args = p.parse_args(argv)
    from learn.tracking.ab import ComparisonError, compare_models

    try:
        compare_models(args.a, args.b, split=args.split, k=args.k, n_resamples=args.resamples, seed=args.seed,
                       exclude_history=None if args.exclude_history is None else args.exclude_history == "true",
                       tracking_uri=args.tracking_uri, experiment=args.experiment, promote=args.promote)
    except (ComparisonError, DataError) as exc:
        print(f"compare error: {exc}", file=sys.stderr)
        return 2
    return 0


def download_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="learn data download",
                                description="Fetch one Amazon Reviews 2018 category (meta + 5-core reviews).")
    p.add_argument("--category", required=True, help="e.g. Industrial_and_Scientific")
    p.add_argument("--dest", required=True, help="directory to write the .json.gz files to")
    p.add_argument("--base-url", default=None, help="mirror of the public dataset address")
    args = p.parse_args(argv)
    from learn.data.download import AMAZON2018_BASE, download_amazon2018

    paths = download_amazon2018(args.category, args.dest, base_url=args.base_url or AMAZON2018_BASE)
    for path in paths:
        print(path)
    print(f"then: python flows/full_pipeline.py --config conf/default.yaml data.path={args.dest} "
          f"data.category={args.category}")
    return 0


def demo_snapshot_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="learn data demo-snapshot",
                                description="Write the demo catalog and interactions as files (data.path=<out>).")
    p.add_argument("--out", required=True, help="directory for items.parquet and interactions.parquet")
    p.add_argument("--config", default="conf/default.yaml", help="the data.demo section of this config is used")
    p.add_argument("--without-cold", action="store_true",
                   help="leave the cold-start items out of the catalog (a snapshot from before they existed)")
    args = p.parse_args(argv)
    from learn.data.demo import write_demo_snapshot

    cfg = load_config(args.config, [])
    print(write_demo_snapshot(cfg.data.demo, args.out, without_cold=args.without_cold))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        return pipeline_main(argv[1:], prog="learn run")
    if argv[:2] == ["data", "download"]:
        return download_main(argv[2:])
    if argv[:2] == ["data", "demo-snapshot"]:
        return demo_snapshot_main(argv[2:])
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Command-line entry points. The flows themselves live in flows/ (read them top to bottom);
``learn run|reembed|compare|serve`` runs that flow file by path, as ``python flows/<flow>.py`` does.

    learn run --config conf/default.yaml [key=value ...]        flows/full_pipeline.py
    learn reembed --config conf/default.yaml [key=value ...]    flows/reembed.py
    learn compare <model A> <model B> [--promote ...]           flows/compare.py
    learn serve --config conf/default.yaml [key=value ...]      flows/serve.py
    learn data download --category Industrial_and_Scientific --dest data/raw
    learn data demo-snapshot --out data/demo-catalog [--without-cold]

Every config key, its type and default is listed in learn/config.py.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import Callable

from learn.config import Config, ConfigError, load_config
from learn.data.schema import DataError

FLOWS = {"run": "full_pipeline.py", "reembed": "reembed.py", "compare": "compare.py", "serve": "serve.py"}
FLOW_DIR = Path(__file__).resolve().parents[1] / "flows"


def run_flow(argv: list[str] | None, prog: str, doc: str, run: Callable[[Config, bool], str],
             errors: dict[type, tuple[str, int]] | None = None) -> int:
    """The command line every config-driven flow shares: ``--config``, ``--no-progress`` and
    ``key=value`` overrides (in any order). Exit codes: 0 done, 2 bad config, 3 bad data, and the
    flow's own ``errors`` ({exception type: (label, code)}); the message names what is wrong."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="conf/default.yaml", help="YAML config (default: conf/default.yaml)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="key=value overrides (every key: learn/config.py), e.g. seed=1")
    args = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    # a ConfigError found while running (e.g. embed.model resolves to nothing) is still a bad config
    handled = {ConfigError: ("config error", 2), DataError: ("data error", 3), **(errors or {})}
    try:
        print(run(cfg, not args.no_progress), flush=True)
    except tuple(handled) as exc:
        label, code = next(v for t, v in handled.items() if isinstance(exc, t))
        print(f"{label}: {exc}", file=sys.stderr)
        return code
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
    if argv[:1] and argv[0] in FLOWS:
        path = FLOW_DIR / FLOWS[argv[0]]
        if not path.is_file():
            print(f"learn {argv[0]}: the flow {path} is not there (flows/ ships with the repository: run from a "
                  f"checkout, or `python flows/{FLOWS[argv[0]]}`)", file=sys.stderr)
            return 2
        return runpy.run_path(str(path))["main"](argv[1:])
    if argv[:2] == ["data", "download"]:
        return download_main(argv[2:])
    if argv[:2] == ["data", "demo-snapshot"]:
        return demo_snapshot_main(argv[2:])
    if argv in (["-h"], ["--help"], ["help"], ["data", "-h"], ["data", "--help"]):
        print(__doc__.strip())
        return 0
    # no command, an unknown one, or `learn data` without its subcommand
    if argv:
        print(f"learn: unknown command {' '.join(argv[:2])!r}\n", file=sys.stderr)
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Where learned position embeddings start to pay: the same 943 MovieLens-100k users cut to their last N
ratings (``bench/movielens.py --last N``), each trained with ``model.positions=none`` and ``learned`` on a few
seeds, beside the mean number of earlier items a training target has (what ``model.positions=auto``
decides on; Scientific: 3.95).

    python bench/movielens.py --last 10 --out .cache/learn/data/movielens-100k-last10   # and 20, 40
    python bench/positions_length.py --lengths 10,20,40 --seeds 0,1,2 --json bench/results/positions_length.json

Each run is ``flows/full_pipeline.py --config conf/scientific/2026-12-07-7-content-id-members.yaml`` (the
seventh freeze: positions none unless set) with ``data.path``, ``model.positions``, ``seed`` and one torch
thread (bench/quality.py's ``run_row``: the default MLflow store, as its rows), outputs under
``runs/bench-positions/ml_last<N>_<positions>_s<seed>/``; a run whose ``metrics.json`` is already there is read, not run again (``--from-runs`` runs nothing).
``--full`` adds the uncut dataset (``.cache/learn/data/movielens-100k``, 12-30 min a run). Prints, per length
and setting, the mean over seeds of the served valid NDCG@10 and of test NDCG@10 / Recall@10 (history kept,
the issue's protocol, and excluded), the per-seed differences learned - none, and the SASRec peer's test
figures where ``bench/sasrec_recbole.py --data <dir> --json bench/results/sasrec_recbole_movielens100k_last<N>.json``
wrote them (``..._movielens100k.json`` for the uncut data).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import run_row  # noqa: E402
from learn.utils import atomic_write_text  # noqa: E402

CONFIG = "conf/scientific/2026-12-07-7-content-id-members.yaml"
DATA = ROOT / ".cache" / "learn" / "data"
KEYS = ["score_mix_valid_ndcg_at_10", "test_ndcg_at_10", "test_recall_at_10", "test_ndcg_at_10_excl_hist",
        "test_recall_at_10_excl_hist"]


def data_dir(length: int | None) -> Path:
    return DATA / ("movielens-100k" if length is None else f"movielens-100k-last{length}")


def run_dir(length: int | None, positions: str, seed: int) -> Path:
    return ROOT / "runs" / "bench-positions" / f"ml_{'full' if length is None else f'last{length}'}_{positions}_s{seed}"


def summary(out: Path) -> dict | None:
    found = sorted(out.glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else None


def run(length: int | None, positions: str, seed: int) -> dict:
    out = run_dir(length, positions, seed)
    run_row(out.name, CONFIG, [f"model.positions={positions}", f"seed={seed}", "train.num_threads=1"],
            str(data_dir(length)), root=out.parent)
    return summary(out)


def peer(length: int | None) -> dict | None:
    """The SASRec peer's test metrics on the same data, where bench/sasrec_recbole.py wrote them."""
    path = ROOT / "bench" / "results" / f"sasrec_recbole_movielens100k{'' if length is None else f'_last{length}'}.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())["rows"][0]["metrics"]
    return {k: round(float(m[k]), 4) for k in ("test_ndcg_at_10", "test_recall_at_10", "best_valid_ndcg_at_10")}


def mean_history_of(length: int | None) -> float:
    """What model.positions=auto decides on, from the dataset itself (as the pipeline computes it)."""
    from learn.config import load_config
    from learn.data.load import load_sequences
    from learn.towers.model import mean_history

    cfg = load_config(ROOT / CONFIG, [f"data.path={data_dir(length)}"])
    _, data = load_sequences(cfg.data)
    return mean_history(data.split(cfg.data.split, cfg.data.time_cut, cfg.seed).train, cfg.data.max_history)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="10,20,40", help="the --last N cuts to run (comma-separated)")
    ap.add_argument("--full", action="store_true", help="also the uncut dataset")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--from-runs", action="store_true", help="run nothing: read the runs already there")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    lengths: list[int | None] = [int(x) for x in args.lengths.split(",") if x]
    if args.full:
        lengths.append(None)
    seeds = [int(s) for s in args.seeds.split(",")]
    for length in lengths:
        if not data_dir(length).is_dir():
            print(f"no {data_dir(length)}: run `python bench/movielens.py"
                  f"{'' if length is None else f' --last {length} --out {data_dir(length)}'}` first", file=sys.stderr)
            return 2
    rows = []
    for length in lengths:
        per = {}
        for positions in ("none", "learned"):
            found = []
            for seed in seeds:
                got = summary(run_dir(length, positions, seed))
                if got is None and not args.from_runs:
                    got = run(length, positions, seed)
                if got is not None:
                    found.append((seed, got))
            per[positions] = found
        if not per["none"] or not per["learned"]:
            print(f"[skip] {data_dir(length).name}: no runs of both settings", flush=True)
            continue
        row = {"data": data_dir(length).name, "last": length,
               "mean_train_history": round(mean_history_of(length), 3),
               "seeds": {p: [s for s, _ in found] for p, found in per.items()}, "sasrec": peer(length)}
        for positions, found in per.items():
            for key in KEYS:
                row[f"{positions}_{key}"] = [round(float(f["metrics"][key]), 4) for _, f in found]
        both = sorted({s for s, _ in per["none"]} & {s for s, _ in per["learned"]})
        for key in KEYS:
            a = dict(zip(row["seeds"]["none"], row[f"none_{key}"]))
            b = dict(zip(row["seeds"]["learned"], row[f"learned_{key}"]))
            row[f"diff_{key}"] = [round(b[s] - a[s], 4) for s in both]
        rows.append(row)
    print("\n| data | earlier items per target | valid none / learned | test NDCG@10 none / learned | "
          "test R@10 none / learned | test NDCG@10 excl. hist none / learned | learned - none, test NDCG@10 per seed | "
          "SASRec test NDCG@10 / R@10 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["sasrec"]
        sasrec = "-" if p is None else f"{p['test_ndcg_at_10']:.4f} / {p['test_recall_at_10']:.4f}"

        def pair(key: str) -> str:
            return f"{np.mean(r['none_' + key]):.4f} / {np.mean(r['learned_' + key]):.4f}"
        print(f"| {r['data']} | {r['mean_train_history']:.2f} | {pair('score_mix_valid_ndcg_at_10')} | "
              f"{pair('test_ndcg_at_10')} | {pair('test_recall_at_10')} | {pair('test_ndcg_at_10_excl_hist')} | "
              f"{', '.join(f'{d:+.4f}' for d in r['diff_test_ndcg_at_10'])} | {sasrec} |")
    if args.json:
        atomic_write_text(args.json, json.dumps({"config": CONFIG, "seeds": seeds, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

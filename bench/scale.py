"""The whole pipeline at 10k / 100k / 1M items: wall, CPU and peak RSS per stage, and how they grow.

    python bench/scale.py --items 10000 100000 1000000 --json bench/results/scale.json

Per catalog size N it builds a synthetic catalog (items "i<j>" titled "synthetic item <j>") and a
log of ``--per-item`` x N interactions (10 per user, so N/... users; items drawn half uniformly,
half from a power law; increasing timestamps per user), written as Parquet in row groups. The content
store is filled through its public API (``ContentStore.upsert``) with SEEDED RANDOM UNIT VECTORS
(not embeddings: embedding throughput is bench/embed.py's job), keyed by the configured encoder's id
and each item's text hash, so the pipeline's embed stage is a pure store lookup. Then the real
``run_pipeline`` runs conf/scale.yaml (sampled_softmax, one epoch; test on 100,000 sampled users over
the full catalog; export and registration in a sqlite MLflow store), and where N <= --full-max-items
the same with train.recipe=full_softmax, side by side. Last, one 10k-row flush into the filled store.
Per stage: wall s, CPU s (this process), peak RSS (sampled); ``--json`` writes them with the growth
exponent of each stage between consecutive sizes (log wall / log N). Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learn.config import load_config  # noqa: E402
from learn.utils import StageTimer, atomic_write_text, rss_bytes, text_hash  # noqa: E402

CHUNK = 2_000_000  # interactions generated and written per row group


def generate(directory: Path, n_items: int, n_inter: int, per_user: int, seed: int) -> dict:
    """items.parquet + interactions.parquet, generated and written chunk by chunk (bounded memory)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    ids = pc.binary_join_element_wise("i", pc.cast(pa.array(np.arange(n_items)), pa.string()), "")
    titles = pc.binary_join_element_wise("synthetic item ", pc.cast(pa.array(np.arange(n_items)), pa.string()), "")
    pq.write_table(pa.table({"item_id": ids, "title": titles}), directory / "items.parquet")
    n_users = max(1, n_inter // per_user)
    # power-law weights over a random permutation of the catalog (the popular items are scattered)
    ranks = rng.permutation(n_items)
    pop_cdf = np.cumsum(1.0 / (1.0 + ranks) ** 0.8)
    pop_cdf /= pop_cdf[-1]
    writer = None
    written = 0
    try:
        for lo in range(0, n_inter, CHUNK):
            n = min(CHUNK, n_inter - lo)
            user = (np.arange(lo, lo + n) // per_user).astype(np.int64) % n_users
            uniform = rng.random(n) < 0.5
            item = np.where(uniform, rng.integers(0, n_items, n),
                            np.minimum(np.searchsorted(pop_cdf, rng.random(n)), n_items - 1))
            stamp = 1_600_000_000 + (np.arange(lo, lo + n) % per_user) * 3600 + user % 977
            table = pa.table({
                "user_id": pc.binary_join_element_wise("u", pc.cast(pa.array(user), pa.string()), ""),
                "item_id": pc.binary_join_element_wise("i", pc.cast(pa.array(item), pa.string()), ""),
                "timestamp": pa.array(stamp, pa.int64()),
            })
            if writer is None:
                writer = pq.ParquetWriter(directory / "interactions.parquet", table.schema)
            writer.write_table(table)
            written += n
    finally:
        if writer is not None:
            writer.close()
    return {"items": n_items, "interactions": written, "users": n_users}


def fill_store(cfg, n_items: int, seed: int, chunk: int = 200_000) -> tuple[str, int]:
    """Seeded random unit vectors for every item, upserted in parts through the store's API."""
    from learn.embed.catalog import content_store_path
    from learn.embed.models import configured_encoder
    from learn.embed.store import ContentStore

    resolved, eid = configured_encoder(cfg.embed)
    dim = 384  # MiniLM's width (conf/scale.yaml's encoder)
    store = ContentStore(content_store_path(cfg.embed, "data"))
    rng = np.random.default_rng(seed)
    for lo in range(0, n_items, chunk):
        hi = min(lo + chunk, n_items)
        vec = rng.standard_normal((hi - lo, dim)).astype(np.float32)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        store.upsert([f"i{j}" for j in range(lo, hi)], [text_hash(f"synthetic item {j}") for j in range(lo, hi)],
                     eid, vec)
    return eid, dim


def flush_10k(cfg, eid: str, dim: int, n_items: int) -> float:
    """One 10k-row flush (new items) into the filled store, timed."""
    from learn.embed.catalog import content_store_path
    from learn.embed.store import ContentStore

    store = ContentStore(content_store_path(cfg.embed, "data"))
    rng = np.random.default_rng(1)
    vec = rng.standard_normal((10_000, dim)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    ids = [f"new{j}" for j in range(10_000)]
    start = time.perf_counter()
    store.upsert(ids, [text_hash(i) for i in ids], eid, vec)
    return time.perf_counter() - start


def bad_row_check(data_dir: Path, n_inter: int) -> dict:
    """The interactions file again with one empty timestamp at ~3/4 of its rows: the error must name
    that row (1-based, as the reader counts Parquet rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from learn.data.files import read_files
    from learn.data.schema import DataError

    bad = data_dir / "bad"
    bad.mkdir(exist_ok=True)
    row = (3 * n_inter) // 4
    table = pq.read_table(data_dir / "interactions.parquet")
    mask = pa.array(np.arange(table.num_rows) == row)
    stamps = pc.if_else(mask, pa.scalar(None, pa.int64()), table.column("timestamp"))
    pq.write_table(table.set_column(2, "timestamp", stamps), bad / "interactions.parquet", row_group_size=1 << 20)
    del table, stamps, mask
    start = time.perf_counter()
    try:
        read_files(data_dir / "items.parquet", bad / "interactions.parquet")
        message = None
    except DataError as exc:
        message = str(exc).replace(str(bad), "<dir>")
    seconds = time.perf_counter() - start
    shutil.rmtree(bad, ignore_errors=True)
    return {"bad_row": row + 1, "error": message, "seconds": round(seconds, 2),
            "names_the_row": message is not None and f"row {row + 1}:" in message}


def data_only(n_items: int, args, work: Path) -> dict:
    """--data-only: generate, then the pipeline's data stage alone (read, sequences, split, popularity,
    fingerprint), for sizes whose training epoch does not fit the session."""
    from learn.data.load import load_sequences

    base = work / f"n{n_items}"
    shutil.rmtree(base, ignore_errors=True)
    timer = StageTimer()
    with timer("generate"):
        facts = generate(base / "data", n_items, n_items * args.per_item, args.per_user, args.seed)
    cfg = load_config(args.config, [f"data.path={base / 'data'}", *args.set])
    with timer("data"):
        _, data = load_sequences(cfg.data)
        splits = data.split(cfg.data.split, cfg.data.time_cut, cfg.seed)
        data.release_times()  # as run_pipeline does
        splits.train_popularity(data.num_items)
        data.fingerprint()
    out = {"items": n_items, "interactions": facts["interactions"], "users": facts["users"], "data_only": True,
           "stages": {k: {m: round(v, 3) for m, v in row.items()} for k, row in timer.stages.items()}}
    if args.bad_row:
        out["bad_row_check"] = bad_row_check(base / "data", facts["interactions"])
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return out


def run_size(n_items: int, args, work: Path) -> dict:
    from tests.flows import run_pipeline  # the flow file, as the CLI runs it

    base = work / f"n{n_items}"
    shutil.rmtree(base, ignore_errors=True)
    timer = StageTimer()
    with timer("generate"):
        facts = generate(base / "data", n_items, n_items * args.per_item, args.per_user, args.seed)
    overrides = [f"data.path={base / 'data'}", f"output_dir={base / 'runs'}",
                 f"embed.cache_dir={args.model_cache}" if args.model_cache else None,
                 f"embed.store={base / 'store' / 'content.parquet'}",
                 f"tracking.tracking_uri=sqlite:///{base / 'mlflow.db'}",
                 f"tracking.artifact_location={base / 'artifacts'}", *args.set]
    cfg = load_config(args.config, [o for o in overrides if o])
    with timer("store_fill"):
        eid, dim = fill_store(cfg, n_items, args.seed)
    out = {"items": n_items, "interactions": facts["interactions"], "users": facts["users"],
           "content": "seeded random unit vectors (not embeddings)", "config": str(args.config),
           "overrides": args.set, "stages": {}}
    start = time.perf_counter()
    result = run_pipeline(cfg, progress=False)
    out["total_wall_s"] = time.perf_counter() - start
    out["stages"] = {k: {m: round(v, 3) for m, v in row.items()} for k, row in result.stages.items()}
    out["metrics"] = {k: result.metrics[k] for k in ("test_ndcg_at_10", "test_recall_at_10", "data_test_users_scored",
                                                     "index_recall_at_10_vs_flat") if k in result.metrics}
    if n_items <= args.full_max_items:
        full = run_pipeline(load_config(args.config, [o for o in overrides if o] + [
            "train.recipe=full_softmax", "export.enabled=false", "tracking.enabled=false"]), progress=False)
        out["full_softmax_train"] = {k: round(v, 3) for k, v in full.stages["train"].items()}
    out["store_flush_10k_s"] = round(flush_10k(cfg, eid, dim, n_items), 3)
    if args.bad_row:
        with timer("bad_row"):
            out["bad_row_check"] = bad_row_check(base / "data", facts["interactions"])
    out["bench_stages"] = {k: {m: round(v, 3) for m, v in row.items()} for k, row in timer.stages.items()}
    out["peak_rss_gb"] = round(max([r["peak_rss_gb"] for r in out["stages"].values()] + [rss_bytes() / 2**30]), 3)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return out


def exponents(rows: list[dict]) -> dict:
    """Per stage: log(wall_b / wall_a) / log(N_b / N_a) between consecutive sizes."""
    out: dict[str, list[float]] = {}
    for a, b in zip(rows, rows[1:]):
        ratio = math.log(b["items"] / a["items"])
        for stage in b["stages"]:
            if stage in a["stages"] and a["stages"][stage]["wall_s"] > 0.05:
                out.setdefault(stage, []).append(round(math.log(b["stages"][stage]["wall_s"]
                                                                / a["stages"][stage]["wall_s"]) / ratio, 2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--per-item", type=int, default=20, help="interactions per catalog item (20: 1M items -> 20M)")
    ap.add_argument("--per-user", type=int, default=10)
    ap.add_argument("--full-max-items", type=int, default=10_000, help="run full_softmax side by side up to here")
    ap.add_argument("--config", default=str(ROOT / "conf" / "scale.yaml"))
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides")
    ap.add_argument("--model-cache", default=None, help="embed.cache_dir (where the packaged encoder is cached)")
    ap.add_argument("--work", default=None, help="working directory (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep each size's files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-only", action="store_true", help="only generate + the data stage (read, split, fingerprint)")
    ap.add_argument("--bad-row", action="store_true", help="also check that a bad row of the log is named")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="learn-scale-"))
    print("content vectors: seeded random unit vectors put into the store through its API (not embeddings)")
    rows = []
    for n in sorted(args.items):
        row = data_only(n, args, work) if args.data_only else run_size(n, args, work)
        rows.append(row)
        print(json.dumps(row), flush=True)
        report = rows[0] if len(rows) == 1 and len(args.items) == 1 else {
            "rows": rows, "growth_exponents": exponents(rows)}
        if args.json:  # after every size: a long run killed later keeps what it measured
            atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    print(f"{'items':>9} {'inter':>10} {'stage':>8} {'wall s':>9} {'cpu s':>9} {'peak GiB':>9}")
    for row in rows:
        for stage, v in row["stages"].items():
            print(f"{row['items']:>9} {row['interactions']:>10} {stage:>8} {v['wall_s']:>9.1f} {v['cpu_s']:>9.1f} "
                  f"{v['peak_rss_gb']:>9.2f}")
        if "total_wall_s" in row:
            print(f"{row['items']:>9} {'':>10} {'total':>8} {row['total_wall_s']:>9.1f} {'':>9} "
                  f"{row['peak_rss_gb']:>9.2f}   store_flush_10k_s {row['store_flush_10k_s']}")
    print("growth exponents (wall, per stage, between consecutive sizes):", exponents(rows))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

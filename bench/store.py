"""Content store write cost: one 10k-row flush into a filled store, single-file (old) vs segmented (new).

    python bench/store.py --items 200000 --json bench/results/store.json

The vectors are seeded random unit vectors (no model runs: embedding throughput is
bench/embed.py's job), put into the store through its public API (``ContentStore.upsert``).
``old``: the single-file ContentStore of commit 038cedc (``git show 038cedc:learn/embed/store.py``),
which rewrites the whole Parquet file on every write. ``new``: learn/embed/store.py, which appends
one part per write; it is filled in writes of --fill-rows and compacted into one part first.

Each step runs in a fresh process (spawned), so its peak RSS (ru_maxrss) is that step's own:
fill (the store built), flush (--flush-rows new items upserted), lookup (--flush-rows stored
items looked up, as a re-run's plan does).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "038cedc"
ENCODER = "bench-random-unit@1"


def _store_class(kind: str, scratch: Path):
    sys.path.insert(0, str(ROOT))
    if kind == "new":
        from learn.embed.store import ContentStore

        return ContentStore
    source = scratch / "store_old.py"
    if not source.exists():
        source.write_bytes(subprocess.run(["git", "show", f"{OLD_COMMIT}:learn/embed/store.py"], cwd=ROOT,
                                          check=True, capture_output=True).stdout)
    spec = importlib.util.spec_from_file_location("store_old", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ContentStore


def _keys(start: int, stop: int) -> tuple[list[str], list[str]]:
    from learn.utils import text_hash

    ids = [f"item{i}" for i in range(start, stop)]
    return ids, [text_hash(f"text of {i}") for i in ids]


def _vectors(start: int, stop: int, dim: int) -> np.ndarray:
    vecs = np.random.default_rng(start).standard_normal((stop - start, dim)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def _step(step: str, kind: str, path: str, n: int, dim: int, fill_rows: int, flush_rows: int) -> dict:
    store = _store_class(kind, Path(path).parent)(path)
    out: dict = {}
    t0 = time.perf_counter()
    if step == "fill":
        size = fill_rows if kind == "new" else n  # old: one write, as each of its writes rewrites the file
        for s in range(0, n, size):
            stop = min(n, s + size)
            store.upsert(*_keys(s, stop), ENCODER, _vectors(s, stop, dim))
        if kind == "new":
            out["upserts_s"] = round(time.perf_counter() - t0, 2)
            t1 = time.perf_counter()
            store.compact()
            out["compact_s"] = round(time.perf_counter() - t1, 2)
    elif step == "flush":
        ids, hashes = _keys(n, n + flush_rows)
        vecs = _vectors(n, n + flush_rows, dim)
        t0 = time.perf_counter()
        store.upsert(ids, hashes, ENCODER, vecs)
    else:
        pick = np.sort(np.random.default_rng(1).choice(n, flush_rows, replace=False))
        ids, hashes = _keys(0, n)
        ids, hashes = [ids[i] for i in pick], [hashes[i] for i in pick]
        t0 = time.perf_counter()
        found, _ = store.lookup(ids, hashes, ENCODER)
        assert found.all(), f"{kind}: {int((~found).sum())} stored items not found"
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return out


def _fresh(*args) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_step, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, nargs="+", default=[200_000], help="store sizes (rows)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--flush-rows", type=int, default=10_000)
    ap.add_argument("--fill-rows", type=int, default=100_000, help="rows per write when filling the new store")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(f"content vectors: seeded random unit vectors, {args.dim}-d, written through ContentStore.upsert "
          f"(no model runs); old = single-file store of commit {OLD_COMMIT}, new = segmented store")
    results = []
    for n in args.items:
        for kind in ("old", "new"):
            with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
                path = str(Path(tmp) / "content.parquet")
                row = {"items": n, "store": kind}
                for step in ("fill", "flush", "lookup"):
                    got = _fresh(step, kind, path, n, args.dim, args.fill_rows, args.flush_rows)
                    row.update({f"{step}_{k}" if k in ("seconds", "peak_rss_gb") else k: v for k, v in got.items()})
                results.append(row)
                print(f"{n:>9,} items  {kind}:  fill {row['fill_seconds']:7.2f} s  "
                      f"{args.flush_rows:,}-row flush {row['flush_seconds']:6.2f} s (peak RSS "
                      f"{row['flush_peak_rss_gb']:.2f} GiB)  {args.flush_rows:,}-row lookup "
                      f"{row['lookup_seconds']:6.2f} s (peak RSS {row['lookup_peak_rss_gb']:.2f} GiB)", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"dim": args.dim, "flush_rows": args.flush_rows, "vectors": "seeded random "
                                         "unit vectors", "old": f"{OLD_COMMIT}:learn/embed/store.py",
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()

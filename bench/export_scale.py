"""Export and registration at scale: the pipeline's own export stage (``registry.export_trained``),
timed sub-stage by sub-stage.

    python bench/export_scale.py --items 100000 1000000 --json bench/results/export_scale.json

The towers are trained-shape but untrained: ``TwinTowers.from_config`` with the model section of
the sixth Scientific freeze, conf/scientific/2026-12-03-6-cold-floor.yaml (4 one-layer members of d_model
128, d_out 256: the README's figures; ``--config`` takes another, e.g. conf/scientific.yaml), seeded initial weights (the
export's cost does not depend on their values). The content vectors are seeded random unit vectors
of 384 dimensions (MiniLM's width); no encoder runs (embedding throughput is bench/embed.py's job).
MLflow is a sqlite store with local artifacts in a scratch directory; the retriever is registered
as a first version (both aliases).

Per sub-stage, as export_trained reports them: towers (torch.export of both towers), item_tower
(the item tower run group by group straight into content.parquet and item_embeddings.parquet,
hashed as written), index (trained on a seeded sample, vectors added batch by batch from the
written table, saved and hashed as written), recall (recall@10 against exact search on the
sampled queries), manifest (provenance, manifest from the digests already taken, publish), mlflow
(the retriever logged from those digests, the bundle copied into the model once, registered).
``hashing`` is measured apart: one sha256 pass over every file of the finished bundle, i.e. what
the export spends hashing inline and what each load_bundle spends verifying. Each catalog size
runs in a fresh (spawned) process, so its peak RSS is its own. Wall s; CPU s = the process's user +
system time over all threads; peak RSS = the highest resident set sampled every 10 ms within the
stage (/proc/self/statm). Torch and faiss use --threads threads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
D_LLM = 384
CONFIG = "conf/scientific/2026-12-03-6-cold-floor.yaml"
NOTE = "synthetic: seeded random unit content vectors (384-d), untrained towers of {config}'s shape; no encoder ran"


class _Peak:
    def __init__(self, value: int) -> None:
        self.value = value


class RssSampler:
    """Resident set (bytes) sampled from /proc/self/statm every ``every_s``; each open ``watch()``
    record keeps the highest value seen while it is open (records may nest)."""

    def __init__(self, every_s: float = 0.01) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.every_s = every_s
        self._open: list[_Peak] = []  # compared by identity
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.rss()
            for record in list(self._open):
                record.value = max(record.value, now)
            time.sleep(self.every_s)

    @contextlib.contextmanager
    def watch(self):
        record = _Peak(self.rss())
        self._open.append(record)
        try:
            yield record
        finally:
            self._open.remove(record)
            record.value = max(record.value, self.rss())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """``with meter("name"): ...`` records wall s, CPU s and peak RSS of the block (blocks may nest)."""

    def __init__(self, sampler: RssSampler) -> None:
        self.sampler = sampler
        self.stages: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        wall, cpu = time.perf_counter(), _cpu_s()
        with self.sampler.watch() as record:
            yield
        self.stages[name] = {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(_cpu_s() - cpu, 2),
                             "peak_rss_gb": round(record.value / GIB, 3)}
        print(f"  [{name}] {self.stages[name]}", flush=True)


def _model_config(config: str = CONFIG):
    """The model section of ``config``, as the pipeline reads it."""
    from learn.config import load_config

    return load_config(ROOT / config, []).model


def _nprobe_sweep(summary, nprobes: list[int], seed: int) -> list[dict]:
    """Recall@10 (and top-1) against exact search, and search ms per query, of the exported IVF index at
    other ``nprobe`` values, on the export's own seeded queries (after the export: not in its figures)."""
    import faiss

    from learn.export.bundle import ITEM_EMBEDDINGS, _recall_queries, _vector_stream
    from learn.index.faiss_index import exact_top_k, load_index, recall_of_rows

    index = load_index(summary.directory / "index")
    stream = _vector_stream(summary.directory / ITEM_EMBEDDINGS, ITEM_EMBEDDINGS, summary.n_items, summary.d_out)
    queries = _recall_queries(stream, summary.recall_queries, seed)
    truth = exact_top_k(stream.batches(), queries, 10)
    out = []
    for nprobe in nprobes:
        faiss.extract_index_ivf(index.index).nprobe = nprobe
        start = time.perf_counter()
        got, _ = index.search_rows(queries, 10)
        ms = (time.perf_counter() - start) * 1000 / len(queries)
        recall, top1 = recall_of_rows(got, truth)
        out.append({"nprobe": nprobe, "recall_at_10": round(recall, 4), "top1": round(top1, 4),
                    "search_ms_per_query": round(ms, 3)})
        print(f"  nprobe {nprobe}: {out[-1]}", flush=True)
    return out


def run_one(items: int, threads: int, seed: int, scratch: Path, nprobes: list[int], index_kind: str,
            config: str = CONFIG) -> dict:
    sys.path.insert(0, str(ROOT))
    import faiss
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # MLflow copies the bundle: no bar per file
    from learn import registry
    from learn.config import ExportConfig
    from learn.export.bundle import BundleInfo
    from learn.export.manifest import verify_manifest
    from learn.towers.model import TwinTowers
    from learn.tracking.mlflow_run import prepare_store

    import mlflow

    with RssSampler() as sampler:
        meter = Meter(sampler)
        with meter("setup"):  # not part of the export: what the pipeline holds when it gets there
            rng = np.random.default_rng(seed)
            content = np.empty((items, D_LLM), dtype=np.float32)
            for s in range(0, items, 65_536):
                block = rng.standard_normal((min(65_536, items - s), D_LLM), dtype=np.float32)
                content[s:s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
            item_ids = [f"item{i:07d}" for i in range(items)]
            torch.manual_seed(seed)
            # untrained towers; with item ID embeddings every item counts as seen (random-sized ID vectors)
            model = TwinTowers.from_config(_model_config(config), content, np.ones(items)).eval()
        work = scratch / f"n{items}"
        uri = f"sqlite:///{work / 'mlflow.db'}"
        work.mkdir(parents=True, exist_ok=True)
        prepare_store(uri)
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.create_experiment("export-scale", artifact_location=(work / "artifacts").as_uri())
        export = ExportConfig(index_kind=index_kind)  # the pipeline's defaults otherwise
        info = BundleInfo(encoder_id="bench-random-unit@1", dataset=f"synthetic-{items}", dataset_fingerprint="bench",
                          run_id=None, max_history=40, config=None)
        rss_before = round(sampler.rss() / GIB, 3)
        with mlflow.start_run(experiment_id=experiment):
            with meter("export_total"):
                exported = registry.export_trained(model, item_ids, content, work / "bundle", info, export, seed=seed,
                                                   max_history=40, tracking_uri=uri,
                                                   registered_model="bench-retriever", stages=meter)
        with meter("hashing"):
            verify_manifest(exported.bundle.directory)
        sweep = _nprobe_sweep(exported.bundle, nprobes, seed) if exported.bundle.index_kind == "ivf" else []
    summary = exported.bundle
    files = summary.manifest["files"]
    result = {
        "items": items,
        "d_llm": D_LLM,
        "d_out": summary.d_out,
        "stages": meter.stages,
        "export_wall_s": meter.stages["export_total"]["wall_s"],
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3),
        "bundle_gb": round(sum(e["size"] for e in files.values()) / GIB, 3),
        "hash_inline_tables_cpu_s": round(summary.hash_seconds, 2),
        "index": {"kind": summary.index_kind, "params": summary.manifest["info"]["index_params"],
                  "recall_at_10_vs_exact": summary.index_recall_at_10, "top1_vs_exact": summary.index_top1_vs_flat,
                  "recall_queries": summary.recall_queries},
        "registered_version": exported.version,
        "rss_before_export_gb": rss_before,
        "ivf_nprobe_sweep": sweep,
    }
    shutil.rmtree(work, ignore_errors=True)
    return result


def _child(items: int, threads: int, seed: int, scratch: str, nprobes: list[int], index_kind: str, config: str,
           queue) -> None:
    try:
        queue.put(("ok", run_one(items, threads, seed, Path(scratch), nprobes, index_kind, config)))
    except BaseException as exc:  # report it to the parent, then fail
        queue.put(("error", f"{type(exc).__name__}: {exc}"))
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=CONFIG, help="the towers' shape: this config's model section")
    parser.add_argument("--nprobe-sweep", type=int, nargs="*", default=[16, 64, 256],
                        help="after an IVF export, its recall at these nprobe values (default 16 64 256)")
    parser.add_argument("--index-kind", choices=["auto", "flat", "ivf", "hnsw"], default="auto",
                        help="export.index_kind (default auto: flat up to 100,000 items, ivf above)")
    parser.add_argument("--scratch", type=Path, default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "export_scale.json")
    args = parser.parse_args(argv)
    note = NOTE.format(config=args.config)
    print(f"export_scale: {note}; {args.threads} thread(s)", flush=True)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="export-scale-"))
    runs = []
    ctx = mp.get_context("spawn")
    for items in args.items:
        print(f"{items} items", flush=True)
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(items, args.threads, args.seed, str(scratch),
                                                    args.nprobe_sweep, args.index_kind, args.config, queue))
        proc.start()
        status, payload = queue.get()
        proc.join()
        if status != "ok":
            print(f"{items} items failed: {payload}", file=sys.stderr)
            return 1
        runs.append(payload)
        print(f"{items} items: export {payload['export_wall_s']} s, peak RSS {payload['peak_rss_gb']} GiB, "
              f"bundle {payload['bundle_gb']} GiB, {payload['index']['kind']} recall@10 "
              f"{payload['index']['recall_at_10_vs_exact']:.4f}", flush=True)
    if args.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)
    out = {"note": note, "threads": args.threads, "seed": args.seed, "index_kind": args.index_kind,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "date": time.strftime("%Y-%m-%d"), "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(f".{args.json.name}.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, args.json)
    print(f"wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Online retrieval latency and throughput: the Ray Serve application against `mlflow models serve`
and against the pyfunc called in process, on the same registered version; then an alias switch
in the middle of a run.

    python bench/serve.py --target demo=sqlite:////tmp/serve/mlflow-demo.db \\
        --target scientific=sqlite:////tmp/serve/mlflow-sci.db --json bench/results/serve.json

Each ``--target name=<tracking uri>`` names a store whose ``learn-retriever@champion`` is served.
Requests are real histories: the users' sequences of the version's own training data (its saved
config), without the last item, cut to the last ``data.max_history`` items, k=10, in a seeded
order; each request of our service carries a user id (routing and the assignment log run as in
production). Everything is on 127.0.0.1; each run is bounded by ``--requests`` and
``--max-seconds``, whichever comes first, after ``--warmup`` requests that are not counted. Each
concurrency level runs every system ``--repeats`` times, interleaved (ray, mlflow, in process, ray,
...), so that the load of a shared machine falls on all of them alike; the JSON keeps every run and
reports the median of each measure.

- ``ray_serve``: learn/serve/app.py on a local Ray (``--replicas`` replicas of ``--replica-cpus``
  CPUs; dynamic batching up to serve.max_batch_size), JSON ``POST /recommend``;
- ``mlflow_serve``: ``mlflow models serve -m models:/<name>/<version> --env-manager local`` with its
  defaults (one uvicorn worker, torch's default threads), ``POST /invocations`` with a
  ``dataframe_split`` of one row and ``params`` k=10: the anchor a user would otherwise pick;
- ``pyfunc_in_process``: ``mlflow.pyfunc.load_model(...).predict`` of a one-row DataFrame, called
  from ``concurrency`` threads of this process (no HTTP: the floor).

The client is one asyncio process (aiohttp, one connection per concurrent worker). Latency is from
sending a request to reading the whole answer; throughput is answered requests over the level's
wall time; an error is any non-200 answer or failed connection. ``server_cpu_s`` is the CPU time
the serving processes used during the level (the Ray stack: every process Ray started; mlflow: the
server's process tree; in process: this process). Answers of the three paths are compared on the
first histories (same ids, scores within 1e-5).

The alias switch: a new version is registered first (the champion's bundle published again, reused
on later runs); then ``ray_serve`` runs at concurrency 8 with anonymous requests (all to the
champion), ``champion`` is moved onto the new version after ``--switch-after`` seconds, and the run
goes on ``--switch-after`` more seconds. Reported: failed requests, how often the version in the answers changes (in receive order,
and per client worker), seconds from the alias move to the first answer of the new version, and the
replica's own load time. ``champion`` is moved back at the end. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

# the local Ray this bench starts keeps every listener on 127.0.0.1 (read when Ray is imported)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learn.serve.loopback import free_loopback_port  # noqa: E402

JSON_HEADERS = {"content-type": "application/json"}
K = 10


# -- helpers ------------------------------------------------------------------------------------
def wait_http(url: str, proc: subprocess.Popen | None, log: Path | None, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:] if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s:\n{log.read_text()[-3000:] if log else ''}")


def tree_cpu_seconds(pids: list[int], descendants_only: bool = False, exclude: tuple[int, ...] = ()) -> float:
    """user + system CPU seconds of these processes and all their live descendants (only the
    descendants with ``descendants_only``), leaving out the trees rooted at ``exclude``."""
    import psutil

    skip: set[int] = set()
    for pid in exclude:
        try:
            root = psutil.Process(pid)
            skip |= {root.pid} | {c.pid for c in root.children(recursive=True)}
        except psutil.Error:
            pass
    seen, total = set(skip), 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = ([] if descendants_only else [root]) + root.children(recursive=True)
        except psutil.Error:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


def stats(latencies_s: list[float], elapsed_s: float, errors: int) -> dict[str, Any]:
    lat = np.asarray(latencies_s) * 1000.0
    return {"requests": int(len(lat)), "errors": int(errors), "wall_s": round(elapsed_s, 3),
            "throughput_rps": round(len(lat) / elapsed_s, 1) if elapsed_s > 0 else None,
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "mean_ms": round(float(lat.mean()), 2) if len(lat) else None}


def summarize_runs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each measure over the repeated runs of a level, every run kept under ``runs``."""
    out: dict[str, Any] = {}
    for key in ("throughput_rps", "p50_ms", "p99_ms", "mean_ms", "server_cpu_ms_per_request", "mean_batch_size",
                "load_1m_after"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = round(float(np.median(values)), 2)
    out["requests"] = sum(r["requests"] for r in rows)
    out["errors"] = sum(r["errors"] for r in rows)
    out["runs"] = rows
    return out


# -- load generation ----------------------------------------------------------------------------
async def _drive(url: str, bodies: list[bytes], concurrency: int, max_requests: int, max_seconds: float,
                 on_start=None) -> tuple[list[tuple[int, float, float, int, bytes]], float]:
    """(worker, sent, received, status, body) per request, and the wall time; -1 status = no answer."""
    import aiohttp

    results: list[tuple[int, float, float, int, bytes]] = []
    counter = itertools.count()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        start = time.perf_counter()
        deadline = start + max_seconds

        async def worker(w: int) -> None:
            while True:
                i = next(counter)
                if i >= max_requests or time.perf_counter() > deadline:
                    return
                sent = time.perf_counter()
                try:
                    async with session.post(url, data=bodies[i % len(bodies)], headers=JSON_HEADERS) as r:
                        payload, status = await r.read(), r.status
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    payload, status = repr(exc).encode(), -1
                results.append((w, sent, time.perf_counter(), status, payload))

        tasks = [asyncio.ensure_future(worker(w)) for w in range(concurrency)]
        if on_start is not None:
            on_start(start)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return results, elapsed


def http_level(url: str, bodies: list[bytes], concurrency: int, args, server_cpu) -> dict[str, Any]:
    """One level against a server; ``server_cpu()`` reads the server's CPU seconds so far."""
    asyncio.run(_drive(url, bodies, concurrency, args.warmup, 60.0))  # not counted
    cpu0 = server_cpu()
    results, elapsed = asyncio.run(_drive(url, bodies, concurrency, args.requests if concurrency > 1 else
                                          args.requests_c1, args.max_seconds))
    cpu = server_cpu() - cpu0
    ok = [r for r in results if r[3] == 200]
    out = stats([r[2] - r[1] for r in ok], elapsed, len(results) - len(ok))
    out["server_cpu_s"] = round(cpu, 2)
    out["server_cpu_ms_per_request"] = round(1000 * cpu / len(ok), 2) if ok else None
    out["load_1m_after"] = round(os.getloadavg()[0], 2)  # the box is shared: other work shows here
    bad = [r for r in results if r[3] != 200][:3]
    if bad:
        out["error_examples"] = [f"{r[3]}: {r[4][:200].decode(errors='replace')}" for r in bad]
    return out


def in_process_level(model, histories: list[list[str]], concurrency: int, args) -> dict[str, Any]:
    import pandas as pd

    def call(i: int) -> float:
        t0 = time.perf_counter()
        model.predict(pd.DataFrame({"history": [histories[i % len(histories)]]}), params={"k": K})
        return time.perf_counter() - t0

    n = args.requests if concurrency > 1 else args.requests_c1
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(call, range(args.warmup)))
        cpu0 = sum(os.times()[:2])  # this process only
        start = time.perf_counter()
        deadline = start + args.max_seconds
        counter = itertools.count()
        lock = threading.Lock()
        latencies: list[float] = []

        def worker() -> None:
            while True:
                with lock:
                    i = next(counter)
                if i >= n or time.perf_counter() > deadline:
                    return
                latency = call(i)
                with lock:
                    latencies.append(latency)

        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
        elapsed = time.perf_counter() - start
        cpu = sum(os.times()[:2]) - cpu0
    out = stats(latencies, elapsed, 0)
    out["server_cpu_s"] = round(cpu, 2)
    out["server_cpu_ms_per_request"] = round(1000 * cpu / len(latencies), 2) if latencies else None
    out["load_1m_after"] = round(os.getloadavg()[0], 2)
    return out


# -- the workload -------------------------------------------------------------------------------
def workload(uri: str, name: str, n: int, seed: int, scratch: Path) -> tuple[str, list[list[str]], dict[str, Any]]:
    """(champion version, request histories, facts) from the champion's own training data."""
    from learn import registry
    from learn.data.load import load_sequences
    from learn.evaluate.ab import saved_config

    import mlflow

    client = registry.client(uri)
    mlflow.set_tracking_uri(client.tracking_uri)  # models:/ downloads read the global store
    ref = registry.resolve(client, f"models:/{name}@champion")
    bundle = registry.fetch_bundle(ref, scratch / f"bundle-{ref.registered[1]}", progress=False)
    cfg = saved_config(bundle, ref.ref)
    _, data = load_sequences(cfg.data)
    seqs, ids = data.seqs, data.item_ids
    users = np.random.default_rng(seed).permutation(len(seqs))[:n]
    histories = []
    for u in users:
        items = seqs.values[seqs.offsets[u]:seqs.offsets[u + 1]][:-1][-cfg.data.max_history:]
        if len(items):
            histories.append([str(ids[i]) for i in items])
    known = float(np.mean([x in bundle.id_to_row for h in histories for x in h]))
    if known < 0.9:
        raise RuntimeError(f"only {known:.0%} of the request histories' ids are in the served catalog: wrong data")
    facts = {"dataset": data.name, "catalog_items": len(bundle.item_ids), "model_version": ref.registered[1],
             "history_ids_in_catalog": round(known, 4),
             "d_out": bundle.d_out, "index_kind": bundle.manifest["info"]["index_kind"],
             "mean_history_len": round(float(np.mean([len(h) for h in histories])), 2),
             "towers": {k: cfg.model.__dict__[k] for k in ("d_model", "n_layers", "members", "d_out")}}
    return ref.registered[1], histories, facts


def bodies_for(histories: list[list[str]]) -> dict[str, list[bytes]]:
    return {
        "ray_serve": [json.dumps({"user_id": f"bench-user-{i}", "history": h, "k": K}).encode()
                      for i, h in enumerate(histories)],
        "ray_serve_anonymous": [json.dumps({"history": h, "k": K}).encode() for h in histories],
        "mlflow_serve": [json.dumps({"dataframe_split": {"columns": ["history"], "data": [[h]]},
                                     "params": {"k": K}}).encode() for h in histories],
    }


def check_agreement(histories: list[list[str]], model, ray_url: str, mlflow_url: str, n: int = 20) -> dict[str, Any]:
    """Ids equal and scores within 1e-5 across the three paths on the first ``n`` histories."""
    import urllib.request

    import pandas as pd

    def post(url: str, body: dict) -> dict:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=JSON_HEADERS)
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    agree, worst, answered = 0, 0.0, 0
    for h in histories[:n]:
        want = model.predict(pd.DataFrame({"history": [h]}), params={"k": K})
        ours = post(f"{ray_url}/recommend", {"history": h, "k": K})
        theirs = post(f"{mlflow_url}/invocations", {"dataframe_split": {"columns": ["history"], "data": [[h]]},
                                                    "params": {"k": K}})["predictions"][0]
        same = ours["item_ids"] == list(want["item_ids"][0]) == list(theirs["item_ids"])
        diff = max(float(np.max(np.abs(np.subtract(ours["scores"], want["scores"][0])))),
                   float(np.max(np.abs(np.subtract(theirs["scores"], want["scores"][0])))))
        worst = max(worst, diff)
        agree += bool(same and diff <= 1e-5)
        answered += len(ours["item_ids"]) == K
    return {"histories": min(n, len(histories)), "agree": agree, "with_k_items": answered, "max_abs_score_diff": worst}


# -- servers ------------------------------------------------------------------------------------
def start_mlflow_serve(uri: str, name: str, version: str, scratch: Path) -> tuple[str, subprocess.Popen, Path]:
    port = free_loopback_port()
    log = scratch / f"mlflow-serve-{port}.log"
    venv_bin = str(Path(sys.executable).parent)  # it runs `uvicorn` from the PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
           "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                                 f"models:/{name}/{version}", "--env-manager", "local", "-h", "127.0.0.1",
                                 "-p", str(port)], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=scratch)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/ping", proc, log, 300)
    return url, proc, log


def stop_process_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_ray_serve(uri: str, name: str, args, scratch: Path, log_dir: Path) -> str:
    from learn.serve.app import ServeSettings, start

    settings = ServeSettings(tracking_uri=uri, model_name=name, challenger_share=0.1, salt="bench", poll_s=args.poll_s,
                             log_dir=str(log_dir), num_replicas=args.replicas, replica_cpus=args.replica_cpus,
                             max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_s)
    return start(settings, host="127.0.0.1", port=free_loopback_port(), name="bench-retriever", timeout_s=300)


def alias_switch(uri: str, name: str, version: str, url: str, bodies: list[bytes], args, scratch: Path) -> dict[str, Any]:
    """Publish the champion's bundle again as a new version (once; reused later), move champion onto
    it mid-run, report what the clients saw, move champion back."""
    import mlflow

    from learn import registry
    from learn.tracking.mlflow_run import prepare_store

    client = registry.client(uri)
    copies = [mv for mv in client.search_model_versions(f"name='{name}'")
              if mv.tags.get("bench_copy_of") == str(version)]
    if copies:
        new_version = str(copies[0].version)
    else:
        prepare_store(uri)
        mlflow.set_tracking_uri(uri)
        bundle_dir = scratch / f"bundle-{version}" / "artifacts" / "bundle"
        mv = client.get_model_version(name, version)
        experiment = client.get_run(mv.run_id).info.experiment_id
        with mlflow.start_run(experiment_id=experiment, run_name=f"bench copy of v{version}"):
            max_history = json.loads((bundle_dir / "manifest.json").read_text())["info"]["max_history"] or 40
            new_version = registry.publish_version(client, bundle_dir, name, max_history,
                                                   tags={"bench_copy_of": str(version)})
    moved: dict[str, float] = {}

    def on_start(start: float) -> None:
        def move() -> None:
            time.sleep(args.switch_after)
            moved["at"] = time.perf_counter()
            registry.move_alias(client, name, registry.CHAMPION, new_version)
        threading.Thread(target=move, daemon=True).start()

    try:
        results, elapsed = asyncio.run(_drive(f"{url}/recommend", bodies, 8, 10 ** 9, 2 * args.switch_after,
                                              on_start=on_start))
        health = _health(url)  # before champion moves back: the swap it reports is this one
    finally:
        registry.move_alias(client, name, registry.CHAMPION, version)
    by_receive = sorted(results, key=lambda r: r[2])
    versions = [json.loads(r[4])["model_version"] if r[3] == 200 else None for r in by_receive]
    per_worker = {}
    for w in range(8):
        seq = [v for r, v in zip(by_receive, versions) if r[0] == w and v is not None]
        per_worker[w] = sum(a != b for a, b in zip(seq, seq[1:]))
    first_new = next((r[2] for r, v in zip(by_receive, versions) if v == new_version), None)
    old_after = sum(1 for r, v in zip(by_receive, versions) if v == version and first_new is not None and r[1] > first_new)
    ok = [r for r in results if r[3] == 200]
    return {"from_version": version, "to_version": new_version, "poll_s": args.poll_s,
            "requests": len(results), "failed": len(results) - len(ok), "wall_s": round(elapsed, 2),
            "version_changes_in_receive_order": sum(a != b for a, b in zip(versions, versions[1:])),
            "version_changes_per_worker_max": max(per_worker.values()),
            "old_answers_sent_after_first_new": old_after,
            "seconds_from_alias_move_to_first_new_answer": (round(first_new - moved["at"], 3)
                                                            if first_new is not None and "at" in moved else None),
            "replica_load_s": health.get("last_swap_s"),
            "p50_ms": stats([r[2] - r[1] for r in ok], elapsed, 0)["p50_ms"],
            "p99_ms": stats([r[2] - r[1] for r in ok], elapsed, 0)["p99_ms"]}


def _cpu_model() -> str | None:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return None


def _health(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/healthz", timeout=30) as r:
        return json.loads(r.read())


# -- main ---------------------------------------------------------------------------------------
def run_target(label: str, uri: str, args, scratch: Path) -> dict[str, Any]:
    import mlflow
    import torch
    import ray

    from learn.serve.app import stop

    print(f"== {label}: {uri}", flush=True)
    scratch = scratch / label  # one directory per target: downloads are cached by version number
    scratch.mkdir(parents=True, exist_ok=True)
    version, histories, facts = workload(uri, args.model, args.histories, args.seed, scratch)
    bodies = bodies_for(histories)
    out: dict[str, Any] = {"tracking_uri": uri, **facts, "histories": len(histories), "levels": {}}
    print(f"   {facts}", flush=True)
    mlflow.set_tracking_uri(uri)
    torch.set_num_threads(args.in_process_threads)
    model = mlflow.pyfunc.load_model(f"models:/{args.model}/{version}")

    mlflow_url, proc, _ = start_mlflow_serve(uri, args.model, version, scratch)
    ray_url = start_ray_serve(uri, args.model, args, scratch, scratch / f"assignments-{label}")
    try:
        out["agreement"] = check_agreement(histories, model, ray_url, mlflow_url)
        print(f"   answers agree: {out['agreement']}", flush=True)
        # Ray's processes (GCS, raylet, controller, proxy, replicas, ...) are this process's descendants
        # outside the mlflow server's tree; the client (this process) is counted for neither server
        def ray_cpu() -> float:
            return tree_cpu_seconds([os.getpid()], descendants_only=True, exclude=(proc.pid,))

        def mlflow_cpu() -> float:
            return tree_cpu_seconds([proc.pid])

        def ray_run(c: int) -> dict[str, Any]:
            before = _health(ray_url)
            row = http_level(f"{ray_url}/recommend", bodies["ray_serve"], c, args, ray_cpu)
            after = _health(ray_url)
            batches = after["batches"] - before["batches"]
            row["mean_batch_size"] = round((after["answered"] - before["answered"]) / batches, 2) if batches else None
            return row  # the mean batch size counts the warm-up requests too

        systems = {"ray_serve": ray_run,
                   "mlflow_serve": lambda c: http_level(f"{mlflow_url}/invocations", bodies["mlflow_serve"], c, args,
                                                        mlflow_cpu),
                   "pyfunc_in_process": lambda c: in_process_level(model, histories, c, args)}
        for c in args.concurrency:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
            for repeat in range(args.repeats):  # interleaved, so a change in the box's load hits every system
                for name, run in systems.items():
                    row = run(c)
                    runs[name].append(row)
                    print(f"   c={c:<3} {name:<18} {row['throughput_rps']:>8} req/s  p50 {row['p50_ms']:>7} ms  "
                          f"p99 {row['p99_ms']:>7} ms  errors {row['errors']}  cpu {row['server_cpu_ms_per_request']} "
                          f"ms/req  load {row['load_1m_after']}  (run {repeat + 1})", flush=True)
            out["levels"][str(c)] = {name: summarize_runs(rows) for name, rows in runs.items()}
        stop_process_group(proc)
        if args.no_switch:
            return out
        out["alias_switch"] = alias_switch(uri, args.model, version, ray_url, bodies["ray_serve_anonymous"], args, scratch)
        print(f"   alias switch: {out['alias_switch']}", flush=True)
    finally:
        stop_process_group(proc)
        stop("bench-retriever")
        ray.shutdown()
    return out


def main() -> int:
    from learn.config import ServeConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", required=True, help="name=<tracking uri> (repeatable)")
    p.add_argument("--model", default="learn-retriever")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=3000, help="per level at concurrency > 1")
    p.add_argument("--requests-c1", type=int, default=1000, help="per level at concurrency 1")
    p.add_argument("--max-seconds", type=float, default=20.0, help="per level")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--histories", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-s", type=float, default=ServeConfig().batch_wait_s, help="serve.batch_wait_s")
    p.add_argument("--poll-s", type=float, default=1.0)
    p.add_argument("--switch-after", type=float, default=15.0, help="seconds before (and after) the alias move")
    p.add_argument("--no-switch", action="store_true", help="leave out the alias switch")
    p.add_argument("--repeats", type=int, default=3, help="runs of each system per level, interleaved; medians reported")
    p.add_argument("--in-process-threads", type=int, default=1, help="torch threads of the in-process pyfunc")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups (servers, Ray) on a kill

    import psutil

    scratch = Path(tempfile.mkdtemp(prefix="learn-bench-serve-"))
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu_model": _cpu_model(),
                    "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1),
                    "load_avg_start": [round(x, 2) for x in os.getloadavg()]},
        "args": {k: v for k, v in vars(args).items() if k not in ("target", "json")},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "targets": {}}
    for spec in args.target:
        label, _, uri = spec.partition("=")
        if not uri:
            p.error(f"--target {spec!r}: expected name=<tracking uri>")
        result["targets"][label] = run_target(label, uri, args, scratch)
    result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2)
    if args.json:
        from learn.utils import atomic_write_text

        atomic_write_text(args.json, text + "\n")
        print(f"wrote {args.json}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

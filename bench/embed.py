"""Item-embedding throughput: a naive HF loop, the project's HF encoder and the Ray Data pipeline.

    python bench/embed.py --data ../shared/data/amazon-unisrec/Scientific --json bench/results/embed.json --limit 1000

Every method embeds the same item texts (the dataset's catalog, in catalog order, first --limit)
with the same model, the same --threads CPU threads in all, in one process run:

- naive_hf_loop: AutoTokenizer/AutoModel, batches of --batch-size in catalog order, each padded to
  its longest text, masked mean pooling, L2 norm (what one writes without thinking about padding).
- hf_sorted: ``learn.embed.hf.HFEncoder.encode`` (texts sorted by token length, then batched).
- ray_data_1 / ray_data_2: ``learn.embed.ray_data.embed_catalog_ray`` with 1 and 2 encoder actors
  (--threads split between them) into a fresh, empty content store, so every item is embedded.
- vllm_cpu: ``learn.embed.vllm_encoder.VLLMEncoder`` (vLLM's CPU build, pooling mode) with the
  interpreter of --vllm-python (default $LEARN_VLLM_PYTHON, else .venv-vllm/bin/python from
  ``make vllm-env``); null with a note when there is none. vLLM runs in its child process and
  binds its compute threads itself (VLLM_CPU_OMP_THREADS_BIND): here to the first --threads
  cores, like the other rows (--vllm-bind auto keeps vLLM's default, which on a 2-core box keeps
  one core for its front end and computes on the other).

Every row is timed the same way, from a cold start: one call builds what the row needs (tokenizer
and model / the Ray Data actor pool, a model in each actor / the vLLM engine), embeds the texts
and tears it down. Each row runs that call twice per round: on the whole list (``end_to_end_s``) and
on its first --probe texts (the start-up cost, ``startup_s``). Steady-state items/s is
(items - probe) / (end_to_end_s - startup_s): the rate once everything runs, start-up excluded by
difference, the same for every row. Before the rounds each row runs once untimed on the probe
texts, so the process's one-time costs (imports, model files read into the OS cache) fall on no
row. Ray itself is started once beforehand (its start is reported in
the notes). The rows run interleaved, round-robin over --rounds rounds (the row order rotates each
round), so a change of load on a shared machine does not favour one row; each figure is the median
over rounds. Vectors of every row are checked against hf_sorted (max abs difference in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learn.config import DataConfig, EmbedConfig  # noqa: E402
from learn.data.load import item_texts, load_dataset  # noqa: E402
from learn.embed.hf import HFEncoder  # noqa: E402
from learn.embed.models import encoder_id, resolve_model  # noqa: E402
from learn.utils import atomic_write_text  # noqa: E402


def load_catalog(data: str, limit: int | None) -> tuple[list[str], list[str]]:
    """Item ids and texts as the pipeline embeds them (the reader's default text template)."""
    raw = load_dataset(DataConfig(path=data))
    texts = item_texts(raw, None)
    ids = raw.items["item_id"].astype(str).tolist()
    texts = texts.tolist()
    if limit:
        ids, texts = ids[:limit], texts[:limit]
    return ids, texts


@torch.inference_mode()
def naive_hf_loop(model_path: str, texts: list[str], batch_size: int, max_tokens: int) -> np.ndarray:
    """Unsorted batches, tokenizer padding, masked mean pooling, L2 norm; the model loaded here."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    out = []
    for s in range(0, len(texts), batch_size):
        batch = tokenizer(texts[s:s + batch_size], padding=True, truncation=True, max_length=max_tokens,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
    return np.concatenate(out)


def hf_sorted(cfg: EmbedConfig, texts: list[str]) -> np.ndarray:
    return HFEncoder.from_config(cfg).encode(texts, progress=False)


def ray_data(cfg: EmbedConfig, ids: list[str], texts: list[str], actors: int, threads: int) -> np.ndarray:
    """Into a fresh, empty content store, so every item is embedded."""
    from learn.embed.ray_data import embed_catalog_ray
    from learn.embed.store import ContentStore

    run_cfg = replace(cfg, executor="ray_data", num_actors=actors, cpus_per_actor=max(1.0, threads / actors))
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        vectors, stats = embed_catalog_ray(run_cfg, ids, texts, ContentStore(Path(tmp) / "content.parquet"),
                                           progress=False)
    if stats["items_embedded"] != len(ids):
        raise RuntimeError(f"ray_data_{actors}: embedded {stats['items_embedded']} of {len(ids)} items")
    return vectors


def vllm_cpu(cfg: EmbedConfig, texts: list[str], python: str, bind: str | None) -> np.ndarray:
    """The vLLM backend: engine started, texts embedded, engine closed."""
    from learn.embed.vllm_encoder import VLLMEncoder

    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    if bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    try:
        encoder = VLLMEncoder.from_config(replace(cfg, backend="vllm", vllm_python=python))
    finally:
        if bind and saved is None:
            del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
        elif bind:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
    with encoder:
        return encoder.encode(texts, progress=False)


def timed(fn, ids: list[str], texts: list[str]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    vectors = fn(ids, texts)
    return vectors, time.perf_counter() - start


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a UniSRec dataset directory (or any data.path the loader reads)")
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--limit", type=int, default=None, help="first N items of the catalog (default: all)")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for every method")
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache/learn"))
    ap.add_argument("--vllm-python", default=os.environ.get("LEARN_VLLM_PYTHON") or str(ROOT / ".venv-vllm/bin/python"),
                    help="an interpreter with vLLM (make vllm-env builds .venv-vllm)")
    ap.add_argument("--vllm-bind", default=None,
                    help="VLLM_CPU_OMP_THREADS_BIND for the vLLM run (default: cores 0..threads-1; 'auto': vLLM's)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="embed the catalog N times over, each copy's texts made distinct by a suffix, so that "
                         "fixed start-up costs weigh less (default 1)")
    ap.add_argument("--methods", default="naive_hf_loop,hf_sorted,ray_data_1,ray_data_2,vllm_cpu",
                    help="comma-separated subset of the rows to run (hf_sorted always runs: the reference)")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin rounds over the rows (median reported)")
    ap.add_argument("--probe", type=int, default=8, help="texts of the start-up call (its time is the start-up cost)")
    args = ap.parse_args()
    methods = set(args.methods.split(",")) | {"hf_sorted"}

    if args.vllm_bind is None:
        args.vllm_bind = f"0-{args.threads - 1}" if args.threads > 1 else "0"
    ids, texts = load_catalog(args.data, args.limit)
    if args.repeat > 1:
        ids = [f"{i}#{r}" for r in range(args.repeat) for i in ids]
        texts = [t if r == 0 else f"{t} (copy {r})" for r in range(args.repeat) for t in texts]
    n = len(ids)
    if not 0 < args.probe < n:
        ap.error(f"--probe must be in [1, {n - 1}] (the start-up call embeds fewer texts than the whole run)")
    cfg = EmbedConfig(model=args.model, max_tokens=args.max_tokens, batch_size=args.batch_size,
                      cache_dir=args.cache_dir)
    resolved = resolve_model(args.model, cache_dir=args.cache_dir)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(f"{n} items from {args.data}, model {args.model}, batch {args.batch_size}, {args.threads} threads, "
          f"{args.rounds} rounds; load average {load_before[0]:.2f}", flush=True)

    rows = {"naive_hf_loop": lambda i, t: naive_hf_loop(resolved.path, t, args.batch_size, args.max_tokens),
            "hf_sorted": lambda i, t: hf_sorted(cfg, t),
            "ray_data_1": lambda i, t: ray_data(cfg, i, t, 1, args.threads),
            "ray_data_2": lambda i, t: ray_data(cfg, i, t, 2, args.threads),
            "vllm_cpu": lambda i, t: vllm_cpu(cfg, t, args.vllm_python, args.vllm_bind)}
    notes = {}
    if "vllm_cpu" in methods and not Path(args.vllm_python).exists():
        methods.discard("vllm_cpu")
        notes["vllm_cpu"] = f"not run: no interpreter with vLLM at {args.vllm_python} (make vllm-env)"
    elif "vllm_cpu" in methods:
        notes["vllm_cpu"] = f"VLLM_CPU_OMP_THREADS_BIND={args.vllm_bind}"
    order = [k for k in rows if k in methods]
    if any(k.startswith("ray_data_") for k in order):
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
        notes.update({k: f"Ray started once beforehand ({time.perf_counter() - start:.1f} s)"
                      for k in order if k.startswith("ray_data_")})
    full: dict[str, list[float]] = {k: [] for k in order}
    probe: dict[str, list[float]] = {k: [] for k in order}
    vectors: dict[str, np.ndarray] = {}
    try:
        for k in order:  # untimed: the process's one-time costs (imports, files into the OS cache) go to no row
            rows[k](ids[:args.probe], texts[:args.probe])
        for r in range(args.rounds):
            for k in order[r % len(order):] + order[:r % len(order)]:
                probe[k].append(timed(rows[k], ids[:args.probe], texts[:args.probe])[1])
                vectors[k], seconds = timed(rows[k], ids, texts)
                full[k].append(seconds)
                print(f"round {r + 1}: {k} {seconds:.2f} s (start-up call {probe[k][-1]:.2f} s)", flush=True)
    finally:
        if any(k.startswith("ray_data_") for k in order):
            ray.shutdown()

    end_to_end = {k: statistics.median(v) for k, v in full.items()}
    startup = {k: statistics.median(v) for k, v in probe.items()}
    steady = {k: (round((n - args.probe) / (end_to_end[k] - startup[k]), 1) if end_to_end[k] > startup[k] else None)
              for k in order}
    ref = vectors["hf_sorted"]
    diff = {k: float(np.abs(v - ref).max()) for k, v in vectors.items()}
    load_after = os.getloadavg()
    result = {"items_per_s_end_to_end": {k: round(n / s, 1) for k, s in end_to_end.items()},
              "items_per_s_steady_state": steady,
              "seconds": {"end_to_end": {k: round(s, 3) for k, s in end_to_end.items()},
                          "startup": {k: round(s, 3) for k, s in startup.items()},
                          "per_round_end_to_end": full, "per_round_startup": probe},
              "max_abs_diff_vs_hf_sorted": diff, "items": n, "probe_items": args.probe, "rounds": args.rounds,
              "model": args.model, "encoder_id": encoder_id(resolved, HFEncoder.pooling, args.max_tokens, cfg.dtype),
              "min_cosine_vs_hf_sorted": {k: float((v * ref).sum(1).min()) for k, v in vectors.items()},
              "batch_size": args.batch_size, "repeat": args.repeat,
              "threads": args.threads, "machine": machine(),
              "load_average": {"before": round(load_before[0], 2), "after": round(load_after[0], 2)},
              "notes": notes, "command": " ".join([Path(sys.executable).name, *sys.argv])}

    print(f"\n{'method':<15} {'e2e items/s':>12} {'steady items/s':>15} {'e2e s':>8} {'start-up s':>11} "
          f"{'max|diff|':>10}  note")
    for k in order:
        s = f"{steady[k]:.1f}" if steady[k] else "-"
        print(f"{k:<15} {n / end_to_end[k]:12.1f} {s:>15} {end_to_end[k]:8.2f} {startup[k]:11.2f} "
              f"{diff[k]:10.1e}  {notes.get(k, '')}")
    for k in set(notes) - set(order):
        print(f"{k:<15} {'-':>12} {'-':>15} {'-':>8} {'-':>11} {'-':>10}  {notes[k]}")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after (shared machine: numbers are noisy)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

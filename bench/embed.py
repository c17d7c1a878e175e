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

items/s for the in-process loops and vLLM count encoding only (model loaded / engine started,
one warm-up call; the engine start is reported in the notes); for Ray Data
they count the whole call: actor start, model load in each actor, encoding, content-store
writes (Ray itself is started beforehand). Vectors of every method are checked against
hf_sorted (max abs difference in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
def naive_hf_loop(model_path: str, texts: list[str], batch_size: int, max_tokens: int) -> tuple[np.ndarray, float]:
    """(vectors, encode seconds): unsorted batches, tokenizer padding, masked mean pooling, L2 norm."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    out = []
    model(**tokenizer(texts[:8], padding=True, return_tensors="pt"))  # warm-up, not timed
    start = time.perf_counter()
    for s in range(0, len(texts), batch_size):
        batch = tokenizer(texts[s:s + batch_size], padding=True, truncation=True, max_length=max_tokens,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
    return np.concatenate(out), time.perf_counter() - start


def hf_sorted(cfg: EmbedConfig, texts: list[str]) -> tuple[np.ndarray, float]:
    encoder = HFEncoder.from_config(cfg)
    encoder.encode(texts[:8], progress=False)  # warm-up, not timed
    start = time.perf_counter()
    vectors = encoder.encode(texts, progress=False)
    return vectors, time.perf_counter() - start


def ray_data(cfg: EmbedConfig, ids: list[str], texts: list[str], actors: int, threads: int
             ) -> tuple[np.ndarray, float]:
    from learn.embed.ray_data import embed_catalog_ray
    from learn.embed.store import ContentStore

    run_cfg = replace(cfg, executor="ray_data", num_actors=actors, cpus_per_actor=max(1.0, threads / actors))
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        start = time.perf_counter()
        vectors, stats = embed_catalog_ray(run_cfg, ids, texts, ContentStore(Path(tmp) / "content.parquet"),
                                           progress=False)
        seconds = time.perf_counter() - start
    if stats["items_embedded"] != len(ids):
        raise RuntimeError(f"ray_data_{actors}: embedded {stats['items_embedded']} of {len(ids)} items")
    return vectors, seconds


def vllm_cpu(cfg: EmbedConfig, texts: list[str], python: str, bind: str | None) -> tuple[np.ndarray, float, float]:
    """(vectors, encode seconds, engine start seconds) with the vLLM backend."""
    from learn.embed.vllm_encoder import VLLMEncoder

    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    if bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    try:
        start = time.perf_counter()
        encoder = VLLMEncoder.from_config(replace(cfg, backend="vllm", vllm_python=python))
        started = time.perf_counter() - start
    finally:
        if bind and saved is None:
            del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
        elif bind:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
    try:
        encoder.encode(texts[:8], progress=False)  # warm-up, not timed
        start = time.perf_counter()
        vectors = encoder.encode(texts, progress=False)
        return vectors, time.perf_counter() - start, started
    finally:
        encoder.close()


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
    args = ap.parse_args()
    methods = set(args.methods.split(",")) | {"hf_sorted"}

    if args.vllm_bind is None:
        args.vllm_bind = f"0-{args.threads - 1}" if args.threads > 1 else "0"
    ids, texts = load_catalog(args.data, args.limit)
    if args.repeat > 1:
        ids = [f"{i}#{r}" for r in range(args.repeat) for i in ids]
        texts = [t if r == 0 else f"{t} (copy {r})" for r in range(args.repeat) for t in texts]
    n = len(ids)
    cfg = EmbedConfig(model=args.model, max_tokens=args.max_tokens, batch_size=args.batch_size,
                      cache_dir=args.cache_dir)
    resolved = resolve_model(args.model, cache_dir=args.cache_dir)
    model_path = resolved.path
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(f"{n} items from {args.data}, model {args.model}, batch {args.batch_size}, {args.threads} threads; "
          f"load average {load_before[0]:.2f}", flush=True)

    seconds: dict[str, float | None] = {}
    vectors: dict[str, np.ndarray] = {}
    if "naive_hf_loop" in methods:
        vectors["naive_hf_loop"], seconds["naive_hf_loop"] = naive_hf_loop(model_path, texts, args.batch_size,
                                                                            args.max_tokens)
    vectors["hf_sorted"], seconds["hf_sorted"] = hf_sorted(cfg, texts)

    ray_rows = [k for k in (1, 2) if f"ray_data_{k}" in methods]
    if ray_rows:
        import ray

        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
        try:
            for k in ray_rows:
                vectors[f"ray_data_{k}"], seconds[f"ray_data_{k}"] = ray_data(cfg, ids, texts, k, args.threads)
        finally:
            ray.shutdown()

    notes = {"naive_hf_loop": "encode only (model loaded, warmed up)",
             "hf_sorted": "encode only (model loaded, warmed up)",
             "ray_data_1": "end to end: actor start + model load + encode + store writes",
             "ray_data_2": "end to end: actor start + model load + encode + store writes"}
    notes = {k: v for k, v in notes.items() if k in seconds}
    if "vllm_cpu" not in methods:
        pass
    elif Path(args.vllm_python).exists():
        vectors["vllm_cpu"], seconds["vllm_cpu"], started = vllm_cpu(cfg, texts, args.vllm_python, args.vllm_bind)
        notes["vllm_cpu"] = (f"encode only (engine started in {started:.1f} s, warmed up); "
                             f"VLLM_CPU_OMP_THREADS_BIND={args.vllm_bind}")
    else:
        seconds["vllm_cpu"] = None
        notes["vllm_cpu"] = f"not run: no interpreter with vLLM at {args.vllm_python} (make vllm-env)"

    rate = {k: (round(n / s, 1) if s else None) for k, s in seconds.items()}
    ref = vectors["hf_sorted"]
    diff = {k: float(np.abs(v - ref).max()) for k, v in vectors.items()}
    load_after = os.getloadavg()
    result = {"items_per_s": rate, "seconds": {k: (round(s, 3) if s else None) for k, s in seconds.items()},
              "max_abs_diff_vs_hf_sorted": diff, "items": n, "model": args.model,
              "encoder_id": encoder_id(resolved, HFEncoder.pooling, args.max_tokens, cfg.dtype),
              "min_cosine_vs_hf_sorted": {k: float((v * ref).sum(1).min()) for k, v in vectors.items()},
              "batch_size": args.batch_size, "repeat": args.repeat,
              "threads": args.threads, "machine": machine(),
              "load_average": {"before": round(load_before[0], 2), "after": round(load_after[0], 2)},
              "notes": notes, "command": " ".join([Path(sys.executable).name, *sys.argv])}

    print(f"\n{'method':<15} {'items/s':>9} {'seconds':>9} {'max|diff|':>10}  note")
    for k in seconds:
        r = f"{rate[k]:.1f}" if rate[k] else "-"
        s = f"{seconds[k]:.2f}" if seconds[k] else "-"
        d = f"{diff[k]:.1e}" if k in diff else "-"
        print(f"{k:<15} {r:>9} {s:>9} {d:>10}  {notes[k]}")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after (shared machine: numbers are noisy)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

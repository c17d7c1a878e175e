"""Training step time of full softmax vs sampled softmax, side by side in one process, as the catalog grows.

    python bench/step_time.py --items 4385 100000 1000000 --json bench/results/step_time.json

Towers as in conf/scientific.yaml (override with --set key=value); content vectors are seeded random
unit vectors of the encoder's width (384, MiniLM), not embeddings (embedding speed is bench/embed.py's
job); sequences are synthetic (``--users`` users, 7 items each, Scientific's mean). Each row: the mean
wall time of ``--steps`` optimisation steps after 2 warm-up steps, on the same batches for both
recipes. Full softmax is skipped where its [batch, catalog] logits and catalog pass would not fit
(``--full-max-items``). With item ID tables (the seventh freeze), ``--id-gradients sparse,dense`` times
each row with sparse ID gradients (lazy rows, learn/train/optim.py) and with dense ones (AdamW over the
whole tables, as before) on the same batches. Prints a table; writes JSON with --json. Measures, asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learn.config import load_config  # noqa: E402
from learn.towers.model import TwinTowers  # noqa: E402
from learn.train.batches import item_popularity  # noqa: E402
from learn.train.loop import make_optimizer, train_step  # noqa: E402
from learn.train.recipes import epoch_batches  # noqa: E402
from learn.utils import atomic_write_text  # noqa: E402


def step_seconds(cfg, content: np.ndarray, train: list[np.ndarray], steps: int, sparse_ids: bool = True) -> float:
    torch.manual_seed(0)
    model = TwinTowers.from_config(cfg.model, content, item_popularity(train, len(content)), train,
                                   cfg.data.max_history)  # IDs: the seen items
    model.sparse_id_gradients(sparse_ids)
    opt = make_optimizer(model, cfg.train)
    batches = iter(epoch_batches(train, cfg.train, cfg.data.max_history, seed=0, epoch=1, num_items=len(content)))
    times = []
    for i in range(steps + 2):
        batch = next(batches)
        start = time.perf_counter()
        train_step(model, batch, opt, None, cfg.train)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return float(np.mean(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, nargs="+", default=[4385, 100_000, 1_000_000])
    ap.add_argument("--users", type=int, default=8442)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--full-max-items", type=int, default=200_000)
    ap.add_argument("--config", default="conf/scientific.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. --set train.num_negatives=512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--id-gradients", default="sparse",
                    help="towers with item IDs: comma-separated sparse (the default: rows a step touches) and/or "
                         "dense (every row each step, the baseline), each measured on the same batches")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / args.config, args.set)
    rows = []
    print("content vectors: seeded random unit vectors (384-d); sequences: synthetic, 7 items per user")
    modes = args.id_gradients.split(",") if cfg.model.item_id_embedding else ["-"]
    if not set(modes) <= {"sparse", "dense", "-"}:
        raise SystemExit(f"--id-gradients: sparse and/or dense, got {args.id_gradients!r}")
    print(f"{'items':>10} {'recipe':>16} {'ID grads':>9} {'ms/step':>9}")
    for n in args.items:
        rng = np.random.default_rng(0)
        content = rng.standard_normal((n, 384)).astype(np.float32)
        content /= np.linalg.norm(content, axis=1, keepdims=True)
        train = [rng.integers(0, n, 7) for _ in range(args.users)]
        for recipe in ("full_softmax", "sampled_softmax"):
            if recipe == "full_softmax" and n > args.full_max_items:
                print(f"{n:>10} {recipe:>16} {'skipped':>9}  (catalog > --full-max-items)")
                continue
            run = replace(cfg, train=replace(cfg.train, recipe=recipe))
            for mode in modes:
                ms = 1000 * step_seconds(run, content, train, args.steps, sparse_ids=mode != "dense")
                rows.append({"items": n, "recipe": recipe, "ms_per_step": round(ms, 1), "id_gradients": mode,
                             "batch_size": cfg.train.batch_size, "num_negatives": cfg.train.num_negatives,
                             "members": cfg.model.members, "id_members": cfg.model.id_members,
                             "threads": args.threads})
                print(f"{n:>10} {recipe:>16} {mode:>9} {ms:>9.1f}", flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps({"rows": rows, "config": args.config, "overrides": args.set}, indent=2))


if __name__ == "__main__":
    main()

"""Training throughput: one process (the reference) vs Ray Train DDP, side by side in one run.

    python bench/train.py --data ../shared/data/amazon-unisrec/Scientific --json bench/results/train.json
    python bench/train.py --data demo --epochs 2 --workers 2

Both paths train the same towers from the same initial weights on the same split for `--epochs`
epochs with validation switched off (`train.eval_every` past the last epoch, so only the final
epoch evaluates, identically for both); reports training sequences (users with >= 2 training
items) per second of training wall time, and the last epoch's loss so the runs can be checked
against each other. Content vectors come from the content store (embedded once if missing).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset directory (or demo)")
    p.add_argument("--config", default="conf/scientific.yaml")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default="bench/results/train.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = p.parse_args()

    import ray
    import torch

    from learn.config import load_config
    from learn.data.load import load_sequences
    from learn.embed.catalog import embed_items
    from learn.pipeline import build_model
    from learn.train.distributed import fit_distributed
    from learn.train.loop import fit
    from learn.utils import seed_everything

    cfg = load_config(ROOT / args.config, [f"data.path={args.data}", f"train.epochs={args.epochs}",
                                           f"train.eval_every={args.epochs}", "train.patience=0",
                                           f"train.num_workers={args.workers}", *args.set])
    _, data = load_sequences(cfg.data)
    splits = data.split(cfg.data.split, cfg.data.time_cut, cfg.seed)
    content, _, encoder_id = embed_items(cfg.embed, data.name, data.item_ids, data.texts, progress=False)
    sequences = sum(1 for s in splits.train if len(s) >= 2) * args.epochs
    seed_everything(cfg.seed)
    model = build_model(cfg, content)
    init = copy.deepcopy(model.state_dict())

    rows = {}
    start = time.perf_counter()
    local = fit(model, splits, cfg.train, cfg.eval, cfg.data.max_history, seed=cfg.seed, progress=False)
    rows["one_process"] = (time.perf_counter() - start, local.history[-1]["train_loss"], torch.get_num_threads())

    model.load_state_dict(init)
    ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    dist = fit_distributed(model, splits, cfg.train, cfg.eval, cfg.data.max_history, seed=cfg.seed,
                           storage_path=Path("/tmp") / f"bench-train-{time.time_ns()}")
    rows[f"ray_ddp_{args.workers}"] = (time.perf_counter() - start, dist.history[-1]["train_loss"], 1)
    ray.shutdown()

    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "dataset": data.name,
              "encoder_id": encoder_id, "epochs": args.epochs, "train_sequences_per_epoch": sequences // args.epochs,
              "sequences_per_s": {k: round(sequences / v[0], 1) for k, v in rows.items()},
              "wall_s": {k: round(v[0], 1) for k, v in rows.items()},
              "last_epoch_loss": {k: v[1] for k, v in rows.items()}}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{'path':<14} {'seq/s':>8} {'wall s':>8} {'last loss':>10}  ({data.name}, {args.epochs} epochs, "
          f"{sequences // args.epochs} sequences/epoch)")
    for k, (wall, loss, _) in rows.items():
        print(f"{k:<14} {sequences / wall:8.1f} {wall:8.1f} {loss:10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

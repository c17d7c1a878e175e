"""Training throughput: one process (the reference) vs Ray Train DDP, side by side in one run.

    python bench/train.py --data ../shared/data/amazon-unisrec/Scientific --json bench/results/train.json
    python bench/train.py --data demo --config conf/tiny.yaml --epochs 3 --workers 2

Both paths train the same towers from the same initial weights on the same split for the same
`--epochs` epochs (>= 2) with validation switched off (`train.eval_every` = the last epoch, so only
the final epoch evaluates, identically for both). Each epoch's start (DDP: rank 0, via the worker
hook) or end (one process) is stamped, which splits the wall time into:

- steady_epoch_s: the median time between consecutive epoch stamps (epochs before the last, so no
  evaluation); for DDP it holds the per-epoch checkpoint that rank 0 reports.
- checkpoint_s (DDP): the cost of that checkpoint measured apart (the same state saved with
  torch.save and copied into a storage directory, median of 5), so steady-state throughput is
  given both with and without it.
- startup_s: the call's start to the first epoch (Ray Train's controller, worker group and process
  group start, the spec shipped to the workers); for one process ~0.
- rest_s: the wall time left (the last epoch with its evaluation, Ray Train's teardown, the final
  checkpoint loaded back).

Throughput is training sequences (users with >= 2 training items) per second. The last epoch's
loss checks the runs against each other. Content vectors come from the content store.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learn.utils import atomic_write_text  # noqa: E402


def _stamp(path: Path, epoch: int, rank: int) -> None:
    """Worker hook: append this epoch's start (wall clock, shared by the processes of one machine)."""
    with open(path, "a") as f:
        f.write(f"{epoch} {rank} {time.time()!r}\n")


def _checkpoint_cost(model, train_cfg, directory: Path, repeats: int = 5) -> float:
    """Seconds to write what rank 0 checkpoints each epoch (model, optimizer and scheduler state) and
    copy it into a storage directory, as Ray Train persists it; the median of ``repeats``."""
    import torch

    from learn.train.loop import make_optimizer, make_scheduler

    opt = make_optimizer(model, train_cfg)
    sched = make_scheduler(opt, train_cfg, 1)
    times = []
    for i in range(repeats):
        begin = time.perf_counter()
        src = directory / f"src_{i}"
        src.mkdir(parents=True)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                   src / "state.pt")
        shutil.copytree(src, directory / f"stored_{i}")
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _row(wall: float, start: float, first_epoch: float, last_epoch: float, steady: float, checkpoint: float,
         per_epoch: int, loss: float) -> dict[str, float]:
    """One path's times, from the call's start and end and its first and last epoch's start."""
    return {"wall_s": round(wall, 3), "startup_s": round(first_epoch - start, 3),
            "steady_epoch_s": round(steady, 4), "checkpoint_s": round(checkpoint, 4),
            "rest_s": round(start + wall - last_epoch, 3),
            "steady_sequences_per_s": round(per_epoch / steady, 1),
            "steady_sequences_per_s_without_checkpoint": round(per_epoch / max(steady - checkpoint, 1e-9), 1),
            "last_epoch_loss": loss}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset directory (or demo)")
    p.add_argument("--config", default="conf/scientific.yaml")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default="bench/results/train.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be >= 2: steady state is measured between epochs")

    import numpy as np
    import ray
    import torch

    from learn.config import load_config
    from learn.data.load import load_sequences
    from learn.embed.catalog import embed_items
    from learn.towers.model import TwinTowers
    from learn.train.distributed import fit_distributed
    from learn.train.fit import fit
    from learn.utils import seed_everything

    cfg = load_config(ROOT / args.config, [f"data.path={args.data}", f"train.epochs={args.epochs}",
                                           f"train.eval_every={args.epochs}", "train.patience=0",
                                           f"train.num_workers={args.workers}", *args.set])
    _, data = load_sequences(cfg.data)
    splits = data.split(cfg.data.split, cfg.data.time_cut, cfg.seed)
    content, _, encoder_id = embed_items(cfg.embed, data.name, data.item_ids, data.texts, progress=False)
    sequences = sum(1 for s in splits.train if len(s) >= 2) * args.epochs
    seed_everything(cfg.seed)
    model = TwinTowers.from_config(cfg.model, content, splits.train_popularity(data.num_items), splits.train,
                                   cfg.data.max_history)
    init = copy.deepcopy(model.state_dict())

    per_epoch = sequences // args.epochs
    rows = {}
    ends: list[float] = []
    start = time.perf_counter()
    local = fit(model, splits, cfg.train, cfg.eval, cfg.data.max_history, seed=cfg.seed, progress=False,
                on_epoch=lambda epoch, row: ends.append(time.perf_counter()))
    wall = time.perf_counter() - start
    # epoch e ends at ends[e - 1]; epochs 2 .. N-1 are steady (no start-up, no evaluation)
    steady = statistics.median(np.diff(ends[:-1])) if len(ends) > 2 else ends[0] - start
    rows["one_process"] = _row(wall, start, ends[0] - steady, ends[-2], steady, 0.0, per_epoch,
                               local.history[-1]["train_loss"])

    model.load_state_dict(init)
    ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        stamps = Path(tmp) / "epoch_starts.txt"
        start_wall, start = time.time(), time.perf_counter()
        dist = fit_distributed(model, splits, cfg.train, cfg.eval, cfg.data.max_history, seed=cfg.seed,
                               storage_path=Path(tmp) / "ray", worker_hook=functools.partial(_stamp, stamps))
        wall = time.perf_counter() - start
        starts = sorted(float(t) - start_wall + start for e, r, t in
                        (line.split() for line in stamps.read_text().splitlines()) if r == "0")
        checkpoint = _checkpoint_cost(model, cfg.train, Path(tmp) / "ckpt")
    ray.shutdown()
    steady = statistics.median(np.diff(starts))
    rows[f"ray_ddp_{args.workers}"] = _row(wall, start, starts[0], starts[-1], steady, checkpoint, per_epoch,
                                           dist.history[-1]["train_loss"])

    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "dataset": data.name,
              "encoder_id": encoder_id, "epochs": args.epochs, "train_sequences_per_epoch": per_epoch,
              "torch_threads_one_process": torch.get_num_threads(), "rows": rows,
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"{'path':<14} {'wall s':>7} {'start s':>8} {'epoch s':>8} {'ckpt s':>7} {'seq/s':>8} "
          f"{'seq/s -ckpt':>11} {'rest s':>7} {'last loss':>10}  ({data.name}, {args.epochs} epochs, "
          f"{per_epoch} sequences/epoch)")
    for k, r in rows.items():
        print(f"{k:<14} {r['wall_s']:7.2f} {r['startup_s']:8.2f} {r['steady_epoch_s']:8.3f} {r['checkpoint_s']:7.3f} "
              f"{r['steady_sequences_per_s']:8.1f} {r['steady_sequences_per_s_without_checkpoint']:11.1f} "
              f"{r['rest_s']:7.2f} {r['last_epoch_loss']:10.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

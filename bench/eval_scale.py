"""Full-ranking evaluation at catalog scale: the dense pass it replaced vs item blocks, side by side.

    python bench/eval_scale.py --json bench/results/eval_scale.json
    python bench/eval_scale.py --items 4000 50000 --users 5000

Per catalog size, both ways rank the same users' targets (both history modes, one pass) over the
whole catalog: "dense" scores [chunk_size, N] at once (the reference kept in
tests/evaluate/test_metrics.py, as evaluation worked before), "blocks" is
learn.evaluate.metrics.target_ranks_both with item blocks. Users and items are seeded random unit
vectors (d=--dim), targets and ~10-item histories random; the ranks of both must be equal. Reports
wall s and the peak memory the call adds: resident set size sampled every 2 ms on CPU, the CUDA
allocator's peak on GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn, device: str) -> tuple[object, float, float]:
    """(result, wall s, peak MiB added over the call)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - t, (torch.cuda.max_memory_allocated() - base) / 2**20
    base, peak, stop = _rss(), [0], threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=poll, daemon=True)
    sampler.start()
    t = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t
    stop.set()
    sampler.join()
    return out, wall, (max(peak[0], _rss()) - base) / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, nargs="+", default=[4000, 50000, 200000])
    p.add_argument("--users", type=int, default=20000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--item-block", type=int, default=8192)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    import numpy as np
    import torch

    from learn.evaluate.metrics import target_ranks_both
    from learn.utils import atomic_write_text
    from tests.evaluate.test_metrics import dense_ranks_both

    rng = np.random.default_rng(args.seed)
    U, d = args.users, args.dim
    users = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((U, d), dtype=np.float32)), dim=1)
    users = users.to(args.device)
    small = torch.nn.functional.normalize(users[:64].flip(0), dim=1)  # warm-up: thread pools, BLAS buffers
    for fn in (target_ranks_both, dense_ranks_both):
        fn(users[:256], small, np.arange(256) % 64, [np.arange(3)] * 256, chunk_size=128)
    rows = []
    print(f"{U} users, d={d}, chunk_size={args.chunk_size}, item_block={args.item_block}, device={args.device}; "
          f"seeded random unit vectors")
    print(f"{'items':>8} | {'dense s':>8} {'dense MiB':>10} | {'blocks s':>8} {'blocks MiB':>10} | equal")
    for N in args.items:
        items = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((N, d), dtype=np.float32)), dim=1)
        items = items.to(args.device)
        targets = rng.integers(0, N, size=U)
        histories = [rng.integers(0, N, size=n) for n in rng.integers(1, 20, size=U)]
        common = dict(chunk_size=args.chunk_size)
        new, new_s, new_mb = measure(lambda: target_ranks_both(users, items, targets, histories,
                                                               item_block=args.item_block, **common), args.device)
        old, old_s, old_mb = measure(lambda: dense_ranks_both(users, items, targets, histories, **common), args.device)
        equal = all(np.array_equal(a, b) for a, b in zip(new, old))
        rows.append({"items": N, "dense": {"wall_s": round(old_s, 3), "peak_mib": round(old_mb, 1)},
                     "blocks": {"wall_s": round(new_s, 3), "peak_mib": round(new_mb, 1)}, "ranks_equal": equal})
        print(f"{N:>8} | {old_s:>8.2f} {old_mb:>10.1f} | {new_s:>8.2f} {new_mb:>10.1f} | {equal}")
        del items
    result = {"users": U, "dim": d, "chunk_size": args.chunk_size, "item_block": args.item_block,
              "device": args.device, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "vectors": "seeded random unit vectors", "rows": rows}
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=1) + "\n")
    return 0 if all(r["ranks_equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

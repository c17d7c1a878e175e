"""Where the dense all-action recipe applies: probes on Scientific and on generated long sequences.

    python bench/dense_probe.py --data ../shared/data/amazon-unisrec/Scientific --epochs 8 \
        --json bench/results/dense_probe_scientific.json
    python bench/dense_probe.py --data demo-long --epochs 10 --json bench/results/dense_probe_demo_long.json

Three parts, all on the leave-one-out valid split (the split the recipes are selected on):

1. lag signal, no training: NDCG@10 / R@10 of the valid target when the user vector is the raw
   (centred) content vector of the item k steps before the target. k = 1 is the last-item floor;
   how fast it falls with k says how much a (position, target) pair k items apart can teach.
2. pair lags: for each variant's sampling, how its positive (history position, target) pairs spread
   over lags (share at lag 1, mean, median) and how many pairs a user gives per epoch.
3. training: each variant trained from the same initial weights, same towers (``--config``, one
   thread) and epoch budget, valid scored on a fixed seeded user sample; best valid NDCG@10 and R@10.

``--window W`` (for long sequences) replaces leave-one-out by a per-user cut that holds out each
user's last W items: training sees the rest, the valid target is the first held-out item (next-item
NDCG@10 / R@10, what the README's tables measure) and, as in the paper's industrial evaluation,
recall@50 over all W held-out items (``window_recall_at_50``; the user's history excluded) is
reported for the same weights: the dense recipe's own task next to the next-item one.

``demo-long`` is the generated demo catalog (3,000 items, 2,000 users) with sequence lengths drawn
around 100 (60-140) instead of the demo's 5-40: the paper's setting of long per-user logs. The bench
swaps the demo's length draw for that while it loads the data (``_long_demo_lengths``); everything
else about the generator (category preferences, item-to-item transitions) is unchanged.
Timings are measured and printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from learn.config import load_config  # noqa: E402
from learn.data.sequences import EvalSplit, Splits  # noqa: E402
from learn.data.load import load_sequences  # noqa: E402
from learn.embed.catalog import embed_items  # noqa: E402
from learn.towers.model import TwinTowers  # noqa: E402
from learn.train.fit import fit  # noqa: E402
from learn.train.loop import user_embeddings  # noqa: E402
from learn.train.recipes import epoch_batches  # noqa: E402
from learn.utils import atomic_write_text, seed_everything  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DENSE = ["train.recipe=dense_all_action", "train.all_positions=false"]
# name -> overrides on top of --config; every dense variant names its negatives explicitly
VARIANTS: dict[str, list[str]] = {
    "paper": DENSE + ["train.num_negatives=0", "train.logq_correction=false"],  # the loss as LEARN.md words it
    "logq": DENSE + ["train.num_negatives=0", "train.logq_correction=true"],  # in-batch negatives, logQ-corrected
    "logq_pool": DENSE + ["train.num_negatives=1024", "train.logq_correction=true"],  # + 1,024 mixed negatives
    "logq_pool_window_1": DENSE + ["train.num_negatives=1024", "train.target_window=1"],
    "logq_pool_window_3": DENSE + ["train.num_negatives=1024", "train.target_window=3"],
    "all_cuts_window_1": ["train.recipe=dense_all_action", "train.all_positions=true", "train.num_negatives=1024",
                          "train.target_window=1"],
    "all_cuts_window_2": ["train.recipe=dense_all_action", "train.all_positions=true", "train.num_negatives=1024",
                          "train.target_window=2"],
    "all_cuts_window_3": ["train.recipe=dense_all_action", "train.all_positions=true", "train.num_negatives=1024",
                          "train.target_window=3"],
    "all_cuts_no_window": ["train.recipe=dense_all_action", "train.all_positions=true", "train.num_negatives=1024"],
    "ref_in_batch_one_target": ["train.recipe=in_batch", "train.all_positions=false"],
    "ref_sampled_all_positions": ["train.recipe=sampled_softmax", "train.all_positions=true",
                                  "train.num_negatives=1024"],
}
DEFAULT_CONFIG = "conf/scientific/2026-11-26-1-one-member.yaml"


@contextlib.contextmanager
def _long_demo_lengths():
    """The demo generator with per-user lengths around 100 (60-140) while the data loads."""
    import learn.data.demo as demo

    saved = demo._lengths
    demo._lengths = lambda rng, n: np.clip(np.rint(rng.normal(100.0, 20.0, n)), 60, 140).astype(np.int64)
    try:
        yield
    finally:
        demo._lengths = saved


def data_overrides(data: str, cache_dir: str) -> list[str]:
    if data == "demo-long":
        return ["data.path=demo", "data.demo.num_items=3000", "data.demo.num_users=2000", "data.max_history=80",
                "model.max_len=128", f"embed.cache_dir={cache_dir}",
                f"embed.store={Path(cache_dir) / 'content' / 'demo-long-minilm.parquet'}"]
    return [f"data.path={data}", f"embed.cache_dir={cache_dir}"]


def lag_signal(content: np.ndarray, split, lags=(1, 2, 3, 5, 10)) -> list[dict]:
    x = torch.as_tensor(content, dtype=torch.float32)
    x = x - x.mean(0, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)
    out = []
    for k in lags:
        rows = [i for i, h in enumerate(split.histories) if len(h) >= k]
        if not rows:
            continue
        scores = x[[int(split.histories[i][-k]) for i in rows]] @ x.T
        target = torch.as_tensor(split.targets[rows], dtype=torch.long)
        own = scores[torch.arange(len(rows)), target]
        rank = (scores > own[:, None]).sum(1) + (scores == own[:, None]).sum(1) - 1  # ties count against
        ndcg = torch.where(rank < 10, 1.0 / torch.log2(rank.double() + 2), torch.zeros((), dtype=torch.double))
        out.append({"lag": k, "users": len(rows), "ndcg_at_10": float(ndcg.mean()),
                    "recall_at_10": float((rank < 10).double().mean())})
    return out


def pair_lags(train, cfg, max_history: int, num_items: int, seed: int) -> dict:
    """The lags of one epoch's positive pairs under ``cfg``'s sampling (dense or pair recipes)."""
    lags, users = [], 0
    for b in epoch_batches(train, cfg, max_history, seed, 1, num_items=num_items):
        if hasattr(b, "pair_valid"):
            lags.extend(b.pair_lag[b.pair_valid].tolist())
            users += b.hist_tokens.shape[0]
        else:
            lags.extend([1] * len(b.targets))
            users += b.tokens.shape[0]
    lags = np.asarray(lags)
    return {"pairs_per_user": len(lags) / max(1, users), "share_lag_1": float((lags == 1).mean()),
            "mean_lag": float(lags.mean()), "median_lag": float(np.median(lags))}


def window_split(seqs, w: int) -> tuple[Splits, list[np.ndarray]]:
    """Each user's last ``w`` items held out: (splits whose valid target is the first of them, the
    held-out windows). Users with fewer than w + 2 items are left out."""
    keep = [u for u, s in enumerate(seqs) if len(s) >= w + 2]
    train = [np.asarray(seqs[u][:-w]) for u in keep]
    valid = EvalSplit(np.asarray(keep), train, np.array([int(seqs[u][-w]) for u in keep]))
    return Splits("window", train, valid, valid), [np.asarray(seqs[u][-w:]) for u in keep]


@torch.no_grad()
def window_recall(model, split: EvalSplit, windows: list[np.ndarray], max_history: int, k: int = 50) -> float:
    users = user_embeddings(model, split.histories, max_history)
    scores = users @ model.all_item_embeddings().T
    for r, h in enumerate(split.histories):
        scores[r, torch.as_tensor(np.asarray(h), dtype=torch.long)] = float("-inf")
    top = scores.topk(k, dim=1).indices.numpy()
    return float(np.mean([np.isin(w, top[r]).mean() for r, w in enumerate(windows)]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a dataset directory (e.g. Scientific) or demo-long")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="towers and training settings (a conf/ file)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--valid-users", type=int, default=3000, help="fixed seeded valid sample (0: all)")
    ap.add_argument("--set", action="append", default=[], help="extra key=value for every variant")
    ap.add_argument("--cache-dir", default=os.environ.get("LEARN_CACHE", ".cache/learn"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--window", type=int, default=0, help="hold out each user's last W items (0: leave-one-out)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    torch.set_num_threads(args.threads)
    config = str(ROOT / args.config) if not Path(args.config).is_absolute() else args.config
    common = data_overrides(args.data, args.cache_dir) + [
        f"train.epochs={args.epochs}", "train.patience=0", f"eval.valid_max_users={args.valid_users}"] + args.set
    base = load_config(config, common)
    with _long_demo_lengths() if args.data == "demo-long" else contextlib.nullcontext():
        _, data = load_sequences(base.data)
    windows = None
    if args.window > 0:
        splits, windows = window_split(data.seqs, args.window)
    else:
        splits = data.split("leave_one_out")
    content, _, encoder_id = embed_items(base.embed, data.name, data.item_ids, data.texts, progress=False)
    lengths = np.array([len(s) for s in splits.train])
    result = {"data": args.data, "dataset": data.name, "items": data.num_items, "users": len(data.seqs),
              "train_length": {"mean": float(lengths.mean()), "median": float(np.median(lengths)),
                               "p90": float(np.percentile(lengths, 90))},
              "config": args.config, "epochs": args.epochs, "valid_users": args.valid_users, "encoder": encoder_id,
              "threads": args.threads, "window": args.window, "lag_signal": lag_signal(content, splits.valid), "variants": {}}
    print(f"{data.name}: {data.num_items} items, {len(data.seqs)} users, training length mean "
          f"{lengths.mean():.1f} / median {np.median(lengths):.0f}")
    print("lag signal (user = content of the item k before the valid target):")
    for row in result["lag_signal"]:
        print(f"  k={row['lag']:2d}  users {row['users']:6d}  NDCG@10 {row['ndcg_at_10']:.4f}  R@10 "
              f"{row['recall_at_10']:.4f}")
    for name in names:
        cfg = load_config(config, common + VARIANTS[name])
        lags = pair_lags(splits.train, cfg.train, cfg.data.max_history, data.num_items, cfg.seed)
        seed_everything(cfg.seed)
        model = TwinTowers.from_config(cfg.model, content, splits.train_popularity(data.num_items),
                                       splits.train, cfg.data.max_history)
        start = time.perf_counter()
        fitted = fit(model, splits, cfg.train, cfg.eval, cfg.data.max_history, seed=cfg.seed, progress=False)
        row = {"overrides": VARIANTS[name], **lags, "best_epoch": fitted.best_epoch,
               "best_valid_ndcg_at_10": fitted.best_valid["valid_ndcg_at_10"],
               "best_valid_recall_at_10": fitted.best_valid["valid_recall_at_10"],
               "valid_ndcg_at_10_per_epoch": [h.get("valid_ndcg_at_10") for h in fitted.history],
               "train_loss_per_epoch": [h["train_loss"] for h in fitted.history],
               "wall_s": time.perf_counter() - start}
        if windows is not None:
            row["window_recall_at_50"] = window_recall(model, splits.valid, windows, cfg.data.max_history)
        result["variants"][name] = row
        print(f"{name:28s} valid NDCG@10 {row['best_valid_ndcg_at_10']:.4f}  R@10 {row['best_valid_recall_at_10']:.4f}"
              f"  (epoch {row['best_epoch']})  pairs/user {lags['pairs_per_user']:.1f}  lag-1 share "
              f"{lags['share_lag_1']:.2f}  mean lag {lags['mean_lag']:.1f}  {row['wall_s']:.0f} s"
              + (f"  window R@50 {row['window_recall_at_50']:.4f}" if windows is not None else ""), flush=True)
        if args.json:  # rewritten after each variant: a long run keeps what it measured
            atomic_write_text(Path(args.json), json.dumps(result, indent=2))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

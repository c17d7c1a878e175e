"""Offline probe: why valid and test disagree on item ID towers (issue 14). From the towers quality rows
already wrote (no training here), for valid and test side by side:

    python bench/id_probe.py --data ../shared/data/amazon-unisrec/Scientific \\
        --rows learn_freeze_6,lever_item_ids_freeze_6,lever_item_id_dropout

Per row and split, on the towers alone (no served mix), history not excluded:
- ``ndcg_at_10`` / ``recall_at_10``;
- ``last_in_top10``: share of users whose own last history item is in their top 10 (a model that
  memorised the training prefixes points the user vector at the last item it was trained to predict);
- ``ndcg_at_10_seen_pair`` / ``_new_pair``: NDCG@10 on the users whose (last history item -> target)
  transition occurs in some training sequence, and on the others; ``seen_pair_share`` is how many
  users have such a target (a property of the split, the same for every row).
Ranks come from learn.evaluate.metrics.target_ranks_both, as in the runs (streamed over user chunks and
item blocks). Writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ensemble_probe import load_row, probe_inputs  # noqa: E402
from learn.evaluate.metrics import metrics_from_ranks, target_ranks_both  # noqa: E402
from learn.towers.mix import last_items  # noqa: E402
from learn.train.loop import user_embeddings  # noqa: E402
from learn.utils import atomic_write_text  # noqa: E402


def training_pairs(train, num_items: int) -> np.ndarray:
    """Sorted unique codes a * num_items + b of every consecutive (a, b) in the training sequences."""
    nxt = np.ones(len(train.values), dtype=bool)
    nxt[train.offsets[1:][np.diff(train.offsets) > 0] - 1] = False  # a sequence's last item has no successor
    idx = np.flatnonzero(nxt)
    return np.unique(train.values[idx].astype(np.int64) * num_items + train.values[idx + 1])


def probe(model, split, max_history: int, pairs: np.ndarray, num_items: int) -> dict:
    users = user_embeddings(model, split.histories, max_history)
    items = model.all_item_embeddings()
    last, targets = last_items(split.histories), np.asarray(split.targets, dtype=np.int64)
    with torch.no_grad():
        ranks, _ = target_ranks_both(users, items, targets, None, need_excluded=False)
        last_rank, _ = target_ranks_both(users, items, last, None, need_excluded=False)
    seen = np.isin(last * num_items + targets, pairs)

    def ndcg(rows: np.ndarray) -> float:
        return metrics_from_ranks(ranks[rows], (10,))["ndcg_at_10"] if rows.any() else 0.0

    overall = metrics_from_ranks(ranks, (10,))
    return {"users": int(len(targets)), "ndcg_at_10": overall["ndcg_at_10"], "recall_at_10": overall["recall_at_10"],
            "last_in_top10": float((last_rank < 10).mean()), "seen_pair_share": float(seen.mean()),
            "ndcg_at_10_seen_pair": ndcg(seen), "ndcg_at_10_new_pair": ndcg(~seen)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default="conf/scientific.yaml")
    ap.add_argument("--rows", required=True, help="comma-separated bench/quality.py rows with towers in runs/")
    ap.add_argument("--json", default="bench/results/id_probe.json")
    args = ap.parse_args()
    cfg, data, splits, popularity, content, encoder_id = probe_inputs(ROOT / args.config, args.data)
    pairs = training_pairs(splits.train, data.num_items)
    out = {}
    for row in filter(None, args.rows.split(",")):
        model = load_row(row, content, popularity, encoder_id).eval()
        out[row] = {name: probe(model, getattr(splits, name), cfg.data.max_history, pairs, data.num_items)
                    for name in ("valid", "test")}
        for name, m in out[row].items():
            print(f"{row:32s} {name:5s} " + " ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "users"), flush=True)
    path = ROOT / args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

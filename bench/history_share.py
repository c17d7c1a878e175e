"""How much of each user's top 10 is items already in the user's history (the towers of a finished run,
ranked over the whole catalog with history kept, as the issue's protocol scores them).

    python bench/history_share.py --data .cache/learn/data/movielens-100k --run runs/ml100k/freeze_7/<run id>

On a dataset where items never repeat (MovieLens ratings, Scientific purchases) every such slot is a miss,
which is why a model's NDCG@10 with history excluded can be twice its figure with history kept. Prints the
mean share over the valid and the test users, of the whole history and of the part the towers read
(the last ``data.max_history`` items).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ensemble_probe import load_run, probe_inputs  # noqa: E402
from learn.train.loop import user_embeddings  # noqa: E402


def history_share(top: np.ndarray, histories, last: int | None = None) -> float:
    """Mean over users of the share of their top-k items that are in their history (its last ``last``)."""
    shares = [np.isin(row, h if last is None else h[-last:]).mean() for row, h in zip(top, histories)]
    return float(np.mean(shares))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--run", required=True, type=Path, help="a run's output directory (holds towers/)")
    ap.add_argument("--config", default="conf/scientific.yaml")
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    cfg, _, splits, popularity, content, encoder_id = probe_inputs(ROOT / args.config, args.data)
    model = load_run(args.run, content, popularity, encoder_id)
    with torch.no_grad():
        items = model.all_item_embeddings()
        for which in ("valid", "test"):
            split = getattr(splits, which)
            users = user_embeddings(model, split.histories, cfg.data.max_history)
            top = (users @ items.T).topk(args.k, dim=1).indices.numpy()
            print(f"{which}: share of top-{args.k} slots that are history items "
                  f"{history_share(top, split.histories):.3f} (of the last {cfg.data.max_history} items the towers "
                  f"read: {history_share(top, split.histories, cfg.data.max_history):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

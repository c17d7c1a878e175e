"""Offline probe: what ensembling trained rows, and adding the untrained last-item content score,
would do on valid and test, from the towers the quality rows already wrote (no training here).

    python bench/ensemble_probe.py --data ../shared/data/amazon-unisrec/Scientific \\
        --combo learn_fs_minilm --combo learn_fs_minilm,learn_fs_minilm_seed1 --weights 0,0.1,0.2

Each ``--combo`` names rows of bench/quality.py (the newest ``runs/bench-quality/<row>/*/towers/``
of each; all on the same encoder). Score of item i for a user = mean over the combo's models of
cos(user, item) + w * cos(content of the user's last item, content of i) + p * popularity(i), with
popularity(i) = log(1 + training interactions of i) / log(1 + the most popular item's), computed as
one inner product over concatenated vectors (what one faiss index over concatenated towers would
serve; p is one more item dimension against a constant user dimension). Choose w and p on valid;
test is printed beside them only to show what that choice gives.

``--id-weights`` (towers with member groups, ``model.id_members``): the ID members' part of each user vector
is scaled by b, so the score is the content members' cosines + b x the ID members' (b = 1: the towers as
trained and served); every b is crossed with the weights above.
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

from learn.config import load_config  # noqa: E402
from learn.evaluate.baselines import content_item_vectors, content_user_vectors  # noqa: E402
from learn.evaluate.metrics import metrics_from_ranks, target_ranks_both  # noqa: E402
from learn.data.load import load_sequences  # noqa: E402
from learn.embed.catalog import embed_items  # noqa: E402
from learn.export.towers import load_twin_towers  # noqa: E402
from learn.towers.model import TwinTowers  # noqa: E402
from learn.train.loop import user_embeddings  # noqa: E402
from learn.utils import atomic_write_text  # noqa: E402


def probe_inputs(config: Path, data_path: str, overrides: list[str] | None = None):
    """What every probe starts from: the config, the dataset, its splits, the training popularity and
    the content vectors (from the content store when it holds them) with their encoder id."""
    torch.set_num_threads(1)
    cfg = load_config(config, [f"data.path={data_path}", *(overrides or [])])
    _, data = load_sequences(cfg.data)
    splits = data.split(cfg.data.split, cfg.data.time_cut, cfg.seed)
    popularity = splits.train_popularity(data.num_items)
    content, _, encoder_id = embed_items(cfg.embed, data.name, data.item_ids, data.texts, False)
    return cfg, data, splits, popularity, content, encoder_id


def load_row(name: str, content: np.ndarray, popularity: np.ndarray, encoder_id: str) -> TwinTowers:
    found = sorted((ROOT / "runs" / "bench-quality" / name).glob("*/towers/towers_state.pt"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"row {name}: no runs/bench-quality/{name}/*/towers/ (run bench/quality.py --only {name})")
    return load_run(found[-1].parents[1], content, popularity, encoder_id)


def load_run(run_dir: Path, content: np.ndarray, popularity: np.ndarray, encoder_id: str) -> TwinTowers:
    """The towers a run exported, over ``content`` (which must come from the encoder the run trained on);
    towers with item ID vectors get them for the items seen in training."""
    trained_on = json.loads((run_dir / "metrics.json").read_text())["encoder_id"]
    if trained_on != encoder_id:
        raise SystemExit(f"run {run_dir} was trained on {trained_on}, the probe embeds with {encoder_id}")
    ids = json.loads((run_dir / "towers" / "tower_config.json").read_text())["num_id_items"]
    known = torch.as_tensor(popularity > 0) if ids else None
    return load_twin_towers(run_dir / "towers", torch.as_tensor(content), id_known=known)


def id_weighted(model: TwinTowers, users: torch.Tensor, b: float) -> torch.Tensor:
    """``users`` with the ID members' columns scaled by ``b`` (towers with member groups; else unchanged)."""
    groups = model.member_groups()
    if b == 1 or len(groups) == 1:
        return users
    out = users.clone()
    width = users.shape[1] // model.cfg.members
    for m in groups[1]:
        out[:, m * width:(m + 1) * width] *= b
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default="conf/scientific.yaml")
    ap.add_argument("--combo", action="append", required=True, help="comma-separated bench/quality.py rows")
    ap.add_argument("--weights", default="0,0.1,0.2", help="weights of the last-item content score")
    ap.add_argument("--pop-weights", default="0", help="weights of the popularity prior (every pair with --weights)")
    ap.add_argument("--id-weights", default="1", help="weights of the ID members' cosines (towers with member groups)")
    ap.add_argument("--json", default="bench/results/ensemble_probe.json")
    args = ap.parse_args()
    cfg, data, splits, popularity, content, encoder_id = probe_inputs(ROOT / args.config, args.data)
    weights = [(float(w), float(p), float(b)) for w in args.weights.split(",") for p in args.pop_weights.split(",")
               for b in args.id_weights.split(",")]
    items_raw = content_item_vectors(content)
    prior = torch.as_tensor(np.log1p(popularity) / np.log1p(popularity.max()), dtype=torch.float32)[:, None]
    # the untrained last-item vectors depend on the split only: once for every combo
    lasts = {which: content_user_vectors(content, getattr(splits, which), "content_last", cfg.data.max_history)
             for which in ("valid", "test")}
    results = []
    for combo in args.combo:
        models = [load_row(n, content, popularity, encoder_id) for n in combo.split(",")]
        row = {"combo": combo, "weights": {}}
        with torch.no_grad():  # the item side is the same for both splits
            towers_items = torch.cat([m.all_item_embeddings() for m in models], 1) / len(models) ** 0.5
        for which in ("valid", "test"):
            split, last = getattr(splits, which), lasts[which]
            with torch.no_grad():
                per_model = [user_embeddings(m, split.histories, cfg.data.max_history) for m in models]
            for w, p, b in weights:
                constant = torch.full((len(last), 1), p)
                towers_users = torch.cat([id_weighted(m, u, b) for m, u in zip(models, per_model)], 1)
                towers_users = towers_users / len(models) ** 0.5
                users = torch.cat([towers_users, last * w ** 0.5, constant], 1)
                items = torch.cat([towers_items, items_raw * w ** 0.5, prior], 1)
                incl, excl = target_ranks_both(users, items, split.targets, split.histories)
                label = (str(w) if p == 0 else f"{w},pop={p}") + ("" if b == 1 else f",ids={b}")
                got = row["weights"].setdefault(label, {})
                for suffix, ranks in (("", incl), ("_excl_hist", excl)):
                    for key, v in metrics_from_ranks(ranks, (10,)).items():
                        if key in ("ndcg_at_10", "recall_at_10"):
                            got[f"{which}_{key}{suffix}"] = round(v, 4)
        results.append(row)
        for w, m in row["weights"].items():
            print(f"{combo:<60} w={w:<12} valid {m['valid_ndcg_at_10']:.4f} / {m['valid_recall_at_10']:.4f}   "
                  f"test {m['test_ndcg_at_10']:.4f} / {m['test_recall_at_10']:.4f}   "
                  f"(excl. hist {m['test_ndcg_at_10_excl_hist']:.4f} / {m['test_recall_at_10_excl_hist']:.4f})",
                  flush=True)
    out = ROOT / args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"encoder_id": encoder_id, "rows": results}, indent=2))


if __name__ == "__main__":
    main()

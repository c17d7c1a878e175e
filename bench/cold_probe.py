"""Offline probe: what a larger content weight for unseen (cold) and rarely seen items would do to the
overall, cold and tail segments on valid and test, from the towers one quality row already wrote
(no training here).

    python bench/cold_probe.py --data ../shared/data/amazon-unisrec/Scientific --row lever_cold_content \\
        --content 0.05 --popularity 0.05 --boosts 0,0.02,0.05,0.1,0.2,0.3,0.5

Score of item i for a user = cos(user tower, item tower) + (content + boost x f(i)) x cos(content of
the user's last item, content of i) + popularity x prior(i), with prior as in learn/towers/mix.py and
f(i) one of two shapes: ``step`` (1 for an item unseen in training, 0 otherwise: only cold items
gain) and ``linear`` (1 - prior(i): what ``score.cold_content_weights`` serves, the tail gains too).
``--content`` / ``--popularity`` are the weights the row chose on valid (its score_mix_* metrics).
Segments as in the runs: pop_cold (target unseen in training), pop_tail / pop_mid / pop_head (warm
terciles). Test is printed beside valid only to show what a valid choice gives.

``--rescore`` instead runs the pipeline's own choice and test on the row's towers: the candidates of
the config's ``score.*`` (after ``--set key=value`` overrides) scored on valid by
``learn.train.loop.choose_score_mix``, the best tested by ``evaluate_model`` with segments, exactly
as flows/full_pipeline.py does after training (what a rerun of the row with that score grid would
give, since its towers do not depend on ``score.*``):

    python bench/cold_probe.py --data ../shared/data/amazon-unisrec/Scientific --row lever_cold_content \
        --rescore --set 'score.cold_content_weights=[0.1,0.2,0.3,0.5]' --json bench/results/cold_rescore.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ensemble_probe import load_row, probe_inputs  # noqa: E402
from learn.evaluate.metrics import metrics_from_ranks, sample_users, segment_metrics, target_ranks_both  # noqa: E402
from learn.train.fit import selection_key  # noqa: E402
from learn.train.loop import choose_score_mix, evaluate_model, mix_metric_key  # noqa: E402
from learn.towers.mix import candidates  # noqa: E402
from learn.towers.mix import last_items, popularity_prior  # noqa: E402
from learn.train.loop import user_embeddings  # noqa: E402
from learn.utils import atomic_write_text  # noqa: E402

SEGMENTS = ("pop_cold", "pop_tail", "pop_mid", "pop_head")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default="conf/scientific.yaml")
    ap.add_argument("--row", required=True, help="a bench/quality.py row whose towers are in runs/bench-quality/")
    ap.add_argument("--content", type=float, default=0.0, help="the row's chosen content weight")
    ap.add_argument("--popularity", type=float, default=0.0, help="the row's chosen popularity weight")
    ap.add_argument("--rescore", action="store_true", help="the pipeline's score-mix choice and test instead")
    ap.add_argument("--set", action="append", default=[], help="config override for --rescore (repeatable)")
    ap.add_argument("--boosts", default="0,0.02,0.05,0.1,0.2,0.3,0.5")
    ap.add_argument("--json", default="bench/results/cold_probe.json")
    args = ap.parse_args()
    cfg, data, splits, popularity, content, encoder_id = probe_inputs(ROOT / args.config, args.data, args.set)
    model = load_row(args.row, content, popularity, encoder_id)
    if args.rescore:
        return rescore(args, cfg, model, splits, popularity, encoder_id)
    prior = torch.as_tensor(popularity_prior(popularity))
    unit = F.normalize(torch.as_tensor(content).float(), dim=-1)
    shapes = {"step": (prior == 0).float(), "linear": 1 - prior}
    print(f"{args.row}: {int((popularity == 0).sum())} of {len(popularity)} items unseen in training", flush=True)
    with torch.no_grad():
        items_t = F.normalize(model.all_item_embeddings().float(), dim=-1)
        users = {}
        for which in ("valid", "test"):
            split = getattr(splits, which)
            u = F.normalize(user_embeddings(model, split.histories, cfg.data.max_history).float(), dim=-1)
            last = unit[torch.as_tensor(last_items(split.histories))]
            users[which] = (split, torch.cat([u, last, torch.ones(len(u), 1)], 1))
    results = []
    for shape, f in shapes.items():
        for boost in [float(b) for b in args.boosts.split(",")]:
            if boost == 0 and shape != "step":
                continue  # no boost is the same score for both shapes
            weight = (args.content + boost * f)[:, None]
            items = torch.cat([items_t, weight * unit, args.popularity * prior[:, None]], 1)
            row = {"shape": shape, "boost": boost}
            for which, (split, u) in users.items():
                incl, _ = target_ranks_both(u, items, split.targets, split.histories)
                row[f"{which}_ndcg_at_10"] = round(metrics_from_ranks(incl, (10,))["ndcg_at_10"], 4)
                seg = segment_metrics(incl, split.targets, split.histories, popularity)
                for name in SEGMENTS:
                    if f"ndcg_at_10_{name}" in seg:
                        row[f"{which}_ndcg_at_10_{name}"] = round(seg[f"ndcg_at_10_{name}"], 4)
                        row[f"{which}_users_{name}"] = int(seg[f"users_{name}"])
            results.append(row)
            print(f"{shape:<7} boost {boost:<5g} " + "   ".join(
                f"{which} {row[f'{which}_ndcg_at_10']:.4f} (cold {row.get(f'{which}_ndcg_at_10_pop_cold', 0):.4f} "
                f"tail {row[f'{which}_ndcg_at_10_pop_tail']:.4f} head {row[f'{which}_ndcg_at_10_pop_head']:.4f})"
                for which in ("valid", "test")), flush=True)
    out = ROOT / args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"row": args.row, "encoder_id": encoder_id, "content_weight": args.content,
                                       "popularity_weight": args.popularity, "results": results}, indent=2))


def rescore(args, cfg, model, splits, popularity, encoder_id) -> None:
    prior = popularity_prior(popularity)
    options = candidates(cfg.score.content_weights, cfg.score.popularity_weights, cfg.score.cold_content_weights)
    key = selection_key(cfg.eval)
    with torch.no_grad():
        mix, table = choose_score_mix(model, sample_users(splits.valid, cfg.eval.valid_max_users, cfg.seed),
                                      cfg.eval, cfg.data.max_history, options, prior, key,
                                      cold_floor=cfg.score.select == "cold_floor", train_popularity=popularity)
        test = evaluate_model(model, sample_users(splits.test, cfg.eval.test_max_users, cfg.seed), cfg.eval,
                              cfg.data.max_history, train_popularity=popularity, prefix="test_", mix=mix, prior=prior,
                              towers_prefix="test_towers_")
    best_one_weight = max((m for m in options if not m.varies), key=lambda m: table[mix_metric_key(key, m)])
    out = {"row": args.row, "encoder_id": encoder_id, "overrides": args.set, "select": cfg.score.select,
           "candidates": len(options),
           "chosen": mix.to_json(), f"valid_{key}": table[mix_metric_key(key, mix)],
           f"valid_{key}_best_one_weight": table[mix_metric_key(key, best_one_weight)],
           "best_one_weight": best_one_weight.to_json(),
           "test": {k: round(v, 4) for k, v in test.items() if k.startswith(("test_ndcg_at_10", "test_recall_at_10"))
                    and ("_hist_" not in k)}, "valid_table": table}
    t = out["test"]
    print(f"{args.row}: chosen {mix.to_json()} over {len(options)} candidates, valid {out[f'valid_{key}']:.4f} "
          f"(best one-weight mix {best_one_weight.to_json()}: {out[f'valid_{key}_best_one_weight']:.4f}); test "
          f"{t['test_ndcg_at_10']:.4f} / {t['test_recall_at_10']:.4f}, cold {t.get('test_ndcg_at_10_pop_cold', 0):.4f}, "
          f"tail {t['test_ndcg_at_10_pop_tail']:.4f}, head {t['test_ndcg_at_10_pop_head']:.4f}", flush=True)
    path = ROOT / args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Regenerate the README's Scientific results table: runs each row's command and writes the
metrics as JSON plus a Markdown table.

    python bench/quality.py --data ../shared/data/amazon-unisrec/Scientific --json bench/results/quality.json
    python bench/quality.py --data <dir> --only floor_mean_minilm,learn_fs_minilm   # some rows
    python bench/quality.py --data <dir> --parallel 2     # two rows at a time, one torch thread each

Each row is `python flows/full_pipeline.py --config <the row's freeze> data.path=<dir> <overrides>`
run as its own process (the command printed in the table is exactly what ran, including
`train.num_threads=1` when rows share the machine). Wall time is the whole command, embedding
included unless the content store already held the vectors.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learn.config import flatten, load_config  # noqa: E402
from learn.utils import atomic_write_text  # noqa: E402

# conf/scientific.yaml was frozen three times on 2026-11-26, each freeze kept as a dated file: one member
# of two layers (d_out 128), then 2 members of two layers, then 4 members of one layer; and a fourth time on
# 2026-12-02 (every transition per epoch, the served score mix) and a fifth time on 2026-12-03 (the softmax
# over the seen items: its rows are lever_softmax_seen and its seed 1, run on FREEZE_4 with the one
# override conf/scientific/2026-12-03-5-softmax-seen-items.yaml adds to it). Every row names
# the freeze it ran against, so its command reproduces it as it is.
FREEZE_1 = "conf/scientific/2026-11-26-1-one-member.yaml"
FREEZE_2 = "conf/scientific/2026-11-26-2-two-members.yaml"
FREEZE_3 = "conf/scientific/2026-11-26-3-four-one-layer-members.yaml"
FREEZE_4 = "conf/scientific/2026-12-02-4-score-mix-transitions.yaml"
FREEZE_5 = "conf/scientific/2026-12-03-5-softmax-seen-items.yaml"
FREEZE_6 = "conf/scientific/2026-12-03-6-cold-floor.yaml"
FREEZE_7 = "conf/scientific/2026-12-07-7-content-id-members.yaml"
FREEZE_8 = "conf/scientific/2026-12-07-8-auto-positions.yaml"
LATEST = "conf/scientific.yaml"  # the floors: a baseline ignores the towers' settings
TPL_PRODUCT = ['data.text_template="Product: {text}"', "embed.store=.cache/learn/content/Scientific-minilm-tpl-product.parquet"]
SAMPLED = ["train.recipe=sampled_softmax", "train.num_negatives=1024"]
# dense_all_action as the paper has it (the recipe's defaults now add logQ terms and a negative pool)
DENSE_PAPER = ["train.num_negatives=0", "train.logq_correction=false"]
# dense_all_action as fixed: every position a cut, next-item positives, 1,024 logQ-corrected negatives
DENSE_FIXED = ["train.recipe=dense_all_action", "train.all_positions=true", "train.target_window=1",
               "train.num_negatives=1024"]

# the served score mix (learn/towers/mix.py): candidate weights of the last item's content score and of the
# popularity prior, every pair scored on valid after training; the towers are the third freeze's, unchanged
SCORE_MIX = ["score.content_weights=[0,0.05,0.1,0.2,0.3]", "score.popularity_weights=[0,0.02,0.05,0.1]"]
COLD_CONTENT = "score.cold_content_weights=[0.3,0.6,1,2]"
ITEM_IDS = ["model.item_id_embedding=true"]
ID_DROPOUT = [*ITEM_IDS, "model.item_id_dropout=0.5"]
HISTORY_PENALTY = "score.history_weights=[0,0.03,0.1,0.3,2]"
LOGIT_ADJUST = ["train.logit_adjustment=1", "score.popularity_weights=[0,0.02,0.05,0.1,0.2,0.3]"]
CONTENT_LOGIT_ADJUST = [*LOGIT_ADJUST, "train.logit_adjustment_members=content"]
# issue 14: the sixth freeze's 4 content-only members beside 4 members with item ID vectors (64 dims each),
# one pair of towers, each group early-stopped on its own valid score (model.id_members)
CONTENT_ID_MEMBERS = ["model.members=8", "model.d_out=512", *ITEM_IDS, "model.id_members=4"]

ROWS: list[tuple[str, str, str, list[str]]] = [
    ("floor_last_minilm", "no training: user = last item, MiniLM", LATEST, ["train.recipe=content_last"]),
    ("floor_mean_minilm", "no training: history mean vs raw content, MiniLM", LATEST, ["train.recipe=content_mean"]),
    ("learn_fs_minilm", "LEARN full softmax, MiniLM", FREEZE_1, []),
    ("learn_ib_minilm", "LEARN in-batch, MiniLM", FREEZE_1, ["train.recipe=in_batch", "train.batch_size=256"]),
    ("floor_last_smollm2", "no training: user = last item, SmolLM2", LATEST, ["embed.model=smollm2", "train.recipe=content_last"]),
    ("floor_mean_smollm2", "no training: history mean vs raw content, SmolLM2", LATEST, ["embed.model=smollm2", "train.recipe=content_mean"]),
    ("learn_fs_smollm2", "LEARN full softmax, SmolLM2", FREEZE_1, ["embed.model=smollm2"]),
    ("learn_ib_smollm2", "LEARN in-batch, SmolLM2", FREEZE_1, ["embed.model=smollm2", "train.recipe=in_batch",
                                                    "train.batch_size=256"]),
    ("learn_fs_minilm_seed1", "LEARN full softmax, MiniLM, seed 1", FREEZE_1, ["seed=1"]),
    # levers, each against learn_fs_minilm (the frozen config), read on valid NDCG@10
    ("lever_shared_head", "lever: shared output head (as in the paper)", FREEZE_1, ["model.user_head=shared"]),
    ("lever_ib_shared_head", "lever: in-batch with the shared head", FREEZE_1, ["train.recipe=in_batch", "train.batch_size=256", "model.user_head=shared"]),
    ("lever_shared_head_dropout0", "lever: shared head, dropout 0", FREEZE_1, ["model.user_head=shared", "model.dropout=0.0"]),
    # LEARN's ablation: item tower (c) = no alignment on the item side (raw centred content vectors)
    ("ablation_item_tower_c", "ablation: item tower (c), raw content items, MiniLM", FREEZE_1, ["model.item_tower=c", "model.d_out=384"]),
    # more levers against learn_fs_minilm, read on valid NDCG@10 (2026-11-26)
    ("lever_scale_10", "lever: score scale 10", FREEZE_1, ["train.score_scale=10"]),
    ("lever_scale_30", "lever: score scale 30", FREEZE_1, ["train.score_scale=30"]),
    ("lever_dropout_03", "lever: dropout 0.3", FREEZE_1, ["model.dropout=0.3"]),
    ("lever_dmodel_256", "lever: d_model 256, d_ff 1024, d_out 256", FREEZE_1, ["model.d_model=256", "model.d_ff=1024", "model.d_out=256"]),
    ("lever_positions", "lever: learned position embeddings", FREEZE_1, ["model.positions=learned"]),
    ("lever_lr_1e3", "lever: learning rate 1e-3", FREEZE_1, ["train.lr=0.001"]),
    ("lever_layers_1", "lever: 1 transformer layer", FREEZE_1, ["model.n_layers=1"]),
    ("lever_dout_64", "lever: output dimension 64", FREEZE_1, ["model.d_out=64"]),
    # the paper's recipe as published: one cut per user, far targets, no logQ terms, no pool
    ("lever_dense", "lever: dense all-action recipe", FREEZE_1, ["train.recipe=dense_all_action", "train.all_positions=false",
                                                                 *DENSE_PAPER]),
    # dense with item tower (b): targets encoded alone in training, as every item is served
    ("lever_dense_b", "lever: dense all-action recipe, item tower (b)", FREEZE_1, ["train.recipe=dense_all_action", "model.item_tower=b",
                                                                                             "train.all_positions=false", *DENSE_PAPER]),
    ("lever_tokens_64", "lever: token budget 64", FREEZE_1, ["embed.max_tokens=64"]),
    ("lever_layers_4", "lever: 4 transformer layers", FREEZE_1, ["model.n_layers=4"]),
    ("lever_wd_01", "lever: weight decay 0.1", FREEZE_1, ["train.weight_decay=0.1"]),
    ("lever_history_20", "lever: history length 20", FREEZE_1, ["data.max_history=20"]),
    ("lever_members_2", "lever: 2-member ensemble (128 dims each), trained and exported as one pair of towers", FREEZE_2, []),
    ("lever_members_2_seed1", "2-member ensemble, seed 1 (the second freeze's seed spread)", FREEZE_2, ["seed=1"]),
    # the text template (UniSRec files have one text field: title, categories, brand): a prefix.
    # Its vectors get their own content store: the store keeps one vector per (item, encoder)
    # and would otherwise re-embed (overwrite) the default template's vectors.
    ("floor_last_minilm_tpl_product", "no training: user = last item, MiniLM, template 'Product: {text}'", LATEST, ["train.recipe=content_last", *TPL_PRODUCT]),
    ("lever_tpl_product", "lever: text template 'Product: {text}'", FREEZE_1, [*TPL_PRODUCT]),
    # 4 members of one layer each (the third freeze): about the training cost of 2 members of two layers
    ("lever_members_4_layers_1", "lever: 4-member ensemble of 1-layer members (64 dims each)", FREEZE_3, []),
    ("lever_members_4_layers_1_seed1", "4-member ensemble of 1-layer members, seed 1 (the frozen config's seed spread)", FREEZE_3, ["seed=1"]),
    # sampled softmax (batch targets + 1,024 sampled negatives per step, logQ-corrected) on the third freeze
    ("learn_sampled_mixed", "LEARN sampled softmax, 1,024 mixed negatives (uniform + popularity), logQ", FREEZE_3, SAMPLED),
    ("learn_sampled_mixed_seed1", "LEARN sampled softmax, mixed negatives, seed 1", FREEZE_3, [*SAMPLED, "seed=1"]),
    ("learn_sampled_popularity", "LEARN sampled softmax, 1,024 popularity negatives, logQ", FREEZE_3,
     [*SAMPLED, "train.negative_sampler=popularity"]),
    ("learn_dense_fixed", "LEARN dense all-action as fixed: every cut, next-item positives, 1,024 logQ negatives",
     FREEZE_3, DENSE_FIXED),
    # issue 14: how the frozen vectors are conditioned (third freeze, full softmax)
    ("lever_mlp_adaptor", "lever: MLP adaptor (hidden 2 x d_model)", FREEZE_3, ["model.adaptor=mlp"]),
    ("lever_views_whiten_group_mlp", "lever: whitened + group-whitened views, MLP adaptors, summed", FREEZE_3,
     ["model.adaptor=mlp", "model.input_views=[whiten,group]"]),
    ("lever_views_whiten_group_mlp_seed1", "whitened + group-whitened views, MLP adaptors, seed 1", FREEZE_3,
     ["model.adaptor=mlp", "model.input_views=[whiten,group]", "seed=1"]),
    ("lever_two_stage", "lever: two stages, in-batch pre-training (batch 256) then full softmax from its best epoch",
     FREEZE_3, ["train.pretrain_epochs=20", "train.pretrain_batch_size=256"]),
    ("lever_score_mix", "lever: served score mix (last item's content + popularity prior), weights chosen on valid",
     FREEZE_3, SCORE_MIX),
    ("lever_score_mix_seed1", "served score mix, seed 1", FREEZE_3, [*SCORE_MIX, "seed=1"]),
    ("learn_freeze_4", "fourth freeze: third freeze's towers, every transition per epoch, score mix chosen on valid",
     FREEZE_4, []),
    ("learn_freeze_4_seed1", "fourth freeze, seed 1", FREEZE_4, ["seed=1"]),
    ("lever_item_ids_score_mix", "lever: served item ID vectors (warm items) + score mix", FREEZE_3,
     ["model.item_id_embedding=true", *SCORE_MIX]),
    ("lever_item_ids_score_mix_seed1", "served item ID vectors + score mix, seed 1", FREEZE_3,
     ["model.item_id_embedding=true", *SCORE_MIX, "seed=1"]),
    # issue 14: the full softmax over the items seen in training only, so items no training user has are
    # never negatives and keep their content score (cold items), on the fourth freeze
    ("lever_softmax_seen", "lever: full softmax over the items seen in training only (unseen items never negatives)",
     FREEZE_4, ["train.softmax_items=seen"]),
    ("lever_softmax_seen_seed1", "full softmax over the seen items, seed 1", FREEZE_4,
     ["train.softmax_items=seen", "seed=1"]),
    # issue 14: the content term's weight per item, larger for items unseen in training. The rows in
    # bench/results/quality.json ran its first form (linear in the prior between the two weights; valid
    # rejected every cold weight); the code now serves the step form (the cold weight for unseen items only)
    ("lever_cold_content", "lever: served content weight per item, larger for unseen and tail items, chosen on valid",
     FREEZE_5, [COLD_CONTENT]),
    ("lever_cold_content_seed1", "content weight per item, seed 1", FREEZE_5, [COLD_CONTENT, "seed=1"]),
    ("learn_freeze_6", "sixth freeze: fifth freeze + cold content weight, valid choice kept at the cold floor",
     FREEZE_6, []),
    ("learn_freeze_6_seed1", "sixth freeze, seed 1", FREEZE_6, ["seed=1"]),
    # issue 14, tail on the training side: logit adjustment (each column's training logit + log(1 + count)),
    # the served prior's grid widened to where the training-time score lies (~0.25 on Scientific)
    ("lever_logit_adjust", "lever: logit adjustment by log popularity in training, prior re-added on valid",
     FREEZE_6, LOGIT_ADJUST),
    ("lever_logit_adjust_seed1", "logit adjustment, seed 1", FREEZE_6, [*LOGIT_ADJUST, "seed=1"]),
    # issue 14, served item IDs on the sixth freeze: IDs alone peaked at epoch 3-4 and valid preferred the
    # content-only towers; with ID dropout half the item occurrences train without their ID vector
    ("lever_item_ids_freeze_6", "lever: served item ID vectors (warm items) on the sixth freeze", FREEZE_6, ITEM_IDS),
    ("lever_item_ids_freeze_6_seed1", "served item ID vectors on the sixth freeze, seed 1", FREEZE_6,
     [*ITEM_IDS, "seed=1"]),
    ("lever_item_id_dropout", "lever: served item ID vectors, each left out of half the training occurrences",
     FREEZE_6, ID_DROPOUT),
    ("lever_item_id_dropout_seed1", "item ID vectors with ID dropout, seed 1", FREEZE_6, [*ID_DROPOUT, "seed=1"]),
    # issue 14: content towers and ID towers win on different users (bench/id_probe.py); their average was the
    # best valid-selected score of bench/ensemble_probe.py. Here trained as one pair of towers
    ("lever_content_id_members", "lever: 4 content-only members + 4 members with item ID vectors, each group at its "
     "own best epoch", FREEZE_6, CONTENT_ID_MEMBERS),
    ("lever_content_id_members_seed1", "content-only + ID members, seed 1", FREEZE_6, [*CONTENT_ID_MEMBERS, "seed=1"]),
    # cost: half the ID group (2 ID members beside the 4 content-only ones: a third less item vector, half the ID floats)
    ("lever_two_id_members", "seventh freeze with 2 ID members instead of 4 (6 members, 384 dims)", FREEZE_7,
     ["model.members=6", "model.d_out=384", "model.id_members=2"]),
    ("lever_two_id_members_seed1", "2 ID members, seed 1", FREEZE_7,
     ["model.members=6", "model.d_out=384", "model.id_members=2", "seed=1"]),
    # tail: logit adjustment on the content-only members alone; the ID members keep learning popularity
    ("lever_content_logit_adjust", "seventh freeze, logit adjustment on the content-only members only, prior re-added "
     "on valid", FREEZE_7, CONTENT_LOGIT_ADJUST),
    ("lever_content_logit_adjust_seed1", "logit adjustment on the content-only members, seed 1", FREEZE_7,
     [*CONTENT_LOGIT_ADJUST, "seed=1"]),
    # (the seventh freeze is lever_content_id_members's command as a file: its rows are those two; this row
    # reruns the file itself since the ID tables train with sparse gradients and lazy row updates)
    ("learn_freeze_7", "seventh freeze as its file, end to end, sparse ID gradients", FREEZE_7, []),
    # the seventh freeze on the recipe a large catalog needs (a step independent of the catalog size)
    ("learn_freeze_7_sampled", "seventh freeze, sampled softmax (1,024 mixed negatives, logQ)", FREEZE_7, SAMPLED),
    ("learn_freeze_7_sampled_seed1", "seventh freeze, sampled softmax, seed 1", FREEZE_7, [*SAMPLED, "seed=1"]),
    # learned positions again, now zero-initialised (lever_positions ran with torch's N(0, 1) rows, which
    # swamped the adaptor's outputs): what SASRec has and the towers lack, for long sequences (MovieLens)
    ("lever_positions_zero_init", "seventh freeze + learned position embeddings, zero-initialised", FREEZE_7,
     ["model.positions=learned"]),
    # the eighth freeze: the seventh with model.positions=auto, which resolves to none on Scientific (3.95
    # earlier items per training target): the seventh freeze's towers, rerun from its own file
    ("learn_freeze_8", "eighth freeze as its file (positions auto: none here)", FREEZE_8, []),
    # a served history penalty (the request's own items lowered by h after the search), h chosen on valid
    ("lever_history_penalty", "eighth freeze + served history penalty, chosen on valid", FREEZE_8, [HISTORY_PENALTY]),
    ("lever_history_penalty_seed1", "served history penalty, seed 1", FREEZE_8, [HISTORY_PENALTY, "seed=1"]),
    # ... and towers trained without the row's own earlier items as negatives (early stopping with history excluded)
    ("lever_no_history_negatives", "served history penalty + own items not negatives in training", FREEZE_8,
     [HISTORY_PENALTY, "train.history_negatives=false"]),
    ("lever_no_history_negatives_seed1", "own items not negatives in training, seed 1", FREEZE_8,
     [HISTORY_PENALTY, "train.history_negatives=false", "seed=1"]),
    # transductive ablation: + a learned ID embedding for items seen in training (not exportable)
    ("ablation_item_ids", "ablation: + item ID embeddings for warm items, MiniLM", FREEZE_1, ["model.item_id_embedding=true", "export.enabled=false"]),
]

PEER_LABELS = {"peer_sasrec_recbole": "peer: SASRec on item ids, RecBole 1.2.1, run here"}

KEYS = ["test_ndcg_at_10", "test_recall_at_10", "test_ndcg_at_10_excl_hist", "test_recall_at_10_excl_hist",
        "best_valid_ndcg_at_10", "best_valid_recall_at_10", "best_valid_ndcg_at_10_excl_hist",
        "best_valid_recall_at_10_excl_hist"]


def run_row(name: str, config: str, overrides: list[str], data: str, root: Path = ROOT / "runs" / "bench-quality") -> dict:
    """Run one row's command with its outputs under ``root/name``; the row read back from its metrics.json."""
    print(f"== {name}: {' '.join(overrides)}", flush=True)
    out_dir = root / name
    cmd = [sys.executable, "flows/full_pipeline.py", "--config", config, "--no-progress", f"data.path={data}",
           *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd + [f"output_dir={out_dir}"], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"row {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    found = re.search(r"outputs in (\S+)", proc.stdout)
    row = row_from_summary(name, ROOT / found.group(1) / "metrics.json", overrides, data, config, wall)
    print(f"== {name} done: {json.dumps(row['metrics'])} wall {row['wall_s']} s", flush=True)
    return row


def row_from_summary(name: str, path: Path, overrides: list[str], data: str, config: str, wall: float) -> dict:
    summary = json.loads(path.read_text())
    threads = summary["config"]["train"].get("num_threads", 0)
    if threads and not any(o.startswith("train.num_threads=") for o in overrides):
        overrides = [*overrides, f"train.num_threads={threads}"]  # as it ran
    shown = ["python", "flows/full_pipeline.py", "--config", config, f"data.path={data}", *overrides]
    return {"name": name, "command": shlex.join(shown), "wall_s": round(wall, 1),
            "run_id": summary["run_id"], "encoder_id": summary["encoder_id"],
            "metrics": {k: v for k, v in summary["metrics"].items() if k in KEYS + ["best_epoch", "epochs_run"]
                        or k.startswith(MIX_PREFIXES) or _segment_key(k)}}


# a score-mix run also reports what it chose and what the towers alone score on test
MIX_PREFIXES = ("score_mix_content_weight", "score_mix_popularity_weight", "score_mix_cold_content_weight",
                "score_mix_history_weight",
                "score_mix_valid_ndcg_at_10",
                "test_towers_ndcg_at_10", "test_towers_recall_at_10")


def _segment_key(key: str) -> bool:
    """The test NDCG@10 of the popularity segments (cold / tail / mid / head), both history modes."""
    return key.startswith(("test_ndcg_at_10_pop_", "test_towers_ndcg_at_10_pop_"))


# set per invocation by run_row (where outputs go, threads when rows share the machine), not by the row
PER_INVOCATION = {"output_dir", "train.num_threads"}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(expected: dict, logged: dict) -> list[str]:
    """Keys whose value in a run's logged config is not what the row's command sets (a key only one
    side has, added or removed since the run, is not compared; data paths compare resolved)."""
    def norm(key: str, value):
        return str(Path(value).resolve()) if key == "data.path" and value != "demo" else value

    return [k for k in expected if k in logged and k not in PER_INVOCATION
            and norm(k, expected[k]) != norm(k, logged[k])]


def run_of_row(name: str, config: str, overrides: list[str], data: str) -> Path | None:
    """The newest metrics.json under runs/bench-quality/<name>/ whose run's config is what the row's
    command sets; None (with the reason printed) when no run there matches."""
    expected = flatten(load_config(ROOT / config, [f"data.path={data}", *overrides]))
    outputs = sorted((ROOT / "runs" / "bench-quality" / name).glob("*/metrics.json"),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for path in outputs:
        if not config_differences(expected, _flat(json.loads(path.read_text())["config"])):
            return path
    if outputs:
        newest = config_differences(expected, _flat(json.loads(outputs[0].read_text())["config"]))
        print(f"[from-runs] {name}: none of {len(outputs)} runs matches the row's command; the newest "
              f"({outputs[0].parent.name}) differs in {', '.join(newest)}", flush=True)
    return None


def rows_from_runs(previous: Path, data: str, wanted: set[str]) -> list[dict]:
    """Rebuild rows from the run each row's command made (wall times from earlier bench JSONs)."""
    walls = {}  # run id -> measured wall time, from every earlier bench JSON beside this one
    for path in sorted(previous.parent.glob("*.json")):
        # other benches' JSONs live beside it: only rows of this bench (a run id and a wall time) count
        walls.update({r["run_id"]: r["wall_s"] for r in json.loads(path.read_text()).get("rows", [])
                      if isinstance(r, dict) and "run_id" in r and "wall_s" in r})
    rows = []
    for name, _, config, overrides in ROWS:
        found = run_of_row(name, config, overrides, data) if not wanted or name in wanted else None
        if found is not None:
            summary = json.loads(found.read_text())
            # no bench JSON for this row: the run's own stage times (data + embed + train + test)
            wall = walls.get(summary["run_id"], sum(v for k, v in summary["metrics"].items()
                                       if k.startswith("time_") and k.endswith("_s")))
            rows.append(row_from_summary(name, found, overrides, data, config, wall))
    return rows


def markdown(rows: list[dict], labels: dict[str, str]) -> str:
    head = ("| row | test NDCG@10 | test R@10 | test NDCG@10 excl. hist | test R@10 excl. hist "
            "| valid NDCG@10 | valid R@10 | valid NDCG@10 excl. hist | valid R@10 excl. hist | wall |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        m = r["metrics"]
        cells = " | ".join(f"{m[k]:.4f}" if m.get(k) is not None else "-" for k in KEYS)
        wall = "-" if r.get("wall_s") is None else f"{r['wall_s']:.0f} s"
        lines.append(f"| {labels[r['name']]} (`{r['name']}`) | {cells} | {wall} |")
    return "\n".join(lines)


def merge_rows(previous: list[dict], new: list[dict]) -> list[dict]:
    """``previous`` with each row of ``new`` in place of the row of its name (appended when new)."""
    fresh = {r["name"]: r for r in new}
    kept = [fresh.pop(r["name"], r) for r in previous]
    return kept + [r for r in new if r["name"] in fresh]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="UniSRec-format dataset directory")
    p.add_argument("--json", default="bench/results/quality.json")
    p.add_argument("--only", default="", help="comma-separated row names")
    p.add_argument("--parallel", type=int, default=1,
                   help="rows run at a time; above 1 each row gets train.num_threads=1")
    p.add_argument("--from-runs", action="store_true",
                   help="run nothing: rebuild the table from the outputs under runs/bench-quality/ that each row's "
                        "command made (the newest run whose logged config matches the row's)")
    p.add_argument("--peers", default="bench/results/sasrec_recbole.json",
                   help="peer results to print under the table (written by bench/sasrec_recbole.py); skipped if absent")
    args = p.parse_args()
    wanted = set(filter(None, args.only.split(",")))
    labels = {n: label for n, label, _, _ in ROWS}
    results = rows_from_runs(Path(args.json), args.data, wanted) if args.from_runs else []
    todo = [(n, c, o + (["train.num_threads=1"] if args.parallel > 1 else []))
            for n, _, c, o in ([] if args.from_runs else ROWS) if not wanted or n in wanted]
    # the floors run first, one at a time: they fill each encoder's content store, so rows running
    # side by side afterwards only read it (never embed the same items twice at once)
    floors = [t for t in todo if t[0].startswith("floor_")]
    results += [run_row(n, c, o, args.data) for n, c, o in floors]
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        rest = [t for t in todo if t not in floors]
        results += list(pool.map(lambda t: run_row(*t, args.data), rest))
    out = Path(args.json)
    if wanted and out.is_file():  # --only: the other rows of the file stay as they were
        results = merge_rows(json.loads(out.read_text())["rows"], results)
    order = [n for n, _, _, _ in ROWS]
    results.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    peers = json.loads(Path(args.peers).read_text())["rows"] if Path(args.peers).is_file() else []
    labels.update({r["name"]: PEER_LABELS.get(r["name"], r["name"]) for r in peers})
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                                       "rows": results, "peers": peers}, indent=2) + "\n")
    print(markdown(results + peers, labels))
    print("\ncommands:")
    for r in results + peers:
        print(f"- `{r['name']}`: `{r['command']}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ID-only peer: SASRec trained with RecBole 1.2.1 on a UniSRec-format dataset (Amazon Scientific),
scored with this project's own metric code in both history modes.

What it does
  1. Trains RecBole's SASRec on the dataset's own benchmark files (<name>.train/.valid/.test.inter,
     columns user_id, item_id_list, item_id), full-softmax CE loss, early stopping on valid NDCG@10
     (RecBole's full ranking), keeping the best-valid checkpoint (under runs/sasrec_recbole/).
  2. Reloads that checkpoint and, for every row of .valid.inter and .test.inter, scores ALL items
     with model.full_sort_predict on the row's item_id_list, drops the padding item 0, and ranks the
     row's target with learn.evaluate.metrics.target_ranks_both (pessimistic ties; "excluded" mode
     drops the user's whole earlier history, the target itself kept) and metrics_from_ranks.
     The whole history is rebuilt from all of the user's earlier rows (identical to the row's
     item_id_list except where the files cut it at 50 items).
  3. Prints a table and writes bench/results/sasrec_recbole.json atomically (temp file + rename),
     with RecBole's own test result (history kept, top-k ties) as `recbole_reported`.

Reproduce (from the repo root; one CPU thread):

    make recbole-env
    .venv-recbole/bin/python bench/sasrec_recbole.py --data ../shared/data/amazon-unisrec/Scientific

Cost: one CPU thread by default (OMP_NUM_THREADS=1, `--threads`); on the 2-core dev box, shared
with other work, one epoch (17 batches of 2048) takes about 100-120 s of training plus about 3.5 s
of valid evaluation, so an early-stopped run takes hours (MovieLens-100k from bench/movielens.py: 48
batches, about 190-200 s an epoch on one thread, 100-130 s on two). Seeded runs are bit-reproducible on the
same machine (epochs 0-1 of two runs matched to the logged digits). RecBole's log lands in
runs/sasrec_recbole/<name>/seed<S>_h<H>/log/ (<name>: the dataset directory's), the best checkpoint in .../saved/. An interrupted run goes
on from that checkpoint with `--resume` (weights, optimizer, epoch, best score and early-stopping
counter come back; the data-shuffling RNG does not).

Runtime patches (RecBole 1.2.1 is older than the torch we use; numpy/pandas/scipy are pinned to
versions it works with in requirements-recbole.lock, so no numpy/pandas patches are needed):
  * torch >= 2.6 defaults torch.load(weights_only=True); RecBole's Trainer.evaluate reloads its own
    checkpoint (which pickles its Config object) with a bare torch.load. This process's torch.load
    defaults weights_only to False when a caller does not pass it (the only files loaded are the
    checkpoints this run wrote itself).
  * RecBole's MRR metric uses the removed alias np.float: we do not ask RecBole for MRR (our own
    MRR comes from learn's metrics), so no patch is applied for it.
  * recbole.quick_start imports ray, which needs pkg_resources (setuptools): we do not import
    quick_start; the script wires Config / create_dataset / data_preparation / Trainer itself.
  * RecBole writes ./log/ and ./log_tensorboard/ relative to the working directory: the script
    chdirs into runs/sasrec_recbole/ (gitignored) before building anything.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# learn's metric module needs only numpy, pandas and torch (all present in .venv-recbole)
from learn.evaluate.metrics import metrics_from_ranks, segment_metrics, target_ranks_both  # noqa: E402

_torch_load = torch.load


def _torch_load_trusted(*args, **kwargs):
    # patch: RecBole 1.2.1 reloads its own checkpoint (with a pickled Config) via a bare torch.load
    kwargs.setdefault("weights_only", False)
    return _torch_load(*args, **kwargs)


torch.load = _torch_load_trusted

from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.data.interaction import Interaction  # noqa: E402
from recbole.model.sequential_recommender import SASRec  # noqa: E402
from recbole.trainer import Trainer  # noqa: E402
from recbole.utils import init_logger, init_seed  # noqa: E402


def read_inter(path: Path) -> list[tuple[str, list[str], str]]:
    rows = []
    with path.open() as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != ["user_id:token", "item_id_list:token_seq", "item_id:token"]:
            raise SystemExit(f"{path}: unexpected header {header}")
        for line in f:
            u, hist, tgt = line.rstrip("\n").split("\t")
            rows.append((u, hist.split(" ") if hist else [], tgt))
    return rows


def build_split(rows, earlier: dict[str, set[str]], tok2id: dict[str, int], max_len: int):
    """Model input (last max_len items of the row's list, right-padded as RecBole does), catalog
    targets and whole histories (catalog index = RecBole internal id - 1: padding id 0 dropped)."""
    n = len(rows)
    seq = torch.zeros(n, max_len, dtype=torch.long)
    lens = torch.zeros(n, dtype=torch.long)
    targets = np.empty(n, dtype=np.int64)
    histories, longer = [], 0
    for i, (u, hist, tgt) in enumerate(rows):
        ids = [tok2id[t] for t in hist][-max_len:]
        seq[i, : len(ids)] = torch.tensor(ids)
        lens[i] = len(ids)
        targets[i] = tok2id[tgt] - 1
        whole = set(hist) | earlier.get(u, set())
        longer += len(whole) > len(set(hist))
        histories.append(np.array(sorted(tok2id[t] - 1 for t in whole), dtype=np.int64))
    return seq, lens, targets, histories, longer


def train_popularity(rows, tok2id: dict[str, int], n_items: int) -> np.ndarray:
    """[n_items] training interactions per catalog item, counted as learn counts them for its segments
    (learn.data.unisrec chains each user's rows into one sequence; the training split is all of it but
    the last two items): every train row's target, plus each user's first item (the one-item history of
    the user's earliest row)."""
    counts = np.zeros(n_items, dtype=np.int64)
    first: dict[str, tuple[int, str]] = {}
    for u, hist, tgt in rows:
        counts[tok2id[tgt] - 1] += 1
        if hist and (u not in first or len(hist) < first[u][0]):
            first[u] = (len(hist), hist[0])
    for _, item in first.values():
        counts[tok2id[item] - 1] += 1
    return counts


@torch.no_grad()
def rank_split(model, seq, lens, targets, histories, n_items: int, batch: int = 1024):
    def score_fn(idx):
        idx = torch.as_tensor(np.asarray(idx))
        inter = Interaction({"item_id_list": seq[idx], "item_length": lens[idx]})
        scores = model.full_sort_predict(inter).view(len(idx), -1)
        assert scores.shape[1] == n_items + 1
        return scores[:, 1:]  # drop the padding item 0

    return target_ranks_both(np.arange(len(targets)), None, targets, histories, chunk_size=batch, score_fn=score_fn)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="UniSRec-format directory with <name>.{train,valid,test}.inter")
    p.add_argument("--json", default="bench/results/sasrec_recbole.json")
    p.add_argument("--seed", type=int, default=2020)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (the README figures: 1; more threads may change float sums in the last digits)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue an interrupted run from its best-valid checkpoint (a path, or the newest "
                        "in runs/sasrec_recbole/<name>/seed<S>_h<H>/saved/ when given alone)")
    p.add_argument("--eval-only", action="store_true",
                   help="with --resume: train no further, only evaluate the checkpoint")
    args = p.parse_args()
    if args.eval_only and not args.resume:
        p.error("--eval-only needs --resume (the checkpoint to evaluate)")
    # a checkpoint path is relative to where the command runs (the script chdirs below)
    resume_path = Path(args.resume).resolve() if args.resume not in (None, "latest") else None
    start = time.perf_counter()
    torch.set_num_threads(args.threads)

    data_dir = Path(args.data).resolve()
    name = data_dir.name
    files = {s: data_dir / f"{name}.{s}.inter" for s in ("train", "valid", "test")}
    for f in files.values():
        if not f.is_file():
            raise SystemExit(f"missing {f}")
    out_json = Path(args.json).resolve()
    work = ROOT / "runs" / "sasrec_recbole" / name / f"seed{args.seed}_h{args.hidden_size}"
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # RecBole's ./log and ./log_tensorboard land here

    config_dict = {
        "data_path": str(data_dir.parent),
        "benchmark_filename": ["train", "valid", "test"],
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "LIST_SUFFIX": "_list",
        "ITEM_LIST_LENGTH_FIELD": "item_length",
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"]},
        "alias_of_item_id": ["item_id_list"],
        "MAX_ITEM_LIST_LENGTH": 50,
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "hidden_size": args.hidden_size,
        "inner_size": 4 * args.hidden_size,
        "n_layers": 2,
        "n_heads": 2,
        "hidden_dropout_prob": 0.5,
        "attn_dropout_prob": 0.5,
        "learning_rate": 0.001,
        "train_batch_size": 2048,
        "eval_batch_size": 2048,
        "epochs": args.epochs,
        "stopping_step": 10,
        "eval_step": 1,
        "metrics": ["Recall", "NDCG", "Hit"],  # not MRR: RecBole 1.2.1's MRR uses np.float
        "topk": [10],
        "valid_metric": "NDCG@10",
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "seed": args.seed,
        "reproducibility": True,
        "use_gpu": False,
        "worker": 0,
        "show_progress": False,
        "checkpoint_dir": str(work / "saved"),
    }
    sys.argv = sys.argv[:1]  # RecBole's Config also parses --key=value from the command line: not ours
    config = Config(model="SASRec", dataset=name, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    torch.set_num_threads(args.threads)

    dataset = create_dataset(config)
    print(dataset, flush=True)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = SASRec(config, train_data._dataset).to(config["device"])
    trainer = Trainer(config, model)
    resumed_from = None
    if args.resume:
        found = [resume_path] if resume_path else sorted((work / "saved").glob("SASRec-*.pth"),
                                                          key=lambda f: f.stat().st_mtime)
        if not found or not found[-1].is_file():
            raise SystemExit(f"--resume: no checkpoint {resume_path or 'in ' + str(work / 'saved')}")
        resume = found[-1]
        # weights, optimizer state, epoch and best valid score come back; the shuffling RNG does
        # not, so a resumed run is not bit-identical to an uninterrupted one. New bests overwrite
        # this same checkpoint file.
        trainer.resume_checkpoint(resume)
        shown_ckpt = resume.relative_to(ROOT) if resume.is_relative_to(ROOT) else resume
        resumed_from = {"checkpoint": str(shown_ckpt), "epoch": trainer.start_epoch}
    if args.eval_only:
        best_valid_score, best_valid_result = trainer.best_valid_score, None
    else:
        best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    if best_valid_result is None:  # nothing improved after --resume (or --eval-only): the checkpoint's own
        best_valid_result = trainer.evaluate(valid_data, load_best_model=True, show_progress=False)
    recbole_test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    # 1-based like learn's training loop (RecBole counts epochs from 0)
    # (unknown with --eval-only: RecBole's log of the training run has it)
    epochs_run = None if args.eval_only else trainer.start_epoch + len(trainer.train_loss_dict)
    # the checkpoint is the best-valid epoch's (Trainer._save_checkpoint stores its 0-based "epoch")
    ckpt = torch.load(trainer.saved_model_file, map_location="cpu", weights_only=False)
    best_epoch = int(ckpt["epoch"]) + 1
    model.load_state_dict(ckpt["state_dict"])
    model.eval()

    # our own evaluation, both history modes
    tok2id = dataset.field2token_id["item_id"]
    n_items = dataset.item_num - 1  # without the padding item
    raw = {s: read_inter(f) for s, f in files.items()}
    before_valid: dict[str, set[str]] = {}
    for u, hist, tgt in raw["train"]:
        before_valid.setdefault(u, set()).update(hist)
        before_valid[u].add(tgt)
    before_test = {u: set(s) for u, s in before_valid.items()}
    for u, hist, tgt in raw["valid"]:
        before_test.setdefault(u, set()).update(hist)
        before_test[u].add(tgt)
    ours, longer = {}, {}
    popularity = train_popularity(raw["train"], tok2id, n_items)
    segments: dict[str, float] = {}
    for split, earlier in (("valid", before_valid), ("test", before_test)):
        seq, lens, targets, hists, longer[split] = build_split(raw[split], earlier, tok2id, 50)
        incl, excl = rank_split(model, seq, lens, targets, hists, n_items)
        ours[split] = {"incl": metrics_from_ranks(incl), "excl": metrics_from_ranks(excl), "users": len(targets)}
        if split == "test":  # test NDCG@10 / R@10 by the target's training popularity, as learn's runs log them
            for ranks, suffix in ((incl, ""), (excl, "_excl_hist")):
                got = segment_metrics(ranks, targets, hists, popularity, k=10, popularity_buckets=3,
                                      history_buckets=[])
                segments.update({f"test_{k}" if k.startswith("users_") else f"test_{k}{suffix}": v
                                 for k, v in got.items()})  # user counts: the same in both modes
    wall = time.perf_counter() - start

    metrics = {
        "test_ndcg_at_10": ours["test"]["incl"]["ndcg_at_10"],
        "test_recall_at_10": ours["test"]["incl"]["recall_at_10"],
        "test_ndcg_at_10_excl_hist": ours["test"]["excl"]["ndcg_at_10"],
        "test_recall_at_10_excl_hist": ours["test"]["excl"]["recall_at_10"],
        "best_valid_ndcg_at_10": ours["valid"]["incl"]["ndcg_at_10"],
        "best_valid_recall_at_10": ours["valid"]["incl"]["recall_at_10"],
        "best_valid_ndcg_at_10_excl_hist": ours["valid"]["excl"]["ndcg_at_10"],
        "best_valid_recall_at_10_excl_hist": ours["valid"]["excl"]["recall_at_10"],
        "test_mrr": ours["test"]["incl"]["mrr"],
        "test_mrr_excl_hist": ours["test"]["excl"]["mrr"],
        "test_ndcg_at_50": ours["test"]["incl"]["ndcg_at_50"],
        "test_recall_at_50": ours["test"]["incl"]["recall_at_50"],
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
        **segments,
    }
    shown = [".venv-recbole/bin/python", "bench/sasrec_recbole.py", "--data", args.data]
    for flag, val, default in (("--seed", args.seed, 2020), ("--epochs", args.epochs, 300),
                               ("--hidden-size", args.hidden_size, 64)):
        if val != default:
            shown += [flag, str(val)]
    if args.resume:
        shown += ["--resume"] + ([args.resume] if resume_path else [])
    if args.eval_only:
        shown.append("--eval-only")
    row = {
        "name": "peer_sasrec_recbole",
        "command": " ".join(shown),
        # an --eval-only run trained nothing: its own wall time is not the row's (RecBole's log has that)
        "wall_s": None if args.eval_only else round(wall, 1),
        "eval_wall_s": round(wall, 1),
        "metrics": metrics,
        "recbole_reported": {
            "test": {k: float(v) for k, v in recbole_test.items()},
            "best_valid": {k: float(v) for k, v in best_valid_result.items()},
            "best_valid_score": float(best_valid_score),
            "note": "RecBole's own full-sort evaluation: sequential models keep history items; ties by torch.topk",
        },
        "details": {
            "recbole": __import__("recbole").__version__, "torch": torch.__version__, "numpy": np.__version__,
            "seed": args.seed, "hidden_size": args.hidden_size, "n_layers": 2, "n_heads": 2,
            "inner_size": 4 * args.hidden_size, "dropout": 0.5, "lr": 0.001, "train_batch_size": 2048,
            "max_item_list_length": 50, "loss": "CE (full softmax)", "valid_metric": "NDCG@10",
            "stopping_step": 10, "threads": torch.get_num_threads(), "n_items": n_items,
            "users": {s: ours[s]["users"] for s in ours},
            "rows_whose_whole_history_is_longer_than_item_id_list": longer,
            "checkpoint": str(Path(trainer.saved_model_file).relative_to(ROOT)),
            "metric_code": "learn.evaluate.metrics.target_ranks_both + metrics_from_ranks",
            "resumed_from": resumed_from,
            "eval_only": args.eval_only,
        },
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "rows": [row]}
    fd, tmp = tempfile.mkstemp(dir=out_json.parent, prefix=out_json.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, out_json)

    print("\n| split | NDCG@10 | R@10 | NDCG@10 excl. hist | R@10 excl. hist | MRR |\n|---|---|---|---|---|---|")
    for split in ("valid", "test"):
        a, b = ours[split]["incl"], ours[split]["excl"]
        print(f"| {split} | {a['ndcg_at_10']:.4f} | {a['recall_at_10']:.4f} | {b['ndcg_at_10']:.4f} "
              f"| {b['recall_at_10']:.4f} | {a['mrr']:.4f} |")
    print(f"\nRecBole reported test: {dict(recbole_test)}")
    print(f"best epoch {best_epoch}, epochs run {epochs_run}, wall {wall:.1f} s -> {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

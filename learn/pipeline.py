"""The full LEARN pipeline in one process: data -> CEX -> PAL training -> full-ranking evaluation,
tracked in MLflow. ``flows/full_pipeline.py`` is the command-line entry point.

Stages (wall time of each is logged as ``time_<stage>_s``):
  data    read the dataset, render item texts, build sequences and the split
  embed   frozen-LLM content vectors, reusing every still-valid vector in the content store
  train   twin towers with early stopping on valid NDCG@10 (skipped by the content_* floors)
  test    full ranking on the test split, both history modes, segment breakdown
  export  (trained recipes) the serving bundle -- towers, content and item-embedding tables, faiss
          index, manifest -- plus plots, logged as artifacts with a pyfunc `retriever`, registered
          under ``tracking.registered_model`` with the alias `challenger`
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from learn.config import Config, flatten, to_dict
from learn.data.load import load_sequences
from learn.embed.catalog import embed_items
from learn.evaluate.baselines import BASELINES
from learn.data.schema import DataError
from learn.data.sequences import Splits
from learn.tracking.mlflow_run import Tracker
from learn.utils import StageTimer, atomic_path, atomic_write_text, seed_everything



@dataclass
class PipelineResult:
    run_id: str | None
    metrics: dict[str, float]
    output_dir: Path
    seconds: dict[str, float] = field(default_factory=dict)


def evaluate_floor(cfg: Config, content: np.ndarray, splits: Splits, popularity: np.ndarray, which: str,
                   prefix: str) -> dict[str, float]:
    from learn.evaluate import evaluate_both_modes
    from learn.evaluate.baselines import content_item_vectors, content_user_vectors

    split = splits.valid if which == "valid" else splits.test
    return evaluate_both_modes(
        content_user_vectors(content, split, cfg.train.recipe, cfg.data.max_history), content_item_vectors(content),
        split,
        ks=cfg.eval.ks, exclude_history=cfg.eval.exclude_history, chunk_size=cfg.eval.chunk_size,
        train_popularity=popularity, prefix=prefix, popularity_buckets=cfg.eval.popularity_buckets,
        history_buckets=cfg.eval.history_buckets,
    )


def dataset_fingerprint(data) -> str:
    """A digest of what the model saw: item ids and texts, and every user's item sequence."""
    h = hashlib.sha256()
    for item_id, text in zip(data.item_ids, data.texts):
        h.update(f"{item_id}\t{text}\n".encode())
    for seq in data.seqs:
        h.update(np.asarray(seq, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


def export_run(cfg: Config, model, item_ids, content: np.ndarray, info: dict, history: list[dict],
               metrics: dict[str, float], out_dir: Path, tracker: Tracker) -> dict[str, float]:
    """Write the serving bundle and plots under ``out_dir`` and log them (and the retriever) to MLflow.

    ``info``: the fields of :class:`BundleInfo`."""
    from learn.export.bundle import BundleInfo, write_bundle

    bundle_dir = out_dir / "bundle"
    summary = write_bundle(model, [str(i) for i in item_ids], content, bundle_dir, info=BundleInfo(**info),
                           index_kind=cfg.export.index_kind, flat_max_items=cfg.export.flat_max_items,
                           recall_queries=cfg.export.recall_queries, seed=cfg.seed)
    out = {"index_items": float(len(item_ids)), "index_recall_at_10_vs_flat": float(summary.index_recall_at_10)}
    print(f"[export] bundle in {bundle_dir}: {summary.index_kind} index over {len(item_ids)} items, "
          f"recall@10 vs Flat {summary.index_recall_at_10:.4f}", flush=True)
    tracker.log_artifacts(bundle_dir, "bundle")
    if cfg.export.plots:
        from learn.tracking.plots import plot_segments, plot_training_curves

        plot_training_curves(history, out_dir / "plots" / "training_curves.png")
        plot_segments(metrics, out_dir / "plots" / "segments_ndcg_at_10.png", metric="test_ndcg_at_10")
        tracker.log_artifacts(out_dir / "plots", "plots")
    if tracker.run_id is not None:
        from learn import registry
        from learn.serve.retriever import log_retriever

        name = cfg.tracking.registered_model
        if name:
            version, aliases = registry.register_trained(registry.client(tracker.uri), bundle_dir, name,
                                                         cfg.data.max_history)
            tracker.set_tags({"registered_model": name, "registered_model_version": version})
            print(f"[export] registered {name} version {version} (alias {', '.join(aliases)})", flush=True)
        else:
            log_retriever(bundle_dir, name="retriever", max_history=cfg.data.max_history)
    return out


def run_pipeline(cfg: Config, progress: bool = True) -> PipelineResult:
    seed_everything(cfg.seed)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    timer = StageTimer()
    tracker = Tracker(cfg.tracking.enabled, cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name,
                      system_metrics=cfg.tracking.system_metrics, artifact_location=cfg.tracking.artifact_location)
    with tracker:
        params = flatten(cfg)
        tracker.log_params(params)

        with timer("data"):
            raw, data = load_sequences(cfg.data)
            if cfg.data.split == "time_cut" and not raw.has_clock:
                raise DataError(f"data.split=time_cut needs real timestamps, but {raw.source or raw.name} has "
                                f"only an order; use data.split=leave_one_out")
            splits = data.split(cfg.data.split, cfg.data.time_cut, cfg.seed)
            popularity = splits.train_popularity(data.num_items)
        n_inter = int(sum(len(s) for s in data.seqs))
        print(f"[data] {data.name}: {data.num_items} items, {len(data.seqs)} users, {n_inter} interactions; "
              f"{raw.drops.summary()}; split {splits.kind}: valid {len(splits.valid)}, test {len(splits.test)}",
              flush=True)
        data_info = {
            "data_items": data.num_items, "data_users": len(data.seqs), "data_interactions": n_inter,
            "data_valid_users": len(splits.valid), "data_test_users": len(splits.test),
            "data_cold_items": int((popularity == 0).sum()),
            "dropped_rows_total": raw.drops.total, **raw.drops.metrics(),
            **{f"split_{k}": v for k, v in splits.info.items()},
        }
        tracker.log_metrics(data_info)
        fingerprint = dataset_fingerprint(data)
        tracker.set_tags({"dataset": data.name, "dataset_source": raw.source or cfg.data.path,
                          "dataset_fingerprint": fingerprint})
        tracker.log_dataset(data.name, str(raw.source or cfg.data.path), fingerprint, "training",
                            {"items": data.num_items, "users": len(data.seqs), "interactions": n_inter,
                             "dropped_rows": raw.drops.total})

        with timer("embed"):
            content, embed_stats, encoder_id = embed_items(cfg.embed, data.name, data.item_ids, data.texts, progress)
        print(f"[embed] {encoder_id}: dim {content.shape[1]}, {embed_stats}", flush=True)
        tracker.log_params({"encoder_id": encoder_id})
        tracker.log_metrics({f"embed_{k}": v for k, v in embed_stats.items() if isinstance(v, (int, float))})

        out_dir = Path(cfg.output_dir) / (tracker.run_id or time.strftime("local-%Y%m%d-%H%M%S"))
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics: dict[str, float] = {}
        if cfg.train.recipe in BASELINES:
            with timer("test"):
                metrics.update(evaluate_floor(cfg, content, splits, popularity, "valid", "best_valid_"))
                metrics.update(evaluate_floor(cfg, content, splits, popularity, "test", "test_"))
        else:
            from learn.towers.model import TwinTowers
            from learn.train.fit import fit
            from learn.train.loop import evaluate_model

            seed_everything(cfg.seed)  # the same initial weights whether or not the encoder ran
            model = TwinTowers.from_config(cfg.model, content, popularity)
            n_params = sum(p.numel() for p in model.parameters())
            print(f"[train] recipe {cfg.train.recipe}, item tower {cfg.model.item_tower}, {n_params:,} parameters",
                  flush=True)
            tracker.log_params({"model_parameters": n_params})
            with timer("train"):
                if cfg.train.backend == "ray":
                    from learn.train.distributed import MlflowTarget, fit_distributed

                    # rank 0 logs each epoch to this run itself (also epochs replayed after a restart)
                    result = fit_distributed(
                        model, splits, cfg.train, cfg.eval, cfg.data.max_history, seed=cfg.seed,
                        storage_path=cfg.train.storage_path or Path(cfg.output_dir).resolve() / "ray",
                        run_name=tracker.run_id,
                        tracking=MlflowTarget(tracker.uri, tracker.run_id) if tracker.run_id else None)
                else:
                    result = fit(model, splits, cfg.train, cfg.eval, cfg.data.max_history, seed=cfg.seed,
                                 on_epoch=lambda epoch, row: tracker.log_metrics(
                                     {k: v for k, v in row.items() if k != "epoch"}, step=epoch),
                                 progress=progress)
            metrics.update({"best_epoch": result.best_epoch, "epochs_run": len(result.history),
                            "stopped_early": float(result.stopped_early)})
            # the restored (best) epoch's valid metrics; per-epoch valid_* values are in the history
            metrics.update({f"best_{k}": v for k, v in result.best_valid.items()})
            with timer("test"):
                metrics.update(evaluate_model(model, splits.test, cfg.eval, cfg.data.max_history,
                                              train_popularity=popularity, prefix="test_"))
            with atomic_path(out_dir / "towers.pt") as tmp:
                torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict(),
                            "encoder_id": encoder_id}, tmp)
            if cfg.export.enabled:
                with timer("export"):
                    info = {"encoder_id": encoder_id, "dataset": data.name, "dataset_fingerprint": fingerprint,
                            "run_id": tracker.run_id, "max_history": cfg.data.max_history,
                            "config": to_dict(cfg)}
                    metrics.update(export_run(cfg, model, data.item_ids, content, info, result.history, metrics,
                                              out_dir, tracker))
        metrics.update({f"time_{k}_s": v for k, v in timer.seconds.items()})
        tracker.log_metrics(metrics)
        summary = {"run_id": tracker.run_id, "dataset": data.name, "encoder_id": encoder_id,
                   "config": to_dict(cfg), "metrics": metrics, "data": data_info}
        atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2, default=str))
        tracker.log_dict(summary, "metrics.json")
    print_summary(metrics, cfg)
    return PipelineResult(run_id=tracker.run_id, metrics=metrics, output_dir=out_dir, seconds=dict(timer.seconds))


def print_summary(metrics: dict[str, float], cfg: Config) -> None:
    mode = "history excluded" if cfg.eval.exclude_history else "history not excluded"
    other = "_incl_hist" if cfg.eval.exclude_history else "_excl_hist"
    print(f"\n== test metrics ({mode}; other mode in parentheses) ==")
    for k in cfg.eval.ks:
        for name in ("recall", "ndcg"):
            key = f"test_{name}_at_{k}"
            if key in metrics:
                print(f"  {key:<22} {metrics[key]:.4f}   ({metrics.get(key + other, float('nan')):.4f})")
    if "test_mrr" in metrics:
        print(f"  {'test_mrr':<22} {metrics['test_mrr']:.4f}   ({metrics.get('test_mrr' + other, float('nan')):.4f})")
    times = ", ".join(f"{k[5:-2]} {v:.1f}s" for k, v in metrics.items() if k.startswith("time_"))
    print(f"  wall time: {times}", flush=True)

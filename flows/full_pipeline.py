"""The whole LEARN pipeline, read top to bottom: data -> frozen-LLM item embeddings -> twin towers ->
full-ranking evaluation -> serving bundle -> registered retriever, tracked in one MLflow run.

    python flows/full_pipeline.py --config conf/default.yaml [key=value ...]
    ray job submit --working-dir . -- python flows/full_pipeline.py --config conf/default.yaml train.backend=ray

Stages (the wall time of each is logged as ``time_<stage>_s``):
  data    read the dataset, render item texts, build sequences and the split
  embed   frozen-LLM content vectors, reusing every still-valid vector in the content store
  train   twin towers with early stopping on the valid split (a baseline trains nothing)
  score_mix (``score.*`` candidates) the served score's weights chosen on valid (learn/towers/mix.py)
  test    full ranking on the test split, both history modes, segment breakdown (with a score mix: of
          the served score, and of the towers alone as ``test_towers_*``)
  export  (trained recipes, ``export.enabled``) the serving bundle -- towers, content and item-embedding
          tables, faiss index, manifest -- logged once, as the artifacts of the run's pyfunc ``retriever``,
          registered under ``tracking.registered_model`` as ``challenger`` (and ``champion`` when it is the first)
Every key is listed, with its type and default, in learn/config.py.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402

from learn import registry  # noqa: E402
from learn.cli import run_flow  # noqa: E402
from learn.config import Config, flatten, to_dict  # noqa: E402
from learn.data.load import load_sequences  # noqa: E402
from learn.data.schema import DataError  # noqa: E402
from learn.device import resolve_device  # noqa: E402
from learn.embed.catalog import check_before_run, embed_items  # noqa: E402
from learn.evaluate.baselines import BASELINES, evaluate_baseline  # noqa: E402
from learn.evaluate.metrics import sample_users  # noqa: E402
from learn.evaluate.report import format_summary  # noqa: E402
from learn.export.bundle import BundleInfo  # noqa: E402
from learn.export.towers import save_tower_weights  # noqa: E402
from learn.towers.model import TwinTowers, resolve_positions  # noqa: E402
from learn.tracking.mlflow_run import Tracker  # noqa: E402
from learn.tracking.plots import plot_segments, plot_training_curves  # noqa: E402
from learn.train.distributed import MlflowTarget, fit_distributed  # noqa: E402
from learn.train.fit import fit  # noqa: E402
from learn.train.fit import selection_key  # noqa: E402
from learn.train.loop import choose_score_mix, evaluate_model, mix_metric_key  # noqa: E402
from learn.towers.mix import ScoreMix, candidates, popularity_prior  # noqa: E402
from learn.utils import StageTimer, atomic_write_text, seed_everything  # noqa: E402


@dataclass
class PipelineResult:
    run_id: str | None
    metrics: dict[str, float]
    output_dir: Path
    seconds: dict[str, float] = field(default_factory=dict)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # {stage: {wall_s, cpu_s, peak_rss_gb}}


def run_pipeline(cfg: Config, progress: bool = True) -> PipelineResult:
    seed_everything(cfg.seed)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    timer = StageTimer()
    # data: sequences, split, popularity -- read and checked before a run exists, so bad input
    # leaves no failed run behind
    with timer("data"):
        raw, data = load_sequences(cfg.data)
        if cfg.data.split == "time_cut" and not raw.has_clock:
            raise DataError(f"data.split=time_cut needs real timestamps, but {raw.source or raw.name} has "
                            f"only an order; use data.split=leave_one_out")
        splits = data.split(cfg.data.split, cfg.data.time_cut, cfg.seed)
        data.release_times()  # 8 bytes per interaction nothing reads after the split
        popularity = splits.train_popularity(data.num_items)
        # model.positions=auto: learned position embeddings on long training sequences only
        towers_cfg, mean_history = resolve_positions(cfg.model, splits.train, cfg.data.max_history)
    check_before_run(cfg.embed, data.name)  # an unknown encoder or a corrupt content store: no run either
    resolve_device(cfg.train.device, "train.device")  # train.device=cuda without a GPU: no run either
    # a distinct, readable run name unless tracking.run_name gives one (uuid4: not the seeded RNGs)
    run_name = cfg.tracking.run_name or f"{data.name}-{cfg.train.recipe}-{uuid.uuid4().hex[:6]}"
    tracker = Tracker(cfg.tracking.enabled, cfg.tracking.tracking_uri, cfg.tracking.experiment, run_name,
                      system_metrics=cfg.tracking.system_metrics, artifact_location=cfg.tracking.artifact_location)
    with tracker:
        tracker.log_params(flatten(cfg))  # as configured (model.positions=auto stays auto here) ...
        # counts and the dataset's fingerprint go to the run
        n_inter = data.num_interactions
        print(f"[data] {data.name}: {data.num_items} items, {len(data.seqs)} users, {n_inter} "
              f"interactions; {raw.drops.summary()}; split {splits.kind}: valid {len(splits.valid)}, test "
              f"{len(splits.test)}", flush=True)
        data_info = {
            "data_mean_train_history": round(mean_history, 3),
            "data_items": data.num_items, "data_users": len(data.seqs), "data_interactions": n_inter,
            "data_valid_users": len(splits.valid), "data_test_users": len(splits.test),
            "data_cold_items": int((popularity == 0).sum()),
            "dropped_rows_total": raw.drops.total, **raw.drops.metrics(),
            **{f"split_{k}": v for k, v in splits.info.items()},
        }
        tracker.log_metrics(data_info)
        if cfg.model.positions == "auto" and cfg.train.recipe not in BASELINES:
            print(f"[model] positions auto -> {towers_cfg.positions}: the training targets have "
                  f"{mean_history:.1f} earlier items on average (learned at >= "
                  f"{cfg.model.positions_min_history:g})", flush=True)
            tracker.log_params({"model_positions_resolved": towers_cfg.positions})  # ... and as decided
        fingerprint, source = data.fingerprint(), str(raw.source or cfg.data.path)
        tracker.set_tags({"dataset": data.name, "dataset_source": source, "dataset_fingerprint": fingerprint})
        tracker.log_dataset(data.name, source, fingerprint, "training",
                            {"items": data.num_items, "users": len(data.seqs), "interactions": n_inter,
                             "dropped_rows": raw.drops.total})

        # embed: one frozen content vector per item
        with timer("embed"):
            content, embed_stats, encoder_id = embed_items(cfg.embed, data.name, data.item_ids, data.texts, progress)
        print(f"[embed] {encoder_id}: dim {content.shape[1]}, {embed_stats}", flush=True)
        tracker.log_params({"encoder_id": encoder_id})
        tracker.log_metrics({f"embed_{k}": v for k, v in embed_stats.items() if isinstance(v, (int, float))})

        out_dir = Path(cfg.output_dir) / (tracker.run_id or time.strftime("local-%Y%m%d-%H%M%S"))
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics: dict[str, float] = {}
        if cfg.train.recipe in BASELINES:  # a floor on the raw content vectors: nothing to train or export
            with timer("test"):
                test = sample_users(splits.test, cfg.eval.test_max_users, cfg.seed)
                for split, prefix in ((sample_users(splits.valid, cfg.eval.valid_max_users, cfg.seed), "best_valid_"),
                                      (test, "test_")):
                    metrics.update(evaluate_baseline(cfg.train.recipe, content, split, cfg.eval, cfg.data.max_history,
                                                     popularity, prefix))
        else:
            # train: the twin towers, the recipe's loss, early stopping on valid; the best epoch restored
            seed_everything(cfg.seed)  # the same initial weights whether or not the encoder ran
            model = TwinTowers.from_config(towers_cfg, content, popularity)  # positions decided
            n_params = sum(p.numel() for p in model.parameters())
            print(f"[train] recipe {cfg.train.recipe}, item tower {cfg.model.item_tower}, output dim "
                  f"{model.cfg.d_out}, {n_params:,} parameters", flush=True)
            tracker.log_params({"model_parameters": n_params})
            with timer("train"):
                if cfg.train.backend == "ray":  # rank 0 logs each epoch to this run itself
                    result = fit_distributed(
                        model, splits, cfg.train, cfg.eval, cfg.data.max_history, seed=cfg.seed,
                        storage_path=cfg.train.storage_path or Path(cfg.output_dir).resolve() / "ray",
                        run_name=tracker.run_id,
                        tracking=MlflowTarget(tracker.uri, tracker.run_id) if tracker.run_id else None)
                else:
                    result = fit(model, splits, cfg.train, cfg.eval, cfg.data.max_history, seed=cfg.seed,
                                 on_epoch=tracker.log_epoch, progress=progress)
            metrics.update({"best_epoch": result.best_epoch, "epochs_run": len(result.history),
                            "stopped_early": float(result.stopped_early),
                            **{f"best_{k}": v for k, v in result.best_valid.items()}})
            save_tower_weights(model, out_dir / "towers")

            # score mix: the served score's weights, chosen on the valid users training selected on
            mix, prior = ScoreMix(), popularity_prior(popularity)
            options = candidates(cfg.score.content_weights, cfg.score.popularity_weights,
                                 cfg.score.cold_content_weights, cfg.score.history_weights)
            if len(options) > 1 or options[0].served:
                with timer("score_mix"):
                    key = selection_key(cfg.eval)
                    mix, table = choose_score_mix(
                        model, sample_users(splits.valid, cfg.eval.valid_max_users, cfg.seed), cfg.eval,
                        cfg.data.max_history, options, prior, key, cold_floor=cfg.score.select == "cold_floor",
                        train_popularity=popularity)
                metrics.update(table)
                metrics.update({"score_mix_content_weight": mix.content_weight,
                                "score_mix_popularity_weight": mix.popularity_weight,
                                "score_mix_cold_content_weight": mix.unseen_content_weight,
                                "score_mix_history_weight": mix.history_weight,
                                f"score_mix_valid_{key}": table[mix_metric_key(key, mix)]})
                print(f"[score_mix] chosen on valid {key} over {len(options)} candidates: content weight "
                      f"{mix.content_weight:g} (unseen items {mix.unseen_content_weight:g}), popularity weight "
                      f"{mix.popularity_weight:g}, history penalty {mix.history_weight:g} (valid "
                      f"{metrics[f'score_mix_valid_{key}']:.4f}; towers alone {metrics['best_valid_' + key]:.4f})",
                      flush=True)

            # test: full ranking over the catalog, both history modes, segments
            with timer("test"):
                test = sample_users(splits.test, cfg.eval.test_max_users, cfg.seed)
                # with a mix: the served score, and beside it what the towers alone score
                metrics.update(evaluate_model(model, test, cfg.eval, cfg.data.max_history,
                                              train_popularity=popularity, prefix="test_", mix=mix, prior=prior,
                                              towers_prefix="test_towers_"))
                metrics["data_test_users_scored"] = float(len(test))
            if cfg.export.plots:
                plot_training_curves(result.history, out_dir / "plots" / "training_curves.png")
                plot_segments(metrics, out_dir / "plots" / "segments_ndcg_at_10.png", metric="test_ndcg_at_10")
                tracker.log_artifacts(out_dir / "plots", "plots")

            # export and register: bundle -> pyfunc retriever (the bundle's one MLflow copy) -> registry aliases
            if cfg.export.enabled:
                with timer("export"):
                    info = BundleInfo(encoder_id=encoder_id, dataset=data.name, dataset_fingerprint=fingerprint,
                                      run_id=tracker.run_id, max_history=cfg.data.max_history,
                                      config=to_dict(replace(cfg, model=towers_cfg)))  # as the towers are
                    exported = registry.export_trained(
                        model, [str(i) for i in data.item_ids], content, out_dir / "bundle", info, cfg.export,
                        seed=cfg.seed, max_history=cfg.data.max_history,
                        tracking_uri=tracker.uri if tracker.run_id is not None else None,
                        registered_model=cfg.tracking.registered_model, mix=mix, prior=prior)
                    bundle, name = exported.bundle, cfg.tracking.registered_model
                    metrics.update({"index_items": float(bundle.n_items),
                                    "index_recall_at_10_vs_flat": float(bundle.index_recall_at_10)})
                    print(f"[export] bundle in {bundle.directory}: {bundle.index_kind} index over {bundle.n_items} "
                          f"items, recall@10 vs Flat {bundle.index_recall_at_10:.4f}", flush=True)
                    if exported.version is not None:
                        tracker.set_tags({"registered_model": name, "registered_model_version": exported.version})
                        print(f"[export] registered {name} version {exported.version} (alias "
                              f"{', '.join(exported.aliases)})", flush=True)

        metrics.update({f"time_{k}_s": v for k, v in timer.seconds.items()})
        tracker.log_metrics(metrics)
        summary = {"run_id": tracker.run_id, "dataset": data.name, "encoder_id": encoder_id,
                   "config": to_dict(cfg), "metrics": metrics, "data": data_info,
                   "model_positions_resolved": towers_cfg.positions}  # config as given; positions as decided
        atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2, default=str))
        tracker.log_dict(summary, "metrics.json")
    print(format_summary(metrics, cfg.eval), flush=True)
    return PipelineResult(run_id=tracker.run_id, metrics=metrics, output_dir=out_dir, seconds=dict(timer.seconds),
                          stages={k: dict(v) for k, v in timer.stages.items()})


def main(argv: list[str] | None = None) -> int:
    def run(cfg: Config, progress: bool) -> str:
        result = run_pipeline(cfg, progress=progress)
        return f"run {result.run_id or '(tracking off)'}; outputs in {result.output_dir}"

    return run_flow(argv, "full_pipeline.py", __doc__, run)


if __name__ == "__main__":
    sys.exit(main())

"""Re-embedding: bring a served retriever's catalog up to date without retraining.

    python flows/reembed.py --config conf/default.yaml data.path=<current catalog> [reembed.alias=champion]
    ray job submit --working-dir . -- python flows/reembed.py --config conf/default.yaml data.path=<dir>

LEARN's item vectors depend on the item alone, so a new item is servable once its text is embedded
by the frozen LLM and passed through the item tower. This flow:

1. reads the registered retriever at ``models:/<tracking.registered_model>@<reembed.alias>`` and
   verifies its bundle (checksums; an index built from another item tower is refused);
2. refuses a configuration whose encoder id differs from the one the served towers were trained
   on (vectors of another encoder are not comparable);
3. reads the current catalog (``data.path``), embeds only items whose (text hash, encoder id) is
   missing from the content store (new or changed text), on the same local or Ray Data path as
   the pipeline, and counts new, changed, unchanged and removed items against the served catalog;
4. runs the served item tower over the items whose content vector differs from the served one
   (the rest keep their served item vectors), builds a new index and writes a new bundle with the
   same towers, assembled aside and renamed into place; its info keeps the served model's training
   provenance (config, max_history, dataset fingerprint, run id), and the new version is served
   with the served model's max_history, whatever this config says;
5. logs an MLflow run (tags ``source_model_version``, ``catalog_fingerprint``) with the counts, the
   index size and, where the data has test users whose target item is new, recall@10 of those
   users before (served index) and after (new index); registers the new bundle as a new version
   of the retriever and only then moves the alias onto it. The alias move is the single switch:
   before it, clients get the old version, after it the new one, never a half-written index.

Idempotent: when the catalog (ids, texts) equals the served one nothing is published (and the
content store makes the embedding step a no-op). A run killed at any point and started again ends
in the same state: the content store keeps what was embedded; a bundle or model version already
made for the same catalog fingerprint is reused instead of made twice.
Every key is listed, with its type and default, in learn/config.py.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import mlflow  # noqa: E402

from learn import registry  # noqa: E402
from learn.cli import run_flow  # noqa: E402
from learn.config import Config, flatten  # noqa: E402
from learn.data.load import load_sequences  # noqa: E402
from learn.embed.catalog import check_before_run, embed_items  # noqa: E402
from learn.export.bundle import load_bundle, rebuild_bundle  # noqa: E402
from learn.export.reembed import (FINGERPRINT_TAG, SOURCE_TAG, ReembedError, ReembedResult,  # noqa: E402
                                  catalog_fingerprint, catalog_id_vectors, finished_bundle, item_vectors,
                                  new_item_recall, new_item_targets, publish_catalog_version, served_bundle)
from learn.tracking.mlflow_run import Tracker, resolve_uri  # noqa: E402
from learn.utils import text_hash  # noqa: E402


def reembed(cfg: Config, progress: bool = True) -> ReembedResult:
    """Run the flow described in the module docstring; returns what it did."""
    name = cfg.tracking.registered_model
    if not cfg.tracking.enabled or not name:
        raise ReembedError("re-embedding updates a registered retriever: it needs tracking.enabled=true and "
                           "tracking.registered_model set")
    uri = resolve_uri(cfg.tracking.tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = registry.client(uri)
    out_root = Path(cfg.output_dir) / "reembed"
    start = time.perf_counter()

    # 1-2. the served retriever, and an encoder that makes comparable vectors (and a readable store)
    source_version, source = served_bundle(client, name, cfg.reembed.alias, cfg.reembed.model_version,
                                           out_root / "served", progress)
    _, data = load_sequences(cfg.data)
    eid = check_before_run(cfg.embed, data.name)
    if source.info.encoder_id != eid:
        raise ReembedError(
            f"encoder mismatch: {name} version {source_version} was trained on vectors of '{source.info.encoder_id}', "
            f"this config embeds with '{eid}'; vectors of different encoders cannot be mixed. Use the served "
            f"encoder's settings (embed.model, embed.max_tokens, embed.dtype) or train a new model")
    # the served retriever's history length (a bundle re-embedded before it was carried: the config's)
    max_history = source.info.max_history or cfg.data.max_history

    # 3. the current catalog against the served one
    ids = [str(i) for i in data.item_ids]
    fingerprint = catalog_fingerprint(ids, [text_hash(t) for t in data.texts], eid, source.tower_id)
    new_ids = [i for i in ids if i not in source.id_to_row]
    removed = sorted(set(source.id_to_row) - set(ids))

    tracker = Tracker(True, uri, cfg.tracking.experiment, cfg.tracking.run_name or "reembed",
                      system_metrics=False, artifact_location=cfg.tracking.artifact_location)
    with tracker:
        tracker.set_tags({SOURCE_TAG: source_version, "registered_model": name, "flow": "reembed",
                          "reembed_alias": cfg.reembed.alias, FINGERPRINT_TAG: fingerprint,
                          "source_tower_id": source.tower_id})
        tracker.log_params({k: v for k, v in flatten(cfg).items() if k.split(".")[0] in ("data", "embed", "reembed")})
        tracker.log_params({"encoder_id": eid})
        content, stats, _ = embed_items(cfg.embed, data.name, ids, data.texts, progress)

        # 4. the item tower only where the content vector differs from the served one
        embeddings, changed_rows = item_vectors(source, ids, content)
        unchanged_catalog = ids == source.item_ids and not changed_rows.any()
        metrics = {"items_total": float(len(ids)), "items_embedded": float(stats["items_embedded"]),
                   "items_unchanged": float(stats["items_reused"]), "items_removed": float(len(removed)),
                   "items_new": float(len(new_ids)),
                   "items_changed": float(changed_rows.sum() - len(new_ids)),
                   "item_tower_rows": float(changed_rows.sum())}
        # cold start: test users whose target item the served index does not hold
        histories, targets = (new_item_targets(data, ids, set(new_ids)) if new_ids and cfg.reembed.eval_new_items
                              else ([], []))
        if targets:
            metrics["new_item_test_users"] = float(len(targets))
            metrics["new_item_recall_at_10_before"] = new_item_recall(source, histories, targets, max_history)

        served_version, bundle_dir = source_version, None
        if unchanged_catalog:
            print(f"[reembed] catalog unchanged against {name} version {source_version}: nothing to publish",
                  flush=True)
            metrics["index_items"] = float(source.index.size)
            tracker.log_metrics(metrics)
        else:
            bundle_dir = out_root / fingerprint / "bundle"
            # the served model's training provenance (config, max_history, ...) and this catalog
            info = replace(source.info, max_history=max_history, catalog_fingerprint=fingerprint,
                           source_model_version=source_version, reembed_run_id=tracker.run_id)
            new = finished_bundle(bundle_dir, fingerprint)
            if new is None:
                rebuild_bundle(source, ids, content, embeddings, bundle_dir, info, index_kind=cfg.export.index_kind,
                               flat_max_items=cfg.export.flat_max_items, recall_queries=cfg.export.recall_queries,
                               seed=cfg.seed, id_vectors=catalog_id_vectors(source, ids, changed_rows))
                new = load_bundle(bundle_dir)
            metrics["index_items"] = float(new.index.size)
            metrics["index_recall_at_10_vs_flat"] = float(new.manifest["info"]["index_recall_at_10_vs_flat"])
            if targets:
                metrics["new_item_recall_at_10_after"] = new_item_recall(new, histories, targets, max_history)
            tracker.log_metrics(metrics)
            # 5. register (or find the version an interrupted run registered), then move the alias; the
            # bundle reaches MLflow once, inside the registered retriever, checked against its manifest
            served_version = publish_catalog_version(client, name, cfg.reembed.alias, fingerprint, source_version,
                                                     bundle_dir, max_history, tracker, manifest=new.manifest)
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        tracker.log_metrics({"seconds": metrics["seconds"]})
        tracker.set_tags({"served_version": served_version})
    print(f"[reembed] {json.dumps(metrics)}", flush=True)
    return ReembedResult(tracker.run_id, name, cfg.reembed.alias, source_version, str(served_version),
                         not unchanged_catalog, metrics, bundle_dir)


def main(argv: list[str] | None = None) -> int:
    def run(cfg: Config, progress: bool) -> str:
        r = reembed(cfg, progress=progress)
        return (f"run {r.run_id}; {r.registered_model}@{r.alias} serves version {r.served_version} "
                f"({'published' if r.published else 'unchanged'}; read version {r.source_version})")

    return run_flow(argv, "reembed.py", __doc__, run, errors={ReembedError: ("reembed error", 4)})


if __name__ == "__main__":
    sys.exit(main())

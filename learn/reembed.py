"""Re-embedding: bring a served retriever's catalog up to date without retraining.

    python flows/reembed.py --config conf/default.yaml data.path=<current catalog> [reembed.alias=champion]

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
   same towers (``rebuild_bundle``), assembled aside and renamed into place;
5. logs an MLflow run (tags ``source_model_version``, ``catalog_fingerprint``) with the counts, the
   index size and, where the data has test users whose target item is new, recall@10 of those
   users before (served index) and after (new index); registers the new bundle as a new version
   of the retriever and only then moves the alias onto it. The alias move is the single switch:
   before it, clients get the old version, after it the new one, never a half-written index.

Idempotent: when the catalog (ids, texts) equals the served one nothing is published (and the
content store makes the embedding step a no-op). A run killed at any point and started again ends
in the same state: the content store keeps what was embedded; a bundle or model version already
made for the same catalog fingerprint is reused instead of made twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from learn.config import Config, flatten

log = logging.getLogger(__name__)

FINGERPRINT_TAG = "catalog_fingerprint"
SOURCE_TAG = "source_model_version"


class ReembedError(RuntimeError):
    """The re-embedding cannot go ahead (no served model, encoder mismatch, ...); the message says why."""


@dataclass
class ReembedResult:
    run_id: str | None
    registered_model: str
    alias: str
    source_version: str
    served_version: str  # what the alias points at when the flow ends
    published: bool  # a new version was made (or reused) and the alias moved
    metrics: dict[str, float] = field(default_factory=dict)
    bundle_dir: Path | None = None


def catalog_fingerprint(item_ids: list[str], text_hashes: list[str], encoder_id: str, tower_id: str) -> str:
    """Names a re-embedded catalog: its items and texts (in order), the encoder and the item tower."""
    h = hashlib.sha256(f"{encoder_id}\n{tower_id}\n".encode())
    for item_id, th in zip(item_ids, text_hashes):
        h.update(f"{item_id}\t{th}\n".encode())
    return h.hexdigest()[:24]


def _served_bundle(client: Any, name: str, alias: str, version: str | None, cache: Path,
                   progress: bool = True) -> tuple[Any, Any]:
    """(model version, loaded Bundle) of what ``name@alias`` (or ``name/version``) serves."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from learn.export.bundle import load_bundle
    from learn.export.manifest import ArtifactError
    from learn.serve.retriever import BUNDLE_ARTIFACT

    try:
        mv = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        which = f"version {version}" if version else f"alias '{alias}'"
        raise ReembedError(
            f"registered model '{name}' has no {which} on {client.tracking_uri} ({exc.message}). Train and "
            f"register one first (flows/full_pipeline.py registers it as 'challenger'; flows/compare.py --promote "
            f"sets 'champion'), or set reembed.alias / reembed.model_version") from None
    target = cache / f"{name}-v{mv.version}"
    if not (target / "MLmodel").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        if not progress:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(target))
    try:
        bundle = load_bundle(target / "artifacts" / BUNDLE_ARTIFACT)
    except ArtifactError as exc:
        raise ReembedError(f"the served retriever {name} version {mv.version} has a bad bundle: {exc}") from exc
    return mv, bundle


def _new_item_recall(bundle: Any, histories: list[list[str]], targets: list[str], max_history: int,
                     k: int = 10) -> float:
    """Recall@k of ``targets`` for users with these histories, against ``bundle``'s index."""
    vecs, _ = bundle.user_vectors(histories, max_history)
    ok = ~np.isnan(vecs).any(1)
    hits = 0
    if ok.any():
        ids, _ = bundle.index.search(vecs[ok], k=k)
        hits = sum(t in set(row) for t, row in zip(np.asarray(targets)[ok], ids.tolist()))
    return hits / max(len(targets), 1)


def reembed(cfg: Config, progress: bool = True) -> ReembedResult:
    """Run the flow described in the module docstring; returns what it did."""
    import mlflow

    from learn.embed.models import configured_encoder
    from learn.export.bundle import load_bundle, rebuild_bundle
    from learn.data.load import load_sequences
    from learn.embed.catalog import embed_items
    from learn.tracking.mlflow_run import Tracker, resolve_uri
    from learn.utils import text_hash

    name = cfg.tracking.registered_model
    if not cfg.tracking.enabled or not name:
        raise ReembedError("re-embedding updates a registered retriever: it needs tracking.enabled=true and "
                           "tracking.registered_model set")
    uri = resolve_uri(cfg.tracking.tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    out_root = Path(cfg.output_dir) / "reembed"
    start = time.perf_counter()

    source_mv, source = _served_bundle(client, name, cfg.reembed.alias, cfg.reembed.model_version,
                                       out_root / "served", progress)
    served_eid = source.manifest["info"].get("encoder_id")
    _, eid = configured_encoder(cfg.embed)
    if served_eid != eid:
        raise ReembedError(
            f"encoder mismatch: {name} version {source_mv.version} was trained on vectors of '{served_eid}', "
            f"this config embeds with '{eid}'; vectors of different encoders cannot be mixed. Use the served "
            f"encoder's settings (embed.model, embed.max_tokens, embed.dtype) or train a new model")

    _, data = load_sequences(cfg.data)
    ids = [str(i) for i in data.item_ids]
    hashes = [text_hash(t) for t in data.texts]
    fingerprint = catalog_fingerprint(ids, hashes, eid, source.tower_id)

    served_rows = source.id_to_row
    new_ids = [i for i in ids if i not in served_rows]
    removed = sorted(set(served_rows) - set(ids))

    tracker = Tracker(True, uri, cfg.tracking.experiment, cfg.tracking.run_name or "reembed",
                      system_metrics=False, artifact_location=cfg.tracking.artifact_location)
    with tracker:
        tracker.set_tags({SOURCE_TAG: str(source_mv.version), "registered_model": name, "flow": "reembed",
                          "reembed_alias": cfg.reembed.alias, FINGERPRINT_TAG: fingerprint,
                          "source_tower_id": source.tower_id})
        tracker.log_params({k: v for k, v in flatten(cfg).items() if k.split(".")[0] in ("data", "embed", "reembed")})
        tracker.log_params({"encoder_id": eid})
        content, stats, _ = embed_items(cfg.embed, data.name, np.asarray(ids), data.texts, progress)

        # the item tower only where the content vector differs from the served one
        rows = np.array([served_rows.get(i, -1) for i in ids])
        known = rows >= 0
        same = np.zeros(len(ids), dtype=bool)
        same[known] = np.all(source.content[rows[known]] == content[known], axis=1)
        embeddings = np.empty((len(ids), source.d_out), dtype=np.float32)
        embeddings[same] = source.item_embeddings[rows[same]]
        embeddings[~same] = source.embed_items(content[~same])
        changed = int((known & ~same).sum())
        unchanged_catalog = ids == source.item_ids and bool(same.all())

        metrics = {"items_total": float(len(ids)), "items_embedded": float(stats["items_embedded"]),
                   "items_unchanged": float(stats["items_reused"]), "items_removed": float(len(removed)),
                   "items_new": float(len(new_ids)), "items_changed": float(changed),
                   "item_tower_rows": float((~same).sum())}

        # cold start: test users whose target item the served index does not hold
        new_set = set(new_ids)
        histories, targets = [], []
        if new_set and cfg.reembed.eval_new_items:
            for seq in data.seqs:
                if len(seq) >= 2 and ids[seq[-1]] in new_set:
                    histories.append([ids[j] for j in seq[:-1]])
                    targets.append(ids[seq[-1]])
        if targets:
            metrics["new_item_test_users"] = float(len(targets))
            metrics["new_item_recall_at_10_before"] = _new_item_recall(source, histories, targets,
                                                                       cfg.data.max_history)

        served_version = str(source_mv.version)
        bundle_dir = None
        if unchanged_catalog:
            print(f"[reembed] catalog unchanged against {name} version {source_mv.version}: nothing to publish",
                  flush=True)
            metrics["index_items"] = float(source.index.size)
            tracker.log_metrics(metrics)
        else:
            bundle_dir = out_root / fingerprint / "bundle"
            info = {"encoder_id": eid, "dataset": data.name, "catalog_fingerprint": fingerprint,
                    "source_model_version": str(source_mv.version), "reembed_run_id": tracker.run_id,
                    **{k: v for k, v in source.manifest["info"].items() if k in ("run_id", "dataset_fingerprint")}}
            new = _finished_bundle(bundle_dir, fingerprint)
            if new is None:
                rebuild_bundle(source, ids, content, embeddings, bundle_dir, info, index_kind=cfg.export.index_kind,
                               flat_max_items=cfg.export.flat_max_items, recall_queries=cfg.export.recall_queries,
                               seed=cfg.seed)
                new = load_bundle(bundle_dir)
            metrics["index_items"] = float(new.index.size)
            metrics["index_recall_at_10_vs_flat"] = float(new.manifest["info"]["index_recall_at_10_vs_flat"])
            if targets:
                metrics["new_item_recall_at_10_after"] = _new_item_recall(new, histories, targets,
                                                                          cfg.data.max_history)
            tracker.log_metrics(metrics)
            tracker.log_artifacts(bundle_dir, "bundle")
            served_version = _publish_version(client, name, cfg.reembed.alias, fingerprint, source_mv, bundle_dir,
                                              cfg.data.max_history, tracker)
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        tracker.log_metrics({"seconds": metrics["seconds"]})
        tracker.set_tags({"served_version": served_version})
    print(f"[reembed] {json.dumps(metrics)}", flush=True)
    return ReembedResult(tracker.run_id, name, cfg.reembed.alias, str(source_mv.version), str(served_version),
                         not unchanged_catalog, metrics, bundle_dir)


def _finished_bundle(bundle_dir: Path, fingerprint: str) -> Any:
    """The finished bundle for this fingerprint if one is already there (a restarted run reuses it), else None."""
    from learn.export.bundle import load_bundle
    from learn.export.manifest import ArtifactError

    if not (bundle_dir / "manifest.json").is_file():
        return None
    try:
        bundle = load_bundle(bundle_dir)
    except ArtifactError as exc:
        log.warning("rebuilding %s: %s", bundle_dir, exc)
        return None
    return bundle if bundle.manifest["info"].get("catalog_fingerprint") == fingerprint else None


def _publish_version(client: Any, name: str, alias: str, fingerprint: str, source_mv: Any, bundle_dir: Path,
                     max_history: int, tracker: Any) -> str:
    """Register the new bundle (or find the version an interrupted run registered) and move the alias."""
    from learn.serve.retriever import log_retriever

    def same_catalog(mv: Any) -> bool:
        if mv.status != "READY":
            return False
        if (mv.tags or {}).get(FINGERPRINT_TAG) == fingerprint:
            return True
        # a run killed between registering and tagging its version: its run carries the fingerprint
        try:
            run = client.get_run(mv.run_id) if mv.run_id else None
        except Exception:  # the run was deleted
            return False
        return run is not None and run.data.tags.get("flow") == "reembed" and \
            run.data.tags.get(FINGERPRINT_TAG) == fingerprint

    existing = [mv for mv in client.search_model_versions(f"name = '{name}'") if same_catalog(mv)]
    if existing:
        version = str(max(int(mv.version) for mv in existing))
        print(f"[reembed] {name} version {version} already holds this catalog (an earlier, interrupted run)",
              flush=True)
    else:
        info = log_retriever(bundle_dir, name="retriever", registered_model_name=name, max_history=max_history)
        version = str(info.registered_model_version)
        for key, value in {FINGERPRINT_TAG: fingerprint, SOURCE_TAG: str(source_mv.version),
                           "reembed_run_id": tracker.run_id}.items():
            client.set_model_version_tag(name, version, key, value)
    # the one switch: from here on models:/<name>@<alias> serves the new index
    client.set_registered_model_alias(name, alias, version)
    tracker.set_tags({"registered_model_version": version})
    print(f"[reembed] {name}@{alias} -> version {version} (was {source_mv.version})", flush=True)
    return version

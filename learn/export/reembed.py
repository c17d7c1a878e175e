"""The pieces of re-embedding a served catalog (the flow is flows/reembed.py): the catalog's
fingerprint, the served item vectors reused where an item's content is unchanged, a finished bundle
found again after a restart, recall of new-item targets, and publishing the version idempotently."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from learn import registry
from learn.export.bundle import load_bundle
from learn.export.manifest import ArtifactError

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


def served_bundle(client: Any, name: str, alias: str, version: str | None, cache: Path,
                   progress: bool = True) -> tuple[str, Any]:
    """(version, loaded Bundle) of what ``name@alias`` (or ``name/version``) serves."""
    try:
        ref = registry.resolve(client, f"models:/{name}/{version}" if version else f"models:/{name}@{alias}")
    except registry.RegistryError as exc:
        which = f"version {version}" if version else f"alias '{alias}'"
        raise ReembedError(
            f"registered model '{name}' has no {which} ({exc}). Train and register one first "
            f"(flows/full_pipeline.py registers it as 'challenger', and its first version as 'champion' too), "
            f"or set reembed.alias / reembed.model_version") from None
    served = ref.registered[1]
    try:
        bundle = registry.fetch_bundle(ref, cache / f"{name}-v{served}", progress)
    except (ArtifactError, registry.RegistryError) as exc:
        raise ReembedError(f"the served retriever {name} version {served} has a bad bundle: {exc}") from exc
    return served, bundle


def new_item_recall(bundle: Any, histories: list[list[str]], targets: list[str], max_history: int,
                     k: int = 10) -> float:
    """Recall@k of ``targets`` for users with these histories, against ``bundle``'s index."""
    vecs, _ = bundle.user_vectors(histories, max_history)
    ok = ~np.isnan(vecs).any(1)
    hits = 0
    if ok.any():
        ids, _ = bundle.search(vecs[ok], [h for h, keep in zip(histories, ok) if keep], k)  # as served
        hits = sum(t in set(row) for t, row in zip(np.asarray(targets)[ok], ids.tolist()))
    return hits / max(len(targets), 1)


def finished_bundle(bundle_dir: Path, fingerprint: str) -> Any:
    """The finished bundle for this fingerprint if one is already there (a restarted run reuses it), else None."""
    if not (bundle_dir / "manifest.json").is_file():
        return None
    try:
        bundle = load_bundle(bundle_dir)
    except ArtifactError as exc:
        log.warning("rebuilding %s: %s", bundle_dir, exc)
        return None
    return bundle if bundle.info.catalog_fingerprint == fingerprint else None


def publish_catalog_version(client: Any, name: str, alias: str, fingerprint: str, source_version: str, bundle_dir: Path,
                     max_history: int, tracker: Any, manifest: dict[str, Any] | None = None) -> str:
    """Register the new bundle (or find the version an interrupted run registered) and move the alias."""
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
        version = registry.publish_version(client, bundle_dir, name, max_history, {
            FINGERPRINT_TAG: fingerprint, SOURCE_TAG: source_version, "reembed_run_id": tracker.run_id},
            manifest=manifest)
    # the one switch: from here on models:/<name>@<alias> serves the new index
    registry.move_alias(client, name, alias, version)
    tracker.set_tags({"registered_model_version": version})
    print(f"[reembed] {name}@{alias} -> version {version} (was {source_version})", flush=True)
    return version


def item_vectors(source, ids: list[str], content: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Item vectors for the catalog ``ids`` with raw ``content``: the served ones where an item's
    content vector is unchanged, the served item tower's elsewhere. With a popularity term in the
    score mix, a re-embedded item keeps its prior (its interactions are the same item's) and a new
    item gets an unseen item's (0); with item ID embeddings both are embedded with a zero ID vector
    (:func:`catalog_id_vectors`). Returns (vectors, changed mask)."""
    rows = np.array([source.id_to_row.get(i, -1) for i in ids])
    known = rows >= 0
    same = np.zeros(len(ids), dtype=bool)
    same[known] = np.all(source.content[rows[known]] == content[known], axis=1)
    vectors = np.empty((len(ids), source.d_out), dtype=np.float32)
    vectors[same] = source.item_embeddings[rows[same]]
    prior = None
    if source.priors is not None:
        prior = np.where(known, source.priors[np.maximum(rows, 0)], 0.0).astype(np.float32)[~same]
    vectors[~same] = source.embed_items(content[~same], prior)
    return vectors, ~same


def catalog_id_vectors(source, ids: list[str], changed: np.ndarray) -> np.ndarray | None:
    """The new catalog's item ID vectors for towers with item ID embeddings (None otherwise): the
    served one for an item whose content is unchanged, zeros for a new or re-embedded item (its ID
    vector was learned beside content it no longer has; it is served from content alone)."""
    if source.id_vectors is None:
        return None
    out = np.zeros((len(ids), source.id_vectors.shape[1]), dtype=np.float32)
    keep = np.flatnonzero(~np.asarray(changed))
    out[keep] = source.id_vectors[[source.id_to_row[ids[i]] for i in keep]]
    return out


def new_item_targets(data, ids: list[str], new_items: set[str]) -> tuple[list[list[str]], list[str]]:
    """(histories, targets) of the users whose last (test) item is one of ``new_items``."""
    seqs = data.seqs
    long_enough = np.flatnonzero(seqs.lengths() >= 2)
    last = seqs.values[seqs.offsets[long_enough + 1] - 1]
    is_new = pd.Index(np.asarray(ids, dtype=object)[last]).isin(list(new_items))  # a hash lookup
    users = long_enough[is_new]
    histories = [[ids[j] for j in seqs[u][:-1]] for u in users]  # only the users with a new target
    return histories, [ids[t] for t in last[is_new]]

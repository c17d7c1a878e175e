"""Embed a catalog with the configured executor, reusing every still-valid vector in the content store.

    content, stats, encoder_id = embed_items(cfg.embed, dataset_name, item_ids, texts)

``embed.executor=local`` runs the encoder in this process; ``ray_data`` fans the missing items out
over a Ray Data actor pool and this process only writes the store.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from learn.config import EmbedConfig
from learn.device import resolve_device
from learn.embed.backends import build_encoder, close_encoder
from learn.embed.models import configured_encoder
from learn.embed.store import ContentStore, embed_catalog


def content_store_path(cfg: EmbedConfig, dataset_name: str) -> Path:
    if cfg.store:
        return Path(cfg.store)
    # one store per dataset and model: a store holds vectors of one dimension only
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", cfg.model).strip("_")[-60:]
    return Path(cfg.cache_dir) / "content" / f"{dataset_name}-{slug}.parquet"


def check_before_run(cfg: EmbedConfig, dataset_name: str) -> str:
    """What can fail before any embedding, checked before a flow opens its run: the encoder resolves
    (``ConfigError`` naming ``embed.model`` otherwise), ``embed.device`` exists here (``ConfigError``) and
    the content store reads (``ContentStoreError``). Returns the encoder id."""
    resolve_device(cfg.device, "embed.device")
    encoder_id = configured_encoder(cfg)[1]
    ContentStore(content_store_path(cfg, dataset_name)).verify()
    return encoder_id


def embed_items(cfg: EmbedConfig, dataset_name: str, item_ids, texts: list[str],
                progress: bool = True) -> tuple[np.ndarray, dict, str]:
    """(content vectors [N, d] in catalog order, embedding counts, encoder id)."""
    store = ContentStore(content_store_path(cfg, dataset_name))
    ids = [str(i) for i in item_ids]
    if cfg.executor == "ray_data":
        from learn.embed.ray_data import embed_catalog_ray

        _, eid = configured_encoder(cfg)
        vectors, stats = embed_catalog_ray(cfg, ids, texts, store, progress=progress)
        return np.asarray(vectors, dtype=np.float32), stats, eid
    encoder = build_encoder(cfg)
    try:
        vectors, stats = embed_catalog(encoder, ids, texts, store, progress=progress,
                                       flush_seconds=cfg.flush_seconds, flush_rows=cfg.rows_per_flush)
    finally:
        close_encoder(encoder)
    return np.asarray(vectors, dtype=np.float32), stats, encoder.encoder_id

"""Ray Data embedding: same vectors as the local path, incremental, resumable, survives a dead actor."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from learn.config import EmbedConfig
from learn.embed.hf import HFEncoder
from learn.embed.ray_data import EncoderActor, embed_catalog_ray
from learn.embed.store import ContentStore, embed_catalog
from learn.utils import text_hash

pytestmark = pytest.mark.slow  # real Ray (or spawned DDP processes): tens of seconds each

N = 48
IDS = [f"item{i}" for i in range(N)]
TEXTS = [f"Title: lab part {i}. Brand: b{i % 5}. " + "Category: Industrial & Scientific > Lab. " * (i % 6)
         for i in range(N)]
TEXTS[7] = TEXTS[3]  # two items with the same text: encoded once


@pytest.fixture(scope="module")
def cfg(model_cache) -> EmbedConfig:
    return EmbedConfig(model="minilm", cache_dir=str(model_cache), batch_size=4, executor="ray_data",
                       num_actors=2, cpus_per_actor=1.0, rows_per_flush=8)


@pytest.fixture(scope="module")
def local(cfg) -> HFEncoder:
    return HFEncoder.from_config(cfg)


@pytest.fixture(scope="module")
def reference(local) -> np.ndarray:
    return local.encode(TEXTS, progress=False)


def assert_store_once(path: Path, encoder_id: str, ids: list[str]) -> None:
    df = ContentStore(path).load()
    assert df is not None
    assert not df.duplicated(["item_id", "encoder_id"]).any()
    assert sorted(df.loc[df.encoder_id == encoder_id, "item_id"]) == sorted(ids)


def test_same_vectors_as_local_path(ray_local, cfg, local, tmp_path):
    want, want_stats = embed_catalog(local, IDS, TEXTS, ContentStore(tmp_path / "local.parquet"), progress=False)
    got, stats = embed_catalog_ray(cfg, IDS, TEXTS, ContentStore(tmp_path / "ray.parquet"), progress=False,
                                   rows_per_call=8)
    assert got.dtype == np.float32 and got.shape == (N, local.dim)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert {k: stats[k] for k in stats if k != "embed_seconds"} == \
        {k: want_stats[k] for k in want_stats if k != "embed_seconds"} == \
        {"items_total": N, "items_reused": 0, "items_embedded": N, "texts_encoded": N - 1}
    assert_store_once(tmp_path / "ray.parquet", local.encoder_id, IDS)
    # the stored vectors are the returned ones
    found, stored = ContentStore(tmp_path / "ray.parquet").lookup(IDS, [text_hash(t) for t in TEXTS], local.encoder_id)
    assert found.all()
    np.testing.assert_allclose(stored, want, atol=1e-5)


def test_incremental_embeds_only_changed_and_new(ray_local, cfg, local, reference, tmp_path):
    path = tmp_path / "content.parquet"
    embed_catalog(local, IDS, TEXTS, ContentStore(path), progress=False)  # a store written by the local path
    texts = list(TEXTS)
    for i in (0, 10, 20, 30, 40):
        texts[i] = f"Title: revised lab part {i}. Brand: new"
    ids = IDS + [f"new{i}" for i in range(5)]
    texts += [f"Title: brand-new item {i}" for i in range(5)]
    got, stats = embed_catalog_ray(replace(cfg, num_actors=1), ids, texts, ContentStore(path), progress=False,
                                   rows_per_call=4)
    assert stats["items_embedded"] == 10 and stats["texts_encoded"] == 10
    assert stats["items_reused"] == N - 5 and stats["items_total"] == N + 5
    np.testing.assert_allclose(got, local.encode(texts, progress=False), atol=1e-5)
    keep = [i for i in range(N) if i not in (0, 10, 20, 30, 40)]
    np.testing.assert_allclose(got[keep], reference[keep], atol=1e-5)
    assert_store_once(path, local.encoder_id, ids)


class StoreKilledAfterFirstFlush(ContentStore):
    """The job dies right after its first write: every later write raises."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.writes = 0

    def upsert(self, *args, **kwargs) -> None:
        self.writes += 1
        if self.writes > 1:
            raise KeyboardInterrupt("killed")
        super().upsert(*args, **kwargs)


def test_resume_after_kill_embeds_only_missing(ray_local, cfg, local, reference, tmp_path):
    path = tmp_path / "content.parquet"
    one = replace(cfg, num_actors=1)
    with pytest.raises(KeyboardInterrupt):
        embed_catalog_ray(one, IDS, TEXTS, StoreKilledAfterFirstFlush(path), progress=False, rows_per_call=8)
    found, _ = ContentStore(path).lookup(IDS, [text_hash(t) for t in TEXTS], local.encoder_id)
    n_saved = int(found.sum())
    assert cfg.rows_per_flush <= n_saved < N
    got, stats = embed_catalog_ray(one, IDS, TEXTS, ContentStore(path), progress=False, rows_per_call=8)
    assert stats["items_reused"] == n_saved and stats["items_embedded"] == N - n_saved
    np.testing.assert_allclose(got, reference, atol=1e-5)
    assert_store_once(path, local.encoder_id, IDS)


def test_dead_actor_is_restarted_and_every_item_embedded_once(ray_local, cfg, local, reference, tmp_path):
    marker = str(tmp_path / "crashed")

    class CrashOnce(EncoderActor):
        """The actor dies (os._exit) in its second call, once in the whole job."""

        calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 2:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    pass
                else:
                    os._exit(1)
            return super().__call__(batch)

    path = tmp_path / "content.parquet"
    # one actor: the job can only finish if Ray restarts it and re-runs the call it died in
    got, stats = embed_catalog_ray(replace(cfg, num_actors=1), IDS, TEXTS, ContentStore(path), progress=False,
                                   rows_per_call=8, actor_cls=CrashOnce)
    assert os.path.exists(marker)  # an actor did die
    assert stats["items_embedded"] == N and stats["texts_encoded"] == N - 1
    np.testing.assert_allclose(got, reference, atol=1e-5)
    assert_store_once(path, local.encoder_id, IDS)

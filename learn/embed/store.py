"""The content store: item content vectors on disk, reused while text and encoder are unchanged.

    store = ContentStore(".cache/learn/content/demo.parquet")
    vectors, stats = embed_catalog(encoder, item_ids, texts, store)   # stats["items_reused"], ...

One Parquet file, one row per (item_id, encoder_id):
item_id string, text_hash string, encoder_id string, embedding fixed_size_list<float32>[dim].
A stored vector is valid for an item only while both its text hash and the encoder id match, so
edited items and a changed model/pooling/truncation are re-embedded and nothing else is. Rows of
other encoders are kept (one store may serve several encoders of the same dimension) and never
returned for another id. Every write replaces the file atomically (temp file + rename).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from learn.utils import atomic_path, text_hash

log = logging.getLogger(__name__)

COLUMNS = ("item_id", "text_hash", "encoder_id", "embedding")
_FORMAT = b"learn.content_store/1"


class ContentStoreError(ValueError):
    """The store file is unreadable, has the wrong schema, or cannot hold the given vectors."""


class Encoder(Protocol):
    encoder_id: str
    dim: int

    def encode(self, texts: list[str], progress: bool = True) -> np.ndarray: ...


class _Rows:
    """The store's content in memory: parallel arrays, plus the stat of the file they came from."""

    def __init__(self, item_id: np.ndarray, text_hash: np.ndarray, encoder_id: np.ndarray,
                 emb: np.ndarray, stamp: tuple | None = None) -> None:
        self.item_id, self.text_hash, self.encoder_id, self.emb = item_id, text_hash, encoder_id, emb
        self.stamp = stamp

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    def __len__(self) -> int:
        return len(self.item_id)


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _strings(values: Sequence[Any]) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object)


class ContentStore:
    """A Parquet file of content vectors keyed by (item_id, encoder_id)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._cache: _Rows | None = None

    def __repr__(self) -> str:
        return f"ContentStore({str(self.path)!r})"

    # -- reading ------------------------------------------------------------------------------
    def _read(self) -> _Rows | None:
        """The file's rows (cached while the file is unchanged); None if there is no file yet."""
        if not self.path.exists():
            self._cache = None
            return None
        if self.path.is_dir():
            raise ContentStoreError(f"content store {self.path} is a directory; give a .parquet file path")
        stamp = _stamp(self.path)
        if self._cache is not None and self._cache.stamp == stamp:
            return self._cache
        try:
            table = pq.read_table(self.path)
        except (pa.ArrowException, OSError) as exc:
            raise ContentStoreError(
                f"content store {self.path} is unreadable ({exc}); delete it to rebuild it (items get re-embedded)"
            ) from exc
        self._cache = self._from_table(table, stamp)
        return self._cache

    def _from_table(self, table: pa.Table, stamp: tuple) -> _Rows:
        def bad(why: str) -> ContentStoreError:
            return ContentStoreError(f"content store {self.path} is not a valid content store: {why}; "
                                     f"delete it to rebuild it")

        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise bad(f"missing columns {missing}")
        for c in COLUMNS[:3]:
            ctype = table.schema.field(c).type
            if not (pa.types.is_string(ctype) or pa.types.is_large_string(ctype)):
                raise bad(f"column '{c}' has type {ctype}, expected string")
        etype = table.schema.field("embedding").type
        if not (pa.types.is_fixed_size_list(etype) and pa.types.is_float32(etype.value_type)):
            raise bad(f"column 'embedding' has type {etype}, expected fixed_size_list<float>")
        if any(table.column(c).null_count for c in COLUMNS):
            raise bad("null values")
        emb_col = table.column("embedding").combine_chunks()
        dim = etype.list_size
        flat = emb_col.flatten().to_numpy(zero_copy_only=False)  # respects the array's offset
        emb = np.ascontiguousarray(flat, dtype=np.float32).reshape(len(table), dim)
        cols = {c: np.asarray(table.column(c).to_pylist(), dtype=object) for c in COLUMNS[:3]}
        keys = pd.MultiIndex.from_arrays([cols["item_id"], cols["encoder_id"]])
        if keys.has_duplicates:
            raise bad("duplicate (item_id, encoder_id) rows")
        return _Rows(cols["item_id"], cols["text_hash"], cols["encoder_id"], emb, stamp)

    def load(self) -> pd.DataFrame | None:
        """All rows as a DataFrame (embedding: one float32 array per row); None if no file yet."""
        rows = self._read()
        if rows is None:
            return None
        return pd.DataFrame({"item_id": rows.item_id, "text_hash": rows.text_hash,
                             "encoder_id": rows.encoder_id, "embedding": list(rows.emb.copy())})

    def encoder_ids(self) -> dict[str, int]:
        """Row count per encoder id held in the store."""
        rows = self._read()
        return {} if rows is None else dict(Counter(rows.encoder_id.tolist()))

    def lookup(self, item_ids: Sequence[Any], text_hashes: Sequence[str], encoder_id: str
               ) -> tuple[np.ndarray, np.ndarray]:
        """(found [n] bool, vectors [n, d] float32) for the given items under ``encoder_id``.

        found[i] only if the store holds item i for this encoder with the same text hash; rows not
        found are zero. d is the store's dimension (0 when nothing is stored yet).
        """
        ids = _strings(item_ids)
        hashes = np.asarray(list(text_hashes), dtype=object)
        if len(ids) != len(hashes):
            raise ValueError(f"lookup: {len(ids)} item ids but {len(hashes)} text hashes")
        rows = self._read()
        if rows is None:
            return np.zeros(len(ids), dtype=bool), np.zeros((len(ids), 0), dtype=np.float32)
        sel = np.flatnonzero(rows.encoder_id == encoder_id)
        pos = pd.Index(rows.item_id[sel]).get_indexer(ids)
        hit = pos >= 0
        src = sel[pos[hit]]
        found = np.zeros(len(ids), dtype=bool)
        found[hit] = rows.text_hash[src] == hashes[hit]
        vectors = np.zeros((len(ids), rows.dim), dtype=np.float32)
        vectors[found] = rows.emb[src[found[hit]]]
        return found, vectors

    # -- writing ------------------------------------------------------------------------------
    def upsert(self, item_ids: Sequence[Any], text_hashes: Sequence[str], encoder_id: str,
               vectors: np.ndarray) -> None:
        """Insert or replace the rows (item_id, encoder_id); write the merged file atomically."""
        ids = _strings(item_ids)
        hashes = np.asarray([str(h) for h in text_hashes], dtype=object)
        vectors = np.array(vectors, dtype=np.float32)  # a copy: the in-memory cache must not alias it
        if vectors.ndim != 2 or len(vectors) != len(ids) or len(hashes) != len(ids):
            raise ValueError(f"upsert: {len(ids)} item ids, {len(hashes)} text hashes and vectors of shape "
                             f"{vectors.shape} do not line up")
        if not isinstance(encoder_id, str) or not encoder_id:
            raise ValueError(f"upsert: encoder_id must be a non-empty string, got {encoder_id!r}")
        if len(ids) == 0:
            return
        dupes = _duplicates(ids)
        if dupes:
            raise ValueError(f"upsert: duplicate item ids {dupes}")
        if not np.isfinite(vectors).all():
            raise ValueError("upsert: vectors hold NaN or inf")
        old = self._read()
        new_enc = np.full(len(ids), encoder_id, dtype=object)
        if old is None or len(old) == 0:
            merged = _Rows(ids, hashes, new_enc, vectors)
        else:
            if old.dim != vectors.shape[1]:
                held = ", ".join(sorted(set(old.encoder_id.tolist())))
                raise ContentStoreError(
                    f"content store {self.path} holds {old.dim}-d vectors (encoders: {held}); encoder "
                    f"'{encoder_id}' gives {vectors.shape[1]}-d. Use a separate store file per vector size "
                    f"(embed.store) or delete this one"
                )
            # drop the old rows this upsert replaces: same item id under the same encoder
            same_enc = old.encoder_id == encoder_id
            replaced = np.zeros(len(old), dtype=bool)
            replaced[same_enc] = pd.Index(ids).get_indexer(old.item_id[same_enc]) >= 0
            keep = ~replaced
            merged = _Rows(np.concatenate([old.item_id[keep], ids]), np.concatenate([old.text_hash[keep], hashes]),
                           np.concatenate([old.encoder_id[keep], new_enc]),
                           np.concatenate([old.emb[keep], vectors]))
        self._write(merged)

    def _write(self, rows: _Rows) -> None:
        dim = rows.dim
        emb = pa.FixedSizeListArray.from_arrays(pa.array(rows.emb.reshape(-1), type=pa.float32()), dim)
        table = pa.table(
            {"item_id": pa.array(rows.item_id.tolist(), type=pa.string()),
             "text_hash": pa.array(rows.text_hash.tolist(), type=pa.string()),
             "encoder_id": pa.array(rows.encoder_id.tolist(), type=pa.string()),
             "embedding": emb},
        ).replace_schema_metadata({b"format": _FORMAT})
        with atomic_path(self.path) as tmp:
            pq.write_table(table, tmp)
        rows.stamp = _stamp(self.path)
        self._cache = rows


def _duplicates(ids: np.ndarray, show: int = 10) -> list[str]:
    counts = Counter(ids.tolist())
    return [k for k, c in counts.items() if c > 1][:show]


def check_catalog(item_ids: Sequence[Any], texts: Sequence[str], who: str = "embed_catalog"
                  ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Validated (ids, texts, text hashes) of a catalog to embed; errors name the item and index."""
    ids = _strings(item_ids)
    texts = list(texts)
    if len(ids) != len(texts):
        raise ValueError(f"{who}: {len(ids)} item ids but {len(texts)} texts")
    dupes = _duplicates(ids)
    if dupes:
        raise ValueError(f"{who}: duplicate item ids in the input: {dupes}")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{who}: item '{ids[i]}' (index {i}) has no text: {t!r}")
    return ids, texts, np.asarray([text_hash(t) for t in texts], dtype=object)


def plan_embedding(store: ContentStore, ids: np.ndarray, hashes: np.ndarray, eid: str, dim: int
                   ) -> tuple[np.ndarray, list[list[int]], dict[str, Any]]:
    """What is left to encode: ``out`` [n, dim] holding every reusable stored vector, ``groups`` (one
    list of item indices per distinct missing text, encoded once for all of them) and fresh stats."""
    found, stored = store.lookup(ids, hashes, eid)
    out = np.zeros((len(ids), dim), dtype=np.float32)
    if found.any():
        if stored.shape[1] != dim:
            raise ContentStoreError(f"content store {store.path} holds {stored.shape[1]}-d vectors under "
                                    f"'{eid}', but the encoder gives {dim}-d; delete the store to rebuild it")
        out[found] = stored[found]
    by_hash: dict[str, list[int]] = {}
    for i in np.flatnonzero(~found):
        by_hash.setdefault(hashes[i], []).append(int(i))
    stats: dict[str, Any] = {"items_total": len(ids), "items_reused": int(found.sum()), "items_embedded": 0,
                             "texts_encoded": 0, "embed_seconds": 0.0}
    return out, list(by_hash.values()), stats


def check_vectors(vecs: np.ndarray, n: int, dim: int, who: str) -> None:
    if vecs.shape != (n, dim) or not np.isfinite(vecs).all():
        raise ValueError(f"{who} returned {vecs.shape} (finite: {np.isfinite(vecs).all()}) for {n} texts; "
                         f"expected ({n}, {dim}) finite values")


class StoreWriter:
    """Collects finished items of ``out`` and appends them to the store in batches; ``saving()`` writes
    whatever is finished when the job stops on an error, so a re-run does not encode it again."""

    def __init__(self, store: ContentStore, ids: np.ndarray, hashes: np.ndarray, eid: str, out: np.ndarray,
                 stats: dict[str, Any]) -> None:
        self.store, self.ids, self.hashes, self.eid, self.out, self.stats = store, ids, hashes, eid, out, stats
        self.pending: list[int] = []
        self.last_flush = time.perf_counter()
        self.write_s = 0.0  # how long the last write took

    def add(self, items: Sequence[int]) -> None:
        self.pending.extend(items)

    def since_flush(self) -> float:
        return time.perf_counter() - self.last_flush

    def flush(self) -> None:
        if self.pending:
            t0 = time.perf_counter()
            self.store.upsert(self.ids[self.pending], self.hashes[self.pending], self.eid, self.out[self.pending])
            self.write_s = time.perf_counter() - t0
            self.stats["items_embedded"] += len(self.pending)
            self.pending = []
        self.last_flush = time.perf_counter()

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        try:
            yield
            self.flush()
        except BaseException:
            try:
                self.flush()
            except Exception as exc:  # the original error matters more
                log.warning("could not save finished items to %s: %s", self.store.path, exc)
            raise


def embed_catalog(encoder: Encoder, item_ids: Sequence[Any], texts: Sequence[str], store: ContentStore, *,
                  progress: bool = True, chunk_size: int = 1024, checkpoint_s: float = 10.0
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """Content vectors for a catalog, [n, encoder.dim] float32 in input order, plus stats.

    Vectors whose item, text hash and encoder id are in ``store`` are reused; the rest are encoded
    in chunks of ``chunk_size`` items. Finished chunks are written to the store every
    ``checkpoint_s`` seconds (stretched so that rewriting a big store takes at most ~20% of the
    time; 0: after every chunk), and whatever is finished is written when the job stops on an
    error, so a re-run resumes where this one stopped. Items with identical text are encoded once.

    stats: items_total, items_reused, items_embedded, texts_encoded, embed_seconds.
    """
    ids, texts, hashes = check_catalog(item_ids, texts)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    eid, dim = encoder.encoder_id, int(encoder.dim)
    out, groups, stats = plan_embedding(store, ids, hashes, eid, dim)
    if not groups:
        return out, stats
    n_todo = sum(len(g) for g in groups)
    log.info("embedding %d items (%d distinct texts) with %s; %d reused from %s",
             n_todo, len(groups), eid, stats["items_reused"], store.path)

    start = time.perf_counter()
    from tqdm.auto import tqdm

    writer = StoreWriter(store, ids, hashes, eid, out, stats)
    bar = tqdm(total=n_todo, unit="item", desc="content store", disable=not progress)
    try:
        with writer.saving():
            for c in range(0, len(groups), chunk_size):
                chunk = groups[c:c + chunk_size]
                vecs = np.asarray(encoder.encode([texts[g[0]] for g in chunk], progress=False), dtype=np.float32)
                check_vectors(vecs, len(chunk), dim, f"encoder '{eid}'")
                for g, v in zip(chunk, vecs):
                    out[g] = v
                    writer.add(g)
                stats["texts_encoded"] += len(chunk)
                bar.update(sum(len(g) for g in chunk))
                # 0: write after every chunk; else every checkpoint_s, but keep writes under ~20% of the time
                due = 0.0 if checkpoint_s <= 0 else max(checkpoint_s, 4.0 * writer.write_s)
                if writer.since_flush() >= due:
                    writer.flush()
    finally:
        bar.close()
        stats["embed_seconds"] = round(time.perf_counter() - start, 3)
    return out, stats

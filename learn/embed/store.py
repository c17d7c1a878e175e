"""The content store: item content vectors on disk, reused while text and encoder are unchanged.

    store = ContentStore(".cache/learn/content/demo.parquet")
    vectors, stats = embed_catalog(encoder, item_ids, texts, store)   # stats["items_reused"], ...

The store named ``demo.parquet`` lives in the directory ``demo.parquet.d/``: append-only Parquet
part files and ``manifest.json``, the committed parts in write order. A part's rows:
item_id string, text_hash string, encoder_id string, embedding fixed_size_list<float32>[dim];
for the same (item_id, encoder_id) the latest part wins. A stored vector is valid for an item only
while both its text hash and the encoder id match, so edited items and a changed
model/pooling/truncation are re-embedded and nothing else is. Rows of other encoders are kept
(one store may serve several encoders of the same dimension) and never returned for another id.

A write (``upsert``) writes one new part (temp file + rename), then, under an exclusive lock on
``.lock``, re-reads the manifest, appends the part and swaps the manifest (temp file + rename):
it costs O(rows written), and concurrent writers (pipeline runs, Ray Data jobs) never lose each
other's rows. ``compact()`` merges the parts into one, dropping superseded rows, and swaps it in
the same way. A lookup is a join on (item_id, text_hash) over the key columns; vectors are read
only from the row groups that hold the rows found. A single-file store of the earlier format
(``demo.parquet`` itself, same columns) becomes the first part on first use, without re-embedding.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from learn.data.schema import DataError
from learn.utils import atomic_path, atomic_write_text, text_hash

log = logging.getLogger(__name__)

COLUMNS = ("item_id", "text_hash", "encoder_id", "embedding")
_FORMAT = b"learn.content_store/1"  # a part file; the single-file store of earlier versions is one too
MANIFEST_FORMAT = "learn.content_store.manifest/2"
ROW_GROUP = 65536  # rows per Parquet row group: the unit a lookup reads vectors in
COMPACT_AT = 32  # a writer that finishes with more parts than this in the store compacts it
MIN_CHUNK = 64  # embed_catalog: smallest number of texts per encoder call when flushing by time

T = TypeVar("T")


class ContentStoreError(DataError):
    """The store is unreadable, has the wrong schema, or cannot hold the given vectors (bad data on
    disk: the CLI exits 3 with the message, as for any DataError)."""


class Encoder(Protocol):
    encoder_id: str
    dim: int

    def encode(self, texts: list[str], progress: bool = True) -> np.ndarray: ...


def _strings(values: Sequence[Any]) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object)


def _part_table(ids: np.ndarray, hashes: np.ndarray, encoder_ids: np.ndarray, emb: np.ndarray) -> pa.Table:
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), emb.shape[1])
    return pa.table({"item_id": pa.array(ids, type=pa.string()), "text_hash": pa.array(hashes, type=pa.string()),
                     "encoder_id": pa.array(encoder_ids, type=pa.string()), "embedding": vectors}
                    ).replace_schema_metadata({b"format": _FORMAT})


class ContentStore:
    """Content vectors keyed by (item_id, encoder_id), in part files under ``<path>.d/``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.root = self.path.with_name(self.path.name + ".d")
        self._manifest_path = self.root / "manifest.json"
        self._live: tuple[list[str], pd.DataFrame] | None = None  # (parts, live rows) of the last read

    def __repr__(self) -> str:
        return f"ContentStore({str(self.path)!r})"

    # -- manifest, lock, migration ---------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive across processes (flock on ``.lock``); released when the file closes."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "ab") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def _read_manifest(self) -> dict[str, Any]:
        """{"dim": int | None, "encoders": [...], "parts": [names, oldest first]}; empty if none yet."""
        try:
            man = json.loads(self._manifest_path.read_bytes())
            ok = man.get("format") == MANIFEST_FORMAT and isinstance(man.get("parts"), list)
        except FileNotFoundError:
            return {"format": MANIFEST_FORMAT, "dim": None, "encoders": [], "parts": []}
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise ContentStoreError(f"content store {self.path}: its manifest {self._manifest_path} is unreadable "
                                    f"or not a content store manifest; delete {self.root} to rebuild it "
                                    f"(items get re-embedded)")
        return man

    def _manifest(self) -> dict[str, Any]:
        """The committed manifest, after taking over a single-file store left at ``path``."""
        if self.path.is_dir():
            raise ContentStoreError(f"content store {self.path} is a directory; give a .parquet file path "
                                    f"(the store keeps its parts in {self.root.name}/)")
        if self.path.is_file():
            self._migrate()
        return self._read_manifest()

    def _migrate(self) -> None:
        """Make the single-file store at ``path`` the oldest part (validated, linked, not re-written)."""
        with self._locked():
            if not self.path.is_file():
                return  # another process took it over meanwhile
            keys, dim = self._read_keys(self.path, self.path)
            man = self._read_manifest()
            self._check_dim(man, "(the single-file store)", dim)
            name = _part_name()
            try:
                os.link(self.path, self.root / name)
            except OSError:  # no hard links on this file system
                with atomic_path(self.root / name) as tmp:
                    shutil.copyfile(self.path, tmp)
            encoders = keys.column("encoder_id").unique().to_pylist()
            self._write_manifest({**man, "dim": dim, "encoders": sorted({*man["encoders"], *encoders}),
                                  "parts": [name, *man["parts"]]})
            self.path.unlink()
        log.info("content store %s: single-file store taken over as part %s", self.path, name)

    def _write_manifest(self, man: dict[str, Any]) -> None:
        atomic_write_text(self._manifest_path, json.dumps({**man, "format": MANIFEST_FORMAT}, indent=1))

    def _check_dim(self, man: dict[str, Any], encoder_id: str, dim: int) -> None:
        if man["dim"] not in (None, dim):
            raise ContentStoreError(
                f"content store {self.path} holds {man['dim']}-d vectors (encoders: {', '.join(man['encoders'])}); "
                f"encoder '{encoder_id}' gives {dim}-d. Use a separate store file per vector size (embed.store) "
                f"or delete this one ({self.root})")

    # -- reading ------------------------------------------------------------------------------
    def _read_keys(self, path: Path, delete: Path) -> tuple[pa.Table, int]:
        """A part's key columns and its dimension, validated; errors say to delete ``delete``."""
        def bad(why: str) -> ContentStoreError:
            return ContentStoreError(f"content store {self.path}: {path} is not a valid content store part: {why}; "
                                     f"delete {delete} to rebuild it (items get re-embedded)")

        try:
            schema = pq.read_schema(path)
            missing = [c for c in COLUMNS if c not in schema.names]
            table = None if missing else pq.read_table(path, columns=list(COLUMNS[:3]))
        except FileNotFoundError:
            raise
        except (pa.ArrowException, OSError) as exc:
            raise ContentStoreError(f"content store {self.path}: {path} is unreadable ({exc}); delete {delete} to "
                                    f"rebuild it (items get re-embedded)") from exc
        if missing:
            raise bad(f"missing columns {missing}")
        for c in COLUMNS[:3]:
            ctype = schema.field(c).type
            if not (pa.types.is_string(ctype) or pa.types.is_large_string(ctype)):
                raise bad(f"column '{c}' has type {ctype}, expected string")
        etype = schema.field("embedding").type
        if not (pa.types.is_fixed_size_list(etype) and pa.types.is_float32(etype.value_type)):
            raise bad(f"column 'embedding' has type {etype}, expected fixed_size_list<float>")
        if any(table.column(c).null_count for c in COLUMNS[:3]):
            raise bad("null values")
        return table, etype.list_size

    def _consistent(self, read: Callable[[dict[str, Any]], T]) -> T:
        """``read(manifest)``; again on the newer manifest if a compaction removed a part meanwhile."""
        while True:
            man = self._manifest()
            try:
                return read(man)
            except FileNotFoundError as exc:
                if self._read_manifest()["parts"] == man["parts"]:
                    missing = [n for n in man["parts"] if not (self.root / n).exists()]
                    raise ContentStoreError(f"content store {self.path}: parts {missing} listed in "
                                            f"{self._manifest_path} are missing; delete {self.root} to rebuild it "
                                            f"(items get re-embedded)") from exc

    def _live_rows(self, man: dict[str, Any]) -> pd.DataFrame:
        """The latest row per (item_id, encoder_id): item_id, text_hash, encoder_id, part, row."""
        if self._live is not None and self._live[0] == man["parts"]:
            return self._live[1]
        frames = []
        for i, name in enumerate(man["parts"]):
            keys, dim = self._read_keys(self.root / name, self.root)
            if dim != man["dim"]:
                raise ContentStoreError(f"content store {self.path}: part {name} holds {dim}-d vectors, its manifest "
                                        f"says {man['dim']}-d; delete {self.root} to rebuild it")
            frame = keys.to_pandas()
            frame["part"], frame["row"] = i, np.arange(len(frame))
            frames.append(frame)
        live = pd.concat(frames, ignore_index=True).drop_duplicates(["item_id", "encoder_id"], keep="last")
        self._live = (list(man["parts"]), live)
        return live

    def _vectors(self, man: dict[str, Any], part: np.ndarray, row: np.ndarray) -> np.ndarray:
        """Embeddings of the rows (part[i], row[i]), read one row group at a time, only the groups that
        hold them (memory: one row group)."""
        out = np.empty((len(part), man["dim"]), dtype=np.float32)
        for p in np.unique(part):
            sel = np.flatnonzero(part == p)
            path = self.root / man["parts"][p]
            try:
                pf = pq.ParquetFile(path)
                starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
                group = np.searchsorted(starts, row[sel], side="right") - 1
                for g in np.unique(group):
                    at = sel[group == g]
                    col = pf.read_row_group(int(g), columns=["embedding"]).column("embedding").combine_chunks()
                    if col.null_count:
                        raise ContentStoreError(f"content store {self.path}: {path} has null vectors; delete "
                                                f"{self.root} to rebuild it")
                    flat = col.flatten().to_numpy(zero_copy_only=False)  # respects the array's offset
                    out[at] = flat.reshape(-1, man["dim"])[row[at] - starts[g]]
            except FileNotFoundError:
                raise
            except (pa.ArrowException, OSError) as exc:
                raise ContentStoreError(f"content store {self.path}: {path} is unreadable ({exc}); delete "
                                        f"{self.root} to rebuild it (items get re-embedded)") from exc
        return out

    def parts(self) -> list[Path]:
        """The committed part files, oldest first."""
        return [self.root / name for name in self._manifest()["parts"]]

    def verify(self) -> None:
        """Cheap check that the store is readable (its manifest, and every part's Parquet footer),
        so a flow refuses a corrupt store before it starts a run; ``ContentStoreError`` names the file."""
        for part in self.parts():
            try:
                pq.read_metadata(part)
            except (OSError, pa.ArrowException) as exc:
                raise ContentStoreError(f"content store {self.path}: part {part} is unreadable ({exc}); delete "
                                        f"{self.root} to rebuild it (items get re-embedded)") from None

    def load(self) -> pd.DataFrame | None:
        """All live rows as a DataFrame (embedding: one float32 array per row); None if nothing stored."""
        def read(man: dict[str, Any]) -> pd.DataFrame | None:
            if not man["parts"]:
                return None
            live = self._live_rows(man)
            emb = self._vectors(man, live["part"].to_numpy(), live["row"].to_numpy())
            return pd.DataFrame({"item_id": live["item_id"].to_numpy(), "text_hash": live["text_hash"].to_numpy(),
                                 "encoder_id": live["encoder_id"].to_numpy(), "embedding": list(emb)})

        return self._consistent(read)

    def encoder_ids(self) -> dict[str, int]:
        """Row count per encoder id held in the store."""
        def read(man: dict[str, Any]) -> dict[str, int]:
            counts = self._live_rows(man)["encoder_id"].value_counts(sort=False) if man["parts"] else {}
            return {str(k): int(v) for k, v in counts.items()}

        return self._consistent(read)

    def lookup(self, item_ids: Sequence[Any], text_hashes: Sequence[str], encoder_id: str
               ) -> tuple[np.ndarray, np.ndarray]:
        """(found [n] bool, vectors [n, d] float32) for the given items under ``encoder_id``.

        found[i] only if the store holds item i for this encoder with the same text hash; rows not
        found are zero. d is the store's dimension (0 when nothing is stored yet).
        """
        ids = _strings(item_ids)
        hashes = np.asarray([str(h) for h in text_hashes], dtype=object)
        if len(ids) != len(hashes):
            raise ValueError(f"lookup: {len(ids)} item ids but {len(hashes)} text hashes")

        def read(man: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
            found = np.zeros(len(ids), dtype=bool)
            vectors = np.zeros((len(ids), man["dim"] or 0), dtype=np.float32)
            if not man["parts"]:
                return found, vectors
            live = self._live_rows(man)
            live = live[live["encoder_id"] == encoder_id]
            want = pd.DataFrame({"item_id": ids, "text_hash": hashes, "pos": np.arange(len(ids))})
            hit = want.merge(live, on=["item_id", "text_hash"], how="inner")
            pos = hit["pos"].to_numpy()
            found[pos] = True
            vectors[pos] = self._vectors(man, hit["part"].to_numpy(), hit["row"].to_numpy())
            return found, vectors

        return self._consistent(read)

    # -- writing ------------------------------------------------------------------------------
    def upsert(self, item_ids: Sequence[Any], text_hashes: Sequence[str], encoder_id: str,
               vectors: np.ndarray) -> None:
        """Insert or replace the rows (item_id, encoder_id): one new part, committed to the manifest."""
        ids = _strings(item_ids)
        hashes = np.asarray([str(h) for h in text_hashes], dtype=object)
        vectors = np.asarray(vectors, dtype=np.float32)
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
        dim = vectors.shape[1]
        self._check_dim(self._manifest(), encoder_id, dim)  # fail before writing anything
        name = self._write_part(_part_table(ids, hashes, np.full(len(ids), encoder_id, dtype=object), vectors))

        def append(man: dict[str, Any]) -> dict[str, Any]:
            self._check_dim(man, encoder_id, dim)  # again: another writer may have come first
            return {**man, "dim": dim, "encoders": sorted({*man["encoders"], encoder_id}),
                    "parts": [*man["parts"], name]}

        self._commit(name, append)

    def compact(self) -> int:
        """Merge the parts into one, dropping superseded rows (the latest write wins), and swap it in.
        Parts that writers commit meanwhile stay, after the merged one. Returns the parts merged."""
        def merged(man: dict[str, Any]) -> tuple[list[str], pa.Table | None]:
            if len(man["parts"]) < 2:
                return man["parts"], None
            live = self._live_rows(man)
            emb = self._vectors(man, live["part"].to_numpy(), live["row"].to_numpy())
            return man["parts"], _part_table(*(live[c].to_numpy() for c in COLUMNS[:3]), emb)

        old, table = self._consistent(merged)
        if table is None:
            return 0
        name = self._write_part(table)
        if not self._commit(name, lambda man: {**man, "parts": [name, *man["parts"][len(old):]]}
                            if man["parts"][:len(old)] == old else None):  # None: another compaction came first
            return 0
        for part in old:
            (self.root / part).unlink(missing_ok=True)
        log.info("content store %s: %d parts compacted into %s (%d rows)", self.path, len(old), name, len(table))
        return len(old)

    def _write_part(self, table: pa.Table) -> str:
        name = _part_name()
        with atomic_path(self.root / name) as tmp:
            # no dictionary for the vectors (random floats: it only slows reads and writes down)
            pq.write_table(table, tmp, row_group_size=ROW_GROUP, use_dictionary=["encoder_id"])
        return name

    def _commit(self, name: str, update: Callable[[dict[str, Any]], dict[str, Any] | None]) -> bool:
        """Under the lock, swap in ``update(the current manifest)`` (None: keep it). The part ``name`` is
        deleted unless a manifest that lists it was committed."""
        committed = False
        try:
            with self._locked():
                man = update(self._read_manifest())
                if man is not None:
                    self._write_manifest(man)
                    committed = True
        finally:
            if not committed:
                (self.root / name).unlink(missing_ok=True)
        return committed


def _part_name() -> str:
    """Unique across processes and hosts, and sorting by creation time."""
    return f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"


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
    """Collects finished items of ``out`` and appends them to the store: ``maybe_flush()`` writes once
    ``flush_rows`` items are pending or ``flush_seconds`` have passed, whichever comes first (each
    write is one new part, O(rows written)). ``saving()`` writes whatever is finished when the job
    ends or stops on an error, so a re-run does not encode it again, and compacts a store that has
    gathered more than ``COMPACT_AT`` parts."""

    def __init__(self, store: ContentStore, ids: np.ndarray, hashes: np.ndarray, eid: str, out: np.ndarray,
                 stats: dict[str, Any], *, flush_rows: int = 2048, flush_seconds: float = 10.0) -> None:
        if flush_rows <= 0 or not flush_seconds >= 0:
            raise ValueError(f"flush_rows must be > 0 and flush_seconds >= 0, got {flush_rows} and {flush_seconds}")
        self.store, self.ids, self.hashes, self.eid, self.out, self.stats = store, ids, hashes, eid, out, stats
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.pending: list[int] = []
        self.last_flush = time.perf_counter()

    def add(self, items: Sequence[int]) -> None:
        self.pending.extend(items)

    def maybe_flush(self) -> None:
        if len(self.pending) >= self.flush_rows or time.perf_counter() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.store.upsert(self.ids[self.pending], self.hashes[self.pending], self.eid, self.out[self.pending])
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
        if len(self.store.parts()) > COMPACT_AT:
            self.store.compact()


def embed_catalog(encoder: Encoder, item_ids: Sequence[Any], texts: Sequence[str], store: ContentStore, *,
                  progress: bool = True, chunk_size: int = 1024, flush_seconds: float = 10.0,
                  flush_rows: int = 2048) -> tuple[np.ndarray, dict[str, Any]]:
    """Content vectors for a catalog, [n, encoder.dim] float32 in input order, plus stats.

    Vectors whose item, text hash and encoder id are in ``store`` are reused; the rest are encoded
    in chunks of at most ``chunk_size`` items, sized to about a quarter of ``flush_seconds`` each.
    Finished items are written to the store every ``flush_seconds`` (0: after every chunk) or
    ``flush_rows`` items, whichever comes first, and whatever is finished is written when the job
    stops on an error: a re-run resumes where this one stopped, and a kill loses at most about
    ``flush_seconds`` of work. Items with identical text are encoded once.

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

    writer = StoreWriter(store, ids, hashes, eid, out, stats, flush_rows=flush_rows, flush_seconds=flush_seconds)
    bar = tqdm(total=n_todo, unit="item", desc="content store", disable=not progress)
    size, c = (chunk_size if flush_seconds == 0 else min(chunk_size, MIN_CHUNK)), 0
    try:
        with writer.saving():
            while c < len(groups):
                chunk, c = groups[c:c + size], c + size
                t0 = time.perf_counter()
                vecs = np.asarray(encoder.encode([texts[g[0]] for g in chunk], progress=False), dtype=np.float32)
                check_vectors(vecs, len(chunk), dim, f"encoder '{eid}'")
                for g, v in zip(chunk, vecs):
                    out[g] = v
                    writer.add(g)
                stats["texts_encoded"] += len(chunk)
                bar.update(sum(len(g) for g in chunk))
                writer.maybe_flush()
                if flush_seconds > 0:  # the next chunk takes about a quarter of the flush interval
                    rate = len(chunk) / max(time.perf_counter() - t0, 1e-6)
                    size = int(min(chunk_size, max(MIN_CHUNK, rate * flush_seconds / 4)))
    finally:
        bar.close()
        stats["embed_seconds"] = round(time.perf_counter() - start, 3)
    return out, stats

"""Item retrieval index: FAISS over L2-normalised item vectors, scored by inner product (= cosine).

    index = build_index(item_vectors, item_ids)            # "auto": exact flat, IVF for big catalogs
    ids, scores = index.search(user_vectors, k=100, exclude=histories)
    index.save("runs/x/index"); index = load_index("runs/x/index")
    recall = recall_vs_exact(index, item_vectors, user_vectors, k=10)

For catalogs that should not sit in memory twice, ``build_index`` also takes a :class:`VectorStream`
(vectors read in row-order batches, e.g. from a Parquet file): an IVF index is trained on a seeded
sample of ``max(64 * nlist, 100_000)`` rows, then every vector is added batch by batch
(:class:`IndexBuilder`); :func:`exact_top_k` gives the exact neighbours of a few queries over the
same stream, for recall against exact search.

On disk a saved index is a directory of three files: ``index.faiss`` (the FAISS index),
``item_ids.parquet`` (one string column ``item_id``, in index row order) and ``index.json``
(kind, dim, size, build params, FAISS version and the sha256 of both data files). Each file is
replaced atomically and ``index.json`` is written last; loading verifies both checksums.

FAISS thread counts are never changed at import; ``num_threads`` (when given) applies only for
the duration of a build or search and the previous setting is restored afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

try:
    import faiss
except ImportError as exc:  # faiss comes from an extra: cpu (faiss-cpu) or gpu (faiss-gpu)
    raise ImportError("faiss is not installed: pip install 'learn[cpu]' (faiss-cpu) or 'learn[gpu]' "
                      "(faiss-gpu, with vLLM)") from exc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from learn.utils import atomic_path, file_sha256

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf", "hnsw")
INDEX_FILE = "index.faiss"
IDS_FILE = "item_ids.parquet"
META_FILE = "index.json"
FORMAT = "learn.item_index/1"
NORM_TOL = 1e-3
MIN_POINTS_PER_LIST = 39  # below this FAISS k-means warns that centroids are poorly trained
MISSING_ID = ""  # id in result slots the index could not fill (score -inf)
TRAIN_ROWS_PER_LIST = 64  # an IVF index is trained on max(64 * nlist, TRAIN_MIN_ROWS) sampled rows
TRAIN_MIN_ROWS = 100_000
ADD_BATCH = 65_536  # rows per index.add in build_index (and per exact-search block)


class ItemIndexError(ValueError):
    """Bad input to the index, or an index directory that is missing, corrupted or inconsistent."""


@contextlib.contextmanager
def faiss_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with FAISS/OpenMP limited to ``num_threads``; None leaves the setting alone."""
    if num_threads is None:
        yield
        return
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ItemIndexError(f"num_threads must be a positive int or None, got {num_threads!r}")
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(num_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


# -- validation ---------------------------------------------------------------------------------
def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ItemIndexError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _float_matrix(name: str, array: Any, first_row: int = 0) -> np.ndarray:
    """``array`` as a C-contiguous float32 [n, d] matrix of finite values (checked in blocks, so a big
    matrix gets no [n, d] temporary; rows in messages count from ``first_row``)."""
    arr = np.asarray(array)
    if arr.ndim != 2:
        raise ItemIndexError(f"{name} must be a 2-D array [n, dim], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ItemIndexError(f"{name} must be a float array, got dtype {arr.dtype}")
    if arr.shape[1] == 0:
        raise ItemIndexError(f"{name} has dimension 0; expected at least one column")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    bad_rows = [np.flatnonzero(~np.isfinite(arr[s:s + ADD_BATCH]).all(axis=1)) + s
                for s in range(0, len(arr), ADD_BATCH)]
    bad = np.concatenate(bad_rows) if bad_rows else np.empty(0, dtype=np.int64)
    if len(bad):
        raise ItemIndexError(f"{name} holds NaN or inf in {len(bad)} row(s), first at row {int(bad[0]) + first_row}")
    return arr


def _check_normalised(vectors: np.ndarray, first_row: int = 0) -> None:
    norms = np.concatenate([np.linalg.norm(vectors[s:s + ADD_BATCH], axis=1)
                            for s in range(0, len(vectors), ADD_BATCH)] or [np.empty(0, np.float32)])
    bad = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOL)
    if len(bad):
        row = int(bad[0])
        raise ItemIndexError(
            f"vectors must be L2-normalised (scores are cosines): row {row + first_row} has norm "
            f"{norms[row]:.6f} (tolerance {NORM_TOL}); {len(bad)} row(s) are off. Normalise with v / ||v|| first"
        )


def _duplicates(ids: np.ndarray, show: int = 5) -> tuple[list[str], int]:
    """(up to ``show`` duplicated ids, number of distinct duplicated ids)."""
    uniq, counts = np.unique(ids, return_counts=True)
    dup = uniq[counts > 1]
    return [str(x) for x in dup[:show]], len(dup)


def _id_array(item_ids: Sequence[str], where: str) -> np.ndarray:
    ids = list(item_ids)
    for i, x in enumerate(ids):
        if not isinstance(x, str):
            raise ItemIndexError(f"{where}: item ids must be strings; item_ids[{i}] is {type(x).__name__} {x!r}")
    arr = np.asarray(ids, dtype=str)
    shown, n_dup = _duplicates(arr)
    if n_dup:
        raise ItemIndexError(f"{where}: item ids must be unique; {n_dup} id(s) are duplicated, e.g. {shown}")
    return arr


# -- the index ----------------------------------------------------------------------------------
class ItemIndex:
    """A FAISS index over item vectors plus the item id of every index row."""

    def __init__(self, index: faiss.Index, kind: str, item_ids: np.ndarray, params: dict[str, Any],
                 num_threads: int | None = None) -> None:
        if index.ntotal != len(item_ids):
            raise ItemIndexError(f"FAISS index holds {index.ntotal} vectors but {len(item_ids)} item ids were given")
        self.index = index
        self.kind = kind
        self.dim = int(index.d)
        self.item_ids = item_ids
        self.size = int(index.ntotal)
        self.params = dict(params)
        self.num_threads = num_threads
        self._row_of: dict[str, int] | None = None

    def __repr__(self) -> str:
        return f"ItemIndex(kind={self.kind!r}, size={self.size}, dim={self.dim}, params={self.params})"

    def _rows_for(self, ids: Sequence[str] | None) -> np.ndarray:
        """Index rows of the known ids among ``ids`` (unknown ids are ignored)."""
        if ids is None:
            return np.empty(0, dtype=np.int64)
        if isinstance(ids, str):
            raise ItemIndexError(f"exclude entries must be lists of item ids, got the string {ids!r}")
        if self._row_of is None:
            self._row_of = {str(x): i for i, x in enumerate(self.item_ids)}
        rows = {self._row_of[x] for x in ids if x in self._row_of}
        return np.fromiter(rows, dtype=np.int64, count=len(rows))

    def _check_queries(self, queries: Any, k: Any) -> tuple[np.ndarray, int]:
        q = np.asarray(queries)
        if q.ndim != 2:
            raise ItemIndexError(f"queries must be a 2-D array [batch, {self.dim}], got shape {q.shape}")
        if q.shape[1] != self.dim:
            raise ItemIndexError(f"queries have dimension {q.shape[1]} but the index holds {self.dim}-d vectors")
        return _float_matrix("queries", q), min(_positive_int("k", k), self.size)

    def search_rows(self, queries: np.ndarray, k: int,
                    exclude: Sequence[Sequence[str] | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` but returns index rows (int64, -1 where unfilled) instead of ids."""
        q, k = self._check_queries(queries, k)
        batch = len(q)
        excluded: list[np.ndarray] = []
        if exclude is not None:
            if len(exclude) != batch:
                raise ItemIndexError(f"exclude must hold one id list per query: {len(exclude)} lists for "
                                     f"{batch} queries")
            excluded = [self._rows_for(e) for e in exclude]
        extra = max((len(e) for e in excluded), default=0)
        fetch = min(k + extra, self.size)
        if batch == 0:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        with faiss_threads(self.num_threads):
            scores, rows = self.index.search(q, fetch)
        rows = rows.astype(np.int64, copy=False)
        scores = scores.astype(np.float32, copy=False)
        if not extra:
            out_rows, out_scores = rows[:, :k].copy(), scores[:, :k].copy()
        else:
            out_rows = np.full((batch, k), -1, dtype=np.int64)
            out_scores = np.full((batch, k), -np.inf, dtype=np.float32)
            for b in range(batch):
                keep = rows[b] >= 0
                if len(excluded[b]):
                    keep &= ~np.isin(rows[b], excluded[b])
                r, s = rows[b][keep][:k], scores[b][keep][:k]
                out_rows[b, : len(r)], out_scores[b, : len(s)] = r, s
        out_scores[out_rows < 0] = -np.inf
        return out_rows, out_scores

    def search(self, queries: np.ndarray, k: int,
               exclude: Sequence[Sequence[str] | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per query: (ids [B, k] str, scores [B, k] float32), best first.

        ``k`` is clamped to the index size. ``exclude`` optionally gives, per query, item ids to
        leave out of its results (e.g. the user's history). Slots an approximate index (or heavy
        exclusion) cannot fill hold id ``""`` and score ``-inf`` at the end of the row.
        """
        rows, scores = self.search_rows(queries, k, exclude)
        ids = np.full(rows.shape, MISSING_ID, dtype=self.item_ids.dtype)
        filled = rows >= 0
        ids[filled] = self.item_ids[rows[filled]]
        return ids, scores

    # -- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> dict[str, str]:
        """Write ``index.faiss``, ``item_ids.parquet`` then ``index.json`` atomically; {file: sha256}."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ItemIndexError(f"cannot save index: {directory} exists and is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        checksums: dict[str, str] = {}
        # each file is hashed as it is written (no second read of a big index)
        with atomic_path(directory / INDEX_FILE) as tmp, open(tmp, "wb") as fh:
            digest = hashlib.sha256()

            def write(chunk: bytes) -> int:
                digest.update(chunk)
                return fh.write(chunk)

            writer = faiss.PyCallbackIOWriter(write)
            faiss.write_index(self.index, writer)
            del writer  # flushes faiss' buffer through ``write``
            checksums[INDEX_FILE] = digest.hexdigest()
        with atomic_path(directory / IDS_FILE) as tmp:
            table = pa.table({"item_id": pa.array(self.item_ids.tolist(), type=pa.string())})
            pq.write_table(table, tmp)
            checksums[IDS_FILE] = file_sha256(tmp)  # ids only: small next to the vectors
        meta = {
            "format": FORMAT,
            "kind": self.kind,
            "metric": "inner_product",
            "dim": self.dim,
            "size": self.size,
            "params": self.params,
            "faiss_version": faiss.__version__,
            "sha256": checksums,
        }
        with atomic_path(directory / META_FILE) as tmp:
            tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        log.info("saved %s index (%d items, dim %d) to %s", self.kind, self.size, self.dim, directory)
        return checksums


# -- building -----------------------------------------------------------------------------------
def default_nlist(n: int) -> int:
    """About 4*sqrt(n) inverted lists, but few enough that each gets ~39+ training points."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // MIN_POINTS_PER_LIST))


def _apply_search_params(index: faiss.Index, kind: str, params: dict[str, Any]) -> None:
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(params["ef_search"])


def _train_rows(n: int, nlist: int, seed: int) -> np.ndarray:
    """Sorted rows an IVF index with ``nlist`` lists is trained on: all ``n`` when few, else a seeded
    sample of ``max(TRAIN_ROWS_PER_LIST * nlist, TRAIN_MIN_ROWS)``."""
    size = max(TRAIN_ROWS_PER_LIST * nlist, TRAIN_MIN_ROWS)
    if n <= size:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


class IndexBuilder:
    """Builds the index :func:`build_index` makes, from batches: ``train`` (IVF only) on the rows
    ``train_rows`` of the vectors, then ``add`` every vector in row order, then ``finish`` with the ids.

        builder = IndexBuilder(n, dim, kind="auto")
        if builder.needs_training:
            builder.train(vectors_at(builder.train_rows))
        for batch in batches: builder.add(batch)
        index = builder.finish(item_ids)

    Each batch is checked (finite, L2-normalised) with rows counted over the whole catalog.
    """

    def __init__(self, n: int, dim: int, kind: str = "auto", flat_max_items: int = 100_000,
                 nlist: int | None = None, nprobe: int | None = None, hnsw_m: int = 32, ef_search: int = 128,
                 seed: int = 0, num_threads: int | None = None) -> None:
        if kind not in KINDS:
            raise ItemIndexError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        if n == 0:
            raise ItemIndexError("vectors is empty (0 rows); an index needs at least one item")
        n, dim = _positive_int("n", n), _positive_int("dim", dim)
        flat_max_items = _positive_int("flat_max_items", flat_max_items, minimum=0)
        params: dict[str, Any] = {"kind_requested": kind}
        if kind == "auto":
            params["flat_max_items"] = flat_max_items
            kind = "flat" if n <= flat_max_items else "ivf"
        self.n, self.dim, self.kind, self.num_threads = n, dim, kind, num_threads
        self.train_rows = np.empty(0, dtype=np.int64)
        with faiss_threads(num_threads):
            if kind == "flat":
                index: faiss.Index = faiss.IndexFlatIP(dim)
            elif kind == "ivf":
                nl = default_nlist(n) if nlist is None else _positive_int("nlist", nlist)
                if nl > n:
                    raise ItemIndexError(f"nlist={nl} exceeds the number of vectors ({n}); use nlist <= {n}")
                if n < MIN_POINTS_PER_LIST * nl:
                    log.warning("ivf: %d vectors for %d lists (< %d per list); centroids may be poor",
                                n, nl, MIN_POINTS_PER_LIST)
                # default: probe 1/16 of the lists (at least 16): at 1M random vectors and 4,000 lists,
                # 16 probes gave recall@10 0.20 against exact search, 256 gave 0.68 (bench/export_scale.py)
                npr = min(_positive_int("nprobe", nprobe) if nprobe is not None else max(16, nl // 16), nl)
                quantizer = faiss.IndexFlatIP(dim)
                index = faiss.IndexIVFFlat(quantizer, dim, nl, faiss.METRIC_INNER_PRODUCT)
                index.cp.seed = int(seed)
                index.cp.spherical = True  # centroids on the unit sphere, like the vectors
                self.train_rows = _train_rows(n, nl, int(seed))
                params.update(nlist=nl, nprobe=npr, seed=int(seed), train_rows=len(self.train_rows))
            else:
                m = _positive_int("hnsw_m", hnsw_m, minimum=2)
                index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
                params.update(hnsw_m=m, ef_search=_positive_int("ef_search", ef_search),
                              ef_construction=int(index.hnsw.efConstruction))
            _apply_search_params(index, kind, params)
        self.index, self.params = index, params
        self.added = 0

    @property
    def needs_training(self) -> bool:
        return not self.index.is_trained

    def _checked(self, name: str, vectors: Any, first_row: int) -> np.ndarray:
        vecs = _float_matrix(name, vectors, first_row)
        if vecs.shape[1] != self.dim:
            raise ItemIndexError(f"{name} have dimension {vecs.shape[1]} but the index is {self.dim}-d")
        _check_normalised(vecs, first_row)
        return vecs

    def train(self, sample: np.ndarray) -> None:
        """Train on the vectors at ``train_rows`` (in that order)."""
        if not self.needs_training:
            raise ItemIndexError(f"a {self.kind} index needs no training")
        vecs = self._checked("training vectors", sample, 0)
        if len(vecs) != len(self.train_rows):
            raise ItemIndexError(f"train needs the {len(self.train_rows)} vectors at train_rows, got {len(vecs)}")
        with faiss_threads(self.num_threads):
            self.index.train(vecs)  # (faiss' Python wrapper keeps the quantizer alive with the index)

    def add(self, vectors: np.ndarray) -> None:
        """Add the next rows (in catalog order)."""
        if self.needs_training:
            raise ItemIndexError(f"the {self.kind} index must be trained (on train_rows) before vectors are added")
        vecs = self._checked("vectors", vectors, self.added)
        if self.added + len(vecs) > self.n:
            raise ItemIndexError(f"more vectors added ({self.added + len(vecs)}) than the {self.n} the index was "
                                 f"planned for")
        with faiss_threads(self.num_threads):
            self.index.add(vecs)
        self.added += len(vecs)

    def finish(self, item_ids: Sequence[str]) -> ItemIndex:
        """The index, with ``item_ids`` (row i is ``item_ids[i]``); all ``n`` vectors must be added."""
        return self._finish(_id_array(item_ids, "build_index"))

    def _finish(self, ids: np.ndarray) -> ItemIndex:
        if self.added != self.n:
            raise ItemIndexError(f"{self.added} of the {self.n} vectors were added; add them all before finish")
        if len(ids) != self.n:
            raise ItemIndexError(f"item_ids has {len(ids)} entries but vectors has {self.n} rows; they must match")
        log.info("built %s index: %d items, dim %d, params %s", self.kind, self.n, self.dim, self.params)
        return ItemIndex(self.index, self.kind, ids, self.params, num_threads=self.num_threads)


@dataclass(frozen=True)
class VectorStream:
    """``n`` vectors of width ``dim`` that are read rather than held: ``batches()`` starts a fresh pass
    over all rows in order; ``rows(sorted_rows)`` returns the vectors at those rows (float32 [r, dim])."""

    n: int
    dim: int
    batches: Callable[[], Iterator[np.ndarray]]
    rows: Callable[[np.ndarray], np.ndarray]

    @classmethod
    def of_array(cls, vectors: np.ndarray, batch: int = ADD_BATCH) -> "VectorStream":
        """An in-memory matrix as a stream (slices, no copies)."""
        return cls(len(vectors), vectors.shape[1],
                   lambda: (vectors[s:s + batch] for s in range(0, len(vectors), batch)),
                   lambda rows: vectors if len(rows) == len(vectors) else vectors[rows])


def build_index(vectors: np.ndarray | VectorStream, item_ids: Sequence[str], kind: str = "auto",
                flat_max_items: int = 100_000, nlist: int | None = None, nprobe: int | None = None,
                hnsw_m: int = 32, ef_search: int = 128, seed: int = 0,
                num_threads: int | None = None) -> ItemIndex:
    """Index L2-normalised ``vectors`` [N, d] (row i is ``item_ids[i]``) for inner-product search.

    ``kind``: "flat" (exact), "ivf" (IndexIVFFlat trained on up to ``max(64 * nlist, 100_000)``
    seeded sample rows, all of them for smaller catalogs), "hnsw", or "auto" (flat when
    N <= ``flat_max_items``, else ivf). ``params`` of the result records what was used. The vectors
    are added in batches (:class:`IndexBuilder`); a :class:`VectorStream` is read, never held whole
    (each batch is checked as it comes, rows counted over the whole stream).
    """
    if kind not in KINDS:
        raise ItemIndexError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if isinstance(vectors, VectorStream):
        stream = vectors
    else:
        vecs = _float_matrix("vectors", vectors)
        stream = VectorStream.of_array(vecs)
    if stream.n == 0:
        raise ItemIndexError("vectors is empty (0 rows); an index needs at least one item")
    ids = _id_array(item_ids, "build_index")
    if len(ids) != stream.n:
        raise ItemIndexError(f"item_ids has {len(ids)} entries but vectors has {stream.n} rows; they must match")
    if not isinstance(vectors, VectorStream):
        _check_normalised(vecs)
    builder = IndexBuilder(stream.n, stream.dim, kind, flat_max_items, nlist, nprobe, hnsw_m, ef_search, seed,
                           num_threads)
    if builder.needs_training:
        builder.train(stream.rows(builder.train_rows))
    for batch in stream.batches():
        builder.add(batch)
    return builder._finish(ids)


# -- loading ------------------------------------------------------------------------------------
def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    if not path.is_file():
        raise ItemIndexError(f"index file {path} is missing; expected {META_FILE} from ItemIndex.save()")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ItemIndexError(f"index file {path} is unreadable: {exc}") from exc
    need = ("format", "kind", "dim", "size", "params", "sha256")
    missing = [key for key in need if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ItemIndexError(f"index file {path} lacks keys {missing}")
    if meta["format"] != FORMAT:
        raise ItemIndexError(f"index file {path} has format {meta['format']!r}, expected {FORMAT!r}")
    if meta["kind"] not in KINDS[1:]:
        raise ItemIndexError(f"index file {path} has kind {meta['kind']!r}, expected one of {list(KINDS[1:])}")
    return meta


def _verified(directory: Path, name: str, meta: dict[str, Any]) -> Path:
    path = directory / name
    if not path.is_file():
        raise ItemIndexError(f"index file {path} is missing (listed in {META_FILE})")
    expected = meta["sha256"].get(name) if isinstance(meta["sha256"], dict) else None
    if not expected:
        raise ItemIndexError(f"{directory / META_FILE} records no sha256 for {name}")
    actual = file_sha256(path)
    if actual != expected:
        raise ItemIndexError(f"index file {path} fails its checksum: expected sha256 {expected}, got {actual}; "
                             f"the file was modified or corrupted after saving")
    return path


def load_index(directory: str | Path, num_threads: int | None = None) -> ItemIndex:
    """Read an index saved by :meth:`ItemIndex.save`, verifying both data files' sha256."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ItemIndexError(f"index directory {directory} does not exist")
    meta = _read_meta(directory)
    index_path = _verified(directory, INDEX_FILE, meta)
    ids_path = _verified(directory, IDS_FILE, meta)
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as exc:
        raise ItemIndexError(f"index file {index_path} is not a readable FAISS index: {exc}") from exc
    try:
        table = pq.read_table(ids_path)
    except (pa.ArrowException, OSError) as exc:
        raise ItemIndexError(f"index file {ids_path} is not readable Parquet: {exc}") from exc
    if "item_id" not in table.column_names:
        raise ItemIndexError(f"index file {ids_path} has columns {table.column_names}, expected 'item_id'")
    col_type = table.schema.field("item_id").type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise ItemIndexError(f"index file {ids_path}: column 'item_id' has type {col_type}, expected string")
    if table.column("item_id").null_count:
        raise ItemIndexError(f"index file {ids_path}: column 'item_id' holds nulls")
    ids = _id_array(table.column("item_id").to_pylist(), f"index file {ids_path}")
    if index.ntotal != meta["size"] or len(ids) != meta["size"] or index.d != meta["dim"]:
        raise ItemIndexError(
            f"index directory {directory} is inconsistent: {META_FILE} says size {meta['size']}, dim {meta['dim']}; "
            f"{INDEX_FILE} holds {index.ntotal} x {index.d}, {IDS_FILE} holds {len(ids)} ids"
        )
    _apply_search_params(index, meta["kind"], meta["params"])
    return ItemIndex(index, meta["kind"], ids, meta["params"], num_threads=num_threads)


# -- quality ------------------------------------------------------------------------------------
def recall_vs_exact(index: ItemIndex, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Mean recall@k of ``index``'s top-k against exact inner-product top-k over ``vectors``.

    ``vectors`` must be the indexed vectors in index row order. 1.0 means the index returns
    exactly the brute-force neighbours.
    """
    vecs = _float_matrix("vectors", vectors)
    if vecs.shape != (index.size, index.dim):
        raise ItemIndexError(f"vectors have shape {vecs.shape} but the index holds {index.size} x {index.dim}")
    got, _ = index.search_rows(queries, k)
    k = got.shape[1]
    if len(got) == 0:
        raise ItemIndexError("queries is empty; recall needs at least one query")
    exact = faiss.IndexFlatIP(index.dim)
    exact.add(vecs)
    with faiss_threads(index.num_threads):
        _, truth = exact.search(_float_matrix("queries", queries), k)
    hits = sum(len(np.intersect1d(g[g >= 0], t)) for g, t in zip(got, truth))
    recall = hits / (len(got) * k)
    log.info("recall@%d of %s index vs exact: %.4f over %d queries", k, index.kind, recall, len(got))
    return float(recall)


def exact_top_k(batches: Iterable[np.ndarray], queries: np.ndarray, k: int,
                num_threads: int | None = None) -> np.ndarray:
    """Rows [Q, k] (best first) of the exact inner-product top-``k`` of each query over vectors that
    arrive as row-order ``batches`` (rows numbered across batches); memory O(Q x (k + batch)), never
    the whole matrix. Fewer than ``k`` vectors in all: the missing slots hold -1."""
    q = _float_matrix("queries", queries)
    k = _positive_int("k", k)
    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    offset = 0
    with faiss_threads(num_threads):
        for batch in batches:
            vecs = _float_matrix("vectors", batch, offset)
            if vecs.shape[1] != q.shape[1]:
                raise ItemIndexError(f"vectors have dimension {vecs.shape[1]} but the queries have {q.shape[1]}")
            if len(vecs):
                scores, rows = faiss.knn(q, vecs, min(k, len(vecs)), metric=faiss.METRIC_INNER_PRODUCT)
                heap.add_result(scores, rows + offset)
            offset += len(vecs)
    heap.finalize()
    return heap.I.copy()


def recall_of_rows(got: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(recall@k, top-1 agreement) of an index's result rows ``got`` [Q, k] against exact ``truth``
    [Q, k] (-1 = empty slot, never a hit); k should not exceed the number of indexed vectors."""
    if got.shape != truth.shape or got.ndim != 2 or 0 in got.shape:
        raise ItemIndexError(f"result rows must be two non-empty [Q, k] arrays of one shape, got {got.shape} "
                             f"and {truth.shape}")
    k = got.shape[1]
    hits = sum(len(np.intersect1d(g[g >= 0], t[t >= 0])) for g, t in zip(got, truth))
    top1 = float(np.mean((got[:, 0] == truth[:, 0]) & (truth[:, 0] >= 0)))
    return hits / (len(got) * k), top1

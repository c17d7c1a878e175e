"""Serving bundle: one directory with everything a retriever needs, checksummed as a whole.

    summary = write_bundle(model, item_ids, content, "runs/x/bundle", info=BundleInfo(...))
    bundle = load_bundle("runs/x/bundle")          # verifies every checksum first
    vectors, unknown = bundle.user_vectors([["i1", "i7"]], max_history=40)
    ids, scores = bundle.index.search(vectors, k=10)

Layout (all listed in ``manifest.json``, which is written last)::

    user_tower.pt2  item_tower.pt2  towers_state.pt  tower_config.json   (export_towers)
    content.parquet          item_id: string, vector: fixed_size_list<float32>[d_llm]
    item_embeddings.parquet  item_id: string, vector: fixed_size_list<float32>[d_out]
    index/                   FAISS index of the item embeddings (ItemIndex.save)
    index/provenance.json    {"tower_id", "item_embeddings_sha256"}: what the index was built from
    item_id_vectors.parquet  item_id: string, vector: fixed_size_list<float32>[ID members x d_model]
                             (towers with item ID embeddings only: each item's learned ID vector,
                             zeros for an item without one; the exported towers take them as input)

With a served score mix (learn/towers/mix.py, manifest info ``score_mix``) the item embeddings
and the index hold the mix's item side, [item tower | normalised content | prior pair] / sqrt(parts)
(``Bundle.priors`` reads the priors back), and ``Bundle.user_vectors`` gives the user side;
without one they are the towers' vectors.

``tower_id`` is the sha256 of ``towers_state.pt``. Rows of the content table, the item embeddings
and the index are in the same (catalog) order. The bundle is assembled in a hidden temp directory
beside ``out_dir`` and renamed into place, so a half-written bundle is never visible.

Writing is streamed: the item tower runs over GROUP_ROWS rows at a time, each group one Parquet row
group of both tables; the index is built from the written table (an IVF index trained on a seeded
sample); every file is hashed once, as it is written, and those digests go into the manifest and
the provenance. Loading verifies every digest and reads the tables batch by batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from learn.export.manifest import (
    MANIFEST,
    ArtifactError,
    HashingWriter,
    check_sizes,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from learn.export.towers import (
    ITEM_TOWER,
    TOWER_CONFIG,
    TOWERS_STATE,
    USER_TOWER,
    export_towers,
    load_item_tower,
    load_user_tower,
)
from learn.index.faiss_index import (
    ItemIndex,
    MISSING_ID,
    ItemIndexError,
    VectorStream,
    build_index,
    exact_top_k,
    load_index,
    recall_of_rows,
)
from learn.towers.mix import ScoreMix, penalise_history
from learn.towers.model import TowerConfig, TwinTowers, id_width
from learn.utils import file_sha256

log = logging.getLogger(__name__)

CONTENT = "content.parquet"
ITEM_ID_VECTORS = "item_id_vectors.parquet"
ITEM_EMBEDDINGS = "item_embeddings.parquet"
INDEX_DIR = "index"
PROVENANCE = f"{INDEX_DIR}/provenance.json"
BUNDLE_FORMAT = "learn.bundle/1"
REQUIRED_FILES = (USER_TOWER, ITEM_TOWER, TOWERS_STATE, TOWER_CONFIG, CONTENT, ITEM_EMBEDDINGS, PROVENANCE)
RESERVED_INFO = ("bundle_format", "tower_id", "d_llm", "d_out", "n_items", "index_kind", "index_params",
                 "index_recall_at_10_vs_flat")
INDEX_PARAM_KEYS = ("nlist", "nprobe", "hnsw_m", "ef_search", "num_threads")
BATCH = 4096  # rows per item-tower call
GROUP_ROWS = 16 * BATCH  # rows per Parquet row group of the tables (and per item-tower group)
READ_BATCH = 65_536  # rows per batch when a table is read back
SPOT_CHECK_ROWS = 64
SPOT_CHECK_ATOL = 1e-4


@dataclass(frozen=True)
class BundleInfo:
    """What a bundle was made from, as ``manifest.json``'s ``info`` (beside the facts the writers
    record themselves: ``RESERVED_INFO``). Written by :meth:`to_json`, read by :meth:`from_manifest`.

    ``dataset``, ``dataset_fingerprint``, ``run_id``, ``config`` and ``max_history`` describe the
    training run behind the towers; a re-embedded bundle keeps its source's and adds
    ``catalog_fingerprint``, ``source_model_version`` and ``reembed_run_id``. ``config`` and
    ``max_history`` are None only in re-embedded bundles written before they were carried over
    (:meth:`require_config` says so where the config is needed)."""

    encoder_id: str
    dataset: str
    dataset_fingerprint: str
    run_id: str | None
    max_history: int | None
    config: dict[str, Any] | None
    catalog_fingerprint: str | None = None
    source_model_version: str | None = None
    reembed_run_id: str | None = None

    _REQUIRED = ("encoder_id", "dataset", "dataset_fingerprint", "run_id")
    _OPTIONAL = ("max_history", "config", "catalog_fingerprint", "source_model_version", "reembed_run_id")

    def to_json(self) -> dict[str, Any]:
        """The manifest's info keys; the re-embedding keys only where set."""
        out = {k: getattr(self, k) for k in (*self._REQUIRED, "max_history", "config")}
        out.update({k: getattr(self, k) for k in self._OPTIONAL[2:] if getattr(self, k) is not None})
        return out

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], where: str = MANIFEST) -> "BundleInfo":
        """The info of a manifest; :class:`ArtifactError` naming ``where`` and the missing or bad key."""
        info = manifest.get("info") if isinstance(manifest, dict) else None
        if not isinstance(info, dict):
            raise ArtifactError(f"{where}: no 'info' table")
        missing = [k for k in cls._REQUIRED if k not in info]
        if missing:
            raise ArtifactError(f"{where}: info lacks {missing}")
        types = {"encoder_id": str, "dataset": str, "dataset_fingerprint": str, "run_id": (str, type(None)),
                 "max_history": (int, type(None)), "config": (dict, type(None)),
                 "catalog_fingerprint": (str, type(None)), "source_model_version": (str, type(None)),
                 "reembed_run_id": (str, type(None))}
        values = {k: info.get(k) for k in types}
        for key, tp in types.items():
            if not isinstance(values[key], tp) or isinstance(values[key], bool):
                raise ArtifactError(f"{where}: info key {key!r} has the bad value {values[key]!r}")
        return cls(**values)

    def require_config(self, what: str) -> dict[str, Any]:
        """The training config, or an ArtifactError saying that ``what`` needs it and this bundle lacks it."""
        if self.config is None:
            raise ArtifactError(f"{what} needs the training config, and this bundle (trained in run "
                                f"{self.run_id}, re-embedded from version {self.source_model_version}) was "
                                f"written without one; re-embed from the trained version "
                                f"(reembed.model_version) to carry it over")
        return self.config


@dataclass
class BundleSummary:
    """What :func:`write_bundle` wrote."""

    directory: Path
    files: list[str]
    tower_id: str
    index_kind: str
    index_recall_at_10: float
    n_items: int
    d_llm: int
    d_out: int
    manifest: dict[str, Any] = field(repr=False)
    index_top1_vs_flat: float = 1.0  # share of recall queries whose exact best item the index ranks first
    recall_queries: int = 0  # queries the recall was measured on (0: a flat index, exact by construction)
    hash_seconds: float = 0.0  # CPU time spent hashing the two tables as they were written


# -- tables -------------------------------------------------------------------------------------
def _vector_table(item_ids: Sequence[str], vectors: np.ndarray) -> pa.Table:
    n, d = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.table({
        "item_id": pa.array(list(item_ids), type=pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(flat, d),
    })


class _VectorTableWriter:
    """Writes a table of :func:`_vector_table`'s schema group by group (one Parquet row group per
    ``write``), hashing the bytes as they go to disk. ``close`` returns the manifest entry."""

    def __init__(self, path: Path, d: int) -> None:
        self.schema = pa.schema([("item_id", pa.string()), ("vector", pa.list_(pa.float32(), d))])
        self.file = HashingWriter(path)
        # random-looking float vectors do not compress: only the ids are compressed
        self.writer = pq.ParquetWriter(self.file, self.schema, use_dictionary=False,
                                       compression={"item_id": "snappy", "vector": "none"})

    def write(self, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        self.writer.write_table(_vector_table(item_ids, vectors), row_group_size=max(len(vectors), 1))

    def close(self) -> dict[str, Any]:
        self.writer.close()
        self.file.close()
        return self.file.entry()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        self.file.close()


def _open_vector_table(path: Path, name: str) -> tuple[pq.ParquetFile, int]:
    """(ParquetFile, width) of a table written by :func:`_vector_table`; ArtifactError if malformed."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ArtifactError(f"{name}: not readable Parquet: {exc}") from exc
    schema = pf.schema_arrow
    if schema.names != ["item_id", "vector"]:
        raise ArtifactError(f"{name}: columns are {schema.names}, expected ['item_id', 'vector']")
    id_type, vec_type = schema.field("item_id").type, schema.field("vector").type
    if not pa.types.is_string(id_type):
        raise ArtifactError(f"{name}: column 'item_id' has type {id_type}, expected string")
    if not (pa.types.is_fixed_size_list(vec_type) and pa.types.is_float32(vec_type.value_type)):
        raise ArtifactError(f"{name}: column 'vector' has type {vec_type}, expected fixed_size_list<float32>")
    return pf, vec_type.list_size


def _batch_matrix(column: pa.Array, width: int, name: str) -> np.ndarray:
    """float32 [rows, width] view of one batch's vector column (Arrow's buffer, read-only)."""
    if column.null_count:
        raise ArtifactError(f"{name}: holds null ids or vectors")
    values = column.flatten()
    if values.null_count:
        raise ArtifactError(f"{name}: vectors hold null components")
    return values.to_numpy(zero_copy_only=False).reshape(len(column), width)


def _vector_batches(path: Path, name: str, batch_rows: int = READ_BATCH) -> Iterator[np.ndarray]:
    """The vector column of a table, in row-order batches of float32 [<= batch_rows, width]."""
    pf, width = _open_vector_table(path, name)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["vector"]):
        yield _batch_matrix(batch.column(0), width, name)


def _vector_stream(path: Path, name: str, n: int, width: int) -> VectorStream:
    """The table's vectors as a :class:`VectorStream`: each pass reads the file again (from the page
    cache, as a rule), so no more than one batch of it is in memory."""

    def rows(wanted: np.ndarray) -> np.ndarray:
        out = np.empty((len(wanted), width), dtype=np.float32)
        start = 0
        for batch in _vector_batches(path, name):
            lo, hi = np.searchsorted(wanted, [start, start + len(batch)])
            out[lo:hi] = batch[wanted[lo:hi] - start]
            start += len(batch)
        return out

    return VectorStream(n, width, lambda: _vector_batches(path, name), rows)


def _read_vector_table(directory: Path, name: str) -> tuple[list[str], np.ndarray]:
    """(ids, float32 [n, d]) from a table written by :func:`_vector_table`; ArtifactError if malformed.
    Read batch by batch into one preallocated (writable) matrix: the table is never whole in memory
    beside it."""
    path = directory / name
    pf, width = _open_vector_table(path, name)
    try:
        ids_column = pf.read(columns=["item_id"]).column("item_id")
        if ids_column.null_count:
            raise ArtifactError(f"{name}: holds null ids or vectors")
        ids = ids_column.to_pylist()
        del ids_column
        matrix = np.empty((pf.metadata.num_rows, width), dtype=np.float32)
        start = 0
        for batch in _vector_batches(path, name):
            matrix[start:start + len(batch)] = batch
            start += len(batch)
    except (pa.ArrowException, OSError) as exc:
        raise ArtifactError(f"{name}: not readable Parquet: {exc}") from exc
    if start != len(ids):
        raise ArtifactError(f"{name}: {len(ids)} ids but {start} vectors")
    return ids, matrix


# -- validation ---------------------------------------------------------------------------------
def _check_catalog(item_ids: Sequence[str], content: np.ndarray, d_llm: int) -> tuple[list[str], np.ndarray]:
    ids = list(item_ids)
    bad = next((i for i, x in enumerate(ids) if not isinstance(x, str) or not x), None)
    if bad is not None:
        raise ValueError(f"item ids must be non-empty strings; item_ids[{bad}] is {ids[bad]!r}")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        for x in ids:
            if x in seen:
                raise ValueError(f"item ids must be unique; {x!r} appears more than once")
            seen.add(x)
    arr = np.asarray(content)
    if arr.ndim != 2 or arr.shape[1] != d_llm:
        raise ValueError(f"content must be [n_items, d_llm={d_llm}], got shape {arr.shape}")
    if arr.shape[0] != len(ids):
        raise ValueError(f"content has {arr.shape[0]} rows but there are {len(ids)} item ids")
    if not ids:
        raise ValueError("the catalog is empty; a bundle needs at least one item")
    arr = np.ascontiguousarray(arr, dtype=np.float32)  # no copy for the usual float32 C-ordered matrix
    for start in range(0, len(arr), GROUP_ROWS):  # in blocks: no [N, d] temporary
        finite = np.isfinite(arr[start:start + GROUP_ROWS]).all(1)
        if not finite.all():
            raise ValueError(f"content holds NaN or inf (first bad row {start + int(np.flatnonzero(~finite)[0])})")
    return ids, arr


def _tower_call(tower: nn.Module, content: np.ndarray, ids: np.ndarray | None, s: int, e: int) -> np.ndarray:
    """The item tower on rows s..e (with their ID vectors when the towers take them)."""
    args = (torch.from_numpy(content[s:e]),) if ids is None else (torch.from_numpy(content[s:e]),
                                                                  torch.from_numpy(ids[s:e]))
    return tower(*args).numpy()


@torch.no_grad()
def _run_item_tower(tower: nn.Module, content: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    """The reference: the item tower over all of ``content`` at once, in BATCH-row calls."""
    out = [_tower_call(tower, content, ids, s, s + BATCH) for s in range(0, len(content), BATCH)]
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


@torch.no_grad()
def _item_tower_rows(tower: nn.Module, content: np.ndarray, start: int, stop: int,
                     ids: np.ndarray | None = None) -> np.ndarray:
    """Item vectors of ``content[start:stop]`` (``start`` a multiple of BATCH), computed in the same
    BATCH-row calls as :func:`_run_item_tower`, so they equal its rows bit for bit."""
    if start % BATCH:
        raise ValueError(f"item-tower groups must start at multiples of BATCH={BATCH}, got row {start}")
    out = None
    for s in range(start, stop, BATCH):
        vecs = _tower_call(tower, content, ids, s, min(s + BATCH, stop))
        if out is None:
            out = np.empty((stop - start, vecs.shape[1]), dtype=np.float32)
        out[s - start:s - start + len(vecs)] = vecs
    return out


def _recall_queries(embeddings: np.ndarray | VectorStream, n: int, seed: int) -> np.ndarray:
    """User-like queries: random items' embeddings plus isotropic noise of about their own norm.
    ``embeddings`` is the matrix or a stream of it (the same queries either way)."""
    rng = np.random.default_rng(seed)
    if isinstance(embeddings, VectorStream):
        rows = rng.integers(0, embeddings.n, n)
        unique, inverse = np.unique(rows, return_inverse=True)
        base, d = embeddings.rows(unique)[inverse], embeddings.dim
    else:
        d = embeddings.shape[1]
        base = embeddings[rng.integers(0, len(embeddings), n)]
    q = base + rng.standard_normal((n, d)) / np.sqrt(d)
    return (q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` onto ``out_dir``; an existing bundle is moved aside first and
    deleted only once the new one is in place (restored if the swap fails)."""
    if not out_dir.exists() and not out_dir.is_symlink():
        os.rename(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        log.warning("replaced bundle %s but could not delete the previous one at %s", out_dir, old)


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ValueError(f"cannot write a bundle to {out_dir}: it exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise ValueError(f"refusing to replace {out_dir}: it is a non-empty directory without {MANIFEST} "
                         f"(not a bundle); remove it or choose another path")


# -- writing ------------------------------------------------------------------------------------
Stages = Callable[[str], ContextManager[Any]]


def _no_stage(name: str) -> ContextManager[None]:
    return contextlib.nullcontext()


def _start_bundle(out_dir: str | Path, info: BundleInfo, index_params: dict[str, Any] | None,
                  recall_queries: int) -> tuple[Path, dict[str, Any], Path]:
    """Check the arguments both writers share and make the hidden temp directory beside ``out_dir``.

    Returns (absolute out_dir, index params, temp dir)."""
    if not isinstance(info, BundleInfo):
        raise TypeError(f"info must be a BundleInfo, got {type(info).__name__}")
    json.dumps(info.to_json())  # fail before any work if the config is not JSON-serialisable
    params = dict(index_params or {})
    unknown = sorted(set(params) - set(INDEX_PARAM_KEYS))
    if unknown:
        raise ValueError(f"unknown index_params {unknown}; allowed: {list(INDEX_PARAM_KEYS)}")
    if isinstance(recall_queries, bool) or not isinstance(recall_queries, int) or recall_queries < 1:
        raise ValueError(f"recall_queries must be an int >= 1, got {recall_queries!r}")
    out_dir = Path(out_dir).absolute()
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the bundle should read like any directory
    return out_dir, params, tmp


def write_bundle(model: TwinTowers, item_ids: Sequence[str], content: np.ndarray, out_dir: str | Path,
                 info: BundleInfo, index_kind: str = "auto", flat_max_items: int = 100_000,
                 index_params: dict[str, Any] | None = None, recall_queries: int = 1000,
                 seed: int = 0, stages: Stages | None = None, mix: ScoreMix | None = None,
                 prior: np.ndarray | None = None) -> BundleSummary:
    """Export ``model``'s towers, embed the catalog (``item_ids`` with raw ``content`` [N, d_llm],
    catalog order) with the exported item tower, index it, and publish all of it at ``out_dir``.

    ``info`` (what the bundle was made from) goes into the manifest with the bundle's own facts.
    ``index_params`` are passed to :func:`build_index` (nlist, nprobe, hnsw_m, ef_search,
    num_threads). Recall@10 of the index against exact search is measured on ``recall_queries``
    noisy item vectors (1.0 for a flat index, which is exact). An existing bundle at ``out_dir`` is
    replaced; any other non-empty directory there is refused.

    Memory stays O(batch) beyond ``content`` and the index: the item tower runs GROUP_ROWS rows at a
    time straight into the Parquet tables (one row group each), the index is built from the written
    table, and every file is hashed once, while it is written. ``stages`` (optional) is called with
    each sub-stage's name ("towers", "item_tower", "index", "recall", "manifest") and must return a
    context manager wrapped around it (timings for benchmarks). ``mix`` (with ``prior`` [N], the
    training split's popularity prior in catalog order, when it has a popularity term) makes the
    served vectors the mix's (module docstring).
    """
    cfg = model.cfg
    stage = stages or _no_stage
    mix = mix or ScoreMix()
    ids, content = _check_catalog(item_ids, content, cfg.d_llm)
    prior = _check_prior(mix, prior, len(ids))
    out_dir, params, tmp = _start_bundle(out_dir, info, index_params, recall_queries)
    try:
        with stage("towers"):
            paths = export_towers(model, tmp)
            tower_id = file_sha256(paths["state"])
            digests = {TOWERS_STATE: {"size": paths["state"].stat().st_size, "sha256": tower_id}}
            tower = load_item_tower(paths["item_tower"])
        id_rows = None
        if model.id_width:  # [N, ID members x d_model], zeros for items unseen in training
            id_rows = np.empty((len(ids), model.id_width), dtype=np.float32)
            for a in range(0, len(ids), GROUP_ROWS):
                b = min(a + GROUP_ROWS, len(ids))
                id_rows[a:b] = model.id_vectors(torch.arange(a, b, device=model.content.device)).cpu().numpy()

        def embed(a: int, b: int) -> np.ndarray:
            rows = _item_tower_rows(tower, content, a, b, id_rows)
            return mix.items(rows, content[a:b], None if prior is None else prior[a:b]).numpy() if mix.enabled else rows

        summary = _finish_bundle(tmp, out_dir, ids, content, embed, digests, tower_id, cfg.d_llm,
                                 cfg.d_out + mix.extra_dims(cfg.d_llm), info, index_kind, flat_max_items, params,
                                 recall_queries, seed, stage, mix, id_rows)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _check_prior(mix: ScoreMix, prior: np.ndarray | None, n: int) -> np.ndarray | None:
    """The priors a mix that stores them needs ([n] finite float32 in [0, 1]), None otherwise."""
    if not mix.stores_prior:
        return None
    if prior is None:
        raise ValueError("a score mix with a popularity weight or a cold content weight needs the items' prior "
                         "(learn.towers.mix.popularity_prior)")
    arr = np.asarray(prior, dtype=np.float32)
    if arr.shape != (n,) or not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
        raise ValueError(f"prior must be [{n}] finite values in [0, 1], got shape {arr.shape}")
    return arr


def _write_tables(tmp: Path, ids: list[str], content: np.ndarray, embed: Callable[[int, int], np.ndarray],
                  d_out: int, id_rows: np.ndarray | None = None) -> tuple[dict[str, dict[str, Any]], float]:
    """content.parquet and item_embeddings.parquet, GROUP_ROWS rows at a time (``embed(start, stop)``
    gives the item vectors of those rows); returns ({file: manifest entry}, seconds spent hashing)."""
    writers = {CONTENT: _VectorTableWriter(tmp / CONTENT, content.shape[1]),
               ITEM_EMBEDDINGS: _VectorTableWriter(tmp / ITEM_EMBEDDINGS, d_out)}
    if id_rows is not None:
        writers[ITEM_ID_VECTORS] = _VectorTableWriter(tmp / ITEM_ID_VECTORS, id_rows.shape[1])
    try:
        for start in range(0, len(ids), GROUP_ROWS):
            stop = min(start + GROUP_ROWS, len(ids))
            vectors = np.ascontiguousarray(embed(start, stop), dtype=np.float32)
            if vectors.shape != (stop - start, d_out):
                raise ValueError(f"item vectors of rows {start}..{stop - 1} have shape {vectors.shape}, expected "
                                 f"{(stop - start, d_out)}")
            finite = np.isfinite(vectors).all(1)
            if not finite.all():
                raise ValueError(f"item vectors hold NaN or inf (first bad row {start + int(np.flatnonzero(~finite)[0])})")
            group_ids = ids[start:stop]
            writers[CONTENT].write(group_ids, content[start:stop])
            writers[ITEM_EMBEDDINGS].write(group_ids, vectors)
            if id_rows is not None:
                writers[ITEM_ID_VECTORS].write(group_ids, id_rows[start:stop])
        entries = {name: w.close() for name, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return entries, sum(w.file.hash_seconds for w in writers.values())


def _finish_bundle(tmp: Path, out_dir: Path, ids: list[str], content: np.ndarray,
                   embed: Callable[[int, int], np.ndarray], digests: dict[str, dict[str, Any]], tower_id: str,
                   d_llm: int, d_out: int, info: BundleInfo, index_kind: str, flat_max_items: int,
                   params: dict[str, Any], recall_queries: int, seed: int, stage: Stages,
                   mix: ScoreMix, id_rows: np.ndarray | None = None) -> BundleSummary:
    """Tables, index, provenance and manifest into ``tmp`` (which holds the towers, ``digests``
    listing those already hashed), then publish it."""
    with stage("item_tower"):
        tables, hash_seconds = _write_tables(tmp, ids, content, embed, d_out, id_rows)
    digests = {**digests, **tables}
    embeddings = _vector_stream(tmp / ITEM_EMBEDDINGS, ITEM_EMBEDDINGS, len(ids), d_out)

    with stage("index"):
        index = build_index(embeddings, ids, kind=index_kind, flat_max_items=flat_max_items, seed=seed, **params)
        for name, sha in index.save(tmp / INDEX_DIR).items():
            digests[f"{INDEX_DIR}/{name}"] = {"size": (tmp / INDEX_DIR / name).stat().st_size, "sha256": sha}
    with stage("recall"):
        if index.kind == "flat":
            recall, top1 = 1.0, 1.0
        else:
            queries = _recall_queries(embeddings, recall_queries, seed)
            got, _ = index.search_rows(queries, 10)
            truth = exact_top_k(embeddings.batches(), queries, got.shape[1], num_threads=index.num_threads)
            recall, top1 = recall_of_rows(got, truth)
            log.info("recall@10 of the %s index vs exact: %.4f (top-1 %.4f) over %d queries",
                     index.kind, recall, top1, len(queries))

    with stage("manifest"):
        provenance = {"tower_id": tower_id, "item_embeddings_sha256": digests[ITEM_EMBEDDINGS]["sha256"]}
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        full_info = {
            **info.to_json(),
            "bundle_format": BUNDLE_FORMAT,
            "tower_id": tower_id,
            "d_llm": d_llm,
            "d_out": d_out,
            "n_items": len(ids),
            "index_kind": index.kind,
            "index_params": index.params,
            "index_recall_at_10_vs_flat": recall,
        }
        if mix.served:
            full_info["score_mix"] = mix.to_json()
        manifest = write_manifest(tmp, files, full_info, digests)
        _publish(tmp, out_dir)
    log.info("wrote bundle %s: %d items, %s index (recall@10 %.4f), tower %s",
             out_dir, len(ids), index.kind, recall, tower_id[:12])
    return BundleSummary(directory=out_dir, files=files, tower_id=tower_id, index_kind=index.kind,
                         index_recall_at_10=recall, n_items=len(ids), d_llm=d_llm, d_out=d_out,
                         manifest=manifest, index_top1_vs_flat=top1,
                         recall_queries=0 if index.kind == "flat" else recall_queries,
                         hash_seconds=hash_seconds)


def rebuild_bundle(source: "Bundle", item_ids: Sequence[str], content: np.ndarray, embeddings: np.ndarray,
                   out_dir: str | Path, info: BundleInfo, index_kind: str = "auto",
                   flat_max_items: int = 100_000, index_params: dict[str, Any] | None = None,
                   recall_queries: int = 1000, seed: int = 0, stages: Stages | None = None,
                   id_vectors: np.ndarray | None = None) -> BundleSummary:
    """A new bundle with ``source``'s towers (files copied byte for byte: same tower id) over a new
    catalog: ``item_ids`` with raw ``content`` [N, d_llm] and their item-tower ``embeddings``
    [N, served width] (from ``source.embed_items``), a new index over them; ``source``'s score mix;
    towers with item ID embeddings need the catalog's ``id_vectors`` [N, id width] (zeros for new
    and re-embedded items: ``learn.export.reembed.item_vectors``). Published at ``out_dir`` as
    :func:`write_bundle` does (assembled aside, renamed into place)."""
    ids, content = _check_catalog(item_ids, content, source.config.d_llm)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.shape != (len(ids), source.d_out):
        raise ValueError(f"embeddings must be finite [{len(ids)}, {source.d_out}], got {embeddings.shape}")
    if (source.id_vectors is None) != (id_vectors is None):
        raise ValueError("id_vectors must be given exactly when the source bundle's towers take item ID vectors")
    if id_vectors is not None:
        id_vectors = np.ascontiguousarray(id_vectors, dtype=np.float32)
        if id_vectors.shape != (len(ids), source.id_vectors.shape[1]):
            raise ValueError(f"id_vectors must be [{len(ids)}, {source.id_vectors.shape[1]}], got {id_vectors.shape}")
    out_dir, params, tmp = _start_bundle(out_dir, info, index_params, recall_queries)
    try:
        for name in (USER_TOWER, ITEM_TOWER, TOWERS_STATE, TOWER_CONFIG):
            shutil.copyfile(source.directory / name, tmp / name)
        tower_id = file_sha256(tmp / TOWERS_STATE)
        if tower_id != source.tower_id:
            raise ArtifactError(f"{TOWERS_STATE} changed while copying from {source.directory}")
        digests = {TOWERS_STATE: {"size": (tmp / TOWERS_STATE).stat().st_size, "sha256": tower_id}}
        summary = _finish_bundle(tmp, out_dir, ids, content, lambda a, b: embeddings[a:b], digests, tower_id,
                                 source.config.d_llm, source.d_out, info, index_kind, flat_max_items, params,
                                 recall_queries, seed, stages or _no_stage, source.mix, id_vectors)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


# -- loading ------------------------------------------------------------------------------------
@dataclass
class Bundle:
    """A loaded, verified bundle. Row i of ``content``, ``item_embeddings`` and the index is
    ``item_ids[i]``."""

    directory: Path
    manifest: dict[str, Any]
    info: BundleInfo
    config: TowerConfig
    item_ids: list[str]
    id_to_row: dict[str, int]
    content: np.ndarray
    item_embeddings: np.ndarray
    index: ItemIndex
    user_tower: nn.Module
    item_tower: nn.Module
    mix: ScoreMix = field(default_factory=ScoreMix)  # the served score (none: the towers' cosine)
    id_vectors: np.ndarray | None = None  # [N, id width] item ID vectors, towers with ID embeddings only

    @property
    def tower_id(self) -> str:
        return self.manifest["info"]["tower_id"]

    @property
    def d_out(self) -> int:
        """Width of the served vectors (the towers' d_out, plus the score mix's dimensions)."""
        return self.item_embeddings.shape[1]

    @property
    def priors(self) -> np.ndarray | None:
        """The items' popularity priors (catalog order) when the score mix has a popularity term."""
        return self.mix.prior_of(self.item_embeddings)

    def check_max_history(self, max_history: int) -> int:
        """``max_history`` validated against the towers (learned positions cap it at max_len)."""
        return check_max_history(self.config, max_history)

    @torch.no_grad()
    def user_vectors(self, histories: Sequence[Sequence[str]], max_history: int) -> tuple[np.ndarray, list[list[str]]]:
        """User vectors [B, d_out] for histories of item ids (oldest first), and per history the ids
        not in the catalog (skipped). Only the last ``max_history`` known items count. A history
        with no known item gets a row of NaN (``np.isnan(v).any(1)`` finds them): it has no vector.
        """
        max_history = self.check_max_history(max_history)
        rows: list[list[int]] = []
        unknown: list[list[str]] = []
        for h in histories:
            if isinstance(h, (str, bytes)):
                raise ValueError(f"each history must be a list of item ids, got the string {h!r}")
            known: list[int] = []
            missing: list[str] = []
            for x in [] if h is None else h:
                item = x if isinstance(x, str) else str(x)
                row = self.id_to_row.get(item)
                if row is None:
                    missing.append(item)
                else:
                    known.append(row)
            rows.append(known[-max_history:])
            unknown.append(missing)
        out = np.full((len(rows), self.d_out), np.nan, dtype=np.float32)
        valid = [i for i, r in enumerate(rows) if r]
        for s in range(0, len(valid), BATCH):
            batch = valid[s:s + BATCH]
            lengths = [len(rows[i]) for i in batch]
            x = np.zeros((len(batch), max(lengths), self.content.shape[1]), dtype=np.float32)
            for j, i in enumerate(batch):
                x[j, : lengths[j]] = self.content[rows[i]]
            args = [torch.from_numpy(x), torch.tensor(lengths, dtype=torch.int64)]
            if self.id_vectors is not None:
                idx = np.zeros((len(batch), max(lengths), self.id_vectors.shape[1]), dtype=np.float32)
                for j, i in enumerate(batch):
                    idx[j, : lengths[j]] = self.id_vectors[rows[i]]
                args.append(torch.from_numpy(idx))
            vecs = self.user_tower(*args)
            if self.mix.enabled:
                vecs = self.mix.users(vecs, self.content[[rows[i][-1] for i in batch]])
            out[batch] = vecs.numpy()
        return out, unknown

    def search(self, vectors: np.ndarray, histories: Sequence[Sequence[str]], k: int,
               exclude_history: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The served top ``k`` (ids [B, k], scores [B, k], as ``ItemIndex.search``) for user vectors from
        :meth:`user_vectors` and the histories they came from: the index's inner products, with the score
        mix's history penalty applied (learn/towers/mix.py), or the history left out (``exclude_history``)."""
        if exclude_history:
            return self.index.search(vectors, k, exclude=histories)
        if not self.mix.penalises_history or len(vectors) == 0:
            return self.index.search(vectors, k)
        own = [np.unique(np.array([self.id_to_row[x] for x in h if x in self.id_to_row], dtype=np.int64))
               for h in histories]
        rows, scores = self.index.search_rows(vectors, k + max(len(h) for h in own))
        rows, scores = penalise_history(rows, scores, own, self.mix.history_weight, min(k, self.index.size))
        ids = np.full(rows.shape, MISSING_ID, dtype=self.index.item_ids.dtype)
        ids[rows >= 0] = self.index.item_ids[rows[rows >= 0]]
        return ids, scores

    def embed_items(self, content_vectors: np.ndarray, prior: np.ndarray | None = None,
                    id_vectors: np.ndarray | None = None) -> np.ndarray:
        """Served item vectors [M, d_out] for raw content vectors [M, d_llm] (e.g. new or re-embedded
        items); with a score mix their ``prior`` [M] (None: 0, an item unseen in training); with item
        ID embeddings their ``id_vectors`` [M, id width] (None: zeros, an item without one)."""
        arr = np.asarray(content_vectors)
        if arr.ndim != 2 or arr.shape[1] != self.content.shape[1]:
            raise ValueError(f"content vectors must be [M, {self.content.shape[1]}], got shape {arr.shape}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError("content vectors hold NaN or inf")
        if len(arr) == 0:
            return np.zeros((0, self.d_out), dtype=np.float32)
        ids = None
        if self.id_vectors is not None:
            width = self.id_vectors.shape[1]
            ids = np.zeros((len(arr), width), np.float32) if id_vectors is None else \
                np.ascontiguousarray(id_vectors, dtype=np.float32)
            if ids.shape != (len(arr), width):
                raise ValueError(f"id vectors must be [{len(arr)}, {width}], got shape {ids.shape}")
        vectors = _run_item_tower(self.item_tower, arr, ids)
        if not self.mix.enabled:
            return vectors
        if self.mix.stores_prior:
            prior = _check_prior(self.mix, np.zeros(len(arr), np.float32) if prior is None else prior, len(arr))
        return self.mix.items(vectors, arr, prior).numpy()


def check_max_history(config: TowerConfig, max_history: int) -> int:
    """``max_history`` validated against towers of ``config`` (learned positions cap it at max_len)."""
    if isinstance(max_history, bool) or not isinstance(max_history, (int, np.integer)) or max_history < 1:
        raise ValueError(f"max_history must be an int >= 1, got {max_history!r}")
    if config.positions == "learned" and max_history > config.max_len:
        raise ValueError(f"max_history={max_history} exceeds the towers' max_len={config.max_len} "
                         f"(learned positions)")
    return int(max_history)


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} ids"
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    same_set = "the same ids in a different order" if set(a) == set(b) else "different ids"
    return f"{same_set}; first difference at row {i}: {a[i]!r} vs {b[i]!r}"


def _read_json(directory: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads((directory / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{name}: unreadable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{name}: expected a JSON object")
    return data


def _load_tower(directory: Path, name: str) -> nn.Module:
    loader = load_user_tower if name == USER_TOWER else load_item_tower
    try:
        return loader(directory / name)
    except Exception as exc:  # a verified file that torch cannot load: wrong torch version, bad export
        raise ArtifactError(f"{name}: cannot load the exported tower: {exc}") from exc


def _check_bundle_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The bundle keys of a manifest's info (files listed, format, tower id); ArtifactError naming the gap."""
    files, info = manifest["files"], manifest.get("info")
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise ArtifactError(f"{directory} is not a complete bundle: {MANIFEST} does not list {missing}")
    if not isinstance(info, dict) or any(k not in info for k in RESERVED_INFO):
        raise ArtifactError(f"{MANIFEST}: info lacks bundle keys {[k for k in RESERVED_INFO if k not in (info or {})]}")
    if info["bundle_format"] != BUNDLE_FORMAT:
        raise ArtifactError(f"{MANIFEST}: bundle format {info['bundle_format']!r}, expected {BUNDLE_FORMAT!r}")
    if files[TOWERS_STATE]["sha256"] != info["tower_id"]:
        raise ArtifactError(f"{TOWERS_STATE} (sha256 {files[TOWERS_STATE]['sha256']}) is not the tower "
                            f"{info['tower_id']} recorded in {MANIFEST}")
    return info


def read_bundle_header(directory: str | Path, manifest: dict[str, Any] | None = None) -> tuple[dict[str, Any], TowerConfig]:
    """(manifest, tower config) of the bundle at ``directory``, checked without reading its tables
    or index: what logging a retriever needs. With ``manifest=None`` every listed file is verified
    against its sha256 (one streaming pass, constant memory). A ``manifest`` handed over by the writer
    (``BundleSummary.manifest``, whose digests were computed while the files were written) is reused
    instead: it must equal the bundle's ``manifest.json`` and every file must have its recorded size,
    and nothing is hashed. Either way the bundle keys and the tower config are checked; the full
    check of the parts against each other is :func:`load_bundle`'s, on every load."""
    directory = Path(directory)
    if manifest is None:
        manifest = verify_manifest(directory)
    else:
        if read_manifest(directory) != json.loads(json.dumps(manifest)):  # (tuples are lists on disk)
            raise ArtifactError(f"{directory / MANIFEST} is not the manifest handed over with the bundle "
                                f"(rewritten since, or another bundle)")
        check_sizes(directory, manifest)
    _check_bundle_manifest(directory, manifest)
    BundleInfo.from_manifest(manifest, str(directory / MANIFEST))
    try:
        config = TowerConfig(**_read_json(directory, TOWER_CONFIG))
    except TypeError as exc:
        raise ArtifactError(f"{TOWER_CONFIG}: not a tower config: {exc}") from exc
    return manifest, config


def load_bundle(directory: str | Path) -> Bundle:
    """Verify ``directory/manifest.json`` (every file's sha256), load all parts and check they
    belong together; raises :class:`ArtifactError` naming what is wrong."""
    directory = Path(directory)
    manifest = verify_manifest(directory)
    files = manifest["files"]
    info = _check_bundle_manifest(directory, manifest)
    bundle_info = BundleInfo.from_manifest(manifest, str(directory / MANIFEST))

    # provenance: the towers, the item embeddings and the index were made together
    tower_id = info["tower_id"]
    provenance = _read_json(directory, PROVENANCE)
    if provenance.get("tower_id") != tower_id:
        raise ArtifactError(
            f"index/tower mismatch: {INDEX_DIR}/ was built from the item tower {provenance.get('tower_id')} "
            f"but the bundle's towers are {tower_id}; the index does not belong to this user tower"
        )
    if provenance.get("item_embeddings_sha256") != files[ITEM_EMBEDDINGS]["sha256"]:
        raise ArtifactError(f"index/embeddings mismatch: {INDEX_DIR}/ was built from item embeddings "
                            f"{provenance.get('item_embeddings_sha256')} but {ITEM_EMBEDDINGS} is "
                            f"{files[ITEM_EMBEDDINGS]['sha256']}")

    cfg_dict = _read_json(directory, TOWER_CONFIG)
    try:
        config = TowerConfig(**cfg_dict)
    except TypeError as exc:
        raise ArtifactError(f"{TOWER_CONFIG}: not a tower config: {exc}") from exc
    try:
        mix = ScoreMix.from_json(info.get("score_mix"), MANIFEST)
    except ValueError as exc:
        raise ArtifactError(str(exc)) from None
    content_ids, content = _read_vector_table(directory, CONTENT)
    emb_ids, embeddings = _read_vector_table(directory, ITEM_EMBEDDINGS)
    id_vectors = None
    if config.num_id_items:
        if ITEM_ID_VECTORS not in files:
            raise ArtifactError(f"{TOWER_CONFIG} has item ID embeddings but {MANIFEST} lists no {ITEM_ID_VECTORS}")
        vec_ids, id_vectors = _read_vector_table(directory, ITEM_ID_VECTORS)
        if vec_ids != content_ids:
            raise ArtifactError(f"item id mismatch: {ITEM_ID_VECTORS} and {CONTENT} list "
                                f"{_first_difference(vec_ids, content_ids)}")
        if id_vectors.shape[1] != id_width(config):
            raise ArtifactError(f"{ITEM_ID_VECTORS} width {id_vectors.shape[1]}, expected ID members x d_model = "
                                f"{id_width(config)}")
    try:
        index = load_index(directory / INDEX_DIR)
    except ItemIndexError as exc:
        raise ArtifactError(f"{INDEX_DIR}/: {exc}") from exc

    # dimensions and sizes
    dims = {
        f"{TOWER_CONFIG} d_llm": config.d_llm, f"{CONTENT} width": content.shape[1],
        f"{MANIFEST} d_llm": info["d_llm"],
    }
    outs = {
        f"{TOWER_CONFIG} d_out + score mix": config.d_out + mix.extra_dims(config.d_llm),
        f"{ITEM_EMBEDDINGS} width": embeddings.shape[1],
        f"{INDEX_DIR}/ dim": index.dim, f"{MANIFEST} d_out": info["d_out"],
    }
    sizes = {f"{CONTENT} rows": len(content_ids), f"{ITEM_EMBEDDINGS} rows": len(emb_ids),
             f"{INDEX_DIR}/ size": index.size, f"{MANIFEST} n_items": info["n_items"]}
    for what, values in (("d_llm", dims), ("d_out", outs), ("item count", sizes)):
        if len(set(values.values())) != 1:
            raise ArtifactError(f"bundle {what} disagrees: {values}")

    # the same items in the same order everywhere
    if emb_ids != content_ids:
        raise ArtifactError(f"item id mismatch: {ITEM_EMBEDDINGS} and {CONTENT} list "
                            f"{_first_difference(emb_ids, content_ids)}")
    index_ids = index.item_ids.tolist()
    if index_ids != content_ids:
        raise ArtifactError(f"item id mismatch: {INDEX_DIR}/item_ids.parquet and {CONTENT} list "
                            f"{_first_difference(index_ids, content_ids)}")
    id_to_row = {x: i for i, x in enumerate(content_ids)}
    if len(id_to_row) != len(content_ids):
        raise ArtifactError(f"{CONTENT}: item ids are not unique")

    user_tower, item_tower = _load_tower(directory, USER_TOWER), _load_tower(directory, ITEM_TOWER)
    bundle = Bundle(directory=directory, manifest=manifest, info=bundle_info, config=config, item_ids=content_ids,
                    id_to_row=id_to_row, content=content, item_embeddings=embeddings, index=index,
                    user_tower=user_tower, item_tower=item_tower, mix=mix, id_vectors=id_vectors)
    # spot check: the stored embeddings are what this item tower computes for this content
    rows = np.unique(np.linspace(0, len(content_ids) - 1, min(SPOT_CHECK_ROWS, len(content_ids))).astype(int))
    try:
        fresh = bundle.embed_items(content[rows], None if bundle.priors is None else bundle.priors[rows],
                                   None if id_vectors is None else id_vectors[rows])
    except ValueError as exc:  # e.g. a prior column outside [0, 1]
        raise ArtifactError(f"{ITEM_EMBEDDINGS}: {exc}") from None
    # (the sqrt(1 - x^2) columns of the mix are derived from the prior column and ill-conditioned near
    # x = 1: the prior column itself is compared)
    keep = np.setdiff1d(np.arange(embeddings.shape[1]), mix.derived_columns(embeddings.shape[1]))
    err = float(np.abs(fresh[:, keep] - embeddings[rows][:, keep]).max())
    if err > SPOT_CHECK_ATOL:
        raise ArtifactError(f"{ITEM_EMBEDDINGS} does not match {ITEM_TOWER} applied to {CONTENT} "
                            f"(max abs difference {err:.3g} on {len(rows)} sampled items)")
    return bundle

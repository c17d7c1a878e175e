"""Item retrieval index: FAISS (flat / IVF / HNSW) over L2-normalised item vectors, cosine scores."""

from learn.index.faiss_index import (
    ItemIndex,
    ItemIndexError,
    build_index,
    default_nlist,
    faiss_threads,
    load_index,
    recall_vs_exact,
)

__all__ = [
    "ItemIndex",
    "ItemIndexError",
    "build_index",
    "default_nlist",
    "faiss_threads",
    "load_index",
    "recall_vs_exact",
]

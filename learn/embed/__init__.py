"""CEX: item text -> frozen-LLM content vectors, cached in a content store.

``HFEncoder`` (transformers, the reference), model specs (``resolve_model``), and the Parquet
``ContentStore`` with ``embed_catalog``, which only encodes new or changed items.
"""

from learn.embed.models import ModelNotAvailable, ResolvedModel, encoder_id, resolve_model
from learn.embed.store import ContentStore, ContentStoreError, embed_catalog


def __getattr__(name: str):
    # HFEncoder imports torch + transformers; load them only when asked for
    if name == "HFEncoder":
        from learn.embed.hf import HFEncoder

        return HFEncoder
    raise AttributeError(f"module 'learn.embed' has no attribute {name!r}")


__all__ = ["HFEncoder", "ContentStore", "ContentStoreError", "embed_catalog", "ModelNotAvailable",
           "ResolvedModel", "encoder_id", "resolve_model"]

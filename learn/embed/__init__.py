"""CEX: item text -> frozen-LLM content vectors, cached in a content store.

``HFEncoder`` (transformers, the reference), ``VLLMEncoder`` (vLLM pooling mode, same vectors),
model specs (``resolve_model``), and the Parquet ``ContentStore`` with ``embed_catalog``, which only
encodes new or changed items. Everything is imported on first use, so a process that needs one
piece (the vLLM worker, say) does not pay for, or need, the others' dependencies.
"""

from importlib import import_module

_WHERE = {
    "HFEncoder": "learn.embed.hf",
    "VLLMEncoder": "learn.embed.vllm_encoder",
    "build_encoder": "learn.embed.backends",
    "ContentStore": "learn.embed.store",
    "ContentStoreError": "learn.embed.store",
    "embed_catalog": "learn.embed.store",
    "ModelNotAvailable": "learn.embed.models",
    "ResolvedModel": "learn.embed.models",
    "encoder_id": "learn.embed.models",
    "resolve_model": "learn.embed.models",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'learn.embed' has no attribute {name!r}")


__all__ = sorted(_WHERE)

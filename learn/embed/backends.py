"""Pick the item-content encoder for ``embed.backend``: "hf" (transformers, the reference) or "vllm"."""

from __future__ import annotations

from typing import Any

BACKENDS = ("hf", "vllm")


def build_encoder(embed_cfg: Any, device: str | None = None) -> Any:
    """An encoder (``encode``, ``dim``, ``encoder_id``) for an ``EmbedConfig``; call ``close_encoder`` after.
    ``device``: where an hf encoder runs (None: ``embed.device``; Ray Data actors pass their own)."""
    if embed_cfg.backend == "hf":
        from learn.embed.hf import HFEncoder

        return HFEncoder.from_config(embed_cfg, device=device)
    if embed_cfg.backend == "vllm":
        from learn.embed.vllm_encoder import VLLMEncoder

        return VLLMEncoder.from_config(embed_cfg, device=device or "cpu")
    raise ValueError(f"embed.backend must be one of {', '.join(BACKENDS)}, got {embed_cfg.backend!r}")


def close_encoder(encoder: Any) -> None:
    """Release what an encoder holds outside this process (the vLLM engine); a no-op for HF."""
    close = getattr(encoder, "close", None)
    if close is not None:
        close()

"""The reference item-content encoder: a frozen Hugging Face model, mean pooling, L2 norm.

    enc = HFEncoder("minilm", max_tokens=256)          # or "smollm2", a local dir, a hub id
    vecs = enc.encode(["Title: ... Brand: ...", ...])  # float32 [n, enc.dim], unit rows

Each text is embedded as if it were alone: the mean of the last hidden layer over its own
(non-padding) tokens, then L2-normalised (LEARN section 1). Batching is only a speed-up: texts are
grouped by token length to cut padding, padding tokens are masked out of attention and pooling,
and position ids are counted from each text's first real token, so left or right padding and the
batch a text lands in do not change its vector. Other encoders (vLLM) are tested against this one.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from learn.device import resolve_device
from learn.embed.models import ModelNotAvailable, ResolvedModel, encoder_id, resolve_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_texts(texts: Sequence[str]) -> list[str]:
    """Texts must be non-empty strings; raise ValueError naming the first bad index."""
    if isinstance(texts, str):
        raise ValueError("encode() takes a list of texts, got a single string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"text at index {i} is {type(t).__name__}, not str: {t!r}")
        if not t.strip():
            raise ValueError(f"text at index {i} is empty; every item needs some text to embed")
    return texts


def tokenize(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids per text, special tokens included, truncated to ``max_tokens`` (every backend uses this)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_tokens, padding=False,
                    return_attention_mask=False, return_token_type_ids=False)
    return enc["input_ids"]


class HFEncoder:
    """A frozen transformers model as a text -> unit-vector encoder (encoder-only or decoder LLM)."""

    pooling = "mean"

    def __init__(self, model_spec: str | ResolvedModel, *, revision: str | None = None, max_tokens: int = 256,
                 batch_size: int = 64, dtype: str = "float32", cache_dir: str | Path = ".cache/learn",
                 device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if max_tokens <= 0 or batch_size <= 0:
            raise ValueError(f"max_tokens and batch_size must be > 0, got {max_tokens} and {batch_size}")
        self.resolved = (model_spec if isinstance(model_spec, ResolvedModel)
                         else resolve_model(model_spec, revision=revision, cache_dir=cache_dir))
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = torch.device(device)
        r = self.resolved
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(r.path, revision=r.revision if r.kind == "hub" else None)
            self.model = AutoModel.from_pretrained(
                r.path, revision=r.revision if r.kind == "hub" else None, dtype=_DTYPES[dtype]
            )
        except OSError as exc:
            if r.kind != "hub":
                raise
            from huggingface_hub.constants import is_offline_mode

            why = "the hub is switched off (HF_HUB_OFFLINE=1)" if is_offline_mode() else "the hub is unreachable"
            raise ModelNotAvailable(
                f"cannot load model '{r.path}' (revision {r.revision or 'main'}): it is not a local directory, "
                f"it is not in the local HF cache, and {why}. Download it where the hub is reachable "
                f"(HF_HOME cache), or set embed.model to a local model directory. Cause: {exc}"
            ) from exc
        self.model.to(self.device).eval().requires_grad_(False)
        # decoder LLMs often ship without a pad token; any id works since padding is masked out
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"tokenizer of '{r.spec}' has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        if max_pos is not None and max_tokens > max_pos:
            raise ValueError(f"max_tokens={max_tokens} exceeds what '{r.spec}' supports ({max_pos} positions)")
        accepted = set(inspect.signature(self.model.forward).parameters)
        self._pass_positions = "position_ids" in accepted
        self._pass_types = "token_type_ids" in accepted
        self._no_cache = "use_cache" in accepted
        self.dim = int(self.model.config.hidden_size)
        self.encoder_id = encoder_id(self.resolved, self.pooling, max_tokens, dtype)

    @classmethod
    def from_config(cls, cfg: Any, device: str | None = None) -> "HFEncoder":
        """Build from an ``EmbedConfig``, on ``device`` (None: ``embed.device``)."""
        device = device or str(resolve_device(cfg.device, "embed.device"))
        return cls(cfg.model, revision=cfg.revision, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size,
                   dtype=cfg.dtype, cache_dir=cfg.cache_dir, device=device)

    def __repr__(self) -> str:
        return f"HFEncoder({self.encoder_id!r}, dim={self.dim}, batch_size={self.batch_size})"

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, special tokens included, truncated to ``max_tokens``."""
        return tokenize(self.tokenizer, texts, self.max_tokens)

    def _pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        n, width = len(ids), max(len(x) for x in ids)
        input_ids = torch.full((n, width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        left = self.tokenizer.padding_side == "left"
        for row, x in enumerate(ids):
            sl = slice(width - len(x), width) if left else slice(0, len(x))
            input_ids[row, sl] = torch.tensor(x, dtype=torch.long)
            mask[row, sl] = 1
        batch = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self._pass_positions:
            # count positions from each row's first real token, whatever the padding side
            batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(self.device)
        if self._pass_types:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        if self._no_cache:
            batch["use_cache"] = False
        return batch

    def _embed_batch(self, ids: list[list[int]]) -> np.ndarray:
        batch = self._pad(ids)
        hidden = self.model(**batch).last_hidden_state.float()
        keep = batch["attention_mask"].unsqueeze(-1).bool()
        # where(), not a product: hidden states at padding positions may be NaN for some models
        summed = torch.where(keep, hidden, torch.zeros((), device=hidden.device)).sum(1)
        mean = summed / keep.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(mean, p=2, dim=-1).cpu().numpy().astype(np.float32, copy=False)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], progress: bool = True, *, sort_by_length: bool = True) -> np.ndarray:
        """float32 [len(texts), dim] unit vectors, in input order.

        sort_by_length=False batches in input order (the naive baseline, for benchmarks only).
        """
        texts = check_texts(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        if sort_by_length:
            # longest first: a batch that does not fit in memory fails at once, not at the end
            order = np.argsort([-len(x) for x in ids], kind="stable")
        else:
            order = np.arange(len(ids))
        with tqdm(total=len(texts), unit="item", desc="embed", disable=not progress, leave=False) as bar:
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                out[idx] = self._embed_batch([ids[i] for i in idx])
                bar.update(len(idx))
        return out

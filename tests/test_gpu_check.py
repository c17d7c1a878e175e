"""bench/gpu_check.py run on CPU (--device cpu --quick), so the GPU check cannot rot before it runs on
a GPU; and embed.device's checks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# run the script as the GPU machine would, then list what it imported that the GPU machine lacks
RUNNER = """
import json, runpy, sys
sys.argv = ["bench/gpu_check.py", *json.loads(sys.argv[1])]
try:
    runpy.run_path("bench/gpu_check.py", run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
print("NOT_ON_GPU_MACHINE", json.dumps(sorted(m for m in ("ray", "mlflow", "faiss", "vllm") if m in sys.modules)))
"""


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, model_cache):
    out = tmp_path_factory.mktemp("gpu-check") / "check.json"
    args = ["--device", "cpu", "--quick", "--json", str(out), "--cache-dir", str(model_cache)]
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("NOT_ON_GPU_MACHINE"))
    return json.loads(out.read_text()), json.loads(line.split(" ", 1)[1])


def test_imports_only_what_the_gpu_machine_has(quick_run):
    assert quick_run[1] == []


def test_every_section_with_sane_values(quick_run):
    result, _ = quick_run
    assert result["meta"]["device"] == "cpu" and result["meta"]["quick"] is True
    assert set(result["seconds"]) == {"embed", "train", "eval"}

    minilm = result["embed"]["minilm"]  # the package is installed here
    models = [minilm] + ([] if "skipped" in result["embed"]["smollm2"] else [result["embed"]["smollm2"]])
    for row in models:
        assert row["texts"] == 16 and row["cpu_float32_items_per_s"] > 0
        assert row["float32"]["cos_to_cpu_min"] > 0.99999  # CPU against CPU: the same vectors
        assert 0.99 < row["bfloat16"]["cos_to_cpu_min"] <= row["bfloat16"]["cos_to_cpu_mean"] < 1.0 + 1e-6
        assert row["float32"]["items_per_s"] > 0 and row["bfloat16"]["items_per_s"] > 0

    rows = result["train"]
    assert {(r["items"], r["recipe"], r["precision"]) for r in rows} == {
        (n, recipe, p) for n in (500, 2000) for recipe in ("full_softmax", "sampled_softmax") for p in ("fp32", "bf16")}
    for r in rows:
        assert r["steps_per_s"] > 0 and len(r["first_losses"]) == len(r["cpu_fp32_losses"]) == 3
        # same weights, same batches: fp32 on CPU repeats the reference; bf16 stays close to it
        assert r["max_abs_loss_diff"] < (1e-5 if r["precision"] == "fp32" else 0.05), r
        assert r["first_losses"][2] < r["first_losses"][0], r  # the steps train

    ev = result["eval"]
    assert ev["items"] == 20_000 and ev["users"] == 2_000 and ev["users_per_s"] > 0
    assert ev["rank_equal_fraction"] == 1.0 and ev["max_abs_rank_diff"] == 0


def test_texts_are_seeded_and_scientific_sized():
    from bench.gpu_check import scientific_like_texts

    texts = scientific_like_texts(4385)
    assert texts == scientific_like_texts(4385) and texts != scientific_like_texts(4385, seed=1)
    words = sorted(len(t.split()) for t in texts)
    assert 20 <= words[len(words) // 2] <= 32 and words[int(0.95 * len(words))] <= 50


def test_a_missing_model_is_skipped_with_the_reason(tmp_path):
    from bench.gpu_check import main

    out = tmp_path / "embed.json"
    assert main(["--device", "cpu", "--quick", "--sections", "embed", "--json", str(out),
                 "--minilm-dir", str(tmp_path / "no-minilm"), "--smollm2-dir", str(tmp_path / "no-smollm2")]) == 0
    embed = json.loads(out.read_text())["embed"]
    assert "no-minilm" in embed["minilm"]["skipped"] and "no-smollm2" in embed["smollm2"]["skipped"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where there is no GPU")
def test_embed_device_cuda_without_a_gpu_names_the_key(tmp_path):
    from learn.config import ConfigError, load_config
    from learn.embed.catalog import check_before_run
    from learn.embed.hf import HFEncoder

    cfg = load_config(None, ["embed.device=cuda", f"embed.cache_dir={tmp_path}"]).embed
    with pytest.raises(ConfigError, match="embed.device=cuda"):
        check_before_run(cfg, "demo")
    with pytest.raises(ConfigError, match="embed.device=cuda"):
        HFEncoder.from_config(cfg)


def test_embed_device_is_for_the_local_hf_encoder_only():
    from learn.config import ConfigError, load_config

    assert load_config(None, ["embed.device=auto"]).embed.device == "auto"
    for other in ("embed.executor=ray_data", "embed.backend=vllm"):
        with pytest.raises(ConfigError, match="embed.device=cuda applies to embed.executor=local"):
            load_config(None, ["embed.device=cuda", other])

"""Golden metrics and bundle of conf/tiny.yaml per recipe: refactors must not move a number.

The values in tests/golden/tiny.json were produced by this test on the 2-core x86_64 CPU box
(torch 2.13.0+cpu) with ``LEARN_WRITE_GOLDEN=1``; every later run must reproduce them to 1e-6.
Regenerate only for a change that is meant to change results, and say so in the commit.
"""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.flows import run_pipeline

GOLDEN = Path(__file__).parent / "golden" / "tiny.json"
RECIPES = {
    "full_softmax": ["train.recipe=full_softmax"],
    "in_batch": ["train.recipe=in_batch"],
    "sampled_softmax": ["train.recipe=sampled_softmax", "train.num_negatives=32", "train.all_positions=true"],
    "in_batch_all_positions": ["train.recipe=in_batch", "train.all_positions=true"],
    "dense_all_action": ["train.recipe=dense_all_action", "train.n_history=4", "train.n_targets=4",
                         "train.target_len=8"],
    "content_mean": ["train.recipe=content_mean"],
    "content_last": ["train.recipe=content_last"],
}
WRITE = os.environ.get("LEARN_WRITE_GOLDEN") == "1"
TOL = 1e-6
# The no-training baselines rank raw MiniLM vectors, whose last bits depend on the CPU's kernels
# (AVX2 vs AVX-512): on an AMD EPYC box content_last's valid MRR came out 0.15091446 against the
# pinned 0.15090971 at the landed commit itself (one near-tie rank flipped). The trained recipes
# reproduce to 1e-6 on both; the baselines are held to 1e-4 (a real evaluation change moves more).
BASELINE_TOL = 1e-4


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    return tmp_path_factory.mktemp("golden-store") / "content.parquet"


def _pinned(metrics: dict) -> dict:
    keys = [k for k in metrics if k.startswith(("test_", "best_valid_")) or k in ("best_epoch", "epochs_run")]
    return {k: float(metrics[k]) for k in sorted(keys)}


def _bundle_facts(bundle: Path) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    info = manifest["info"]
    emb = pq.read_table(bundle / "item_embeddings.parquet")
    vectors = np.stack(emb.column("vector").to_numpy(zero_copy_only=False))
    return {
        "files": sorted(manifest["files"]),
        "info_keys": sorted(info),
        "facts": {k: info[k] for k in ("d_llm", "d_out", "n_items", "index_kind", "max_history", "dataset")},
        "first_rows": vectors[:3].round(7).tolist(),
        "column_means": vectors.astype(np.float64).mean(0).round(7).tolist(),
    }


def _check(name: str, got, want, tol: float = TOL) -> None:
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), f"{name}: keys differ: {sorted(set(got) ^ set(want))}"
        for k in want:
            _check(f"{name}.{k}", got[k], want[k], tol)
    elif isinstance(want, list) and want and isinstance(want[0], (list, float, int)):
        np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), atol=tol,
                                   rtol=0, err_msg=name)
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=tol, rel=0), f"{name}: {got} != golden {want}"
    else:
        assert got == want, f"{name}: {got!r} != golden {want!r}"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_tiny_recipe_reproduces_its_golden_metrics(recipe, tiny_cfg, shared_store):
    export = recipe == "full_softmax"
    cfg = tiny_cfg("tracking.enabled=false", *RECIPES[recipe],
                   f"embed.store={shared_store}", f"export.enabled={str(export).lower()}", "export.plots=false")
    result = run_pipeline(cfg, progress=False)
    got = {"metrics": _pinned(result.metrics)}
    if export:
        got["bundle"] = _bundle_facts(result.output_dir / "bundle")
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if WRITE:
        golden[recipe] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert recipe in golden, f"no golden values for {recipe} in {GOLDEN}; run with LEARN_WRITE_GOLDEN=1"
    _check(recipe, got, golden[recipe], BASELINE_TOL if recipe.startswith("content_") else TOL)

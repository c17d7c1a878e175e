import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from learn.export import ArtifactError, write_manifest
from learn.export.bundle import BundleInfo, load_bundle, write_bundle
from learn.index import build_index
from learn.towers.model import TowerConfig, TwinTowers, pad_histories
from learn.utils import file_sha256

N_ITEMS = 50
D_LLM = 16
IDS = [f"item{i:03d}" for i in range(N_ITEMS)]
FILES = [
    "content.parquet", "index/index.faiss", "index/index.json", "index/item_ids.parquet",
    "index/provenance.json", "item_embeddings.parquet", "item_tower.pt2", "tower_config.json",
    "towers_state.pt", "user_tower.pt2",
]


def info(run_id: str = "run", **changes) -> BundleInfo:
    return BundleInfo(encoder_id="enc", dataset="demo", dataset_fingerprint="fp", run_id=run_id, max_history=12,
                      config={"seed": 0}, **changes)


def make_model(seed: int) -> tuple[TwinTowers, np.ndarray]:
    torch.manual_seed(0)
    content = torch.randn(N_ITEMS, D_LLM) + 3.0  # the same catalog for every seed
    torch.manual_seed(seed)
    cfg = TowerConfig(d_llm=D_LLM, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.1, d_out=8, max_len=12)
    model = TwinTowers(cfg, content)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), content.numpy()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two bundles of the same catalog from differently initialised models: {"a"/"b": (model, summary)}."""
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        model, content = make_model(seed)
        out[name] = model, write_bundle(model, IDS, content, root / name, info(f"run-{name}"))
    return out


def copy_bundle(built, tmp_path: Path, name: str = "a") -> Path:
    return Path(shutil.copytree(built[name][1].directory, tmp_path / name))


def reseal(directory: Path) -> None:
    """Rewrite the manifest for the files as they are now, so that every checksum passes."""
    old = json.loads((directory / "manifest.json").read_text())
    write_manifest(directory, list(old["files"]), old["info"])


def test_round_trip(built, tmp_path):
    model, summary = built["a"]
    assert summary.files == FILES
    assert sorted(p.name for p in summary.directory.parent.iterdir()) == ["a", "b"]  # no temp dirs left
    bundle = load_bundle(summary.directory)

    assert bundle.item_ids == IDS and bundle.id_to_row["item007"] == 7
    np.testing.assert_array_equal(bundle.content, model.content[1:].numpy())
    np.testing.assert_allclose(bundle.item_embeddings, model.all_item_embeddings().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(bundle.embed_items(bundle.content[:5]), bundle.item_embeddings[:5], atol=1e-6)
    assert bundle.index.kind == "flat" and bundle.index.item_ids.tolist() == IDS

    info = bundle.manifest["info"]
    assert info["run_id"] == "run-a" and info["tower_id"] == summary.tower_id == bundle.tower_id
    assert (info["d_llm"], info["d_out"], info["n_items"]) == (D_LLM, 8, N_ITEMS)
    assert info["index_kind"] == "flat" and info["index_recall_at_10_vs_flat"] == 1.0
    assert sorted(bundle.manifest["files"]) == FILES
    assert summary.tower_id != built["b"][1].tower_id

    rng = np.random.default_rng(0)
    rows = [list(rng.integers(0, N_ITEMS, n)) for n in (1, 3, 7, 20)]
    histories = [[IDS[r] for r in h] for h in rows]
    histories[1].insert(1, "not-an-item")
    vectors, unknown = bundle.user_vectors(histories + [["ghost"], []], max_history=10)
    assert unknown == [[], ["not-an-item"], [], [], ["ghost"], []]
    expected = model.user_embedding(pad_histories(rows, 10)).detach().numpy()  # last 10 items of the long one
    np.testing.assert_allclose(vectors[:4], expected, atol=1e-5, rtol=0)
    assert np.isnan(vectors[4:]).all()  # no known item: no vector


@pytest.mark.parametrize("name", FILES)
def test_flipped_byte_is_caught(built, tmp_path, name):
    directory = copy_bundle(built, tmp_path)
    path = directory / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=name):
        load_bundle(directory)


def test_index_from_another_tower_is_refused(built, tmp_path):
    directory = copy_bundle(built, tmp_path)
    shutil.rmtree(directory / "index")
    shutil.copytree(built["b"][1].directory / "index", directory / "index")
    reseal(directory)
    with pytest.raises(ArtifactError, match="index/tower mismatch"):
        load_bundle(directory)


def test_embeddings_not_from_the_item_tower_are_refused(built, tmp_path):
    directory = copy_bundle(built, tmp_path)
    shutil.copy(built["b"][1].directory / "item_embeddings.parquet", directory / "item_embeddings.parquet")
    provenance = json.loads((directory / "index/provenance.json").read_text())
    provenance["item_embeddings_sha256"] = file_sha256(directory / "item_embeddings.parquet")
    (directory / "index/provenance.json").write_text(json.dumps(provenance))
    reseal(directory)
    with pytest.raises(ArtifactError, match="item_embeddings.parquet does not match item_tower.pt2"):
        load_bundle(directory)


@pytest.mark.parametrize("part", ["content", "index"])
def test_item_id_order_mismatch(built, tmp_path, part):
    directory = copy_bundle(built, tmp_path)
    perm = np.roll(np.arange(N_ITEMS), 1)
    if part == "content":
        table = pq.read_table(directory / "content.parquet")
        pq.write_table(table.take(perm), directory / "content.parquet")
        expected = ("item id mismatch: item_embeddings.parquet and content.parquet list "
                    "the same ids in a different order")
    else:
        emb = load_bundle(directory).item_embeddings
        shutil.rmtree(directory / "index")
        build_index(emb[perm], [IDS[i] for i in perm], kind="flat").save(directory / "index")
        shutil.copy(built["a"][1].directory / "index/provenance.json", directory / "index/provenance.json")
        expected = "item id mismatch: index/item_ids.parquet and content.parquet"
    reseal(directory)
    with pytest.raises(ArtifactError, match=expected):
        load_bundle(directory)


def test_dimension_disagreement(built, tmp_path):
    directory = copy_bundle(built, tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["info"]["d_out"] = 9
    write_manifest(directory, list(manifest["files"]), manifest["info"])
    with pytest.raises(ArtifactError, match="d_out disagrees"):
        load_bundle(directory)


def test_replace_existing_bundle_and_failed_write(built, tmp_path, monkeypatch):
    model = built["a"][0]
    content = model.content[1:].numpy()
    out = tmp_path / "bundle"
    write_bundle(model, IDS, content, out, info("v1"))
    summary = write_bundle(model, IDS, content, out, info("v2"), index_kind="ivf", index_params={"nlist": 2},
                           recall_queries=200)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    bundle = load_bundle(out)
    assert bundle.info.run_id == "v2" and bundle.index.kind == summary.index_kind == "ivf"
    assert 0.0 < summary.index_recall_at_10 <= 1.0
    assert bundle.manifest["info"]["index_recall_at_10_vs_flat"] == summary.index_recall_at_10

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("learn.export.bundle.build_index", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_bundle(model, IDS, content, out, info("v3"))
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # temp dir removed, old bundle untouched
    assert load_bundle(out).info.run_id == "v2"


def test_write_bundle_rejects_bad_input(built, tmp_path):
    model, _ = built["a"]
    content = model.content[1:].numpy()
    with pytest.raises(ValueError, match="unique"):
        write_bundle(model, IDS[:-1] + [IDS[0]], content, tmp_path / "x", info())
    with pytest.raises(ValueError, match="rows"):
        write_bundle(model, IDS[:-1], content, tmp_path / "x", info())
    with pytest.raises(TypeError, match="BundleInfo"):
        write_bundle(model, IDS, content, tmp_path / "x", {"run_id": "untyped"})
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace"):
        write_bundle(model, IDS, content, tmp_path / "precious", info())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_bundle_info_round_trip_and_named_errors(built, tmp_path):
    bundle = load_bundle(built["a"][1].directory)
    assert bundle.info == info("run-a")
    # the re-embedding keys are written only where set
    assert "catalog_fingerprint" not in bundle.manifest["info"]
    reembedded = info("run-a", catalog_fingerprint="cf", source_model_version="3", reembed_run_id="r")
    assert BundleInfo.from_manifest({"info": reembedded.to_json()}) == reembedded
    assert bundle.info.require_config("comparing") == {"seed": 0}

    directory = copy_bundle(built, tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["info"]["encoder_id"]
    write_manifest(directory, list(manifest["files"]), manifest["info"])
    with pytest.raises(ArtifactError, match=r"manifest.json: info lacks \['encoder_id'\]"):
        load_bundle(directory)
    manifest["info"].update(encoder_id="enc", max_history="12")
    write_manifest(directory, list(manifest["files"]), manifest["info"])
    with pytest.raises(ArtifactError, match="info key 'max_history' has the bad value '12'"):
        load_bundle(directory)

    # a bundle re-embedded before the config was carried over: loadable, and a clear error where needed
    for key in ("config", "max_history"):
        manifest["info"].pop(key)
    manifest["info"].update(catalog_fingerprint="cf", source_model_version="3")
    write_manifest(directory, list(manifest["files"]), manifest["info"])
    old = load_bundle(directory)
    assert old.info.config is None and old.info.max_history is None
    with pytest.raises(ArtifactError, match="comparing needs the training config.*re-embedded from version 3"):
        old.info.require_config("comparing")

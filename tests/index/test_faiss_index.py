import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from learn.index import ItemIndexError, build_index, faiss_threads, load_index, recall_vs_exact

DIM = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, seed: int = 0, clusters: int = 20, noise: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, DIM))
    return _unit(centers[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, DIM)))


def _ids(n: int) -> list[str]:
    return [f"item-{i:05d}" for i in range(n)]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, list[str], np.ndarray]:
    vecs = _clustered(3000)
    rng = np.random.default_rng(1)
    queries = _unit(vecs[rng.integers(0, len(vecs), 100)] + 0.2 * rng.normal(size=(100, DIM)))
    return vecs, _ids(len(vecs)), queries


# -- search -------------------------------------------------------------------------------------
def test_flat_search_equals_numpy_brute_force(data):
    vecs, ids, queries = data
    index = build_index(vecs, ids, kind="flat")
    got_ids, got_scores = index.search(queries, k=10)
    dots = queries @ vecs.T
    order = np.argsort(-dots, axis=1)[:, :10]
    assert got_ids.shape == (len(queries), 10) and got_scores.dtype == np.float32
    np.testing.assert_array_equal(got_ids, np.asarray(ids)[order])
    np.testing.assert_allclose(got_scores, np.take_along_axis(dots, order, axis=1), atol=1e-5)
    assert (np.diff(got_scores, axis=1) <= 0).all()  # best first


def test_k_is_clamped_to_size():
    vecs = _clustered(7)
    ids, scores = build_index(vecs, _ids(7), kind="flat").search(vecs[:2], k=50)
    assert ids.shape == scores.shape == (2, 7)
    assert set(ids[0]) == set(_ids(7))
    assert ids[0, 0] == "item-00000" and ids[1, 0] == "item-00001"  # each vector's best match is itself


@pytest.mark.parametrize("kind,kwargs", [("ivf", {"nprobe": 8}), ("hnsw", {"hnsw_m": 16, "ef_search": 64})])
def test_approximate_recall_is_high(data, kind, kwargs):
    vecs, ids, queries = data
    index = build_index(vecs, ids, kind=kind, **kwargs)
    assert index.kind == kind and index.size == len(vecs) and index.dim == DIM
    assert recall_vs_exact(index, vecs, queries, k=10) >= 0.9


def _numpy_recall(index, vecs: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Recall@k of ``index`` against a brute-force numpy top-k (no faiss on the truth side)."""
    truth = np.argsort(-(queries @ vecs.T), axis=1, kind="stable")[:, :k]
    got, _ = index.search_rows(queries, k)
    return float(np.mean([len(np.intersect1d(g, t)) / k for g, t in zip(got, truth)]))


def test_recall_vs_exact_agrees_with_numpy_brute_force(data):
    vecs, ids, queries = data
    flat = build_index(vecs, ids, kind="flat")
    assert _numpy_recall(flat, vecs, queries, 10) == recall_vs_exact(flat, vecs, queries, k=10) == 1.0
    poor = build_index(vecs, ids, kind="ivf", nprobe=1)  # an index that misses some neighbours
    measured = recall_vs_exact(poor, vecs, queries, k=10)
    assert measured < 1.0
    assert measured == pytest.approx(_numpy_recall(poor, vecs, queries, 10), abs=1e-9)


def test_recall_detects_a_poor_index():
    rng = np.random.default_rng(3)
    vecs = _unit(rng.normal(size=(2000, DIM)))  # no cluster structure: one probed list misses a lot
    index = build_index(vecs, _ids(2000), kind="ivf", nlist=50, nprobe=1)
    assert index.params["nprobe"] == 1 and index.params["nlist"] == 50
    assert recall_vs_exact(index, vecs, _unit(rng.normal(size=(50, DIM))), k=10) < 0.8


def test_ivf_params_recorded_and_nprobe_clamped(data):
    vecs, ids, _ = data
    index = build_index(vecs, ids, kind="ivf", nprobe=1000)
    nlist = index.params["nlist"]
    assert 1 <= nlist <= len(vecs) // 39
    assert index.params["nprobe"] == nlist
    assert faiss.extract_index_ivf(index.index).nprobe == nlist


def test_exclude_removes_items_and_keeps_k(data):
    vecs, ids, queries = data
    index = build_index(vecs, ids, kind="flat")
    base, base_scores = index.search(queries[:3], k=10)
    exclude = [np.append(base[0, :4], "not-an-item"), [], None]
    got, scores = index.search(queries[:3], k=10, exclude=exclude)
    assert got.shape == (3, 10)
    assert not set(base[0, :4]) & set(got[0])
    np.testing.assert_array_equal(got[0, :6], base[0, 4:])  # the rest moves up, order kept
    np.testing.assert_allclose(scores[0, :6], base_scores[0, 4:])
    np.testing.assert_array_equal(got[1:], base[1:])  # queries without exclusions are untouched
    assert (np.diff(scores, axis=1) <= 0).all()


def test_exclude_everything_pads_the_row():
    vecs = _clustered(5)
    index = build_index(vecs, _ids(5), kind="flat")
    ids, scores = index.search(vecs[:1], k=5, exclude=[_ids(5)[:3]])
    assert list(ids[0, 2:]) == ["", "", ""] and np.isneginf(scores[0, 2:]).all()
    assert set(ids[0, :2]) == {"item-00003", "item-00004"}


def test_exclude_needs_one_list_per_query(data):
    vecs, ids, queries = data
    index = build_index(vecs, ids, kind="flat")
    with pytest.raises(ItemIndexError, match="exclude must hold one id list per query"):
        index.search(queries[:3], k=5, exclude=[[]])
    with pytest.raises(ItemIndexError, match="lists of item ids"):
        index.search(queries[:1], k=5, exclude=["item-00001"])


# -- auto ---------------------------------------------------------------------------------------
def test_auto_picks_flat_up_to_threshold_and_ivf_above(data):
    vecs, ids, _ = data
    small = build_index(vecs[:500], ids[:500], kind="auto", flat_max_items=500)
    assert small.kind == "flat" and isinstance(small.index, faiss.IndexFlatIP)
    big = build_index(vecs, ids, kind="auto", flat_max_items=500)
    assert big.kind == "ivf" and faiss.extract_index_ivf(big.index).nlist == big.params["nlist"]
    assert big.params["kind_requested"] == "auto" and big.params["flat_max_items"] == 500


# -- persistence --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, data, kind):
    vecs, ids, queries = data
    index = build_index(vecs, ids, kind=kind, nprobe=4, ef_search=32)
    checksums = index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.faiss", "index.json", "item_ids.parquet"]
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["sha256"] == checksums and set(checksums) == {"index.faiss", "item_ids.parquet"}
    assert meta["kind"] == kind and meta["size"] == len(vecs) and meta["dim"] == DIM
    assert meta["faiss_version"] == faiss.__version__
    assert pq.read_table(tmp_path / "idx" / "item_ids.parquet").column("item_id").to_pylist() == ids

    loaded = load_index(tmp_path / "idx")
    assert (loaded.kind, loaded.size, loaded.dim, loaded.params) == (kind, index.size, index.dim, index.params)
    np.testing.assert_array_equal(loaded.item_ids, index.item_ids)
    a_ids, a_scores = index.search(queries, k=10)
    b_ids, b_scores = loaded.search(queries, k=10)
    np.testing.assert_array_equal(a_ids, b_ids)
    np.testing.assert_array_equal(a_scores, b_scores)


def test_save_leaves_no_temp_files_and_overwrites(tmp_path, data):
    vecs, ids, _ = data
    build_index(vecs[:100], ids[:100], kind="flat").save(tmp_path)
    build_index(vecs[:50], ids[:50], kind="flat").save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss", "index.json", "item_ids.parquet"]
    assert load_index(tmp_path).size == 50


@pytest.fixture()
def saved(tmp_path, data):
    vecs, ids, _ = data
    build_index(vecs[:200], ids[:200], kind="flat").save(tmp_path)
    return tmp_path


def test_corrupted_index_file_fails_checksum(saved):
    path = saved / "index.faiss"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 8] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 8])
    path.write_bytes(bytes(raw))
    expected = json.loads((saved / "index.json").read_text())["sha256"]["index.faiss"]
    with pytest.raises(ItemIndexError, match="index.faiss") as err:
        load_index(saved)
    assert expected in str(err.value) and "checksum" in str(err.value)


def test_edited_item_ids_fail_checksum(saved):
    path = saved / "item_ids.parquet"
    ids = pq.read_table(path).column("item_id").to_pylist()
    ids[0], ids[1] = ids[1], ids[0]  # same ids, different order: would silently mislabel results
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.string())}), path)
    with pytest.raises(ItemIndexError, match=r"item_ids\.parquet.*checksum"):
        load_index(saved)


@pytest.mark.parametrize("name", ["index.faiss", "item_ids.parquet", "index.json"])
def test_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(ItemIndexError, match=rf"{name}.*missing"):
        load_index(saved)


def test_missing_directory(tmp_path):
    with pytest.raises(ItemIndexError, match="does not exist"):
        load_index(tmp_path / "nope")


# -- validation ---------------------------------------------------------------------------------
def test_duplicate_ids_are_listed():
    vecs = _clustered(10)
    ids = _ids(10)
    ids[3], ids[7] = ids[1], ids[2]
    with pytest.raises(ItemIndexError, match=r"unique.*2 id\(s\).*item-00001.*item-00002"):
        build_index(vecs, ids)


def test_id_count_must_match_rows():
    with pytest.raises(ItemIndexError, match="item_ids has 9 entries but vectors has 10 rows"):
        build_index(_clustered(10), _ids(9))


def test_ids_must_be_strings():
    with pytest.raises(ItemIndexError, match=r"item_ids\[0\] is int"):
        build_index(_clustered(3), [1, 2, 3])


def test_non_normalised_vectors_name_the_row():
    vecs = _clustered(10)
    vecs[4] *= 2.0
    vecs[8] *= 0.5
    with pytest.raises(ItemIndexError, match=r"L2-normalised.*row 4 has norm 2\.0.*2 row"):
        build_index(vecs, _ids(10))


def test_nan_rejected():
    vecs = _clustered(10)
    vecs[6, 3] = np.nan
    with pytest.raises(ItemIndexError, match="NaN or inf.*row 6"):
        build_index(vecs, _ids(10))


@pytest.mark.parametrize("bad,match", [
    (np.ones(DIM, dtype=np.float32), "2-D"),
    (np.ones((3, DIM), dtype=np.int64), "float array"),
    (np.zeros((0, DIM), dtype=np.float32), "empty"),
])
def test_bad_vector_arrays(bad, match):
    with pytest.raises(ItemIndexError, match=match):
        build_index(bad, _ids(len(bad)) if bad.ndim == 2 else ["a"])


def test_bad_kind_and_params():
    vecs = _clustered(100)
    with pytest.raises(ItemIndexError, match="kind must be one of"):
        build_index(vecs, _ids(100), kind="annoy")
    with pytest.raises(ItemIndexError, match="nlist=500 exceeds"):
        build_index(vecs, _ids(100), kind="ivf", nlist=500)
    with pytest.raises(ItemIndexError, match="nprobe must be an int >= 1"):
        build_index(vecs, _ids(100), kind="ivf", nprobe=0)


def test_query_validation(data):
    vecs, ids, queries = data
    index = build_index(vecs[:100], ids[:100], kind="flat")
    with pytest.raises(ItemIndexError, match="queries have dimension 16 but the index holds 32-d"):
        index.search(queries[:, :16], k=5)
    with pytest.raises(ItemIndexError, match="2-D"):
        index.search(queries[0], k=5)
    with pytest.raises(ItemIndexError, match="k must be an int >= 1"):
        index.search(queries, k=0)
    q = queries[:2].copy()
    q[1, 0] = np.inf
    with pytest.raises(ItemIndexError, match="queries holds NaN or inf.*row 1"):
        index.search(q, k=5)


def test_recall_checks_vector_shape(data):
    vecs, ids, queries = data
    index = build_index(vecs[:100], ids[:100], kind="flat")
    with pytest.raises(ItemIndexError, match="vectors have shape"):
        recall_vs_exact(index, vecs, queries)


# -- threads ------------------------------------------------------------------------------------
def test_thread_setting_is_restored(data):
    vecs, ids, queries = data
    before = faiss.omp_get_max_threads()
    index = build_index(vecs[:200], ids[:200], kind="hnsw", num_threads=1)
    index.search(queries, k=5)
    assert faiss.omp_get_max_threads() == before
    with faiss_threads(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before

"""Content store: atomic writes, reuse by (text hash, encoder id), resume, exact round trips."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from learn.embed import store as store_mod
from learn.embed.store import ContentStore, ContentStoreError, embed_catalog
from learn.utils import text_hash


class FakeEncoder:
    """Same interface as HFEncoder; a vector is a deterministic function of (text, encoder id)."""

    def __init__(self, encoder_id: str = "fake@1|pool=mean", dim: int = 8, fail_on_call: int | None = None):
        self.encoder_id, self.dim = encoder_id, dim
        self.calls, self.texts_seen, self.fail_on_call = 0, [], fail_on_call

    def encode(self, texts, progress=True):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt("killed")
        self.texts_seen.extend(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(f"{self.encoder_id}|{t}".encode()).digest()[:4], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out


def catalog(n: int) -> tuple[list[str], list[str]]:
    return [f"item{i}" for i in range(n)], [f"Title: product {i}. Brand: b{i % 7}" for i in range(n)]


def _tmp_files(folder) -> list[str]:
    """Temp files left in ``folder`` or a store directory under it."""
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_round_trip_is_exact(tmp_path):
    st = ContentStore(tmp_path / "c.parquet")
    assert st.load() is None
    vecs = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    vecs[0, 0] = np.float32(1e-38)  # denormal-ish and odd values survive bit for bit
    ids, hashes = ["a", "b", "c", "d", "e"], [text_hash(x) for x in "abcde"]
    st.upsert(ids, hashes, "enc", vecs)
    fresh = ContentStore(tmp_path / "c.parquet")  # a new reader, no in-memory cache
    found, got = fresh.lookup(ids[::-1], hashes[::-1], "enc")
    assert found.all() and got.dtype == np.float32
    assert np.array_equal(got, vecs[::-1])
    df = fresh.load()
    assert list(df.columns) == ["item_id", "text_hash", "encoder_id", "embedding"]
    [part] = fresh.parts()
    assert part.parent == tmp_path / "c.parquet.d"
    schema = pq.read_schema(part)
    assert schema.field("embedding").type == pa.list_(pa.float32(), 3)
    assert schema.field("item_id").type == pa.string()


def test_lookup_needs_matching_hash_and_encoder(tmp_path):
    st = ContentStore(tmp_path / "c.parquet")
    st.upsert(["a", "b"], ["h1", "h2"], "enc1", np.ones((2, 4), np.float32))
    st.upsert(["a"], ["h1"], "enc2", np.full((1, 4), 2, np.float32))
    found, vecs = st.lookup(["a", "b", "zz"], ["h1", "CHANGED", "h3"], "enc1")
    assert found.tolist() == [True, False, False]
    assert np.array_equal(vecs[0], np.ones(4)) and not vecs[1:].any()
    found, vecs = st.lookup(["a", "b"], ["h1", "h2"], "enc2")
    assert found.tolist() == [True, False] and np.array_equal(vecs[0], np.full(4, 2))
    assert st.lookup(["a"], ["h1"], "other")[0].tolist() == [False]
    assert st.encoder_ids() == {"enc1": 2, "enc2": 1}


def test_upsert_replaces_same_item_and_encoder_only(tmp_path):
    st = ContentStore(tmp_path / "c.parquet")
    st.upsert(["a", "b"], ["h1", "h2"], "enc1", np.ones((2, 4), np.float32))
    st.upsert(["a"], ["h1"], "enc2", np.full((1, 4), 2, np.float32))
    st.upsert(["a"], ["h1new"], "enc1", np.full((1, 4), 3, np.float32))
    df = ContentStore(tmp_path / "c.parquet").load()
    assert len(df) == 3
    rows = {(r.item_id, r.encoder_id): (r.text_hash, r.embedding[0]) for r in df.itertuples()}
    assert rows == {("a", "enc1"): ("h1new", 3.0), ("b", "enc1"): ("h2", 1.0), ("a", "enc2"): ("h1", 2.0)}


def test_upsert_of_another_dimension_is_refused(tmp_path):
    st = ContentStore(tmp_path / "c.parquet")
    st.upsert(["a"], ["h"], "small", np.ones((1, 4), np.float32))
    with pytest.raises(ContentStoreError, match=r"c\.parquet holds 4-d vectors.*gives 6-d"):
        st.upsert(["a"], ["h"], "big", np.ones((1, 6), np.float32))


def _files(root) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.iterdir()}


def test_failed_write_keeps_old_store(tmp_path, monkeypatch):
    path = tmp_path / "c.parquet"
    st = ContentStore(path)
    st.upsert(["a"], ["h"], "enc", np.ones((1, 4), np.float32))
    before = _files(st.root)
    real_write = pq.write_table

    def write_half_then_die(table, where, **kwargs):
        real_write(table, where, **kwargs)
        with open(where, "r+b") as fh:  # leave a truncated file behind, as a crash would
            fh.truncate(20)
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.pq, "write_table", write_half_then_die)
    with pytest.raises(OSError, match="disk full"):
        st.upsert(["b"], ["h"], "enc", np.zeros((1, 4), np.float32))
    assert _files(st.root) == before
    monkeypatch.undo()

    def manifest_write_dies(target, text):
        raise OSError("disk full at the manifest")

    monkeypatch.setattr(store_mod, "atomic_write_text", manifest_write_dies)
    with pytest.raises(OSError, match="at the manifest"):
        st.upsert(["b"], ["h"], "enc", np.zeros((1, 4), np.float32))
    assert _files(st.root) == before  # the part written before the commit is gone again
    monkeypatch.undo()
    assert _tmp_files(tmp_path) == []
    fresh = ContentStore(path)
    assert fresh.lookup(["a", "b"], ["h", "h"], "enc")[0].tolist() == [True, False]


def test_corrupted_or_foreign_file_is_named(tmp_path):
    path = tmp_path / "c.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ContentStoreError, match=str(path)):
        ContentStore(path).lookup(["a"], ["h"], "enc")
    with pytest.raises(ContentStoreError, match="unreadable"):
        embed_catalog(FakeEncoder(), ["a"], ["t"], ContentStore(path), progress=False)
    pq.write_table(pa.table({"item_id": ["a"], "vector": [1.0]}), path)
    with pytest.raises(ContentStoreError, match=r"missing columns \['text_hash', 'encoder_id', 'embedding'\]"):
        ContentStore(path).load()


def test_reuse_change_and_other_encoder(tmp_path):
    st = ContentStore(tmp_path / "c.parquet")
    ids, texts = catalog(50)
    enc = FakeEncoder()
    first, stats = embed_catalog(enc, ids, texts, st, progress=False)
    assert stats["items_embedded"] == 50 and stats["items_reused"] == 0
    assert first.shape == (50, 8) and first.dtype == np.float32
    assert np.array_equal(first, FakeEncoder().encode(texts))  # input order

    enc = FakeEncoder()
    again, stats = embed_catalog(enc, ids, texts, st, progress=False)
    assert stats["items_embedded"] == 0 and stats["items_reused"] == 50 and enc.calls == 0
    assert np.array_equal(again, first)

    texts2 = list(texts)
    texts2[17] = "Title: product 17, new edition"
    enc = FakeEncoder()
    changed, stats = embed_catalog(enc, ids, texts2, st, progress=False)
    assert stats["items_embedded"] == 1 and stats["items_reused"] == 49 and enc.texts_seen == [texts2[17]]
    assert np.array_equal(np.delete(changed, 17, 0), np.delete(first, 17, 0))
    assert not np.array_equal(changed[17], first[17])

    other = FakeEncoder(encoder_id="fake@2|pool=mean")
    _, stats = embed_catalog(other, ids, texts2, st, progress=False)
    assert stats["items_embedded"] == 50 and stats["items_reused"] == 0
    # both encoders' rows are kept side by side
    assert st.encoder_ids() == {"fake@1|pool=mean": 50, "fake@2|pool=mean": 50}
    _, stats = embed_catalog(FakeEncoder(), ids, texts2, st, progress=False)
    assert stats["items_reused"] == 50


def test_identical_texts_encoded_once(tmp_path):
    enc = FakeEncoder()
    vecs, stats = embed_catalog(enc, ["a", "b", "c"], ["same", "other", "same"], ContentStore(tmp_path / "c.parquet"),
                                progress=False)
    assert enc.texts_seen == ["same", "other"] and stats["texts_encoded"] == 2 and stats["items_embedded"] == 3
    assert np.array_equal(vecs[0], vecs[2])


def test_resume_after_kill_between_chunks(tmp_path):
    st = ContentStore(tmp_path / "c.parquet")
    ids, texts = catalog(100)
    killed = FakeEncoder(fail_on_call=4)  # chunks of 30: three finish, the fourth is killed
    with pytest.raises(KeyboardInterrupt):
        embed_catalog(killed, ids, texts, st, progress=False, chunk_size=30, flush_seconds=0)
    assert len(ContentStore(st.path).load()) == 90
    assert _tmp_files(tmp_path) == []

    resumed = FakeEncoder()
    vecs, stats = embed_catalog(resumed, ids, texts, ContentStore(st.path), progress=False, chunk_size=30)
    assert stats["items_reused"] == 90 and stats["items_embedded"] == 10
    assert resumed.texts_seen == texts[90:]
    assert np.array_equal(vecs, FakeEncoder().encode(texts))


def test_checkpoint_after_every_chunk(tmp_path, monkeypatch):
    st = ContentStore(tmp_path / "c.parquet")
    writes = []
    real = ContentStore.upsert
    monkeypatch.setattr(ContentStore, "upsert", lambda self, *a: (writes.append(len(a[0])), real(self, *a)))
    ids, texts = catalog(100)
    embed_catalog(FakeEncoder(), ids, texts, st, progress=False, chunk_size=30, flush_seconds=0)
    assert writes == [30, 30, 30, 10]
    writes.clear()
    embed_catalog(FakeEncoder("other"), ids, texts, st, progress=False, chunk_size=30, flush_seconds=3600)
    assert writes == [100]  # time-based checkpoints: one write at the end


def test_input_validation(tmp_path):
    st = ContentStore(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=r"duplicate item ids.*'b'.*'c'"):
        embed_catalog(FakeEncoder(), ["a", "b", "c", "b", "c"], list("vwxyz"), st, progress=False)
    with pytest.raises(ValueError, match="3 item ids but 2 texts"):
        embed_catalog(FakeEncoder(), ["a", "b", "c"], ["x", "y"], st, progress=False)
    with pytest.raises(ValueError, match=r"item 'b' \(index 1\) has no text"):
        embed_catalog(FakeEncoder(), ["a", "b"], ["x", ""], st, progress=False)

    class Broken(FakeEncoder):
        def encode(self, texts, progress=True):
            return super().encode(texts)[:, :4]

    with pytest.raises(ValueError, match="expected"):
        embed_catalog(Broken(), ["a"], ["x"], st, progress=False)
    assert not st.path.exists() and not st.root.exists()


def test_integer_item_ids_are_stored_as_strings(tmp_path):
    st = ContentStore(tmp_path / "c.parquet")
    vecs, _ = embed_catalog(FakeEncoder(), [10, 11], ["x", "y"], st, progress=False)
    found, got = st.lookup(["10", "11"], [text_hash("x"), text_hash("y")], FakeEncoder().encoder_id)
    assert found.all() and np.array_equal(got, vecs)


def test_resume_after_hard_kill(tmp_path):
    """A process killed outright (no exception handling) keeps the chunks checkpointed before."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import os
from tests.embed.test_store import FakeEncoder, catalog
from learn.embed.store import ContentStore, embed_catalog

class Dies(FakeEncoder):
    def encode(self, texts, progress=True):
        if self.calls == 3:
            os._exit(9)  # like SIGKILL: no cleanup, no finally
        return super().encode(texts)

ids, texts = catalog(100)
embed_catalog(Dies(), ids, texts, ContentStore({str(tmp_path / 'c.parquet')!r}), progress=False,
              chunk_size=30, flush_seconds=0)
"""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    ids, texts = catalog(100)
    resumed = FakeEncoder()
    _, stats = embed_catalog(resumed, ids, texts, ContentStore(tmp_path / "c.parquet"), progress=False)
    assert stats["items_reused"] == 90 and resumed.texts_seen == texts[90:]
    assert _tmp_files(tmp_path) == []


# -- the segmented store: parts, compaction, concurrency, migration, kills --------------------------

def _rows(n: int, prefix: str = "item", fill: float | None = None, dim: int = 4):
    ids = [f"{prefix}{i}" for i in range(n)]
    vecs = (np.random.default_rng(n).standard_normal((n, dim)) if fill is None else np.full((n, dim), fill))
    return ids, [text_hash(i) for i in ids], vecs.astype(np.float32)


def test_each_write_appends_one_part_of_its_own_rows(tmp_path):
    st = ContentStore(tmp_path / "c.parquet")
    for k in range(3):
        ids, hashes, vecs = _rows(10 * (k + 1), prefix=f"w{k}-")
        st.upsert(ids, hashes, "enc", vecs)
    parts = st.parts()
    assert [pq.read_metadata(p).num_rows for p in parts] == [10, 20, 30]  # nothing old re-written
    assert len(ContentStore(st.path).load()) == 60


def test_compaction_keeps_the_latest_write_and_reads_only_needed_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "ROW_GROUP", 7)
    st = ContentStore(tmp_path / "c.parquet")
    ids, hashes, first = _rows(50)
    st.upsert(ids, hashes, "enc", first)
    st.upsert(ids[:5], ["new"] * 5, "enc", np.full((5, 4), 9, np.float32))  # replaces items 0-4 (new text)
    st.upsert(ids[:5], hashes[:5], "other", np.full((5, 4), 7, np.float32))  # another encoder: kept
    old_parts = st.parts()
    assert st.compact() == 3
    [part] = st.parts()
    assert not any(p.exists() for p in old_parts) and pq.read_metadata(part).num_rows == 55
    assert pq.ParquetFile(part).num_row_groups == 8

    fresh = ContentStore(st.path)
    assert fresh.encoder_ids() == {"enc": 50, "other": 5}
    found, got = fresh.lookup(ids[:5], hashes[:5], "enc")
    assert not found.any()  # superseded by the rows of the new text
    found, got = fresh.lookup(ids[:5], ["new"] * 5, "enc")
    assert found.all() and (got == 9).all()

    groups_read = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kwargs):
        groups_read.append((i, columns))
        return real(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    want = [40, 12, 13, 41]  # rows of the compacted part: 0-44 are items 5-49, in write order
    found, got = fresh.lookup([ids[i] for i in want], [hashes[i] for i in want], "enc")
    assert found.all() and np.array_equal(got, first[want])
    # items 12, 13 are rows 7, 8 (group 1); items 40, 41 rows 35, 36 (group 5): only the vector column
    assert groups_read == [(1, ["embedding"]), (5, ["embedding"])]
    assert st.compact() == 0  # one part: nothing to do


def test_corrupt_part_or_manifest_is_named(tmp_path):
    st = ContentStore(tmp_path / "c.parquet")
    st.upsert(*_rows(5)[:2], "enc", _rows(5)[2])
    st.upsert(*_rows(3, "x")[:2], "enc", _rows(3, "x")[2])
    manifest = st.root / "manifest.json"
    good = manifest.read_bytes()
    manifest.write_text("{not json")
    with pytest.raises(ContentStoreError, match=r"manifest .*manifest\.json is unreadable.*delete .*c\.parquet\.d"):
        ContentStore(st.path).lookup(["item0"], ["h"], "enc")
    manifest.write_bytes(good)
    first, second = st.parts()
    second.write_bytes(second.read_bytes()[:30])
    with pytest.raises(ContentStoreError, match=rf"{second.name} is unreadable"):
        ContentStore(st.path).load()
    second.unlink()
    with pytest.raises(ContentStoreError, match=rf"parts \['{second.name}'\] listed in .*manifest\.json are missing"):
        ContentStore(st.path).encoder_ids()


def test_single_file_store_of_the_earlier_format_is_taken_over(tmp_path):
    """data/store_v1.parquet was written by the single-file ContentStore (commit 038cedc) through
    embed_catalog: items item0-19 of catalog(20) with item 5's text edited once, and items 0-2 under
    a second encoder."""
    from pathlib import Path
    import shutil

    path = tmp_path / "c.parquet"
    shutil.copy(Path(__file__).parent / "data" / "store_v1.parquet", path)
    ids, texts = catalog(20)
    texts[5] = "Title: product 5, edited"
    st = ContentStore(path)
    enc = FakeEncoder()
    vecs, stats = embed_catalog(enc, ids, texts, st, progress=False)
    assert stats["items_reused"] == 20 and enc.calls == 0  # nothing re-embedded
    assert np.array_equal(vecs, FakeEncoder().encode(texts))
    assert not path.exists() and len(st.parts()) == 1 and st.encoder_ids() == {"fake@1|pool=mean": 20,
                                                                               "fake@2|pool=mean": 3}
    # the taken-over store grows like any other
    _, stats = embed_catalog(FakeEncoder(), ids + ["new"], texts + ["Title: a new item"], ContentStore(path),
                             progress=False)
    assert stats["items_reused"] == 20 and stats["items_embedded"] == 1 and len(st.parts()) == 2


_WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from learn.embed.store import ContentStore

path, who, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
Path(f"{go}.{who}").touch()
while not go.exists():
    time.sleep(0.01)
st = ContentStore(path)
for k in range(30):
    ids = [f"{who}-{k}-{i}" for i in range(20)]
    st.upsert(ids, ["h"] * 20, "enc", np.full((20, 4), k, np.float32))
    if who == "a" and k % 10 == 9:
        st.compact()  # while the other process keeps appending
"""


def test_two_writing_processes_lose_no_row(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "c.parquet"), who, str(go)], cwd=root,
                              stderr=subprocess.PIPE, text=True) for who in "ab"]
    while not all(Path(f"{go}.{who}").exists() for who in "ab"):
        assert all(p.poll() is None for p in procs), [p.communicate()[1] for p in procs]
        time.sleep(0.05)
    go.touch()  # both start writing at once
    for p in procs:
        assert p.wait(timeout=120) == 0, p.communicate()[1]
    df = ContentStore(tmp_path / "c.parquet").load()
    want = {f"{who}-{k}-{i}" for who in "ab" for k in range(30) for i in range(20)}
    assert len(df) == 1200 and set(df["item_id"]) == want
    assert all(v[0] == int(i.split("-")[1]) for i, v in zip(df["item_id"], df["embedding"]))
    assert _tmp_files(tmp_path) == []


_KILLED = """
import sys, time
from tests.embed.test_store import FakeEncoder, catalog
from learn.embed.store import ContentStore, embed_catalog

class Slow(FakeEncoder):
    def encode(self, texts, progress=True):
        time.sleep(0.005 * len(texts))
        return super().encode(texts)

ids, texts = catalog(580)  # fewer items than one default chunk (1024)
embed_catalog(Slow(), ids, texts, ContentStore(sys.argv[1]), progress=False, flush_seconds=0.3)
"""


def test_kill_mid_embedding_loses_only_the_last_seconds(tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    path = tmp_path / "c.parquet"
    manifest = tmp_path / "c.parquet.d" / "manifest.json"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(path)], cwd=root, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (manifest.exists() and json.loads(manifest.read_text())["parts"]):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # right after its first flush: no handler runs
    assert proc.wait() == -signal.SIGKILL
    ids, texts = catalog(580)
    resumed = FakeEncoder()
    vecs, stats = embed_catalog(resumed, ids, texts, ContentStore(path), progress=False)
    n_saved = stats["items_reused"]
    assert 0 < n_saved < 580 and stats["items_embedded"] == 580 - n_saved
    assert resumed.texts_seen == texts[n_saved:]
    assert np.array_equal(vecs, FakeEncoder().encode(texts))


def test_writer_flushes_by_rows_or_seconds_whichever_first(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(store_mod.time, "perf_counter", lambda: clock[0])
    st = ContentStore(tmp_path / "c.parquet")
    ids, hashes, vecs = _rows(10)
    stats = {"items_embedded": 0}
    writer = store_mod.StoreWriter(st, np.asarray(ids, dtype=object), np.asarray(hashes, dtype=object), "enc", vecs,
                                   stats, flush_rows=4, flush_seconds=5.0)
    writer.add([0, 1, 2])
    writer.maybe_flush()
    assert stats["items_embedded"] == 0  # 3 rows, no time passed
    writer.add([3])
    writer.maybe_flush()
    assert stats["items_embedded"] == 4  # by rows
    writer.add([4])
    clock[0] = 5.0
    writer.maybe_flush()
    assert stats["items_embedded"] == 5 and len(st.parts()) == 2  # by seconds
    with pytest.raises(ValueError, match="flush_seconds >= 0"):
        store_mod.StoreWriter(st, np.asarray(ids), np.asarray(hashes), "enc", vecs, stats, flush_seconds=-1)

"""The column reader of interactions files (learn.data.columnar) against the row reader (the
reference): the same columns, or the same error naming the same line/row, on every case."""

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from learn.data.columnar import read_interaction_columns
from learn.data.files import _scan_csv, interaction_rows, read_files, to_epoch_seconds
from learn.data.load import item_texts
from learn.data.schema import DataError
from learn.data.sequences import build_sequences


def _columnar(path: Path, ts: str | None = "timestamp"):
    return read_interaction_columns(path, "user_id", "item_id", ts, to_epoch_seconds, _scan_csv)


def _outcome(fn):
    try:
        cols = fn()
    except DataError as exc:
        return ("error", str(exc))
    return ("ok", list(cols.users.astype(str)), list(cols.items.astype(str)),
            None if cols.stamps is None else (cols.stamps.dtype.kind, cols.stamps.tolist()))


def _same(path: Path, ts: str | None = "timestamp", expect_columnar: bool = True):
    cols = None
    try:
        cols = _columnar(path, ts)
    except DataError:
        pass
    if expect_columnar:
        assert cols is not None or _outcome(lambda: _columnar(path, ts))[0] == "error", "fell back to the row reader"
    fast = _outcome(lambda: _columnar(path, ts) or interaction_rows(path, "user_id", "item_id", ts))
    ref = _outcome(lambda: interaction_rows(path, "user_id", "item_id", ts))
    assert fast == ref
    return fast


def _parquet(tmp_path: Path, table: pa.Table) -> Path:
    path = tmp_path / "interactions.parquet"
    pq.write_table(table, path, row_group_size=3)  # several row groups: dictionaries get unified
    return path


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "interactions.csv"
    path.write_bytes(text.encode())
    return path


USERS = ["u1", " u2 ", "u1", "u3", "u2", "u1", "u4"]
ITEMS = ["i1", "i2", "i2 ", "i3", "i1", "i4", "i1"]


@pytest.mark.parametrize("stamps", [
    pa.array([3, 1, 2, 9, 5, 6, 7], pa.int64()),
    pa.array([3, 1, 2, 9, 5, 6, 7], pa.int32()),
    pa.array([3.0, 1.0, 2.0, 9.0, 5.0, 6.0, 7.0]),
    pa.array([3.5, 1.0, 2.25, 9.0, 5.0, 6.0, 7.0]),
    pa.array([dt.datetime(2020, 1, 1, 0, 0, s) for s in range(7)], pa.timestamp("s")),
    pa.array([dt.datetime(2020, 1, 1, 0, 0, 0, 500_000 * (s % 2)) for s in range(7)], pa.timestamp("ms")),
    pa.array(["10", " 11", "12 ", "13", "14", "15", "16"]),
    pa.array(["10", "11.5", "1e3", "13", "14", "15", "16"]),
    pa.array(["2020-01-01", "2020-01-01T10:00:00", "2020-01-02 10:00", "17", "18.5", "2021-06-01T00:00:00+02:00",
              "19"]),
])
def test_parquet_matches_the_row_reader(tmp_path, stamps):
    out = _same(_parquet(tmp_path, pa.table({"user_id": USERS, "item_id": ITEMS, "timestamp": stamps})))
    assert out[0] == "ok" and out[1][1] == "u2" and out[2][2] == "i2"


@pytest.mark.parametrize("bad_row", [0, 4, 6])
@pytest.mark.parametrize("column,value", [("user_id", None), ("user_id", "  "), ("item_id", None),
                                          ("timestamp", None), ("timestamp", "yesterday"), ("timestamp", "nan")])
def test_parquet_errors_name_the_same_row(tmp_path, bad_row, column, value):
    cols = {"user_id": list(USERS), "item_id": list(ITEMS), "timestamp": [str(10 + i) for i in range(7)]}
    cols[column][bad_row] = value
    out = _same(_parquet(tmp_path, pa.table(cols)))
    assert out[0] == "error" and f"row {bad_row + 1}:" in out[1]


def test_integer_ids_and_missing_timestamp_column(tmp_path):
    path = _parquet(tmp_path, pa.table({"user_id": pa.array([7, 7, 8], pa.int64()), "item_id": [1, 2, 1],
                                        "other": ["a", "b", "c"]}))
    assert _same(path, ts="timestamp") == ("ok", ["7", "7", "8"], ["1", "2", "1"], None)


def test_csv_matches_the_row_reader(tmp_path):
    text = "user_id,item_id,timestamp\nu1,i1,3\n u2 ,i2,1\nu1,i2,2.5\nu3,\"i3\",9\n"
    out = _same(_csv(tmp_path, text))
    assert out[0] == "ok" and out[3] == ("f", [3.0, 1.0, 2.5, 9.0])
    # a BOM, CRLF line ends, trailing blank lines
    assert _same(_csv(tmp_path, "\ufeffuser_id,item_id,timestamp\r\nu1,i1,3\r\nu2,i2,1\r\n\n\n"))[0] == "ok"


@pytest.mark.parametrize("text,line", [
    ("user_id,item_id,timestamp\nu1,i1,3\nu2,i2\nu3,i3,4\n", 3),  # too few fields
    ("user_id,item_id,timestamp\nu1,i1,3\nu2,i2,1,9\n", 3),  # too many
    ("user_id,item_id,timestamp\nu1,i1,3\n\nu2,,1\n", 4),  # blank line before the bad row
    ("user_id,item_id,timestamp\nu1,i1,3\nu2,i2,\n", 3),  # empty timestamp
    ("user_id,item_id,timestamp\nu1,i1,3\nu2,i2,soon\n", 3),
    ("user_id,item_id,timestamp\nu1,i1,3\n,i2,4\n", 3),
])
def test_csv_errors_name_the_same_line(tmp_path, text, line):
    out = _same(_csv(tmp_path, text), expect_columnar=False)
    assert out[0] == "error" and f"line {line}:" in out[1], out


def test_bad_utf8_names_its_line(tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_bytes(b"user_id,item_id,timestamp\nu1,i1,3\nu2,i\xff2,4\n")
    with pytest.raises(DataError, match=r"interactions\.csv: line 3: bytes are not valid UTF-8"):
        _columnar(path)


def test_read_files_on_a_large_log_builds_the_same_sequences(tmp_path):
    """A generated 60k-row log (several row groups) through read_files (column reader) and through the row reader."""
    rng = np.random.default_rng(0)
    n, n_items, n_users = 60_000, 3_000, 6_000
    items = pd.DataFrame({"item_id": [f"i{j}" for j in range(n_items)], "title": [f"t{j}" for j in range(n_items)]})
    items.to_parquet(tmp_path / "items.parquet", index=False)
    inter = pa.table({"user_id": [f"u{u}" for u in rng.integers(0, n_users, n)],
                      "item_id": [f"i{j}" for j in rng.integers(0, n_items + 10, n)],  # some not in the catalog
                      "timestamp": rng.integers(0, 10**6, n)})
    pq.write_table(inter, tmp_path / "interactions.parquet", row_group_size=16_000)
    ds = read_files(tmp_path / "items.parquet", tmp_path / "interactions.parquet")
    assert isinstance(ds.interactions["user_id"].dtype, pd.CategoricalDtype)
    ref = interaction_rows(tmp_path / "interactions.parquet", "user_id", "item_id", "timestamp")
    keep = pd.Index(np.asarray(ref.items.astype(str))).isin(items["item_id"])
    assert ds.drops.counts["interaction_item_without_text"] == int((~keep).sum()) > 0
    fast = build_sequences(ds, item_texts(ds, None))
    ref_ds = pd.DataFrame({"user_id": np.asarray(ref.users.astype(str))[keep],
                           "item_id": np.asarray(ref.items.astype(str))[keep], "timestamp": ref.stamps[keep]})
    ds.interactions = ref_ds
    slow = build_sequences(ds, item_texts(ds, None))
    assert list(fast.user_ids) == list(slow.user_ids)
    assert fast.seqs == slow.seqs and fast.times == slow.times
    assert fast.fingerprint() == slow.fingerprint()

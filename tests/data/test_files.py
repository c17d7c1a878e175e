import csv
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from learn.data.files import PAPER_TEMPLATE, read_files
from learn.data.load import item_texts
from learn.data.schema import DataError
from learn.data.sequences import build_sequences

ITEMS = [
    {"item_id": "007", "title": "Lab  goggles", "brand": "Acme", "category": "Safety"},
    {"item_id": "i2", "title": "Beaker", "brand": None, "category": "Glass"},
    {"item_id": "i3", "title": "Pipette", "brand": "Acme", "category": "Glass"},
]
INTERACTIONS = [
    {"user_id": "u1", "item_id": "007", "timestamp": 30},
    {"user_id": "u1", "item_id": "i2", "timestamp": 10},
    {"user_id": "u2", "item_id": "i3", "timestamp": 5},
    {"user_id": "u1", "item_id": "i3", "timestamp": 20},
]


def write(path: Path, records: list[dict]) -> Path:
    """Write records as CSV / JSON lines / JSON array / Parquet by the path's suffix."""
    cols = list(dict.fromkeys(k for r in records for k in r))
    if path.suffix == ".csv":
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for r in records:
                w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1))
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_every_format_reads_the_same(tmp_path, suffix):
    ds = read_files(write(tmp_path / f"items{suffix}", ITEMS), write(tmp_path / f"interactions{suffix}", INTERACTIONS))
    assert ds.name == tmp_path.name
    assert ds.items.columns.tolist() == ["item_id", "title", "brand", "category"]
    assert ds.items["item_id"].tolist() == ["007", "i2", "i3"]  # ids stay strings ("007" is not 7)
    assert ds.items["brand"].tolist() == ["Acme", "", "Acme"]
    assert ds.interactions.to_dict("records") == INTERACTIONS
    assert str(ds.interactions["timestamp"].dtype) == "int64"
    assert ds.default_template == PAPER_TEMPLATE
    assert item_texts(ds, None).iloc[0] == "Title: Lab  goggles. Brand: Acme. Category: Safety"
    assert ds.drops.total == 0
    seq = build_sequences(ds, item_texts(ds, None))
    assert [seq.item_ids[i] for i in seq.seqs[0]] == ["i2", "i3", "007"]  # u1 in time order


def test_custom_columns_and_text_fields(tmp_path):
    items = write(tmp_path / "products.csv", [{"asin": "a", "name": "Scale", "notes": "digital", "price": "3"},
                                              {"asin": "b", "name": "Flask", "notes": "", "price": "5"}])
    inter = write(tmp_path / "events.jsonl", [{"uid": 1, "asin": "a", "t": 1}, {"uid": 2, "asin": "b", "t": 2}])
    ds = read_files(items, inter, item_id_col="asin", user_id_col="uid", timestamp_col="t",
                    text_fields=["name", "notes"], name="shop")
    assert ds.name == "shop"
    assert ds.items.columns.tolist() == ["item_id", "name", "notes"]
    assert ds.default_template == "{name}. {notes}"
    assert item_texts(ds, None).tolist() == ["Scale. digital", "Flask."]
    assert ds.interactions["user_id"].tolist() == ["1", "2"]


def test_timestamps_ints_floats_iso_and_datetimes(tmp_path):
    rows = [
        {"user_id": "u", "item_id": "i2", "timestamp": "2020-01-01T00:00:00Z"},
        {"user_id": "u", "item_id": "i3", "timestamp": "2020-01-01"},
        {"user_id": "u", "item_id": "007", "timestamp": "2020-01-01T02:00:00+01:00"},
        {"user_id": "v", "item_id": "i2", "timestamp": "1577836800.9"},
        {"user_id": "v", "item_id": "i3", "timestamp": "17"},
    ]
    items = write(tmp_path / "items.csv", ITEMS)
    ds = read_files(items, write(tmp_path / "interactions.csv", rows))
    # a fraction is kept (float64 seconds), not floored
    assert ds.interactions["timestamp"].tolist() == [1577836800, 1577836800, 1577840400, 1577836800.9, 17]
    assert str(ds.interactions["timestamp"].dtype) == "float64"
    # native Parquet timestamps and JSON floats
    table = pa.table({"user_id": ["u", "u"], "item_id": ["i2", "i3"],
                      "timestamp": pa.array([pd.Timestamp("2021-06-01 12:00"), pd.Timestamp("2021-06-02")],
                                            pa.timestamp("ms"))})
    pq.write_table(table, tmp_path / "inter.parquet")
    ds = read_files(items, tmp_path / "inter.parquet")
    assert ds.interactions["timestamp"].tolist() == [1622548800, 1622592000]
    ds = read_files(items, write(tmp_path / "f.jsonl", [{"user_id": "u", "item_id": "i2", "timestamp": 12.7}]))
    assert ds.interactions["timestamp"].tolist() == [12.7]


def test_missing_timestamp_column_uses_row_order(tmp_path):
    rows = [{"user_id": "u", "item_id": i} for i in ["i3", "007", "i2"]]
    ds = read_files(write(tmp_path / "items.csv", ITEMS), write(tmp_path / "interactions.csv", rows))
    assert ds.interactions["timestamp"].tolist() == [0, 1, 2]
    assert "timestamps are the row order" in ds.source
    seq = build_sequences(ds, item_texts(ds, None))
    assert [seq.item_ids[i] for i in seq.seqs[0]] == ["i3", "007", "i2"]


@pytest.mark.parametrize(
    "value, needle",
    [(None, r"interactions\.csv: line 4: timestamp column 'timestamp' is empty"),
     ("yesterday", r"interactions\.csv: line 4: timestamp column 'timestamp' value 'yesterday' is not a timestamp")],
)
def test_bad_timestamps_name_the_line(tmp_path, value, needle):
    rows = [dict(r) for r in INTERACTIONS]
    rows[2]["timestamp"] = value
    with pytest.raises(DataError, match=needle):
        read_files(write(tmp_path / "items.csv", ITEMS), write(tmp_path / "interactions.csv", rows))


def test_missing_columns_name_file_column_and_columns_found(tmp_path):
    items = write(tmp_path / "items.csv", ITEMS)
    inter = write(tmp_path / "interactions.csv", INTERACTIONS)
    with pytest.raises(DataError, match=r"items\.csv: missing item id column\(s\) \['asin'\]; columns found: "
                                        r"\['item_id', 'title', 'brand', 'category'\]"):
        read_files(items, inter, item_id_col="asin")
    with pytest.raises(DataError, match=r"items\.csv: missing text column\(s\) \['name'\]"):
        read_files(items, inter, text_fields=["title", "name"])
    with pytest.raises(DataError, match=r"interactions\.csv: missing id column\(s\) \['uid'\]"):
        read_files(items, inter, user_id_col="uid")


def test_empty_files(tmp_path):
    items = write(tmp_path / "items.csv", ITEMS)
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("user_id,item_id,timestamp\n")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.csv: the file is empty"):
        read_files(items, tmp_path / "empty.csv")
    with pytest.raises(DataError, match=r"header\.csv: the file has no data rows"):
        read_files(items, tmp_path / "header.csv")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file has no data rows"):
        read_files(tmp_path / "empty.jsonl", tmp_path / "header.csv")
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        read_files(items, tmp_path / "x.txt")


def test_null_or_empty_ids_name_the_row(tmp_path):
    items = write(tmp_path / "items.csv", ITEMS)
    bad = [dict(r) for r in ITEMS]
    bad[1]["item_id"] = "  "
    with pytest.raises(DataError, match=r"bad\.csv: line 3: item id column 'item_id' is empty"):
        read_files(write(tmp_path / "bad.csv", bad), tmp_path / "x.csv")
    rows = [dict(r) for r in INTERACTIONS]
    rows[3]["user_id"] = None
    with pytest.raises(DataError, match=r"i\.jsonl: line 4: user id column 'user_id' is empty"):
        read_files(items, write(tmp_path / "i.jsonl", rows))
    with pytest.raises(DataError, match=r"i\.parquet: row 4: user id column 'user_id' is empty"):
        read_files(items, write(tmp_path / "i.parquet", rows))


def test_line_numbers_survive_quoted_newlines(tmp_path):
    items = write(tmp_path / "items.csv", [{"item_id": "a", "title": "two\nlines"}, {"item_id": "", "title": "x"}])
    with pytest.raises(DataError, match=r"items\.csv: line 4: item id column"):
        read_files(items, write(tmp_path / "i.csv", INTERACTIONS))


def test_duplicate_items(tmp_path):
    inter = write(tmp_path / "interactions.csv", INTERACTIONS)
    same = write(tmp_path / "items.csv", ITEMS + [dict(ITEMS[1]), dict(ITEMS[1])])
    ds = read_files(same, inter)
    assert ds.items["item_id"].tolist() == ["007", "i2", "i3"]
    assert ds.drops.counts == {"duplicate_item_identical": 2}
    other = dict(ITEMS[1], title="Big beaker")
    with pytest.raises(DataError, match=r"item id 'i2' appears twice with different text: line 3 and line 5 "
                                        r"differ in \['title'\]"):
        read_files(write(tmp_path / "items2.csv", ITEMS + [other]), inter)


def test_missing_text_policy(tmp_path):
    items = write(tmp_path / "items.csv", ITEMS + [{"item_id": "blank", "title": " ", "brand": "", "category": None}])
    rows = INTERACTIONS + [{"user_id": "u2", "item_id": "blank", "timestamp": 1},
                           {"user_id": "u2", "item_id": "ghost", "timestamp": 2}]
    inter = write(tmp_path / "interactions.csv", rows)
    ds = read_files(items, inter, missing_text="drop")
    assert "blank" not in set(ds.items["item_id"])
    assert ds.interactions.to_dict("records") == INTERACTIONS
    assert ds.drops.counts == {"item_without_text": 1, "interaction_item_without_text": 2}
    with pytest.raises(DataError, match=r"items\.csv: line 5: item 'blank' has no text"):
        read_files(items, inter, missing_text="fail")
    with pytest.raises(DataError, match=r"interactions\.csv: line 6: interaction on item 'blank' which is not in "
                                        r"the items file"):
        read_files(write(tmp_path / "ok.csv", ITEMS), inter, missing_text="fail")


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "items.csv"
    path.write_bytes(b"item_id,title\na,ok\nb,caf\xe9\n")
    with pytest.raises(DataError, match=r"items\.csv: line 3: bytes are not valid UTF-8"):
        read_files(path, write(tmp_path / "i.csv", INTERACTIONS))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"item_id": "a", "title": "x"}\n{"item_id": "b", "title": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: invalid JSON"):
        read_files(bad, write(tmp_path / "i.csv", INTERACTIONS))


def test_wrong_field_count_and_unsafe_field_names(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("item_id,title\na,ok\nb,x,extra\n")
    with pytest.raises(DataError, match=r"items\.csv: line 3: expected 2 fields"):
        read_files(path, write(tmp_path / "i.csv", INTERACTIONS))
    odd = write(tmp_path / "odd.csv", [{"item_id": "a", "size.cm": "3"}])
    with pytest.raises(DataError, match=r"text field 'size\.cm' cannot be used in a text template"):
        read_files(odd, write(tmp_path / "i.csv", INTERACTIONS))

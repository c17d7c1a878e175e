import gzip
import json
from pathlib import Path

import pytest

from learn.data.amazon import k_core, read_amazon2018
from learn.data.files import PAPER_TEMPLATE
from learn.data.load import item_texts
from learn.data.schema import DataError

CAT = "Lab_Things"


def meta_records() -> list[dict]:
    recs = [
        {"asin": f"I{k}", "title": f"Item {k} &amp; more", "brand": "Acme &quot;Pro&quot;",
         "category": ["Industrial &amp; Scientific", f"Kind  {k}"], "price": "$1"}
        for k in range(1, 7)
    ]
    recs[0]["title"] = "  Safety\n goggles &gt; 2  "
    recs.append({"asin": "NOTITLE", "brand": "Acme", "category": ["X"]})
    recs.append({"asin": "UNUSED", "title": "Never reviewed", "category": []})
    return recs


def review_records() -> list[dict]:
    """u1..u5 x I1..I5 survive 5-core; u6..u9 (I1..I4 + I6) survive one pass but not the second."""
    out = []
    t = 1_500_000_000
    for u in range(1, 10):
        items = [f"I{k}" for k in range(1, 6)] if u <= 5 else ["I1", "I2", "I3", "I4", "I6"]
        for i in items:
            t += 86400
            out.append({"reviewerID": f"u{u}", "asin": i, "unixReviewTime": t, "overall": 5.0})
    return out


def write_gz(path: Path, records: list[dict], python_literal_every: int = 0) -> Path:
    """One record per line; every n-th line as a Python dict literal (as in older dumps)."""
    lines = []
    for k, r in enumerate(records):
        lit = python_literal_every and k % python_literal_every == 0
        lines.append(repr(r) if lit else json.dumps(r))
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def write_category(d: Path, meta: list[dict], reviews: list[dict]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    write_gz(d / f"meta_{CAT}.json.gz", meta, python_literal_every=2)
    write_gz(d / f"{CAT}_5.json.gz", reviews)
    return d


def test_reads_cleans_and_filters_iteratively(tmp_path):
    d = write_category(tmp_path, meta_records(), review_records())
    ds = read_amazon2018(d, CAT, min_core=5)
    assert ds.name == CAT and ds.default_template == PAPER_TEMPLATE
    assert ds.items["item_id"].tolist() == ["I1", "I2", "I3", "I4", "I5"]
    first = ds.items.iloc[0]
    assert first["title"] == "Safety goggles > 2"
    assert first["brand"] == 'Acme "Pro"'
    assert first["category"] == "Industrial & Scientific, Kind 1"
    assert item_texts(ds, None).iloc[1] == (
        'Title: Item 2 & more. Brand: Acme "Pro". Category: Industrial & Scientific, Kind 2')
    # one pass would keep u6..u9 with 4 reviews each; the second pass removes them
    assert sorted(ds.interactions["user_id"].unique()) == [f"u{u}" for u in range(1, 6)]
    assert len(ds.interactions) == 25
    assert ds.drops.counts["k_core_filtered"] == 20
    # I6 (k-core), NOTITLE and UNUSED (never reviewed) are not in the catalog
    assert ds.drops.counts["item_without_interactions"] == 3
    assert "item_without_text" not in ds.drops.counts  # only reviewed items count here
    u1 = ds.interactions[ds.interactions["user_id"] == "u1"]
    assert u1["timestamp"].tolist() == [1_500_000_000 + 86400 * k for k in range(1, 6)]
    assert str(ds.interactions["timestamp"].dtype) == "int64"


def test_min_core_one_keeps_everything_and_duplicates_are_counted(tmp_path):
    reviews = review_records()
    reviews.append(dict(reviews[3]))  # exact duplicate
    d = write_category(tmp_path, meta_records(), reviews)
    ds = read_amazon2018(d, CAT, min_core=1)
    assert len(ds.interactions) == 45
    assert ds.drops.counts["duplicate_interaction"] == 1
    assert "k_core_filtered" not in ds.drops.counts
    assert set(ds.items["item_id"]) == {f"I{k}" for k in range(1, 7)}


def test_k_core_is_iterative():
    import pandas as pd

    # a chain: dropping the 1-interaction item leaves its user with 1, which then drops the next item
    frame = pd.DataFrame({"user_id": ["a", "a", "b", "b", "c", "c"], "item_id": ["x", "y", "y", "z", "z", "w"]})
    assert len(k_core(frame, 2)) == 0
    assert len(k_core(frame, 1)) == 6


def test_reviews_of_items_without_text(tmp_path):
    reviews = review_records()
    extra = [{"reviewerID": "u1", "asin": "NOTITLE", "unixReviewTime": 1},
             {"reviewerID": "u2", "asin": "NOMETA", "unixReviewTime": 2}]
    d = write_category(tmp_path, meta_records(), reviews + extra)
    ds = read_amazon2018(d, CAT, min_core=5)
    assert ds.drops.counts["interaction_item_without_text"] == 2
    assert ds.drops.counts["item_without_text"] == 1  # NOTITLE (NOMETA has no meta record at all)
    assert len(ds.interactions) == 25
    with pytest.raises(DataError, match=rf"{CAT}_5\.json\.gz: line 46: review of item 'NOTITLE' which has no title"):
        read_amazon2018(d, CAT, missing_text="fail")
    write_gz(d / f"{CAT}_5.json.gz", reviews + extra[1:])
    with pytest.raises(DataError, match=rf"line 46: review of item 'NOMETA' which is not in meta_{CAT}\.json\.gz"):
        read_amazon2018(d, CAT, missing_text="fail")


def test_duplicate_meta_records(tmp_path):
    meta = meta_records()
    meta += [dict(meta[1]), dict(meta[2], title="Another title")]
    ds = read_amazon2018(write_category(tmp_path, meta, review_records()), CAT)
    assert ds.drops.counts["duplicate_item_identical"] == 1
    assert ds.drops.counts["duplicate_item_conflicting"] == 1
    assert ds.items.set_index("item_id").loc["I3", "title"] == "Item 3 & more"  # first record wins


def test_bad_lines_name_file_and_line(tmp_path):
    d = write_category(tmp_path, meta_records(), review_records())
    with gzip.open(d / f"meta_{CAT}.json.gz", "at") as fh:
        fh.write("{'asin': 'B1', 'title': \n")
    with pytest.raises(DataError, match=rf"meta_{CAT}\.json\.gz: line 9: not a JSON object or Python dict literal"):
        read_amazon2018(d, CAT)

    d = write_category(tmp_path / "b", meta_records(), review_records())
    bad = review_records()
    del bad[4]["unixReviewTime"]
    write_gz(d / f"{CAT}_5.json.gz", bad)
    with pytest.raises(DataError, match=rf"{CAT}_5\.json\.gz: line 5: 'unixReviewTime' must be integer seconds"):
        read_amazon2018(d, CAT)
    bad = review_records()
    bad[2]["reviewerID"] = ""
    write_gz(d / f"{CAT}_5.json.gz", bad)
    with pytest.raises(DataError, match=r"line 3: missing or empty 'reviewerID'"):
        read_amazon2018(d, CAT)


def test_missing_empty_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match=rf"meta_{CAT}\.json\.gz: file not found"):
        read_amazon2018(tmp_path, CAT)
    d = write_category(tmp_path, meta_records(), review_records())
    (d / f"{CAT}_5.json.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=rf"{CAT}_5\.json\.gz: not a readable gzip file"):
        read_amazon2018(d, CAT)
    with gzip.open(d / f"{CAT}_5.json.gz", "wb"):
        pass
    with pytest.raises(DataError, match=rf"{CAT}_5\.json\.gz: the file is empty"):
        read_amazon2018(d, CAT)
    data = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in review_records()))
    (d / f"{CAT}_5.json.gz").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(DataError, match="not a readable gzip file"):
        read_amazon2018(d, CAT)

"""bench/movielens.py: RecBole's MovieLens atomic files -> a UniSRec directory that learn reads back."""

from pathlib import Path

import numpy as np
import pytest

from bench.movielens import MAX_HISTORY, convert
from learn.config import DataConfig
from learn.data.load import load_sequences
from learn.data.schema import DataError


def _write_source(root: Path, ratings: list[tuple[str, str, float]], items: dict[str, tuple[str, str, str]]) -> Path:
    src = root / "src"
    src.mkdir()
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{i}\t4\t{t}" for u, i, t in ratings]
    (src / "ml-100k.inter").write_text("\n".join(lines) + "\n")
    rows = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    rows += [f"{i}\t{title}\t{year}\t{genres}" for i, (title, year, genres) in items.items()]
    (src / "ml-100k.item").write_text("\n".join(rows) + "\n")
    return src


def _items(n: int) -> dict[str, tuple[str, str, str]]:
    return {str(k): (f"Movie {k}", "1995" if k % 2 else "", "Comedy Drama" if k % 3 else "") for k in range(1, n + 1)}


def test_sequences_follow_timestamps_ties_in_file_order_and_learn_reads_them_back(tmp_path):
    # user 7: items 3, 1, 2 share one timestamp (file order kept), 5 is earlier, 4 later
    ratings = [("7", "3", 100), ("7", "1", 100), ("7", "4", 300), ("7", "2", 100), ("7", "5", 50),
               ("9", "2", 10), ("9", "6", 5), ("9", "1", 20)]
    # user 11: a long history, beyond the 50 items a row keeps
    ratings += [("11", str(1 + k % 60), 1000 + k) for k in range(60)]
    out = tmp_path / "movies"
    counts = convert(_write_source(tmp_path, ratings, _items(60)), out)
    assert counts["users"] == 3 and counts["items"] == 60 and counts["interactions"] == 68

    raw, data = load_sequences(DataConfig(path=str(out)))
    by_user = {u: [data.item_ids[i] for i in data.seqs[k]] for k, u in enumerate(data.user_ids)}
    # the files' user tokens are indices; user2index maps MovieLens' user id to them
    users = dict(line.split("\t") for line in (out / "movies.user2index").read_text().splitlines())
    assert by_user[users["7"]] == ["5", "3", "1", "2", "4"]
    assert by_user[users["9"]] == ["6", "2", "1"]
    assert by_user[users["11"]] == [str(1 + k % 60) for k in range(60)]  # rebuilt whole from 50-item rows

    splits = data.split("leave_one_out")
    test = {users_k: data.item_ids[t] for users_k, t in zip(splits.test.users, splits.test.targets)}
    valid = {users_k: data.item_ids[t] for users_k, t in zip(splits.valid.users, splits.valid.targets)}
    user_index = {u: k for k, u in enumerate(data.user_ids)}
    assert test[user_index[users["7"]]] == "4" and valid[user_index[users["7"]]] == "2"
    assert test[user_index[users["9"]]] == "1" and valid[user_index[users["9"]]] == "2"

    rows = (out / "movies.train.inter").read_text().splitlines()[1:]
    assert len(rows) == (5 - 3) + (3 - 3) + (60 - 3)
    assert max(len(r.split("\t")[1].split()) for r in rows) == MAX_HISTORY
    texts = dict(line.split("\t") for line in (out / "movies.text").read_text().splitlines()[1:])
    assert texts["1"] == "Movie 1 (1995). Genres: Comedy, Drama."
    assert texts["2"] == "Movie 2. Genres: Comedy, Drama."
    assert texts["3"] == "Movie 3 (1995)."
    assert np.array_equal(np.sort(splits.train_popularity(data.num_items))[-1:], [2])


def test_bad_source_rows_name_the_file_and_line(tmp_path):
    src = _write_source(tmp_path, [("1", "1", 1), ("1", "2", 2), ("1", "3", 3)], _items(3))
    text = (src / "ml-100k.inter").read_text().splitlines()
    (src / "ml-100k.inter").write_text("\n".join(text[:3] + ["1\t3\t4"]) + "\n")
    with pytest.raises(DataError, match=r"ml-100k.inter: line 4: expected 4 tab-separated fields"):
        convert(src, tmp_path / "out")
    (src / "ml-100k.inter").write_text("\n".join(text[:3] + ["1\t3\t4\tyesterday"]) + "\n")
    with pytest.raises(DataError, match=r"line 4: timestamp 'yesterday' is not a number"):
        convert(src, tmp_path / "out")
    (src / "ml-100k.inter").write_text("\n".join(text[:3] + ["1\t9\t4\t3"]) + "\n")
    with pytest.raises(DataError, match=r"1 rated items have no row in ml-100k.item \(e.g. \['9'\]\)"):
        convert(src, tmp_path / "out")
    (src / "ml-100k.inter").write_text("\n".join(text[:3]) + "\n")
    with pytest.raises(DataError, match=r"1 users have fewer than 3 ratings"):
        convert(src, tmp_path / "out")
    (src / "ml-100k.item").write_text("item_id:token\ttitle\n1\tx\n")
    with pytest.raises(DataError, match=r"ml-100k.item: line 1: expected the header"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_last_keeps_each_users_latest_ratings_and_only_the_items_they_name(tmp_path):
    ratings = [("7", str(k), 100 + k) for k in range(1, 9)] + [("9", "2", 10), ("9", "6", 5), ("9", "1", 20)]
    src = _write_source(tmp_path, ratings, _items(10))
    counts = convert(src, tmp_path / "cut", last=4)
    assert counts == {**counts, "users": 2, "interactions": 4 + 3, "max_sequence": 4}
    _, data = load_sequences(DataConfig(path=str(tmp_path / "cut")))
    by_user = sorted([data.item_ids[i] for i in s] for s in data.seqs)
    assert by_user == sorted([["5", "6", "7", "8"], ["6", "2", "1"]])  # the last 4 by time; user 9 whole
    assert sorted(data.item_ids, key=int) == ["1", "2", "5", "6", "7", "8"]  # items 3, 4 only in the cut-off part
    assert "only each user's last 4 ratings kept" in (tmp_path / "cut" / "PROVENANCE.md").read_text()
    with pytest.raises(ValueError, match="--last must be >= 3"):
        convert(src, tmp_path / "bad", last=2)

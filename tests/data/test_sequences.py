import numpy as np
import pandas as pd
import pytest

from learn.data.schema import DataError, DropReport, RawDataset, render_texts
from learn.data.sequences import build_sequences


def dataset(inter_rows, n_items=6):
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(n_items)], "title": [f"t{k}" for k in range(n_items)]})
    inter = pd.DataFrame(inter_rows, columns=["user_id", "item_id", "timestamp"])
    return RawDataset(name="toy", items=items, interactions=inter, default_template="{title}")


def test_sequences_are_time_ordered_with_stable_ties():
    ds = dataset([("u1", "i2", 5), ("u1", "i0", 1), ("u1", "i1", 5), ("u2", "i3", 0), ("u1", "i4", 9)])
    data = build_sequences(ds, render_texts(ds.items, "{title}"))
    assert list(data.user_ids) == ["u1", "u2"]
    assert data.seqs[0].tolist() == [0, 2, 1, 4]  # ts 1, 5 (file order), 5, 9
    assert data.texts[3] == "t3" and data.num_items == 6


def test_leave_one_out_holds_out_last_two_with_whole_history():
    rows = [("u", f"i{k}", k) for k in range(6)] + [("short", "i0", 0), ("short", "i1", 1)]
    ds = dataset(rows)
    sp = build_sequences(ds, render_texts(ds.items, "{title}")).split("leave_one_out")
    assert sp.test.targets.tolist() == [5] and sp.valid.targets.tolist() == [4]
    assert sp.test.histories[0].tolist() == [0, 1, 2, 3, 4] and sp.valid.histories[0].tolist() == [0, 1, 2, 3]
    u = int(sp.test.users[0])
    assert sp.train[u].tolist() == [0, 1, 2, 3]
    assert sp.info["users_not_evaluated_short"] == 1
    pop = sp.train_popularity(6)
    assert pop[5] == 0 and pop[4] == 0 and pop[0] == 2  # "short" trains on its whole sequence


def test_time_cut_never_trains_on_the_future():
    rows = [(f"u{u}", f"i{(u + k) % 6}", 10 * k + u) for u in range(8) for k in range(5)]
    ds = dataset(rows)
    data = build_sequences(ds, render_texts(ds.items, "{title}"))
    sp = data.split("time_cut", time_cut=25.0, seed=0)
    cut = sp.info["time_cut"]
    for u, seq in enumerate(sp.train):
        assert (data.times[u][: len(seq)] < cut).all()
    assert len(sp.valid) + len(sp.test) == 8 and abs(len(sp.valid) - len(sp.test)) <= 1
    for split in (sp.valid, sp.test):
        for u, h, t in zip(split.users, split.histories, split.targets):
            first_after = data.seqs[u][data.times[u] >= cut][0]
            assert t == first_after and len(h) == (data.times[u] < cut).sum()


def test_missing_timestamp_and_unknown_item_are_errors():
    ds = dataset([("u", "i0", 1), ("u", "i1", None)])
    with pytest.raises(DataError, match="row 1 has no timestamp"):
        build_sequences(ds, render_texts(ds.items, "{title}"))
    ds = dataset([("u", "i0", 1), ("u", "nope", 2)])
    with pytest.raises(DataError, match="nope"):
        build_sequences(ds, render_texts(ds.items, "{title}"))


def test_template_with_unknown_field_names_it():
    ds = dataset([("u", "i0", 1)])
    with pytest.raises(DataError, match="brand"):
        render_texts(ds.items, "{title} by {brand}")


def test_drop_report_counts_and_summarises():
    d = DropReport()
    d.add("item_without_text", 3, ["a", "b"])
    d.add("item_without_text", 2)
    d.add("nothing", 0)
    assert d.total == 5 and d.metrics() == {"dropped_item_without_text": 5}
    assert "item_without_text: 5" in d.summary() and "nothing" not in d.summary()


def test_backwards_timestamps_fail_when_the_log_must_be_ordered():
    ds = dataset([("u", "i0", 1), ("v", "i1", 2), ("u", "i2", 5), ("u", "i3", 4)])
    texts = render_texts(ds.items, "{title}")
    assert build_sequences(ds, texts).seqs[0].tolist() == [0, 3, 2]  # "sort" orders by time
    with pytest.raises(DataError, match=r"row 3 \(user 'u'\) has timestamp 4"):
        build_sequences(ds, texts, unsorted="fail")


def test_splits_that_leave_nothing_to_evaluate_or_train_are_errors():
    ds = dataset([("u", "i0", 1), ("u", "i1", 2)])  # one user, two items: no valid/test
    data = build_sequences(ds, render_texts(ds.items, "{title}"))
    with pytest.raises(DataError, match="leaves 0 valid and 0 test users"):
        data.split("leave_one_out")
    ds = dataset([(f"u{k}", f"i{j}", j) for k in range(3) for j in range(3)])  # 3 items each: train of 1
    with pytest.raises(DataError, match="nothing to train on"):
        build_sequences(ds, render_texts(ds.items, "{title}")).split("leave_one_out")


def test_leave_one_out_without_short_users_and_released_times():
    rows = [("a", f"i{k}", k) for k in range(4)] + [("b", f"i{k}", 10 - k) for k in range(3)]
    ds = dataset(rows)
    data = build_sequences(ds, render_texts(ds.items, "{title}"))
    sp = data.split("leave_one_out")  # every user evaluated: the histories read the sequences themselves
    assert sp.valid.histories[0].tolist() == [0, 1] and sp.test.histories[0].tolist() == [0, 1, 2]
    assert sp.valid.histories[1].tolist() == [2] and sp.test.targets.tolist() == [3, 0]
    data.release_times()
    assert data.split("leave_one_out").test.targets.tolist() == [3, 0]  # needs no timestamps
    with pytest.raises(RuntimeError, match="released"):
        data.split("time_cut", 0.5)

import random
from collections import Counter
from pathlib import Path

import pytest

from learn.data.load import item_texts
from learn.data.schema import DataError
from learn.data.sequences import build_sequences
from learn.data.unisrec import find_name, read_unisrec

SCIENTIFIC = Path(__file__).resolve().parents[3] / "shared/data/amazon-unisrec/Scientific"
HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token"


def write_unisrec(directory: Path, seqs: dict[str, list[int]], num_items: int, cap: int = 3,
                  name: str = "Toy", order: str = "shuffle") -> Path:
    """Write UniSRec files for full sequences, histories capped at ``cap`` like the real files."""
    directory.mkdir(parents=True, exist_ok=True)
    asins = [f"A{i:04d}" for i in range(num_items)]
    rows = {"train": [], "valid": [], "test": []}
    for user, seq in seqs.items():
        for p in range(1, len(seq)):
            split = "test" if p == len(seq) - 1 else "valid" if p == len(seq) - 2 else "train"
            hist = " ".join(str(i) for i in seq[max(0, p - cap):p])
            rows[split].append(f"{user}\t{hist}\t{seq[p]}")
    if order == "shuffle":  # the reader must not depend on the row order
        random.Random(0).shuffle(rows["train"])
    elif order == "reverse":
        rows["train"].reverse()
    for split, lines in rows.items():
        (directory / f"{name}.{split}.inter").write_text("\n".join([HEADER, *lines]) + "\n")
    # item2index written out of index order: the catalog must still come out in index order
    order = list(range(num_items))[::-1]
    (directory / f"{name}.item2index").write_text("".join(f"{asins[i]}\t{i}\n" for i in order))
    (directory / f"{name}.text").write_text(
        "item_id:token\ttext:token_seq\n" + "".join(f"{a}\tItem  {a} text. \n" for a in asins)
    )
    return directory


def sequences(ds) -> dict[str, list[str]]:
    inter = ds.interactions.sort_values(["user_id", "timestamp"], kind="stable")
    return {u: g["item_id"].tolist() for u, g in inter.groupby("user_id", sort=False)}


SEQS = {
    "u1": [0, 1, 2, 3, 4],
    "u2": [5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6],  # longer than the cap: chained through truncated rows
    "u3": [1, 2, 1, 2, 1, 3, 1, 2, 3, 4],  # repeated items
    "u4": [9, 8, 7],
}


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle"])
def test_rebuilds_full_sequences_in_index_order(tmp_path, order):
    # u3 repeats the run [1, 2, 1] with different next items; in reverse order the wrong one is met first
    d = write_unisrec(tmp_path / "toy", SEQS, num_items=10, order=order)
    ds = read_unisrec(d)
    assert ds.name == "Toy" and ds.default_template == "{text}"
    assert ds.items["item_id"].tolist() == [f"A{i:04d}" for i in range(10)]
    assert ds.items["text"].iloc[3] == "Item A0003 text."  # whitespace collapsed
    got = sequences(ds)
    assert got == {u: [f"A{i:04d}" for i in s] for u, s in SEQS.items()}
    for _, g in ds.interactions.groupby("user_id"):
        assert g["timestamp"].tolist() == list(range(len(g)))
    assert str(ds.interactions["timestamp"].dtype) == "int64"
    assert ds.drops.total == 0
    assert item_texts(ds, None).iloc[0] == "Item A0000 text."


def test_catalog_keeps_items_without_interactions_and_counts_extra_texts(tmp_path):
    d = write_unisrec(tmp_path / "toy", {"u1": [0, 1, 2]}, num_items=6)
    with open(d / "Toy.text", "a") as fh:
        fh.write("ZZZ\tan item missing from item2index\n")
    ds = read_unisrec(d)
    assert len(ds.items) == 6 and set(ds.interactions["item_id"]) == {"A0000", "A0001", "A0002"}
    assert ds.drops.counts == {"text_item_not_in_item2index": 1}


def test_name_must_be_unambiguous(tmp_path):
    d = write_unisrec(tmp_path / "toy", SEQS, num_items=10)
    assert find_name(d) == "Toy"
    (d / "Other.item2index").write_text("A0000\t0\n")
    with pytest.raises(DataError, match=r"exactly one '\*\.item2index'.*Other\.item2index, Toy\.item2index"):
        read_unisrec(d)
    with pytest.raises(DataError, match="found none"):
        read_unisrec(tmp_path)


def _edit(path: Path, lineno: int, new: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = new
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: (d / "Toy.valid.inter").unlink(), r"Toy\.valid\.inter: file not found"),
        (lambda d: (d / "Toy.test.inter").write_text(""), r"Toy\.test\.inter: the file is empty"),
        (lambda d: _edit(d / "Toy.train.inter", 1, "user\titems\titem"), r"Toy\.train\.inter: line 1: header"),
        (lambda d: _edit(d / "Toy.text", 1, "asin\ttext"), r"Toy\.text: line 1: header"),
        (lambda d: _edit(d / "Toy.valid.inter", 3, "u2\t1 2"), r"Toy\.valid\.inter: line 3: expected 3 .*found 2"),
        (lambda d: _edit(d / "Toy.test.inter", 2, "u1\t1 x 3\t4"), r"Toy\.test\.inter: line 2: .*integers"),
        (lambda d: _edit(d / "Toy.test.inter", 2, "u1\t1 2 3\t99"), r"Toy\.test\.inter: line 2: item index 99 is not"),
        (lambda d: _edit(d / "Toy.item2index", 2, "A0008\tabc"), r"Toy\.item2index: line 2: index 'abc'"),
        (lambda d: _edit(d / "Toy.item2index", 2, "A0009\t7"), r"Toy\.item2index: line 2: item 'A0009' already"),
        (lambda d: _edit(d / "Toy.text", 5, "A0003\t   "), r"have no text \(e\.g\. 'A0003'\)"),
        (lambda d: _edit(d / "Toy.text", 5, "A0003"), r"Toy\.text: line 5: expected 2"),
        (lambda d: (d / "Toy.valid.inter").write_bytes(b"%s\nu1\t0 1 2\t3\n\xff\xfe\t1\t2\n" % HEADER.encode()),
         r"Toy\.valid\.inter: line 3: bytes are not valid UTF-8"),
    ],
)
def test_bad_files_are_named(tmp_path, mutate, needle):
    d = write_unisrec(tmp_path / "toy", SEQS, num_items=10, order="forward")
    mutate(d)
    with pytest.raises(DataError, match=needle):
        read_unisrec(d)


def _line_of(path: Path, text: str) -> int:
    return path.read_text().splitlines().index(text) + 1


def test_contradicting_rows_name_file_line_and_user(tmp_path):
    d = write_unisrec(tmp_path / "toy", SEQS, num_items=10, order="forward")
    # u2's test row claims a history the train rows never produce
    test = d / "Toy.test.inter"
    n = _line_of(test, "u2\t3 4 5\t6")
    _edit(test, n, "u2\t3 4 7\t6")
    with pytest.raises(DataError, match=rf"Toy\.test\.inter: line {n}: user 'u2'.*contradicts"):
        read_unisrec(d)


def test_two_targets_for_one_prefix_are_reported_with_both_lines(tmp_path):
    d = write_unisrec(tmp_path / "toy", SEQS, num_items=10, order="forward")
    train = d / "Toy.train.inter"
    with open(train, "a") as fh:
        fh.write("u1\t0 1\t9\n")
    a = _line_of(train, "u1\t0 1\t2")
    b = len(train.read_text().splitlines())
    with pytest.raises(DataError, match=rf"line {b}: user 'u1'.*line {a} have the same history but different targets"):
        read_unisrec(d)


def test_test_row_must_be_the_last_item(tmp_path):
    d = write_unisrec(tmp_path / "toy", {"u1": [0, 1, 2, 3, 4]}, num_items=5, order="forward")
    # swap the valid and test rows: the chain still works but test is no longer the last item
    valid, test = (d / "Toy.valid.inter").read_text(), (d / "Toy.test.inter").read_text()
    (d / "Toy.valid.inter").write_text(test)
    (d / "Toy.test.inter").write_text(valid)
    with pytest.raises(DataError, match=r"Toy\.test\.inter: line 2: user 'u1': the test row is not the last"):
        read_unisrec(d)


def test_user_without_test_row_is_an_error(tmp_path):
    d = write_unisrec(tmp_path / "toy", SEQS, num_items=10, order="forward")
    lines = [ln for ln in (d / "Toy.test.inter").read_text().splitlines() if not ln.startswith("u4\t")]
    (d / "Toy.test.inter").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"user 'u4' has 0 rows in the test file"):
        read_unisrec(d)


# ---------------------------------------------------------------- real data


def _read_inter(path: Path) -> list[tuple[str, list[int], int]]:
    rows = []
    for line in path.read_text().splitlines()[1:]:
        user, hist, target = line.split("\t")
        rows.append((user, [int(x) for x in hist.split()], int(target)))
    return rows


@pytest.mark.realdata
def test_scientific_leave_one_out_reproduces_the_files():
    if not (SCIENTIFIC / "Scientific.item2index").is_file():
        pytest.skip(f"real data not found at {SCIENTIFIC}")
    ds = read_unisrec(SCIENTIFIC)
    assert ds.name == "Scientific"
    assert len(ds.items) == 4385 and len(ds.interactions) == 59427
    assert ds.interactions["user_id"].nunique() == 8442
    assert ds.drops.total == 0
    index = {}
    for line in (SCIENTIFIC / "Scientific.item2index").read_text().splitlines():
        asin, i = line.split("\t")
        index[asin] = int(i)
    assert ds.items["item_id"].map(index).tolist() == list(range(4385))

    texts = item_texts(ds, None)
    data = build_sequences(ds, texts)
    splits = data.split("leave_one_out")
    pos = {u: k for k, u in enumerate(data.user_ids)}
    # catalog position == item2index index, so file indices compare directly
    for split_name, split in (("valid", splits.valid), ("test", splits.test)):
        rows = _read_inter(SCIENTIFIC / f"Scientific.{split_name}.inter")
        assert len(rows) == len(split) == 8442
        by_user = {int(u): (h.tolist(), int(t)) for u, h, t in zip(split.users, split.histories, split.targets)}
        for user, hist, target in rows:
            got_hist, got_target = by_user[pos[user]]
            assert got_target == target, (split_name, user)
            assert got_hist[-50:] == hist and len(hist) == min(len(got_hist), 50), (split_name, user)

    # and every train row is a (last <= 50 items -> next item) window of the rebuilt sequence
    expected = Counter()
    for u, seq in zip(data.user_ids, data.seqs):
        seq = seq.tolist()
        for p in range(1, len(seq) - 2):
            expected[(u, tuple(seq[max(0, p - 50):p]), seq[p])] += 1
    got = Counter((u, tuple(h), t) for u, h, t in _read_inter(SCIENTIFIC / "Scientific.train.inter"))
    assert got == expected

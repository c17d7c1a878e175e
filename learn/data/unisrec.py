"""UniSRec / RecBole atomic files -> RawDataset.

A directory holds ``<name>.train.inter``, ``.valid.inter``, ``.test.inter`` (user, space-separated
history of item indices, target index), ``<name>.text`` (ASIN, text), ``<name>.item2index``
(ASIN, index) and optionally ``<name>.user2index`` (not needed: users keep their token).

The files store samples, not sequences: each row is "history (the last <= M items before position
p) -> item at position p", with M the truncation length (50 in UniSRec). We rebuild every user's
full sequence by chaining rows: the item at position p is the target of the row whose history equals
the last M items of what is known so far (a run of M items that repeats with different next items
is resolved by trying the alternatives). Rows that do not chain are a DataError. The timestamp is
the position (the files have no clock), so leave-one-out on the result gives back the test rows
(last item) and the valid rows (second to last).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from learn.data.files import decode_utf8
from learn.data.schema import DataError, DropReport, RawDataset, is_missing_text

INTER_COLUMNS = ("user_id:token", "item_id_list:token_seq", "item_id:token")
TEXT_COLUMNS = ("item_id:token", "text:token_seq")
SPLITS = ("train", "valid", "test")


@dataclass
class _Row:
    split: int  # index into SPLITS
    line: int
    history: tuple[int, ...]
    target: int


def find_name(directory: Path) -> str:
    """The dataset name: the one stem shared by ``*.item2index`` and ``*.text`` in ``directory``."""
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory (expected a UniSRec dataset directory)")
    found = {}
    for suffix in (".item2index", ".text"):
        stems = sorted(p.name[: -len(suffix)] for p in directory.glob(f"*{suffix}") if p.is_file())
        if len(stems) != 1:
            what = "none" if not stems else ", ".join(s + suffix for s in stems)
            raise DataError(
                f"{directory}: expected exactly one '*{suffix}' file to name the dataset, found {what}"
            )
        found[suffix] = stems[0]
    if found[".item2index"] != found[".text"]:
        raise DataError(
            f"{directory}: '{found['.item2index']}.item2index' and '{found['.text']}.text' name different datasets"
        )
    return found[".text"]


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(
            f"{path}: file not found (a UniSRec directory needs .train/.valid/.test.inter, .text, .item2index)"
        )
    text = decode_utf8(path.read_bytes(), path)
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise DataError(f"{path}: the file is empty")
    return lines


def _check_header(path: Path, line: str, expected: tuple[str, ...]) -> None:
    got = tuple(c.strip() for c in line.split("\t"))
    if got != expected:
        raise DataError(f"{path}: line 1: header {list(got)} is not the expected {list(expected)} (tab-separated)")


def read_item2index(path: Path) -> pd.DataFrame:
    """ASIN -> index, sorted by index; duplicate ASINs or indices are errors."""
    asins, index = [], []
    seen_asin: dict[str, int] = {}
    seen_index: dict[int, int] = {}
    for lineno, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 2:
            raise DataError(f"{path}: line {lineno}: expected 2 tab-separated columns (ASIN, index), found {len(cols)}")
        asin, raw = cols[0].strip(), cols[1].strip()
        if not asin:
            raise DataError(f"{path}: line {lineno}: empty item id")
        try:
            idx = int(raw)
        except ValueError:
            raise DataError(f"{path}: line {lineno}: index {raw!r} is not an integer") from None
        if asin in seen_asin:
            raise DataError(f"{path}: line {lineno}: item '{asin}' already listed on line {seen_asin[asin]}")
        if idx in seen_index:
            raise DataError(f"{path}: line {lineno}: index {idx} already used on line {seen_index[idx]}")
        seen_asin[asin], seen_index[idx] = lineno, lineno
        asins.append(asin)
        index.append(idx)
    frame = pd.DataFrame({"item_id": pd.Series(asins, dtype=object), "index": np.asarray(index, np.int64)})
    return frame.sort_values("index", kind="stable").reset_index(drop=True)


def read_text(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    """ASIN -> text and ASIN -> line number; a repeated ASIN with another text is an error."""
    lines = _lines(path)
    _check_header(path, lines[0], TEXT_COLUMNS)
    texts: dict[str, str] = {}
    where: dict[str, int] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 2:
            raise DataError(
                f"{path}: line {lineno}: expected 2 tab-separated columns (item_id, text), found {len(cols)}"
            )
        asin, text = cols[0].strip(), " ".join(cols[1].split())
        text = "" if is_missing_text(text) else text  # "NaN", "None", "null": no text
        if not asin:
            raise DataError(f"{path}: line {lineno}: empty item id")
        if asin in texts and texts[asin] != text:
            raise DataError(f"{path}: line {lineno}: item '{asin}' has a different text on line {where[asin]}")
        texts[asin] = text
        where.setdefault(asin, lineno)
    return texts, where


def _read_inter(path: Path, split: int, valid_index: set[int], rows: dict[str, list[_Row]]) -> int:
    """Append the rows of one .inter file to ``rows`` (by user); return the longest history."""
    lines = _lines(path)
    _check_header(path, lines[0], INTER_COLUMNS)
    longest = 0
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 3:
            raise DataError(
                f"{path}: line {lineno}: expected 3 tab-separated columns (user, history, target), found {len(cols)}"
            )
        user = cols[0].strip()
        if not user:
            raise DataError(f"{path}: line {lineno}: empty user id")
        try:
            history = tuple(int(x) for x in cols[1].split())
            target = int(cols[2])
        except ValueError:
            raise DataError(
                f"{path}: line {lineno}: item indices must be integers, got {cols[1]!r} -> {cols[2]!r}"
            ) from None
        for idx in (*history, target):
            if idx not in valid_index:
                raise DataError(f"{path}: line {lineno}: item index {idx} is not in the .item2index file")
        longest = max(longest, len(history))
        rows.setdefault(user, []).append(_Row(split, lineno, history, target))
    return longest


def _chain(user: str, rows: list[_Row], max_hist: int, paths: list[Path], budget: int = 100_000) -> list[int]:
    """Rebuild one user's full sequence from its rows (see module doc).

    Depth-first: at each position the candidates are the unused rows whose history equals the
    last ``max_hist`` items so far. Only a repeated run of ``max_hist`` items with different next
    items gives more than one candidate; then the alternatives are tried in turn. The valid and
    test rows may only fill the last two positions.
    """
    at = lambda r: f"{paths[r.split]}: line {r.line}"  # noqa: E731
    by_split = [[r for r in rows if r.split == s] for s in range(3)]
    if len(by_split[2]) != 1:
        r = (by_split[2][1:] or rows)[0]
        raise DataError(f"{at(r)}: user '{user}' has {len(by_split[2])} rows in the test file (expected exactly 1)")
    if len(by_split[1]) > 1:
        raise DataError(
            f"{at(by_split[1][1])}: user '{user}' has {len(by_split[1])} rows in the valid file (expected 1)"
        )
    test = by_split[2][0]
    valid = by_split[1][0] if by_split[1] else None

    ordered = sorted(rows, key=lambda r: (r.split, r.line))
    by_key: dict[tuple[int, ...], list[int]] = {}
    for k, r in enumerate(ordered):
        same = by_key.setdefault(r.history, [])
        # a history shorter than the cap starts at position 0: two such rows claim one position
        if same and len(r.history) < max_hist:
            o = ordered[same[0]]
            what = "the same target (duplicate row)" if o.target == r.target else (
                f"different targets ({o.target} vs {r.target})")
            raise DataError(f"{at(r)}: user '{user}': this row and {at(o)} have the same history but {what}")
        same.append(k)

    n = len(ordered)
    start = min(ordered, key=lambda r: len(r.history))  # the shortest history starts the sequence
    if len(start.history) >= max_hist:
        raise DataError(
            f"{at(start)}: user '{user}': every row's history has the maximum length {max_hist}, so the start "
            f"of the sequence is unknown (expected the rows of every prefix)"
        )
    seq = list(start.history)
    used = [False] * n
    chosen: list[int] = []  # row index per filled position
    stack: list[tuple[list[int], int]] = []  # per filled position: its options and the one taken
    deepest: tuple[int, list[int], list[bool], list[int]] | None = None

    def options() -> tuple[list[int], list[int]]:
        """Allowed candidates (one per distinct target) and those refused by the position rule."""
        step = len(chosen)
        allowed, refused, targets = [], [], set()
        for k in by_key.get(tuple(seq[-max_hist:]) if seq else (), []):
            r = ordered[k]
            if used[k]:
                continue
            if (r is test and step != n - 1) or (r is valid and step != n - 2):
                refused.append(k)
            elif r.target not in targets:
                targets.add(r.target)
                allowed.append(k)
        return allowed, refused

    steps = 0
    while len(chosen) < n:
        steps += 1
        if steps > budget:
            raise DataError(f"{at(test)}: user '{user}': the rows cannot be ordered unambiguously "
                            f"(too many repeated runs of {max_hist} items)")
        allowed, refused = options()
        if allowed:
            stack.append((allowed, 0))
            k = allowed[0]
        else:
            if deepest is None or len(chosen) > deepest[0]:
                deepest = (len(chosen), list(seq), list(used), refused)
            while stack:  # backtrack to the last position with an untried alternative
                opts, i = stack.pop()
                used[chosen.pop()] = False
                seq.pop()
                if i + 1 < len(opts):
                    stack.append((opts, i + 1))
                    k = opts[i + 1]
                    break
            else:
                _, seq_at, used_at, refused_at = deepest
                if refused_at:
                    r = ordered[refused_at[0]]
                    which = "last" if r is test else "second to last"
                    raise DataError(f"{at(r)}: user '{user}': the {('test', 'valid')[r is valid]} row is not the "
                                    f"{which} item of the user's sequence")
                r = next(ordered[k] for k in range(n) if not used_at[k])
                raise DataError(
                    f"{at(r)}: user '{user}': history {list(r.history)} -> {r.target} contradicts the sequence "
                    f"built from the user's other rows (...{seq_at[-10:]} after {len(seq_at)} items)"
                )
        used[k] = True
        chosen.append(k)
        seq.append(ordered[k].target)
    return seq


def read_unisrec(path: str | Path) -> RawDataset:
    directory = Path(path)
    name = find_name(directory)
    drops = DropReport()

    mapping = read_item2index(directory / f"{name}.item2index")
    texts, where = read_text(directory / f"{name}.text")
    missing = [a for a in mapping["item_id"] if not texts.get(a)]
    if missing:
        line = f"line {where[missing[0]]}: " if missing[0] in where else ""
        raise DataError(
            f"{directory / (name + '.text')}: {line}{len(missing)} catalog item(s) of {name}.item2index have no "
            f"text (e.g. '{missing[0]}'); every catalog item needs a text (empty, NaN, None or null is none)"
        )
    catalog = set(mapping["item_id"])
    extra = [a for a in texts if a not in catalog]
    drops.add("text_item_not_in_item2index", len(extra), extra)
    items = pd.DataFrame(
        {"item_id": mapping["item_id"], "text": pd.Series([texts[a] for a in mapping["item_id"]], dtype=object)}
    )

    index_to_pos = {int(i): k for k, i in enumerate(mapping["index"])}
    valid_index = set(index_to_pos)
    paths = [directory / f"{name}.{s}.inter" for s in SPLITS]
    rows: dict[str, list[_Row]] = {}
    max_hist = max(_read_inter(p, s, valid_index, rows) for s, p in enumerate(paths))

    users, item_pos, stamps = [], [], []
    for user, user_rows in rows.items():
        seq = _chain(user, user_rows, max(max_hist, 1), paths)
        users.extend([user] * len(seq))
        item_pos.extend(index_to_pos[i] for i in seq)
        stamps.append(np.arange(len(seq), dtype=np.int64))
    item_ids = items["item_id"].to_numpy(dtype=object)
    interactions = pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype=object),
            "item_id": pd.Series(item_ids[np.asarray(item_pos, dtype=np.int64)], dtype=object),
            "timestamp": np.concatenate(stamps) if stamps else np.zeros(0, np.int64),
        }
    )
    return RawDataset(
        name=name,
        items=items,
        interactions=interactions,
        drops=drops,
        source=f"{directory} (UniSRec files '{name}'; timestamps are sequence positions)",
        default_template="{text}",
        has_clock=False,
    )

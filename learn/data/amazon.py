"""Raw Amazon Reviews 2018 files -> RawDataset.

    ds = read_amazon2018("data/amazon2018", "Industrial_and_Scientific", min_core=5)

Reads ``meta_<Category>.json.gz`` (item metadata) and ``<Category>_5.json.gz`` (reviews), one
record per line: JSON, or a Python dict literal as in some older dumps. Items keep title, brand and
category (the category path joined with ", "), HTML entities unescaped and whitespace collapsed.
Interactions are the reviews; exact duplicates are removed, items without a title follow the
missing-text policy, then users and items are k-core filtered. The catalog is every item left in
the filtered interactions. Every removal is counted in ``drops``.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from learn.data.files import PAPER_TEMPLATE
from learn.data.schema import DataError, DropReport, RawDataset, is_missing_text


def meta_path(directory: str | Path, category: str) -> Path:
    return Path(directory) / f"meta_{category}.json.gz"


def reviews_path(directory: str | Path, category: str) -> Path:
    return Path(directory) / f"{category}_5.json.gz"


def iter_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line of a gzipped JSON / Python-literal file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    lineno = 0
    try:
        with gzip.open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}: line {lineno}: bytes are not valid UTF-8 ({exc.reason})") from None
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    try:  # older dumps write Python dict literals
                        rec = ast.literal_eval(line)
                    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                        raise DataError(
                            f"{path}: line {lineno}: not a JSON object or Python dict literal: {line[:80]!r}"
                        ) from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}: line {lineno}: expected an object, found {type(rec).__name__}")
                yield lineno, rec
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc}; after line {lineno})") from None
    if lineno == 0:
        raise DataError(f"{path}: the file is empty")


def clean(value: Any) -> str:
    """HTML entities unescaped, whitespace collapsed; lists joined with ', '; None and the
    missing-text literals ("NaN", "None", "null": ``is_missing_text``) -> ''."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(t for t in (clean(v) for v in value) if t)
    text = " ".join(html.unescape(str(value)).split())
    return "" if is_missing_text(text) else text


def _read_meta(path: Path, drops: DropReport) -> dict[str, tuple[Any, Any, Any]]:
    """asin -> raw (title, brand, category); cleaning waits until we know which items are used."""
    meta: dict[str, tuple[Any, Any, Any]] = {}
    identical: list[str] = []
    conflicting: list[str] = []
    for lineno, rec in iter_records(path):
        asin = clean(rec.get("asin"))
        if not asin:
            raise DataError(f"{path}: line {lineno}: record has no 'asin'")
        fields = (rec.get("title"), rec.get("brand"), rec.get("category"))
        old = meta.get(asin)
        if old is None:
            meta[asin] = fields
        elif old == fields or tuple(map(clean, old)) == tuple(map(clean, fields)):
            identical.append(asin)
        else:  # raw dumps repeat some items; the first record wins, the rest are counted
            conflicting.append(asin)
    drops.add("duplicate_item_identical", len(identical), identical)
    drops.add("duplicate_item_conflicting", len(conflicting), conflicting)
    return meta


def _read_reviews(path: Path) -> pd.DataFrame:
    users, items, stamps, lines = [], [], [], []
    for lineno, rec in iter_records(path):
        vals = []
        for key in ("reviewerID", "asin"):
            v = rec.get(key)
            if not isinstance(v, (str, int)) or not str(v).strip():
                raise DataError(f"{path}: line {lineno}: missing or empty '{key}' (got {v!r})")
            vals.append(str(v).strip())
        ts = rec.get("unixReviewTime")
        try:
            if isinstance(ts, bool) or not isinstance(ts, (int, float, str)):
                raise TypeError
            t = int(ts)
        except (ValueError, TypeError, OverflowError):
            raise DataError(f"{path}: line {lineno}: 'unixReviewTime' must be integer seconds, got {ts!r}") from None
        users.append(vals[0])
        items.append(vals[1])
        stamps.append(t)
        lines.append(lineno)
    return pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype=object),
            "item_id": pd.Series(items, dtype=object),
            "timestamp": np.asarray(stamps, dtype=np.int64),
            "line": np.asarray(lines, dtype=np.int64),
        }
    )


def k_core(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    """Repeatedly drop users and items with fewer than ``k`` interactions until none is left."""
    if k <= 1:
        return frame
    while len(frame):
        users = frame["user_id"].map(frame["user_id"].value_counts())
        items = frame["item_id"].map(frame["item_id"].value_counts())
        keep = (users >= k) & (items >= k)
        if keep.all():
            break
        frame = frame[keep.to_numpy()]
    return frame


def read_amazon2018(
    directory: str | Path, category: str, *, min_core: int = 5, missing_text: str = "drop"
) -> RawDataset:
    if missing_text not in ("drop", "fail"):
        raise DataError(f"missing_text must be 'drop' or 'fail', got {missing_text!r}")
    directory = Path(directory)
    mpath, rpath = meta_path(directory, category), reviews_path(directory, category)
    drops = DropReport()
    meta = _read_meta(mpath, drops)
    inter = _read_reviews(rpath)

    dup = inter.duplicated(["user_id", "item_id", "timestamp"]).to_numpy()
    drops.add("duplicate_interaction", int(dup.sum()),
              [f"{u}/{i}" for u, i in inter.loc[dup, ["user_id", "item_id"]].head(5).itertuples(index=False)])
    inter = inter[~dup]

    # clean only the reviewed items: the meta file covers the whole category
    reviewed = set(inter["item_id"])
    fields = {a: tuple(map(clean, meta[a])) for a in meta if a in reviewed}
    titled = {a for a, f in fields.items() if f[0]}
    has_text = inter["item_id"].isin(titled).to_numpy()
    if not has_text.all():
        bad = inter[~has_text]
        if missing_text == "fail":
            row = bad.iloc[0]
            why = "has no title" if row["item_id"] in meta else f"is not in {mpath.name}"
            raise DataError(
                f"{rpath}: line {row['line']}: review of item '{row['item_id']}' which {why}; "
                f"{len(bad)} such reviews; set missing_text=drop to drop them"
            )
        drops.add("interaction_item_without_text", len(bad), bad["item_id"].head(5).tolist())
        inter = inter[has_text]
    untitled = [a for a, f in fields.items() if not f[0]]
    drops.add("item_without_text", len(untitled), untitled)

    before = len(inter)
    inter = k_core(inter, min_core)
    drops.add("k_core_filtered", before - len(inter))

    used = set(inter["item_id"])
    order = [a for a in meta if a in used]
    # meta items never reviewed (or removed by k-core) are not part of the dataset
    drops.add("item_without_interactions", len(meta) - len(untitled) - len(order))
    items = pd.DataFrame(
        {
            "item_id": pd.Series(order, dtype=object),
            "title": pd.Series([fields[a][0] for a in order], dtype=object),
            "brand": pd.Series([fields[a][1] for a in order], dtype=object),
            "category": pd.Series([fields[a][2] for a in order], dtype=object),
        }
    )
    interactions = inter[["user_id", "item_id", "timestamp"]].reset_index(drop=True)
    return RawDataset(
        name=category,
        items=items,
        interactions=interactions,
        drops=drops,
        source=f"{mpath} + {rpath} ({min_core}-core)",
        default_template=PAPER_TEMPLATE,
    )

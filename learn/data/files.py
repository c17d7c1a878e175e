"""Generic item / interaction files (Parquet, CSV, JSON lines) -> RawDataset.

    ds = read_files("items.csv", "interactions.parquet", item_id_col="asin", text_fields=["title"])

The format follows the suffix: ``.parquet``, ``.csv``, ``.jsonl`` or ``.json`` (JSON lines, or one
JSON array of records). Every problem is a DataError that names the file and the line (CSV, JSON
lines) or the 1-based data row (Parquet, JSON array); every removed row is counted in ``drops``.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import io
import json
import logging
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from learn.data.columnar import InteractionColumns, read_interaction_columns, scan_csv
from learn.data.schema import DataError, DropReport, RawDataset, is_missing_text

log = logging.getLogger(__name__)

SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
PAPER_TEMPLATE = "Title: {title}. Brand: {brand}. Category: {category}"
_UNSAFE_FIELD_CHARS = set("{}[].:!")


def decode_utf8(data: bytes, source: str | Path) -> str:
    """UTF-8 bytes -> str (a leading BOM is ignored); bad bytes name the line they sit on."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{source}: line {line}: bytes are not valid UTF-8 ({exc.reason} at byte {exc.start}); "
            f"expected UTF-8 text"
        ) from None


@dataclass
class Table:
    """Raw column values of one file plus where each row came from (for error messages)."""

    path: Path
    columns: dict[str, list[Any]]
    where: list[int]  # line number (CSV, JSON lines) or 1-based row (Parquet, JSON array)
    unit: str  # "line" | "row"

    def __len__(self) -> int:
        return len(self.where)

    def at(self, i: int) -> str:
        return f"{self.path}: {self.unit} {self.where[i]}"

    def require(self, names: list[str], role: str) -> None:
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise DataError(
                f"{self.path}: missing {role} column(s) {missing}; columns found: {list(self.columns)}"
            )


def read_table(path: str | Path) -> Table:
    """Read one Parquet / CSV / JSON-lines file into raw column lists; an empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        table = _read_parquet(path)
    elif suffix == ".csv":
        table = _read_csv(path)
    elif suffix in (".jsonl", ".json"):
        table = _read_json(path)
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (expected one of {list(SUFFIXES)})")
    if len(table) == 0:
        raise DataError(f"{path}: the file has no data rows")
    return table


def _read_parquet(path: Path) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        arrow = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read as Parquet ({exc})") from None
    # to_pylist keeps ints as ints and nulls as None (pandas would turn int+null into floats)
    columns = {name: arrow.column(name).to_pylist() for name in arrow.column_names}
    return Table(path, columns, list(range(1, arrow.num_rows + 1)), "row")


def _read_csv(path: Path) -> Table:
    text = decode_utf8(path.read_bytes(), path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: the file is empty (expected a header line)") from None
    except csv.Error as exc:
        raise DataError(f"{path}: line 1: malformed CSV header ({exc})") from None
    header = [h.strip() for h in header]
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise DataError(f"{path}: line 1: duplicate column name(s) {dup}")
    columns: dict[str, list[Any]] = {h: [] for h in header}
    where: list[int] = []
    prev = reader.line_num
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"{path}: line {prev + 1}: malformed CSV ({exc})") from None
        start, prev = prev + 1, reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if len(row) != len(header):
            raise DataError(
                f"{path}: line {start}: expected {len(header)} fields ({header}), found {len(row)}"
            )
        for name, value in zip(header, row):
            columns[name].append(value if value != "" else None)
        where.append(start)
    return Table(path, columns, where, "line")


def _read_json(path: Path) -> Table:
    text = decode_utf8(path.read_bytes(), path)
    records: list[tuple[int, Any]] = []
    unit = "line"
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
        records = [(i + 1, r) for i, r in enumerate(data)]
        unit = "row"
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {lineno}: invalid JSON ({exc.msg}); expected one object per line"
                ) from None
    names: dict[str, None] = {}
    for pos, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{path}: {unit} {pos}: expected a JSON object, found {type(rec).__name__}")
        names.update(dict.fromkeys(rec))
    columns = {n: [rec.get(n) for _, rec in records] for n in names}
    return Table(path, columns, [pos for pos, _ in records], unit)


def _is_null(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return v is pd.NaT or v is pd.NA


def id_values(table: Table, col: str, role: str) -> list[str]:
    """An id column as non-empty strings; a null or empty id is a DataError naming the row."""
    out = []
    for i, v in enumerate(table.columns[col]):
        if isinstance(v, str):
            s = v.strip()
        elif _is_null(v) or isinstance(v, (bool, list, dict)):
            s = ""
        elif isinstance(v, numbers.Integral):
            s = str(int(v))
        elif isinstance(v, float) and v.is_integer():
            s = str(int(v))
        else:
            s = str(v).strip()
        if not s:
            raise DataError(f"{table.at(i)}: {role} column '{col}' is empty or null (got {v!r}); every row needs an id")
        out.append(s)
    return out


def text_value(v: Any) -> str:
    """A text field as a stripped string; nulls and missing-text literals ("NaN", "None", "null":
    ``is_missing_text``) are empty, lists are joined with ', '."""
    if _is_null(v):
        return ""
    if isinstance(v, (list, tuple)):
        return ", ".join(t for t in (text_value(x) for x in v) if t)
    s = (v if isinstance(v, str) else str(v)).strip()
    return "" if is_missing_text(s) else s


def to_epoch_seconds(v: Any) -> int | float | None:
    """int / float / ISO-8601 string / datetime -> epoch seconds: an int when whole, else a float
    (sub-second order is kept); None if null; ValueError if bad."""
    if _is_null(v):
        return None
    if isinstance(v, bool):
        raise ValueError("a boolean is not a timestamp")
    if isinstance(v, numbers.Integral):
        if not -(2**63) <= int(v) < 2**63:
            raise ValueError("out of the int64 range")
        return int(v)
    if isinstance(v, numbers.Real):
        f = float(v)
        if not math.isfinite(f):
            raise ValueError("not a finite number")
        return int(f) if f.is_integer() else f
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:  # naive datetimes are read as UTC
            v = v.replace(tzinfo=dt.timezone.utc)
        return to_epoch_seconds(v.timestamp())
    if isinstance(v, dt.date):
        return to_epoch_seconds(dt.datetime(v.year, v.month, v.day))
    if isinstance(v, str):
        s = v.strip()
        if not s:
            return None
        try:
            return int(s)
        except ValueError:
            pass
        try:
            return to_epoch_seconds(float(s))
        except ValueError:
            pass
        return to_epoch_seconds(dt.datetime.fromisoformat(s))
    raise ValueError(f"unsupported type {type(v).__name__}")


def check_template_field(name: str, path: Path) -> None:
    if not name or name.isdigit() or name != name.strip() or set(name) & _UNSAFE_FIELD_CHARS:
        raise DataError(
            f"{path}: text field {name!r} cannot be used in a text template (names must be non-numeric "
            f"and free of {''.join(sorted(_UNSAFE_FIELD_CHARS))}); rename the column or choose text_fields"
        )


def default_template(fields: list[str]) -> str:
    """The paper's Amazon template when title/brand/category exist, else every field joined by '. '."""
    if {"title", "brand", "category"} <= set(fields):
        return PAPER_TEMPLATE
    return ". ".join("{" + f + "}" for f in fields)


def _decode_error(path: Path, line: int, exc: UnicodeDecodeError) -> None:
    raise DataError(f"{path}: line {line}: bytes are not valid UTF-8 ({exc.reason}); expected UTF-8 text") from None


def _scan_csv(path: Path) -> None:
    scan_csv(path, _decode_error)


def interaction_rows(path: Path, user_id_col: str, item_id_col: str, timestamp_col: str | None) -> InteractionColumns:
    """The row reader of an interactions file (any suffix): the reference the column reader
    (``learn.data.columnar``) is tested against, and the path for JSON files."""
    tb = read_table(path)
    tb.require([user_id_col, item_id_col], "id")
    users = id_values(tb, user_id_col, "user id")
    items = id_values(tb, item_id_col, "item id")
    stamps = None
    if timestamp_col is not None and timestamp_col in tb.columns:
        values = []
        for i, v in enumerate(tb.columns[timestamp_col]):
            try:
                t = to_epoch_seconds(v)
            except (ValueError, OverflowError) as exc:
                raise DataError(
                    f"{tb.at(i)}: timestamp column '{timestamp_col}' value {v!r} is not a timestamp ({exc}); "
                    f"expected epoch seconds (int/float) or an ISO-8601 date/time"
                ) from None
            if t is None:
                raise DataError(
                    f"{tb.at(i)}: timestamp column '{timestamp_col}' is empty; every row needs a timestamp "
                    f"(or leave the column out entirely to use the row order)"
                )
            values.append(t)
        # whole seconds stay int64; any fraction makes the column float64 seconds (order kept)
        whole = all(isinstance(t, int) for t in values)
        stamps = np.asarray(values, dtype=np.int64 if whole else np.float64)
    return InteractionColumns(pd.Categorical(users), pd.Categorical(items), stamps, list(tb.columns), tb.at)


def read_files(
    items_path: str | Path,
    interactions_path: str | Path,
    *,
    item_id_col: str = "item_id",
    user_id_col: str = "user_id",
    timestamp_col: str | None = "timestamp",
    text_fields: list[str] | None = None,
    missing_text: str = "drop",
    name: str | None = None,
) -> RawDataset:
    """Read an items file and an interactions file into a RawDataset.

    text_fields: item columns that carry text (None or empty: every column except the id).
    timestamp_col: None, or a column the interactions file lacks, uses the row order as an
    ordinal timestamp (noted in ``source``). missing_text: "drop" removes items without text and
    the interactions on them (counted), "fail" makes them a DataError.
    """
    if missing_text not in ("drop", "fail"):
        raise DataError(f"missing_text must be 'drop' or 'fail', got {missing_text!r}")
    items_path, interactions_path = Path(items_path), Path(interactions_path)
    drops = DropReport()

    # ---- items
    it = read_table(items_path)
    it.require([item_id_col], "item id")
    fields = list(text_fields) if text_fields else [c for c in it.columns if c != item_id_col]
    if not fields:
        raise DataError(
            f"{items_path}: no text columns besides the id '{item_id_col}' (columns found: {list(it.columns)})"
        )
    it.require(fields, "text")
    if item_id_col in fields:
        raise DataError(f"{items_path}: the id column '{item_id_col}' cannot also be a text field")
    if "item_id" in fields:
        raise DataError(f"{items_path}: a text field may not be named 'item_id' (it is the id column's output name)")
    for f in fields:
        check_template_field(f, items_path)
    ids = id_values(it, item_id_col, "item id")
    texts = {f: [text_value(v) for v in it.columns[f]] for f in fields}
    rows = list(zip(*(texts[f] for f in fields)))

    first: dict[str, int] = {}
    keep: list[int] = []
    identical: list[str] = []
    for i, iid in enumerate(ids):
        j = first.get(iid)
        if j is None:
            first[iid] = i
            keep.append(i)
        elif rows[i] == rows[j]:
            identical.append(iid)
        else:
            diff = [f for f, a, b in zip(fields, rows[j], rows[i]) if a != b]
            raise DataError(
                f"{items_path}: item id '{iid}' appears twice with different text: {it.unit} {it.where[j]} and "
                f"{it.unit} {it.where[i]} differ in {diff}"
            )
    drops.add("duplicate_item_identical", len(identical), identical)

    no_text = [i for i in keep if not any(rows[i])]
    if no_text:
        if missing_text == "fail":
            i = no_text[0]
            raise DataError(
                f"{it.at(i)}: item '{ids[i]}' has no text (all of {fields} empty; {len(no_text)} such items); "
                f"set missing_text=drop to drop them"
            )
        drops.add("item_without_text", len(no_text), [ids[i] for i in no_text])
        empty = set(no_text)
        keep = [i for i in keep if i not in empty]
    items = pd.DataFrame({"item_id": [ids[i] for i in keep]}, dtype=object)
    for f in fields:
        items[f] = pd.Series([texts[f][i] for i in keep], dtype=object)

    # ---- interactions
    cols = read_interaction_columns(interactions_path, user_id_col, item_id_col, timestamp_col, to_epoch_seconds,
                                    _scan_csv)
    if cols is None:  # JSON, or a column type only the row reader handles
        cols = interaction_rows(interactions_path, user_id_col, item_id_col, timestamp_col)
    source = f"{items_path} + {interactions_path}"
    has_clock = cols.stamps is not None
    stamps = cols.stamps
    if stamps is None:
        # no clock in the file: the row order is the time order
        stamps = np.arange(len(cols), dtype=np.int64)
        note = "no timestamp column" if timestamp_col is None else f"no '{timestamp_col}' column"
        source += f" ({note}: timestamps are the row order)"
        log.warning("%s: %s; using the row order as timestamps", interactions_path, note)

    in_catalog = pd.Index(items["item_id"]).get_indexer(cols.items.categories) >= 0
    has_item = in_catalog[cols.items.codes]
    if not has_item.all():
        bad = np.flatnonzero(~has_item)
        if missing_text == "fail":
            i = int(bad[0])  # items without text already failed above: this one is not in the file
            raise DataError(
                f"{cols.where(i)}: interaction on item '{cols.items[i]}' which is not in the items file ({items_path}); "
                f"{len(bad)} such interactions; set missing_text=drop to drop them"
            )
        drops.add("interaction_item_without_text", len(bad), [cols.items[i] for i in bad[:5]])
    keep_rows = slice(None) if has_item.all() else has_item  # no copy of 20M rows when every row stays
    interactions = pd.DataFrame(
        {
            "user_id": cols.users[keep_rows],
            "item_id": cols.items[keep_rows],
            "timestamp": stamps[keep_rows],
        },
        copy=False,
    )
    del cols, stamps, has_item

    if name is None:
        parent = items_path.resolve().parent.name
        name = parent if items_path.stem == "items" and parent else items_path.stem
    return RawDataset(
        name=name,
        items=items,
        interactions=interactions,
        drops=drops,
        source=source,
        default_template=default_template(fields),
        has_clock=has_clock,
    )

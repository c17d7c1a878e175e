"""The interactions file read column-wise (Arrow), for logs of tens of millions of rows.

    cols = read_interaction_columns(path, user_col, item_col, ts_col)   # None: use the row reader

Only the three columns are read; ids become dictionary codes (int32 per row plus one string per
distinct id), timestamps one int64/float64 array, so 20M rows cost ~0.4 GiB instead of ~20M Python
objects per column. The semantics are those of the row reader in ``learn.data.files`` (the
reference, which tests compare against): ids are stripped strings (integers written as digits),
a null or empty id or timestamp is a DataError naming the file and the Parquet row (1-based) or
the CSV line, and timestamps are epoch seconds (int64 when every value is whole, else float64).
Cases the column reader does not handle itself (JSON files, float/bool/nested id columns, ISO-8601
date strings) fall back to the row reader or to a per-value pass over the timestamp column; CSV
files whose structure pyarrow rejects are scanned line by line to name the first bad line.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from learn.data.schema import DataError

COLUMNAR_SUFFIXES = (".parquet", ".csv")


class Unsupported(Exception):
    """The column reader cannot reproduce the row reader's semantics here: use the row reader."""


@dataclass
class InteractionColumns:
    users: pd.Categorical  # per row
    items: pd.Categorical  # per row
    stamps: np.ndarray | None  # per row; None when the file has no timestamp column
    columns: list[str]  # every column of the file
    where: Callable[[int], str]  # 0-based data row -> "path: line N" / "path: row N"

    def __len__(self) -> int:
        return len(self.users)


def read_interaction_columns(path: Path, user_col: str, item_col: str, timestamp_col: str | None,
                             to_epoch_seconds: Callable, csv_scan: Callable[[Path], None]) -> InteractionColumns | None:
    """The three columns of ``path``, or None where the row reader must do it (see the module doc).

    ``to_epoch_seconds`` is the row reader's converter (used for the values only it can parse and for
    the exact error text); ``csv_scan(path)`` raises the row reader's DataError for a malformed CSV."""
    suffix = path.suffix.lower()
    if suffix not in COLUMNAR_SUFFIXES:
        return None
    try:
        if suffix == ".parquet":
            table = _ParquetColumns(path)
            names = table.column_names
            where = lambda i: f"{path}: row {i + 1}"  # noqa: E731
        else:
            table, names, where = _csv(path, user_col, item_col, timestamp_col, csv_scan)
        if table.num_rows == 0:
            raise DataError(f"{path}: the file has no data rows")
        missing = [c for c in (user_col, item_col) if c not in names]
        if missing:
            raise DataError(f"{path}: missing id column(s) {missing}; columns found: {names}")
        users = _ids(table.column(user_col), user_col, "user id", where)
        items = _ids(table.column(item_col), item_col, "item id", where)
        stamps = None
        if timestamp_col is not None and timestamp_col in names:
            stamps = _stamps(table.column(timestamp_col), timestamp_col, where, to_epoch_seconds)
    except Unsupported:
        return None
    finally:
        pa.default_memory_pool().release_unused()  # the freed string columns back to the system
    return InteractionColumns(users, items, stamps, names, where)


class _ParquetColumns:
    """Reads one column at a time (a 20M-row id column is ~0.25 GiB as Arrow strings, freed once coded)."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path = path
        try:
            self.file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: cannot read as Parquet ({exc})") from None
        self.column_names = list(self.file.schema_arrow.names)
        self.num_rows = self.file.metadata.num_rows

    def column(self, name: str) -> pa.ChunkedArray:
        try:
            return self.file.read(columns=[name]).column(0)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{self.path}: cannot read column '{name}' as Parquet ({exc})") from None


def _csv(path: Path, user_col: str, item_col: str, ts_col: str | None,
         csv_scan: Callable[[Path], None]) -> tuple[pa.Table, list[str], Callable[[int], str]]:
    import pyarrow.csv as pacsv

    with open(path, "rb") as f:
        head = f.read(1 << 16)
    try:
        header = pacsv.read_csv(io.BytesIO(head.split(b"\n", 1)[0] + b"\n"),
                                read_options=pacsv.ReadOptions(use_threads=False)).column_names
    except pa.ArrowInvalid:
        csv_scan(path)
        raise Unsupported from None
    names = [h.strip() for h in header]
    if names != header or len(set(names)) != len(names):
        raise Unsupported  # padded or duplicate header names: the row reader words those errors
    wanted = [c for c in dict.fromkeys((user_col, item_col, ts_col)) if c is not None and c in names]
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=1 << 24),
            parse_options=pacsv.ParseOptions(newlines_in_values=False),
            convert_options=pacsv.ConvertOptions(
                include_columns=wanted, column_types={c: pa.string() for c in wanted},
                strings_can_be_null=True, null_values=[""]),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError):
        csv_scan(path)  # raises the row reader's error naming the line
        raise Unsupported from None
    if table.num_rows and _has_blank_lines(path):
        raise Unsupported  # blank lines shift the row -> line map: the row reader counts lines
    return table, names, lambda i: f"{path}: line {i + 2}"


def _has_blank_lines(path: Path) -> bool:
    """True if an empty line comes before a data line (pyarrow skips it, so line numbers would shift)."""
    seen_blank, prev_nl = False, False
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            if seen_blank and block.strip(b"\n"):
                return True
            at = 0 if prev_nl and block.startswith(b"\n") else block.find(b"\n\n")
            if at >= 0:
                seen_blank = True
                if block[at:].strip(b"\n"):
                    return True
            prev_nl = block.endswith(b"\n")
    return False


def _ids(col: pa.ChunkedArray, name: str, role: str, where: Callable[[int], str]) -> pd.Categorical:
    """An id column -> Categorical of stripped strings; a null or empty id is a DataError."""
    t = col.type
    if pa.types.is_dictionary(t):
        col = col.cast(t.value_type)
        t = t.value_type
    if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise Unsupported  # float / bool / nested ids: the row reader's rules
    if len(col) == 0:
        return pd.Categorical([])
    value_type = t
    # one hash pass over the whole column, chunk by chunk: the chunks share one dictionary, and the
    # column is never combined into one copy (at 20M rows that copy was the read's peak)
    encoded = pc.dictionary_encode(col)
    del col
    dictionary = encoded.chunk(encoded.num_chunks - 1).dictionary
    codes = np.concatenate([chunk.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
                            for chunk in encoded.chunks])
    del encoded
    if len(codes) and codes.max() >= len(dictionary):  # the kernel's contract: one dictionary for all chunks
        raise RuntimeError("pyarrow dictionary_encode returned chunks with different dictionaries")
    if pa.types.is_integer(value_type):
        values = pc.cast(dictionary, pa.string())
    elif pa.types.is_string(value_type) or pa.types.is_large_string(value_type):
        values = pc.utf8_trim_whitespace(dictionary)
    else:
        raise Unsupported
    values = np.asarray(values.to_pylist(), dtype=object)
    empty = np.flatnonzero(values == "")
    bad = (codes < 0) | (np.isin(codes, empty) if len(empty) else False)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        got = None if codes[i] < 0 else dictionary[int(codes[i])].as_py()
        raise DataError(f"{where(i)}: {role} column '{name}' is empty or null (got {got!r}); every row needs an id")
    # stripping can merge dictionary entries (" a" and "a"): re-factorise the distinct values
    merged, categories = pd.factorize(values)
    return pd.Categorical.from_codes(merged[codes].astype(np.int32), categories=pd.Index(categories, dtype=object))


def _stamps(col: pa.ChunkedArray, name: str, where: Callable[[int], str], to_epoch_seconds: Callable) -> np.ndarray:
    t = col.type
    nulls = col.is_null()
    if pc.any(nulls).as_py():
        i = int(pc.index(nulls, True).as_py())
        raise DataError(f"{where(i)}: timestamp column '{name}' is empty; every row needs a timestamp "
                        f"(or leave the column out entirely to use the row order)")
    if pa.types.is_integer(t):
        return col.to_numpy().astype(np.int64)
    if pa.types.is_floating(t):
        return _floats(col.to_numpy().astype(np.float64), col, name, where, to_epoch_seconds)
    if pa.types.is_timestamp(t):
        per_s = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[t.unit]
        raw = pc.cast(col, pa.int64()).to_numpy()  # UTC (naive values are read as UTC)
        whole, frac = np.divmod(raw, per_s)
        return whole if not frac.any() else raw / per_s
    if pa.types.is_date(t):
        return pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64()).to_numpy()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        text = pc.utf8_trim_whitespace(col)
        blank = pc.equal(text, "")
        if pc.any(blank).as_py():
            i = int(pc.index(blank, True).as_py())
            raise DataError(f"{where(i)}: timestamp column '{name}' is empty; every row needs a timestamp "
                            f"(or leave the column out entirely to use the row order)")
        try:
            return pc.cast(text, pa.int64()).to_numpy()
        except pa.ArrowInvalid:
            pass
        try:
            return _floats(pc.cast(text, pa.float64()).to_numpy(), col, name, where, to_epoch_seconds)
        except pa.ArrowInvalid:
            pass
        return _per_value(col, name, where, to_epoch_seconds)  # ISO-8601 dates, mixed forms
    raise Unsupported  # bool and other types: the row reader names the row and the reason


def _floats(f: np.ndarray, col: pa.ChunkedArray, name: str, where, to_epoch_seconds) -> np.ndarray:
    bad = ~np.isfinite(f)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        _raise_bad(col, i, name, where, to_epoch_seconds)
    whole = np.floor(f) == f
    return f.astype(np.int64) if whole.all() and (np.abs(f) < 2**63).all() else f


def _per_value(col: pa.ChunkedArray, name: str, where, to_epoch_seconds) -> np.ndarray:
    """The row reader's converter over the column, a chunk at a time (bounded memory)."""
    parts, all_int, row = [], True, 0
    for chunk in col.chunks:
        for lo in range(0, len(chunk), 1 << 20):
            values = chunk.slice(lo, 1 << 20).to_pylist()
            out = []
            for j, v in enumerate(values):
                try:
                    out.append(to_epoch_seconds(v))
                except (ValueError, OverflowError):
                    _raise_bad(col, row + j, name, where, to_epoch_seconds)
            all_int &= all(isinstance(x, int) for x in out)
            parts.append(np.asarray(out, dtype=np.float64 if not all(isinstance(x, int) for x in out) else np.int64))
            row += len(values)
    stamps = np.concatenate(parts)
    return stamps.astype(np.int64) if all_int else stamps.astype(np.float64)


def _raise_bad(col: pa.ChunkedArray, i: int, name: str, where, to_epoch_seconds) -> None:
    v = col[i].as_py()
    try:
        parsed = to_epoch_seconds(v)
        reason = "not a timestamp"
    except (ValueError, OverflowError) as exc:
        parsed, reason = v, str(exc)
    if parsed is None:  # "nan" and the like are missing values to the row reader
        raise DataError(f"{where(i)}: timestamp column '{name}' is empty; every row needs a timestamp "
                        f"(or leave the column out entirely to use the row order)")
    raise DataError(f"{where(i)}: timestamp column '{name}' value {v!r} is not a timestamp ({reason}); "
                    f"expected epoch seconds (int/float) or an ISO-8601 date/time")


def scan_csv(path: Path, decode_error: Callable[[Path, int, UnicodeDecodeError], None]) -> None:
    """Walk a CSV file as the row reader does, without keeping its rows, and raise the row reader's
    DataError at the first bad line (malformed quoting, a wrong field count, bad UTF-8)."""
    with open(path, "rb") as raw:  # bad UTF-8 first: the physical line of the first bad byte
        for lineno, line in enumerate(raw, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                decode_error(path, lineno, exc)
                return
    with open(path, "rb") as raw:
        stream = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        reader = csv.reader(stream)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: the file is empty (expected a header line)") from None
        except UnicodeDecodeError as exc:
            decode_error(path, 1, exc)
            return
        except csv.Error as exc:
            raise DataError(f"{path}: line 1: malformed CSV header ({exc})") from None
        prev = reader.line_num
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as exc:
                decode_error(path, prev + 1, exc)
                return
            except csv.Error as exc:
                raise DataError(f"{path}: line {prev + 1}: malformed CSV ({exc})") from None
            start, prev = prev + 1, reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                raise DataError(f"{path}: line {start}: expected {len(header)} fields "
                                f"({[h.strip() for h in header]}), found {len(row)}")

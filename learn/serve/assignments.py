"""The assignment log: one row per answer of the online service, as Parquet part files.

    log = AssignmentLog("runs/assignments", flush_rows=5000, flush_s=10.0)
    log.append([{"time_ms": ..., "request_id": ..., "user_hash": ..., "variant": "champion",
                 "model_version": "3", "k": 10, "exclude_history": False, "n_history": 4,
                 "n_unknown": 0, "item_ids": ["i1", "i9"]}])
    log.close()                                   # writes what is left
    table = read_assignments("runs/assignments")  # every part, one Arrow table
    summary = summarize(table)                    # per-variant counts, overlap of the lists
    exposures(table)                              # one row per (request, rank, item): join with clicks

Layout: ``<dir>/date=YYYY-MM-DD/part-<UTC time>-<writer>-<seq>.parquet`` (one directory per UTC
day: the log rotates daily; ``keep_days`` > 0 deletes day directories older than that). Rows are
buffered in memory and written as one new part every ``flush_rows`` rows or ``flush_s`` seconds,
whichever comes first, by a background thread, so an answer never waits on the disk. Each part is
written to a hidden temp file in its day directory and renamed into place: a reader sees whole
parts only, never a half-written file. Every writer (one per service replica) names its parts with
its own id, so replicas never write the same file. A part is never appended to or rewritten.

Columns (``SCHEMA``): ``time`` (UTC, ms), ``request_id`` (also the answer's ``x-request-id``
header), ``user_hash`` (the salted hash of the user id, :func:`learn.serve.routing.user_hash`;
null for a request without a user id), ``variant``, ``model_version``, ``k``, ``exclude_history``,
``n_history`` (ids in the request), ``n_unknown`` (ids not in the served catalog) and ``item_ids``
(the returned list, best first). Raw user ids are never written.

If a write fails (a full disk, say) the rows stay buffered and are retried on the next flush; past
``10 x flush_rows`` buffered rows the oldest are dropped and counted (``dropped_rows``), so a broken
disk cannot exhaust the service's memory.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from learn.serve.routing import VARIANTS
from learn.utils import atomic_path

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("time", pa.timestamp("ms", tz="UTC")),
    ("request_id", pa.string()),
    ("user_hash", pa.string()),
    ("variant", pa.string()),
    ("model_version", pa.string()),
    ("k", pa.int32()),
    ("exclude_history", pa.bool_()),
    ("n_history", pa.int32()),
    ("n_unknown", pa.int32()),
    ("item_ids", pa.list_(pa.string())),
])
ROW_KEYS = ("time_ms", "request_id", "user_hash", "variant", "model_version", "k", "exclude_history",
            "n_history", "n_unknown", "item_ids")
DAY_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
PART = re.compile(r"^part-.+\.parquet$")
BUFFER_FACTOR = 10  # rows kept when writes fail: this many flushes' worth


class AssignmentLogError(ValueError):
    """An assignment log directory that is missing, empty or holds a malformed part."""


def _writer_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _day(time_ms: int) -> str:
    return datetime.fromtimestamp(time_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d")


def _to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    columns = {key: [row[key] for row in rows] for key in ROW_KEYS}
    arrays = [pa.array(columns["time_ms"], type=pa.int64()).cast(SCHEMA.field("time").type)]
    arrays += [pa.array(columns[key], type=SCHEMA.field(key).type) for key in ROW_KEYS[1:]]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


class AssignmentLog:
    """Buffered, rotated, atomically written Parquet log of the service's answers (module docstring)."""

    def __init__(self, directory: str | Path, flush_rows: int = 5000, flush_s: float = 10.0, keep_days: int = 0,
                 writer_id: str | None = None) -> None:
        if isinstance(flush_rows, bool) or not isinstance(flush_rows, int) or flush_rows < 1:
            raise ValueError(f"flush_rows must be an int >= 1, got {flush_rows!r}")
        if not flush_s > 0:
            raise ValueError(f"flush_s must be > 0, got {flush_s!r}")
        if isinstance(keep_days, bool) or not isinstance(keep_days, int) or keep_days < 0:
            raise ValueError(f"keep_days must be an int >= 0 (0: keep every day), got {keep_days!r}")
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.flush_rows, self.flush_s, self.keep_days = flush_rows, float(flush_s), keep_days
        self.writer_id = writer_id or _writer_id()
        self.rows_written = 0
        self.parts_written = 0
        self.dropped_rows = 0
        self._buffer: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # guards _buffer and the counters
        self._write_lock = threading.Lock()  # one flush at a time (the thread, close, a caller)
        self._seq = 0
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="assignment-log", daemon=True)
        self._thread.start()

    # -- writing --------------------------------------------------------------------------------
    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Buffer answers (dicts with the keys ``ROW_KEYS``); never touches the disk."""
        if self._closed.is_set():
            raise RuntimeError(f"the assignment log {self.directory} is closed")
        for row in rows:
            missing = [key for key in ROW_KEYS if key not in row]
            if missing:
                raise ValueError(f"assignment row lacks {missing}: {row!r}")
        with self._lock:
            self._buffer.extend(rows)
            full = len(self._buffer) >= self.flush_rows
        if full:
            self._wake.set()

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.flush_s)
            self._wake.clear()
            if self._closed.is_set():
                break
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the thread must survive a bad disk; flush logged it
                pass

    def flush(self) -> int:
        """Write every buffered row now (parts of at most ``flush_rows`` rows, one per UTC day);
        returns the rows written. On a failed write the rows go back to the buffer."""
        with self._write_lock:
            with self._lock:
                rows, self._buffer = self._buffer, []
            if not rows:
                return 0
            written = 0
            try:
                by_day: dict[str, list[dict[str, Any]]] = {}
                for row in rows:
                    by_day.setdefault(_day(int(row["time_ms"])), []).append(row)
                for day, day_rows in sorted(by_day.items()):
                    for start in range(0, len(day_rows), self.flush_rows):
                        chunk = day_rows[start:start + self.flush_rows]
                        self._write_part(day, chunk)
                        written += len(chunk)
            except Exception as exc:
                self._requeue(rows, written, exc)
                raise
            with self._lock:
                self.rows_written += written
            self._expire()
            return written

    def _write_part(self, day: str, rows: list[dict[str, Any]]) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        self._seq += 1
        path = self.directory / f"date={day}" / f"part-{stamp}-{self.writer_id}-{self._seq:06d}.parquet"
        table = _to_table(rows)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        with self._lock:
            self.parts_written += 1
        return path

    def _requeue(self, rows: list[dict[str, Any]], written: int, exc: Exception) -> None:
        """Put back what a failed flush did not write (rows are written in day order, so the
        unwritten ones are those after the first ``written`` of that order), oldest dropped past the cap."""
        by_day: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_day.setdefault(_day(int(row["time_ms"])), []).append(row)
        pending = [row for _, day_rows in sorted(by_day.items()) for row in day_rows][written:]
        cap = BUFFER_FACTOR * self.flush_rows
        with self._lock:
            self.rows_written += written
            self._buffer = pending + self._buffer
            over = len(self._buffer) - cap
            if over > 0:
                self._buffer = self._buffer[over:]
                self.dropped_rows += over
            kept, dropped = len(self._buffer), self.dropped_rows
        log.error("assignment log: writing to %s failed (%s); %d rows kept for the next flush, %d dropped so far",
                  self.directory, exc, kept, dropped)

    def _expire(self) -> None:
        if not self.keep_days:
            return
        oldest = (datetime.now(timezone.utc) - timedelta(days=self.keep_days)).strftime("%Y-%m-%d")
        for child in self.directory.iterdir():
            match = DAY_DIR.match(child.name)
            if match and child.is_dir() and match[1] < oldest:
                shutil.rmtree(child, ignore_errors=True)

    def close(self) -> None:
        """Stop the flush thread and write what is buffered; idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=30)
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - already logged; nothing more can be done at shutdown
            pass

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"rows_buffered": len(self._buffer), "rows_written": self.rows_written,
                    "parts_written": self.parts_written, "dropped_rows": self.dropped_rows}


# -- reading ------------------------------------------------------------------------------------
def part_files(directory: str | Path) -> list[Path]:
    """Every finished part under ``directory`` (hidden temp files excluded), in name order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AssignmentLogError(f"assignment log directory {directory} does not exist")
    return sorted(p for d in directory.iterdir() if DAY_DIR.match(d.name) and d.is_dir()
                  for p in d.iterdir() if PART.match(p.name) and p.is_file())


def read_assignments(directory: str | Path) -> pa.Table:
    """All parts of the log as one table with ``SCHEMA``; AssignmentLogError naming a bad part."""
    parts = part_files(directory)
    if not parts:
        raise AssignmentLogError(f"assignment log directory {directory} holds no parts "
                                 f"(date=YYYY-MM-DD/part-*.parquet); has the service answered and flushed?")
    tables = []
    for path in parts:
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise AssignmentLogError(f"{path}: not readable Parquet: {exc}") from exc
        if not table.schema.equals(SCHEMA):
            raise AssignmentLogError(f"{path}: schema {table.schema} is not the assignment log's {SCHEMA}")
        tables.append(table)
    return pa.concat_tables(tables)


def exposures(table: pa.Table) -> pa.Table:
    """One row per returned item: time, request_id, user_hash, variant, model_version, rank (1 =
    best) and item_id, ready to join with click data on (user_hash, item_id)."""
    lists = table.column("item_ids").combine_chunks()
    parent = pc.list_parent_indices(lists)
    offsets = lists.offsets.to_numpy()
    starts = np.repeat(offsets[:-1], np.diff(offsets))
    rank = np.arange(len(parent), dtype=np.int64) - starts + 1
    taken = table.select(["time", "request_id", "user_hash", "variant", "model_version"]).take(parent)
    return taken.append_column("rank", pa.array(rank.astype(np.int32))).append_column("item_id", pc.list_flatten(lists))


def summarize(table: pa.Table) -> dict[str, Any]:
    """Per variant: ``requests``, ``users`` (distinct hashes), ``anonymous`` requests, ``versions``
    ({version: requests}), ``items`` (distinct items returned), ``mean_list_length``; overall:
    ``requests``, ``first_time``/``last_time``, ``users_in_both_variants`` (0 unless the salt or the
    share changed while logging), ``challenger_user_share``, and the overlap of the two variants'
    lists: ``items_both``, ``item_jaccard`` (distinct items returned by both / by either) and
    ``exposure_overlap`` (sum over items of the smaller of the two variants' shares of list slots:
    1 when both hand out the same items equally often, 0 when they share none)."""
    variant = table.column("variant").to_pylist()
    users = table.column("user_hash").to_pylist()
    versions = table.column("model_version").to_pylist()
    lists = table.column("item_ids").to_pylist()
    times = table.column("time")
    out: dict[str, Any] = {"requests": table.num_rows,
                           "first_time": str(pc.min(times).as_py()) if table.num_rows else None,
                           "last_time": str(pc.max(times).as_py()) if table.num_rows else None,
                           "variants": {}}
    slots: dict[str, dict[str, int]] = {}
    user_sets: dict[str, set[str]] = {}
    order = {v: i for i, v in enumerate(VARIANTS)}
    for name in sorted(set(variant) | set(VARIANTS), key=lambda v: (order.get(v, len(order)), v)):
        rows = [i for i, v in enumerate(variant) if v == name]
        counts: dict[str, int] = {}
        for i in rows:
            for item in lists[i]:
                counts[item] = counts.get(item, 0) + 1
        slots[name] = counts
        user_sets[name] = {users[i] for i in rows if users[i] is not None}
        by_version: dict[str, int] = {}
        for i in rows:
            by_version[versions[i]] = by_version.get(versions[i], 0) + 1
        out["variants"][name] = {
            "requests": len(rows), "users": len(user_sets[name]),
            "anonymous": sum(1 for i in rows if users[i] is None),
            "versions": dict(sorted(by_version.items(), key=lambda kv: (len(kv[0]), kv[0]))),
            "items": len(counts),
            "mean_list_length": float(np.mean([len(lists[i]) for i in rows])) if rows else 0.0,
        }
    a, b = slots.get(VARIANTS[0], {}), slots.get(VARIANTS[1], {})
    both = set(a) & set(b)
    either = set(a) | set(b)
    total_a, total_b = sum(a.values()), sum(b.values())
    overlap = sum(min(a[i] / total_a, b[i] / total_b) for i in both) if total_a and total_b else float("nan")
    all_users = set().union(*user_sets.values()) if user_sets else set()
    out.update({
        "users_in_both_variants": len(user_sets.get(VARIANTS[0], set()) & user_sets.get(VARIANTS[1], set())),
        "challenger_user_share": (len(user_sets.get(VARIANTS[1], set())) / len(all_users)) if all_users else float("nan"),
        "items_both": len(both),
        "item_jaccard": len(both) / len(either) if a and b else float("nan"),  # NaN: a variant returned nothing
        "exposure_overlap": overlap,
    })
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """A short table of :func:`summarize`'s result."""
    lines = [f"{summary['requests']} answers logged, {summary['first_time']} .. {summary['last_time']}",
             f"{'variant':<12}{'requests':>10}{'users':>9}{'anonymous':>11}{'items':>8}{'mean len':>10}  versions"]
    for name, v in summary["variants"].items():
        versions = ", ".join(f"v{ver}: {n}" for ver, n in v["versions"].items()) or "-"
        lines.append(f"{name:<12}{v['requests']:>10}{v['users']:>9}{v['anonymous']:>11}{v['items']:>8}"
                     f"{v['mean_list_length']:>10.2f}  {versions}")
    lines.append(f"challenger share of users {summary['challenger_user_share']:.4f}; users under both variants "
                 f"{summary['users_in_both_variants']}")
    lines.append(f"list overlap: {summary['items_both']} items returned by both, item Jaccard "
                 f"{summary['item_jaccard']:.4f}, exposure overlap {summary['exposure_overlap']:.4f}")
    return "\n".join(lines)

"""The assignment log: batched part files, one directory per UTC day, atomic writes, reading back,
the per-variant summary and the exposure table."""

import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from learn.serve.assignments import (SCHEMA, AssignmentLog, AssignmentLogError, exposures, format_summary,
                                     part_files, read_assignments, summarize)

DAY_MS = 86_400_000


def row(i: int, variant: str = "champion", time_ms: int | None = None, user: str | None = "u", items=None) -> dict:
    return {"time_ms": int(time.time() * 1000) if time_ms is None else time_ms, "request_id": f"r{i}",
            "user_hash": None if user is None else f"{user}{i % 7}", "variant": variant, "model_version": "1",
            "k": 3, "exclude_history": False, "n_history": 2, "n_unknown": 0,
            "item_ids": items if items is not None else [f"i{i % 5}", f"i{(i + 1) % 5}"]}


def test_rows_are_flushed_in_parts_of_at_most_flush_rows(tmp_path):
    log = AssignmentLog(tmp_path / "log", flush_rows=4, flush_s=3600, writer_id="w1")
    log.append([row(i) for i in range(3)])
    assert part_files(tmp_path / "log") == []  # below flush_rows, before flush_s: still in memory
    log.append([row(i) for i in range(3, 10)])
    deadline = time.time() + 10
    while log.stats()["rows_written"] < 8 and time.time() < deadline:  # the thread writes the full batches
        time.sleep(0.05)
    assert log.stats()["rows_written"] >= 4
    log.close()
    parts = part_files(tmp_path / "log")
    assert sum(pq.read_metadata(p).num_rows for p in parts) == 10
    assert all(pq.read_metadata(p).num_rows <= 4 for p in parts)
    assert all(p.parent.name.startswith("date=") and "-w1-" in p.name for p in parts)
    table = read_assignments(tmp_path / "log")
    assert table.schema.equals(SCHEMA)
    assert sorted(table.column("request_id").to_pylist()) == sorted(f"r{i}" for i in range(10))
    assert not list((tmp_path / "log").rglob(".*"))  # no temp file left behind
    with pytest.raises(RuntimeError, match="closed"):
        log.append([row(0)])


def test_time_flush_and_daily_rotation(tmp_path):
    log = AssignmentLog(tmp_path / "log", flush_rows=1000, flush_s=0.2)
    now = int(time.time() * 1000)
    log.append([row(0, time_ms=now - DAY_MS), row(1, time_ms=now)])
    deadline = time.time() + 10
    while log.stats()["rows_written"] < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert log.stats()["rows_written"] == 2  # written by the timer, with no close
    days = sorted(p.parent.name for p in part_files(tmp_path / "log"))
    fmt = lambda ms: datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("date=%Y-%m-%d")  # noqa: E731
    assert days == sorted([fmt(now - DAY_MS), fmt(now)])
    log.close()


def test_keep_days_deletes_old_day_directories(tmp_path):
    old = tmp_path / "log" / "date=2001-01-01"
    old.mkdir(parents=True)
    (old / "part-x.parquet").write_bytes(b"")
    log = AssignmentLog(tmp_path / "log", flush_rows=10, flush_s=3600, keep_days=3)
    log.append([row(0)])
    log.close()
    assert not old.exists() and len(part_files(tmp_path / "log")) == 1


def test_a_failed_write_keeps_the_rows_and_bounds_the_buffer(tmp_path, monkeypatch):
    log = AssignmentLog(tmp_path / "log", flush_rows=2, flush_s=3600)
    real = AssignmentLog._write_part
    monkeypatch.setattr(AssignmentLog, "_write_part", lambda self, day, rows: (_ for _ in ()).throw(OSError("disk full")))
    log._wake.set = lambda: None  # no background flush: this test drives every flush itself
    log.append([row(i) for i in range(5)])
    with pytest.raises(OSError, match="disk full"):
        log.flush()
    assert log.stats()["rows_buffered"] == 5 and log.stats()["dropped_rows"] == 0
    log.append([row(i) for i in range(5, 30)])  # 30 rows against a cap of 10 x 2
    with pytest.raises(OSError):
        log.flush()
    assert log.stats()["rows_buffered"] == 20 and log.stats()["dropped_rows"] == 10
    monkeypatch.setattr(AssignmentLog, "_write_part", real)
    del log._wake.set  # the Event's own method again, so close() wakes the thread
    assert log.flush() == 20
    log.close()
    ids = read_assignments(tmp_path / "log").column("request_id").to_pylist()
    assert sorted(ids, key=lambda r: int(r[1:])) == [f"r{i}" for i in range(10, 30)]  # the oldest were dropped


def test_summary_counts_variants_users_versions_and_overlap(tmp_path):
    log = AssignmentLog(tmp_path / "log", flush_rows=100, flush_s=3600)
    rows = [row(i, "champion", items=["a", "b"]) for i in range(6)]
    rows += [row(i, "challenger", user="c", items=["b", "c"]) for i in range(6, 9)]
    rows += [row(9, "champion", user=None, items=["a"])]
    rows[0]["model_version"] = "2"
    log.append(rows)
    log.close()
    table = read_assignments(tmp_path / "log")
    s = summarize(table)
    champ, chal = s["variants"]["champion"], s["variants"]["challenger"]
    assert s["requests"] == 10
    assert (champ["requests"], champ["anonymous"], champ["users"]) == (7, 1, 6)
    assert champ["versions"] == {"1": 6, "2": 1}
    assert (chal["requests"], chal["users"], chal["items"]) == (3, 3, 2)
    assert s["items_both"] == 1 and s["item_jaccard"] == pytest.approx(1 / 3)
    # champion slots: a 7/13, b 6/13; challenger: b 1/2, c 1/2 -> overlap min(6/13, 1/2)
    assert s["exposure_overlap"] == pytest.approx(6 / 13)
    assert s["users_in_both_variants"] == 0 and s["challenger_user_share"] == pytest.approx(3 / 9)
    text = format_summary(s)
    assert "champion" in text and "exposure overlap 0.4615" in text

    exp = exposures(table)
    assert exp.num_rows == sum(len(r["item_ids"]) for r in rows)
    assert exp.column_names == ["time", "request_id", "user_hash", "variant", "model_version", "rank", "item_id"]
    first = [(r, i) for q, r, i in zip(exp.column("request_id").to_pylist(), exp.column("rank").to_pylist(),
                                       exp.column("item_id").to_pylist()) if q == "r6"]
    assert first == [(1, "b"), (2, "c")]


def test_reading_a_missing_empty_or_foreign_log_names_it(tmp_path):
    with pytest.raises(AssignmentLogError, match="does not exist"):
        read_assignments(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssignmentLogError, match="holds no parts"):
        read_assignments(tmp_path / "empty")
    bad = tmp_path / "bad" / "date=2026-01-01"
    bad.mkdir(parents=True)
    (bad / "part-1.parquet").write_bytes(b"not parquet")
    with pytest.raises(AssignmentLogError, match="part-1.parquet: not readable"):
        read_assignments(tmp_path / "bad")
    with pytest.raises(ValueError, match="lacks"):
        AssignmentLog(tmp_path / "x").append([{"variant": "champion"}])
    with pytest.raises(ValueError, match="flush_rows"):
        AssignmentLog(tmp_path / "y", flush_rows=0)


def test_parts_are_whole_files_while_writing(tmp_path):
    """Readers only ever see complete parts: each is renamed into place after it is written."""
    log = AssignmentLog(tmp_path / "log", flush_rows=50, flush_s=3600)
    seen = []
    for batch in range(5):
        log.append([row(batch * 50 + i) for i in range(50)])
        log.flush()
        seen.append(read_assignments(tmp_path / "log").num_rows)
    log.close()
    assert seen == [50, 100, 150, 200, 250]
    assert isinstance(part_files(tmp_path / "log")[0], Path)

"""Small shared helpers: atomic writes, hashing, seeding, timing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``target``; rename it onto ``target`` only if the block succeeds.

    A reader never sees a half-written file: either the old one or the new one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should read like any written file
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class StageTimer:
    """Wall time, CPU time (this process, all threads) and peak RSS per pipeline stage:
    ``with timer("embed"): ...``; ``timer.seconds``, ``timer.stages`` ({stage: {wall_s, cpu_s,
    peak_rss_gb}}). The peak is sampled every ``interval_s`` by a daemon thread while a stage runs."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.seconds: dict[str, float] = {}
        self.stages: dict[str, dict[str, float]] = {}
        self.interval_s = interval_s

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        import threading

        start, cpu = time.perf_counter(), time.process_time()
        peak = [rss_bytes()]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(self.interval_s):
                peak[0] = max(peak[0], rss_bytes())

        sampler = threading.Thread(target=sample, name=f"rss-{name}", daemon=True)
        sampler.start()
        try:
            yield
        finally:
            done.set()
            sampler.join()
            peak[0] = max(peak[0], rss_bytes())
            wall = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + wall
            row = self.stages.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_gb": 0.0})
            row["wall_s"] += wall
            row["cpu_s"] += time.process_time() - cpu
            row["peak_rss_gb"] = max(row["peak_rss_gb"], peak[0] / 2**30)

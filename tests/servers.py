"""Helpers for tests that start a real server (mlflow server, a Ray head) as their own process group."""

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """n distinct ports on 127.0.0.1 that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout_s: float) -> None:
    """Poll ``url`` until the server answers (any HTTP status: 401 means it is up behind auth)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_process_group(proc)
            raise RuntimeError(f"{what} did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM the process's own session (started with start_new_session=True), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

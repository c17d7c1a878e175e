"""Helpers for tests that start a real server (mlflow server, a Ray head) as their own process group."""

import os
import signal
import socket
import subprocess
import sys
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


def start_mlflow_server(root: Path, timeout_s: float = 90) -> tuple[str, subprocess.Popen]:
    """`mlflow server` on 127.0.0.1 in its own session, its sqlite store, artifacts and log under
    ``root``; returns (url, process) once it answers. Stop it with ``stop_process_group``."""
    root.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
             "--artifacts-destination", str(root / "served-artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", proc, root / "server.log", "mlflow server", timeout_s)
    return url, proc



def listening_sockets(pgids: list[int]) -> list[tuple[str, int, str, int]]:
    """(process name, pid, address, port) of every listening TCP socket held by the processes in the
    process groups ``pgids`` and all their descendants (Ray workers start groups of their own)."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in pgids:
                procs.update({q.pid: q for q in [p, *p.children(recursive=True)]})
        except (psutil.Error, ProcessLookupError):
            continue
    found = []
    for p in procs.values():
        try:
            name, sockets = p.name(), p.net_connections(kind="tcp")
        except psutil.Error:
            continue
        found += [(name, p.pid, s.laddr.ip, s.laddr.port) for s in sockets if s.status == psutil.CONN_LISTEN]
    return sorted(found)



def assert_loopback_only(pgids: list[int], expected_ports: set[int]) -> None:
    """Every listening TCP socket of the started servers (their groups and descendants, workers
    included) is bound to loopback; ``expected_ports`` are among them (so the check saw the servers)."""
    sockets = listening_sockets(pgids)
    assert expected_ports <= {port for *_, port in sockets}, sockets
    exposed = [f"{name} (pid {pid}) on {ip}:{port}" for name, pid, ip, port in sockets if not _is_loopback(ip)]
    assert not exposed, f"listening beyond loopback: {exposed}"


def _is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback address (::ffff:127.0.0.1)."""
    import ipaddress

    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)

"""Keep Ray Serve's HAProxy on loopback on a loopback-only node (the local Ray flows/serve.py starts).

Ray Serve 2.60 writes HAProxy's Prometheus frontend (``bind :9101``) and its stats page
(``bind *:8404``) on every interface, whatever ``serve.host`` says. On a node whose address is
127.0.0.1 this module's :func:`keep_haproxy_on_loopback`, run in each Ray worker process as its
``worker_process_setup_hook`` (learn/serve/app.py ``start``), rewrites those two binds to 127.0.0.1
in the template the HAProxy manager renders. Elsewhere (a cluster, whose pods are reached on their
pod address) it changes nothing. Kept apart from learn.serve.app so that every worker pays only for
importing Serve's HAProxy module, and only when HAProxy is on.
"""

from __future__ import annotations

import os

# Ray Serve 2.60's template lines for the two listeners, and their loopback form
REBINDS = (("bind :{{ config.metrics_port }}", "bind 127.0.0.1:{{ config.metrics_port }}"),
           ("bind *:{{ config.stats_port }}", "bind 127.0.0.1:{{ config.stats_port }}"))


# listeners Ray Serve opens on fixed ports by default (8500, 8404, 9101): HAProxy's fallback Python
# proxy (for when no replica is up), its stats page and its metrics
FIXED_PORTS = ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now, taken just below the kernel's ephemeral range: a port chosen now
    and bound later (HAProxy's stats and metrics ports, when Serve starts) could otherwise be taken in
    between by an outgoing connection, which only ever gets ephemeral ports (port 0 would give one)."""
    import random
    import socket

    low = ephemeral_port_low()
    for port in random.SystemRandom().sample(range(max(1024, low - 8000), low), 64):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # all 64 taken: an ephemeral one, as before
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ephemeral_port_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768, Linux's default, elsewhere)."""
    try:
        with open(path, encoding="ascii") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def use_free_serve_ports() -> None:
    """Give each of FIXED_PORTS a free loopback port (what is set already stays), before a local Ray
    starts, so that two local services (or the tests' and a flow's) do not clash on them."""
    for key in FIXED_PORTS:
        if key not in os.environ:
            os.environ[key] = str(free_loopback_port())


def loopback_template(template: str) -> str:
    """``template`` with the metrics and stats listeners bound to 127.0.0.1 (ValueError when a line
    this expects is missing: a Ray upgrade changed the template, and the check must be redone)."""
    for old, new in REBINDS:
        if old not in template and new not in template:
            raise ValueError(f"Ray Serve's HAProxy template has no {old!r} line: check its listeners by hand")
        template = template.replace(old, new)
    return template


def keep_haproxy_on_loopback() -> None:
    """Ray worker setup hook: on a 127.0.0.1 node with HAProxy on, patch the template (see module doc)."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return
    import ray

    if ray.util.get_node_ip_address() != "127.0.0.1":
        return
    from ray.serve._private import haproxy

    haproxy.HAPROXY_CONFIG_TEMPLATE = loopback_template(haproxy.HAPROXY_CONFIG_TEMPLATE)

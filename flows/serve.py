"""Online retrieval with A/B routing: serve the registered retriever's champion and challenger.

    python flows/serve.py --config conf/default.yaml [serve.port=8000 serve.challenger_share=0.1 ...]
    ray job submit --working-dir . -- python flows/serve.py --config conf/default.yaml      # on a cluster
    curl -s 127.0.0.1:8000/recommend -d '{"user_id": "u1", "history": ["D000001", "D000002"], "k": 10}'
    curl -s 127.0.0.1:8000/healthz

This flow:

1. builds the service settings from the config: the registered model
   (``tracking.registered_model`` in the store ``tracking.tracking_uri``), the routing share and salt,
   the alias poll period, the assignment log directory and the request limits (``serve.*``);
2. connects to Ray (``$RAY_ADDRESS``, else a local instance whose listeners stay on 127.0.0.1),
   starts Ray Serve's HTTP ingress (HAProxy, learn.serve.SERVE_RAY_ENV) on ``serve.host``:``serve.port``
   (127.0.0.1 unless told otherwise)
   and deploys the application of learn/serve/app.py: ``models:/<name>@champion`` and, when it
   exists and differs, ``@challenger``, each loaded with ``mlflow.pyfunc.load_model``;
3. waits for ``/healthz``, prints the URL and the versions served, and keeps serving (aliases read
   every ``serve.poll_s``; a moved alias is loaded in the background and swapped in atomically)
   until SIGINT or SIGTERM (``ray job stop``);
4. then deletes the application and stops Serve; each replica writes the rest of its assignment
   log (``serve.log_dir``, default ``<output_dir>/assignments``) as it stops.

Read the log with ``python flows/compare.py --online <log dir>``. Every key is listed, with its
type and default, in learn/config.py.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

if not os.environ.get("RAY_ADDRESS"):
    # a local Ray in single-node mode keeps every listener of its processes on 127.0.0.1 (README,
    # Network exposure); Ray reads this when it is imported, so it is set before anything imports it
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from learn.cli import run_flow  # noqa: E402
from learn.config import Config  # noqa: E402
from learn.serve.app import ServeError, ServeSettings, start, stop, wait_healthy  # noqa: E402
from learn.registry import RegistryError  # noqa: E402

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(cfg: Config, progress: bool = True, until: threading.Event | None = None) -> str:
    """Run the flow of the module docstring; returns a one-line summary once stopped. ``until``:
    stop when this event is set (the default: on SIGINT / SIGTERM)."""
    settings = ServeSettings.from_config(cfg)
    host, port = cfg.serve.host, cfg.serve.port
    if host not in LOOPBACK:
        print(f"[serve] warning: serve.host={host} accepts connections from other machines; the service has "
              f"no authentication of its own", file=sys.stderr, flush=True)
    done = until or threading.Event()

    def on_signal() -> None:
        if until is None:
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: done.set())

    on_signal()  # a signal while starting stops the service as soon as it is up
    url = start(settings, host=host, port=port, name=settings.model_name)
    try:
        on_signal()  # again: ray.init installs a SIGTERM handler of its own in this process
        health = wait_healthy(url)
        print(f"[serve] {url}: {settings.model_name} champion v{health['champion']}, challenger "
              f"{'v' + health['challenger'] if health['challenger'] else 'none'} (share {settings.challenger_share}); "
              f"POST {url}/recommend, GET {url}/healthz; assignment log {settings.log_dir}", flush=True)
        while not done.wait(1.0):
            pass
        health = wait_healthy(url, timeout_s=10)
    finally:
        stop(settings.model_name)
    return (f"[serve] stopped after {health['swaps']} swap(s), last serving champion v{health['champion']}; "
            f"assignment log in {settings.log_dir}")


def main(argv: list[str] | None = None) -> int:
    return run_flow(argv, "serve.py", __doc__, serve, errors={ServeError: ("serve error", 4),
                                                              RegistryError: ("serve error", 4)})


if __name__ == "__main__":
    sys.exit(main())

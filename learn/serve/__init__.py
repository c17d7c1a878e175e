"""Serving: the bundle-backed retriever as an MLflow pyfunc model."""

import os

from learn.serve.retriever import Retriever, load_retriever, log_retriever, retriever_signature

# Ray Serve's throughput mode (gRPC between the proxy and the replicas, user code and the router on the
# replica's main loop, buffered request logs, the collector frozen after start-up; README, Online
# retrieval) without its direct ingress, which would have clients address each replica's own port. Every
# Serve process reads these when it starts: the local Ray the flow starts gets them from this process,
# a cluster from its pods' environment (infra/k8s/rayservice.yaml); replicas also get them in their
# runtime_env.
SERVE_RAY_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def use_serve_ray_env() -> None:
    """Put SERVE_RAY_ENV into this process's environment (what is set already stays), before the
    local Ray that inherits it starts."""
    for key, value in SERVE_RAY_ENV.items():
        os.environ.setdefault(key, value)


__all__ = ["SERVE_RAY_ENV", "Retriever", "load_retriever", "log_retriever", "retriever_signature", "use_serve_ray_env"]

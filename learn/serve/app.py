"""Online retrieval: a Ray Serve application over the registered retriever, champion vs challenger.

    settings = ServeSettings.from_config(cfg)       # cfg.serve, cfg.tracking
    url = start(settings)                           # http://127.0.0.1:8000 (serve.host, serve.port)
    POST {url}/recommend  {"user_id": "u1", "history": ["i1", "i7"], "k": 10, "exclude_history": false}
      -> {"item_ids": [...], "scores": [...], "variant": "champion", "model_version": "3",
          "unknown_item_ids": [...]}                 (header x-request-id: the assignment log's id)
    GET  {url}/healthz -> {"status": "ok", "champion": "3", "challenger": "4" | null, ...}
    stop()

What answers: ``models:/<tracking.registered_model>@champion`` and, when that alias exists and
names another version, ``@challenger``. A user whose salted id hash falls under
``serve.challenger_share`` gets the challenger (:mod:`learn.serve.routing`); a request without a
user id, and every request while there is no challenger, gets the champion.

One code path: each version is loaded with ``mlflow.pyfunc.load_model`` exactly as any client
would (checksums, the logged code file, the bundle's towers and faiss index), and the service
scores with that pyfunc's own ``Retriever.retrieve``, the method its ``predict`` calls.

Hot swap: a background thread reads both aliases every ``serve.poll_s``. When one has moved it
loads the new version completely (download, verification, one warm-up query) while the old one
keeps answering, then replaces the one reference to the (champion, challenger) snapshot. Each
batch of requests reads that reference once, so a request is answered by exactly one version and
no request fails or waits for the load. A version that fails to load is logged and retried at the
next poll; the service keeps answering with what it has.

Concurrent requests are scored together (Ray Serve's dynamic batching, ``serve.max_batch_size``):
one user-tower pass and one index search per (variant, k, exclude_history) group of a batch.
Every answer is appended to the assignment log (:mod:`learn.serve.assignments`).

Bad requests get HTTP 400 and a message naming the field: not JSON, not an object, an unknown
field, neither ``user_id`` nor a non-empty ``history``, wrong types, ``k`` outside
[1, ``serve.max_k``], more than ``serve.max_history_items`` ids, a body over
``serve.max_body_bytes``. Ids not in the served catalog are reported in ``unknown_item_ids``.

On Kubernetes the RayService (infra/k8s/rayservice.yaml) imports :func:`app_builder`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import mlflow
from mlflow.exceptions import MlflowException
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from learn import registry
from learn.serve import serve_ray_env, use_serve_ray_env
from learn.serve.assignments import AssignmentLog
from learn.serve.loopback import use_free_serve_ports
from learn.serve.retriever import Retriever
from learn.serve.routing import CHALLENGER, CHAMPION, Router

log = logging.getLogger(__name__)

APP_NAME = "learn-retriever"
# the local Ray's workers (the Serve controller and its HAProxy manager among them) keep HAProxy's
# metrics and stats listeners on 127.0.0.1 (learn/serve/loopback.py)
LOOPBACK_RUNTIME_ENV = {"worker_process_setup_hook": "learn.serve.loopback.keep_haproxy_on_loopback"}
FIELDS = ("user_id", "history", "k", "exclude_history")
NO_SUCH_ALIAS = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")  # MLflow's error codes for a missing alias
DEFAULT_K = 10
MAX_USER_ID_CHARS = 512


class BadRequest(ValueError):
    """A request the service refuses with HTTP 400; the message says what to change."""


class ServeError(RuntimeError):
    """The service cannot start: no champion, a model that does not load, a port that does not answer."""


# -- settings and requests ----------------------------------------------------------------------
@dataclass(frozen=True)
class ServeSettings:
    """What a replica needs (built from a Config by :meth:`from_config`)."""

    tracking_uri: str = field(repr=False)  # may carry credentials for a server in another process: never printed
    model_name: str
    challenger_share: float
    salt: str = field(repr=False)
    poll_s: float
    log_dir: str
    log_flush_rows: int = 5000
    log_flush_s: float = 10.0
    log_keep_days: int = 0
    max_body_bytes: int = 65536
    max_k: int = 1000
    max_history_items: int = 1000
    num_replicas: int = 1
    replica_cpus: float = 1.0
    max_batch_size: int = 32
    batch_wait_s: float = 0.003
    max_ongoing_requests: int = 64
    access_log: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "ServeSettings":
        """From a ``learn.config.Config``: its ``serve`` section, the tracking store and registered
        model name; a relative sqlite path or log directory is made absolute (replicas may run elsewhere)."""
        from learn.tracking.mlflow_run import resolve_uri
        from learn.train.distributed import absolute_tracking_uri

        name = cfg.tracking.registered_model
        if not cfg.tracking.enabled or not name:
            raise ServeError("serving reads a registered retriever: it needs tracking.enabled=true and "
                             "tracking.registered_model set")
        s = cfg.serve
        log_dir = s.log_dir or str(Path(cfg.output_dir) / "assignments")
        return cls(tracking_uri=absolute_tracking_uri(resolve_uri(cfg.tracking.tracking_uri)), model_name=name,
                   challenger_share=s.challenger_share, salt=s.salt, poll_s=s.poll_s,
                   log_dir=str(Path(log_dir).absolute()), log_flush_rows=s.log_flush_rows,
                   log_flush_s=s.log_flush_s, log_keep_days=s.log_keep_days, max_body_bytes=s.max_body_bytes,
                   max_k=s.max_k, max_history_items=s.max_history_items, num_replicas=s.num_replicas,
                   replica_cpus=s.replica_cpus, max_batch_size=s.max_batch_size, batch_wait_s=s.batch_wait_s,
                   max_ongoing_requests=s.max_ongoing_requests, access_log=s.access_log)


@dataclass(frozen=True)
class RecommendRequest:
    user_id: str | None
    history: tuple[str, ...]
    k: int = DEFAULT_K
    exclude_history: bool = False


def parse_request(body: bytes, max_k: int, max_history_items: int, max_body_bytes: int) -> RecommendRequest:
    """The JSON body of ``POST /recommend`` as a request; BadRequest naming the field otherwise."""
    if len(body) > max_body_bytes:
        raise BadRequest(f"request body is {len(body)} bytes, over the limit of {max_body_bytes} (serve.max_body_bytes)")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object with 'user_id' and/or 'history', got {type(data).__name__}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; a request takes {list(FIELDS)}")
    user_id = data.get("user_id")
    if user_id is not None and (not isinstance(user_id, str) or not user_id or len(user_id) > MAX_USER_ID_CHARS):
        raise BadRequest(f"'user_id' must be a non-empty string of at most {MAX_USER_ID_CHARS} characters (or "
                         f"absent), got {type(user_id).__name__} {str(user_id)[:80]!r}")
    history = data.get("history")
    if history is None:
        history = []
    if not isinstance(history, list):
        raise BadRequest(f"'history' must be a list of item id strings, oldest first; got {type(history).__name__}")
    if len(history) > max_history_items:
        raise BadRequest(f"'history' holds {len(history)} ids, over the limit of {max_history_items} "
                         f"(serve.max_history_items)")
    bad = next((i for i, x in enumerate(history) if not isinstance(x, str) or not x), None)
    if bad is not None:
        raise BadRequest(f"'history' must hold non-empty item id strings; item {bad} is "
                         f"{type(history[bad]).__name__} {str(history[bad])[:80]!r}")
    if user_id is None and not history:
        raise BadRequest("a request needs a 'user_id' or a non-empty 'history' (or both)")
    k = data.get("k", DEFAULT_K)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise BadRequest(f"'k' must be an integer in [1, {max_k}] (serve.max_k), got {k!r}")
    exclude = data.get("exclude_history", False)
    if not isinstance(exclude, bool):
        raise BadRequest(f"'exclude_history' must be true or false, got {exclude!r}")
    return RecommendRequest(user_id, tuple(history), k, exclude)


# -- the served versions ------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str  # champion | challenger
    version: str
    retriever: Retriever = field(repr=False)


@dataclass(frozen=True)
class Snapshot:
    """What answers at one moment; replaced as a whole, never changed."""

    champion: Variant
    challenger: Variant | None
    loaded_at: float

    def versions(self) -> tuple[str, str | None]:
        return self.champion.version, None if self.challenger is None else self.challenger.version

    def get(self, name: str) -> Variant:
        if name == CHALLENGER and self.challenger is not None:
            return self.challenger
        return self.champion


def load_version(model_name: str, version: str) -> Retriever:
    """``mlflow.pyfunc.load_model("models:/<name>/<version>")``, its Retriever, warmed up by one query.
    The download is deleted once loaded (the bundle is held in memory)."""
    dst = Path(tempfile.mkdtemp(prefix=f"learn-serve-{version}-"))
    path_before = list(sys.path)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}", dst_path=str(dst))
        retriever = model.unwrap_python_model()
        if not isinstance(retriever, Retriever) or retriever.bundle is None:
            raise ServeError(f"models:/{model_name}/{version} is not a retriever logged by learn "
                             f"(its python model is {type(retriever).__name__})")
        retriever.retrieve([[retriever.bundle.item_ids[0]]], 1)  # the first call of the exported tower is slow
        return retriever
    finally:
        sys.path[:] = path_before  # load_model prepends the model's code copy; `learn` is imported already
        shutil.rmtree(dst, ignore_errors=True)


class RetrievalService:
    """The service without Ray: snapshot, routing, scoring, hot swap, assignment log.
    The Serve deployment (:class:`RetrieverDeployment`) wraps one per replica."""

    def __init__(self, settings: ServeSettings, start_polling: bool = True) -> None:
        self.settings = settings
        self.router = Router(settings.challenger_share, settings.salt)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self._client = registry.client(settings.tracking_uri)
        mlflow.set_tracking_uri(self._client.tracking_uri)
        self._refresh_lock = threading.Lock()
        self.swaps = 0
        self.last_swap_s: float | None = None  # seconds the last swap took from noticing the move to serving it
        self.last_error: str | None = None
        self.batches = 0  # recommend() calls and the requests they answered: the mean batch size
        self.answered = 0
        self._snapshot = self._load({}, self._resolve())
        self.log = AssignmentLog(settings.log_dir, flush_rows=settings.log_flush_rows, flush_s=settings.log_flush_s,
                                 keep_days=settings.log_keep_days)
        self._stop = threading.Event()
        self._poller = None
        if start_polling:
            self._poller = threading.Thread(target=self._poll, name="alias-poll", daemon=True)
            self._poller.start()

    # -- versions ---------------------------------------------------------------------------------
    def _resolve(self) -> tuple[str, str | None]:
        name = self.settings.model_name
        try:
            champion = str(self._client.get_model_version_by_alias(name, registry.CHAMPION).version)
        except MlflowException as exc:
            raise ServeError(f"models:/{name}@{registry.CHAMPION} does not resolve on {self._client.tracking_uri}: "
                             f"{exc.message}; train and register a model first (flows/full_pipeline.py)") from None
        try:
            challenger = str(self._client.get_model_version_by_alias(name, registry.CHALLENGER).version)
        except MlflowException as exc:
            if exc.error_code not in NO_SUCH_ALIAS:  # the store failed: keep serving what is loaded
                raise ServeError(f"cannot read models:/{name}@{registry.CHALLENGER} on {self._client.tracking_uri}: "
                                 f"{exc.message}") from None
            challenger = None
        # a challenger alias on the champion's own version (a model's first version has both) is no challenger
        return champion, None if challenger == champion else challenger

    def _load(self, loaded: dict[str, Retriever], versions: tuple[str, str | None]) -> Snapshot:
        champion, challenger = versions
        for version in (v for v in versions if v is not None and v not in loaded):
            loaded[version] = load_version(self.settings.model_name, version)
        return Snapshot(Variant(CHAMPION, champion, loaded[champion]),
                        None if challenger is None else Variant(CHALLENGER, challenger, loaded[challenger]),
                        time.time())

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def refresh(self) -> bool:
        """Read the aliases; when one moved, load what is new and swap the snapshot. True if swapped."""
        with self._refresh_lock:
            current = self._snapshot
            versions = self._resolve()
            if versions == current.versions():
                return False
            start = time.perf_counter()
            reuse = {v.version: v.retriever for v in (current.champion, current.challenger) if v is not None}
            new = self._load(dict(reuse), versions)
            self._snapshot = new  # the swap: one reference; batches read it once
            self.swaps += 1
            self.last_swap_s = time.perf_counter() - start
            log.warning("serving %s: champion %s -> %s, challenger %s -> %s (loaded in %.2f s)",
                        self.settings.model_name, current.champion.version, versions[0],
                        current.versions()[1], versions[1], self.last_swap_s)
            return True

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            try:
                self.refresh()
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - keep serving what is loaded; retry at the next poll
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("alias poll for %s failed, still serving %s: %s", self.settings.model_name,
                          self._snapshot.versions(), self.last_error)

    # -- answers ----------------------------------------------------------------------------------
    def recommend(self, requests: Sequence[RecommendRequest]) -> list[tuple[dict[str, Any], str]]:
        """(answer, request id) per request, all from one snapshot; every answer is logged."""
        snap = self._snapshot
        now_ms = int(time.time() * 1000)
        has_challenger = snap.challenger is not None
        assigned = [self.router.assign(r.user_id, has_challenger) for r in requests]
        groups: dict[tuple[str, int, bool], list[int]] = {}
        for i, (r, (variant, _)) in enumerate(zip(requests, assigned)):
            groups.setdefault((variant, r.k, r.exclude_history), []).append(i)
        out: list[Any] = [None] * len(requests)
        rows = []
        for (name, k, exclude), members in groups.items():
            variant = snap.get(name)
            ids, scores, unknown = variant.retriever.retrieve([list(requests[i].history) for i in members], k, exclude)
            for j, i in enumerate(members):
                request_id = uuid.uuid4().hex
                out[i] = ({"item_ids": ids[j], "scores": scores[j], "variant": variant.name,
                           "model_version": variant.version, "unknown_item_ids": unknown[j]}, request_id)
                rows.append({"time_ms": now_ms, "request_id": request_id, "user_hash": assigned[i][1],
                             "variant": variant.name, "model_version": variant.version, "k": k,
                             "exclude_history": exclude, "n_history": len(requests[i].history),
                             "n_unknown": len(unknown[j]), "item_ids": ids[j]})
        self.log.append(rows)
        self.batches += 1
        self.answered += len(requests)
        return out

    def health(self) -> dict[str, Any]:
        snap = self._snapshot
        champion, challenger = snap.versions()
        return {"status": "ok", "model": self.settings.model_name, "champion": champion, "challenger": challenger,
                "challenger_share": self.settings.challenger_share if challenger is not None else 0.0,
                "swaps": self.swaps, "last_swap_s": self.last_swap_s, "poll_s": self.settings.poll_s,
                "last_poll_error": self.last_error, "answered": self.answered, "batches": self.batches,
                "mean_batch_size": round(self.answered / self.batches, 2) if self.batches else None,
                "log": self.log.stats()}

    def check(self) -> None:
        """Raise when the service cannot keep itself up to date (Serve then restarts the replica)."""
        if self._poller is not None and not self._poller.is_alive() and not self._stop.is_set():
            raise ServeError("the alias poll thread has died")

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
        self.log.close()


# -- Ray Serve ----------------------------------------------------------------------------------
def _keep_replica_grpc_on_loopback() -> None:
    """Ray Serve 2.60 starts each replica's inter-deployment gRPC server on ``[::]:0``, every
    interface, whatever the node's address (ray/serve/_private/replica.py, ``_on_initialized``, after
    this deployment's ``__init__``). On a loopback-only node (single-node mode, node address
    127.0.0.1: what :func:`start` starts) bind it to 127.0.0.1 instead; elsewhere change nothing."""
    import ray
    from ray.serve._private import replica as replica_module

    original = getattr(replica_module, "add_port_to_grpc_server", None)
    if ray.util.get_node_ip_address() != "127.0.0.1" or original is None or getattr(original, "_loopback", False):
        return

    def loopback(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address[len("[::]:"):]
        return original(server, address)

    loopback._loopback = True  # type: ignore[attr-defined]
    replica_module.add_port_to_grpc_server = loopback


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BadRequest(f"request body is {length} bytes, over the limit of {limit} (serve.max_body_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"request body is over the limit of {limit} bytes (serve.max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(name="retriever")
class RetrieverDeployment:
    """HTTP ingress: /recommend and /healthz over one RetrievalService per replica."""

    def __init__(self, settings: ServeSettings) -> None:
        import faiss
        import torch

        # the replica's compute threads: its CPUs, for torch and for faiss alike (faiss's OpenMP default is
        # every core of the node, whose idle threads spin after each search on cores the proxy needs)
        threads = max(1, int(settings.replica_cpus))
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        _keep_replica_grpc_on_loopback()
        self.settings = settings
        self.service = RetrievalService(settings)
        self._batched.set_max_batch_size(settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(settings.batch_wait_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _batched(self, requests: list[RecommendRequest]) -> list[tuple[dict[str, Any], str]]:
        return self.service.recommend(requests)

    async def __call__(self, request: Request) -> JSONResponse:
        path, method = request.url.path.rstrip("/") or "/", request.method
        if path == "/healthz":
            if method != "GET":
                return JSONResponse({"error": "use GET /healthz"}, status_code=405)
            return JSONResponse(self.service.health())
        if path != "/recommend":
            return JSONResponse({"error": f"no route {path[:100]}; use POST /recommend or GET /healthz"},
                                status_code=404)
        if method != "POST":
            return JSONResponse({"error": "use POST /recommend with a JSON body"}, status_code=405)
        s = self.settings
        try:
            body = await _read_body(request, s.max_body_bytes)
            parsed = parse_request(body, s.max_k, s.max_history_items, s.max_body_bytes)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        answer, request_id = await self._batched(parsed)
        return JSONResponse(answer, headers={"x-request-id": request_id})

    def check_health(self) -> None:
        self.service.check()

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


def build_app(settings: ServeSettings) -> Any:
    """The bound Serve application for ``settings`` (replicas, CPUs, concurrency from it)."""
    deployment = RetrieverDeployment.options(
        num_replicas=settings.num_replicas, max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.replica_cpus, "runtime_env": {"env_vars": serve_ray_env()}},
        logging_config={"enable_access_log": settings.access_log})
    return deployment.bind(settings)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve's application builder (``import_path: learn.serve.app:app_builder``): ``args`` holds
    ``config`` (a YAML path) and optionally ``overrides`` (a list of ``key=value``), as on the command line."""
    from learn.config import load_config

    unknown = sorted(set(args) - {"config", "overrides"})
    if unknown:
        raise ServeError(f"unknown application args {unknown}; give 'config' and optionally 'overrides'")
    overrides = args.get("overrides") or []
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise ServeError(f"application arg 'overrides' must be a list of key=value strings, got {overrides!r}")
    return build_app(ServeSettings.from_config(load_config(args.get("config", "conf/default.yaml"), list(overrides))))


def wait_healthy(url: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll ``GET <url>/healthz`` until it answers 200; returns its JSON."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    last = "no answer"
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.25)
    raise ServeError(f"{url}/healthz did not answer within {timeout_s:.0f} s (last: {last})")


def start(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME,
          timeout_s: float = 180.0) -> str:
    """Start Serve's HTTP ingress on host:port (on the connected Ray; a local one is started when
    none is) and deploy the application; returns its URL once /healthz answers. A Serve instance
    already running with other HTTP options keeps them: the URL check then fails with a message."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
        else:
            # a local instance on 127.0.0.1; in single-node mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
            # which Ray reads when it is imported: flows/serve.py sets it first) every listener of
            # Ray's own processes binds loopback (README, Network exposure)
            from ray._private import ray_constants

            use_serve_ray_env()  # Ray's processes inherit this environment
            use_free_serve_ports()  # not Ray's fixed defaults: two local services can coexist
            if ray_constants.ENABLE_RAY_CLUSTER:
                log.warning("starting a local Ray whose internal listeners bind every interface: set "
                            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Python starts to keep them on 127.0.0.1")
            ray.init(_node_ip_address="127.0.0.1", log_to_driver=False, runtime_env=LOOPBACK_RUNTIME_ENV)
    serve.start(http_options={"host": host, "port": port},
                logging_config={"enable_access_log": settings.access_log})  # the proxy's access log
    serve.run(build_app(settings), name=name, route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        wait_healthy(url, timeout_s)
    except ServeError as exc:
        raise ServeError(f"{exc}; if Serve was already running on this Ray with other HTTP options, "
                         f"`serve shutdown` it first") from None
    return url


def stop(name: str = APP_NAME, shutdown: bool = True) -> None:
    """Delete the application (its replicas flush their assignment logs); ``shutdown`` also stops Serve."""
    serve.delete(name)
    if shutdown:
        serve.shutdown()

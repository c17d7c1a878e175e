"""MLflow logging for a pipeline run.

The store is ``tracking.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else a sqlite file
``mlflow.db`` in the working directory. Only rank 0 logs (``enabled=False`` elsewhere). Credentials in
the URI never reach MLflow's URI, params, tags or logged dicts (see ``learn.secrets``).

A run's lifecycle: a fresh sqlite store is created under a file lock (``prepare_store``); the run is
tagged with its host, pid and process start time; it ends FINISHED, FAILED on an exception, or KILLED
on SIGTERM / SIGINT (exit code 128 + signal). A run left RUNNING by a process that is gone (SIGKILL) is
marked FAILED, with a ``learn.failure`` tag, by the next Tracker on the same experiment and host.
"""

from __future__ import annotations

import fcntl
import math
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import psutil

from learn.secrets import MASK, export_credentials, is_secret_key, redact, redact_uri

DEFAULT_URI = "sqlite:///mlflow.db"
# who owns a run: a later Tracker on this host marks the run FAILED once that process is gone
HOST_TAG, PID_TAG, PID_START_TAG, FAILURE_TAG = "learn.host", "learn.pid", "learn.pid_start", "learn.failure"
_prepared: set[str] = set()


def resolve_uri(configured: str | None) -> str:
    """The store URI without credentials: a ``user:password@`` in it goes to MLflow's
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of this process (sent as basic auth)."""
    return export_credentials(configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)


def prepare_store(uri: str) -> None:
    """Create and migrate a sqlite store under an exclusive lock on ``<db file>.lock``: processes
    opening one fresh file at once otherwise race in MLflow's schema migration. Once per process and
    URI; other stores (a tracking server, another database) are left to MLflow."""
    from sqlalchemy.engine import make_url

    if uri in _prepared or not uri.startswith("sqlite:"):
        return
    database = make_url(uri).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        with open(f"{database}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            import mlflow

            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # MLflow caches the store
    _prepared.add(uri)


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (tells a reused pid apart), None when there is no such process."""
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return None


def _driver_main_thread() -> bool:
    """Signal handlers belong to the driver's main thread only (never a Ray worker's, whose tasks run in
    their main thread too)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    ray = sys.modules.get("ray")
    return ray is None or not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE


def _fail_abandoned_runs(client, experiment_id: str) -> None:
    """Mark FAILED every RUNNING run of the experiment started on this host by a process that is gone
    (killed with SIGKILL, or the machine went down)."""
    host = socket.gethostname()
    for run in client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"):
        pid, started = run.data.tags.get(PID_TAG, ""), run.data.tags.get(PID_START_TAG)
        if pid.isdigit() and _process_start(int(pid)) != started:
            client.set_tag(run.info.run_id, FAILURE_TAG, f"process {pid} on {host} ended without closing the run; "
                                                         f"marked FAILED by process {os.getpid()}")
            client.set_terminated(run.info.run_id, "FAILED")


class RunInterrupted(BaseException):
    """SIGTERM or SIGINT while a run is open: unwinds the pipeline (finally blocks, temp files) so that
    the Tracker ends the run KILLED and exits with 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def _ending_signal(exc: BaseException | None) -> int | None:
    """The signal that ended a run: ours (RunInterrupted), Ctrl-C where our handler is not installed,
    or SIGTERM through the handler ray.init sets in the driver (``sys.exit(SIGTERM)``)."""
    if isinstance(exc, RunInterrupted):
        return exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
        return signal.SIGTERM
    return None


def _param_value(key: str, value: Any) -> str:
    if is_secret_key(key):
        return MASK
    text = "null" if value is None else redact_uri(str(value))
    return text if len(text) <= 6000 else text[:5997] + "..."


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


class Tracker:
    """A thin wrapper so the pipeline code reads the same with tracking on or off."""

    def __init__(self, enabled: bool, uri: str | None, experiment: str, run_name: str | None = None,
                 system_metrics: bool = False, artifact_location: str | None = None):
        self.artifact_location = artifact_location
        self.enabled = enabled
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.system_metrics = system_metrics
        self.run_id: str | None = None
        self._mlflow = None
        self._owner: int | None = None  # the process whose signal handlers end the run
        self._saved_handlers: dict[int, Any] = {}
        self._ray_before = True  # whether Ray was up when the run began (set at enter)

    def __enter__(self) -> "Tracker":
        self._ray_before = _ray_initialized()  # tracking on or off: Ray's own SIGTERM handler may end the run
        if self.enabled:
            import mlflow

            prepare_store(self.uri)
            mlflow.set_tracking_uri(self.uri)
            if self.artifact_location and mlflow.get_experiment_by_name(self.experiment) is None:
                mlflow.create_experiment(self.experiment, artifact_location=self.artifact_location)
            experiment = mlflow.set_experiment(self.experiment)
            _fail_abandoned_runs(mlflow.MlflowClient(self.uri), experiment.experiment_id)
            pid = os.getpid()
            tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), PID_START_TAG: _process_start(pid)}
            run = mlflow.start_run(run_name=self.run_name, log_system_metrics=self.system_metrics, tags=tags)
            self.run_id = run.info.run_id
            self._mlflow = mlflow
            if _driver_main_thread():
                self._owner = pid
                self._saved_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _on_signal(self, signum: int, frame) -> None:
        if os.getpid() != self._owner:  # a forked child (a DataLoader worker): what it would have done
            signal.signal(signum, self._saved_handlers[signum] or signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise RunInterrupted(signum)

    def __exit__(self, exc_type, exc, tb) -> None:
        for signum, handler in self._saved_handlers.items():  # a second signal now acts as it did before,
            if signal.getsignal(signum) == self._on_signal:  # unless a handler set since (ray.init's) is kept
                signal.signal(signum, handler or signal.SIG_DFL)
        self._saved_handlers = {}
        signum = _ending_signal(exc)
        if self._mlflow is not None:
            self._mlflow.end_run(status="KILLED" if signum else "FINISHED" if exc_type is None else "FAILED")
            self._mlflow = None
        if isinstance(exc, (RunInterrupted, SystemExit)) and signum:
            print(f"interrupted by {signal.Signals(signum).name}: run {self.run_id} marked KILLED", file=sys.stderr,
                  flush=True)
            if _ray_initialized() and not self._ray_before:
                # a Ray this run started has seen the signal: interpreter teardown aborts (exit 134), so
                # leave now with the signal's code (Ray's raylet reaps the driver's workers). A Ray that was
                # up before the run (an embedding program's, a test session's) is left to its owner
                sys.stdout.flush()
                os._exit(128 + signum)
            raise SystemExit(128 + signum) from None

    def log_params(self, params: dict[str, Any]) -> None:
        if self._mlflow is not None:
            self._mlflow.log_params({k: _param_value(k, v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._mlflow is None:
            return
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def log_epoch(self, epoch: int, row: dict[str, float]) -> None:
        """One training epoch's row (loss, lr, valid metrics) at step = epoch."""
        self.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags({k: redact_uri(str(v)) for k, v in tags.items()})

    def log_dict(self, data: dict, name: str) -> None:
        if self._mlflow is not None:
            self._mlflow.log_dict(redact(data), name)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None:
            self._mlflow.log_artifacts(str(local_dir), artifact_path)

    def log_dataset(self, name: str, source: str, digest: str, context: str, tags: dict[str, Any]) -> None:
        """Record the dataset as a run input: where it came from, its fingerprint and row counts."""
        if self._mlflow is None:
            return
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        path = Path(source)
        if path.exists():
            src = resolve_dataset_source(str(path.resolve()))
        else:  # generated (the demo catalog): name the generator instead of a location
            src = CodeDatasetSource(tags={"generator": source})
        dataset = MetaDataset(src, name=name, digest=digest)
        self._mlflow.log_input(dataset, context=context, tags={k: str(v) for k, v in tags.items()})



def print_run_lists(uri: str | None, ui_url: str) -> None:
    """Where each experiment's training runs are in the MLflow UI at ``ui_url`` (which opens on its home
    page, GenAI views first): one ``<experiment>: <ui_url>/#/experiments/<id>/runs`` line each."""
    import mlflow

    uri = resolve_uri(uri)
    prepare_store(uri)
    for exp in sorted(mlflow.MlflowClient(uri).search_experiments(), key=lambda e: e.name):
        print(f"{exp.name} runs: {ui_url}/#/experiments/{exp.experiment_id}/runs")

"""MLflow logging for a pipeline run.

The store is ``tracking.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else a sqlite file
``mlflow.db`` in the working directory. Only rank 0 logs (``enabled=False`` elsewhere).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

DEFAULT_URI = "sqlite:///mlflow.db"
_SECRET = re.compile(r"(^|[._])(password|secret|token|api_key|access_key)$", re.I)
_URL_CREDENTIALS = re.compile(r"(//)[^/@\s]+@")


def resolve_uri(configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _param_value(key: str, value: Any) -> str:
    if _SECRET.search(key):
        return "***"
    text = "null" if value is None else _URL_CREDENTIALS.sub(r"\1***@", str(value))
    return text if len(text) <= 6000 else text[:5997] + "..."


class Tracker:
    """A thin wrapper so the pipeline code reads the same with tracking on or off."""

    def __init__(self, enabled: bool, uri: str | None, experiment: str, run_name: str | None = None):
        self.enabled = enabled
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: str | None = None
        self._mlflow = None

    def __enter__(self) -> "Tracker":
        if self.enabled:
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            mlflow.set_experiment(self.experiment)
            run = mlflow.start_run(run_name=self.run_name)
            self.run_id = run.info.run_id
            self._mlflow = mlflow
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._mlflow is not None:
            self._mlflow.end_run(status="FINISHED" if exc_type is None else "FAILED")
            self._mlflow = None

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

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_dict(self, data: dict, name: str) -> None:
        if self._mlflow is not None:
            self._mlflow.log_dict(data, name)

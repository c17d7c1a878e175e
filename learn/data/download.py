"""Fetch the raw Amazon Reviews 2018 files of one category (metadata + 5-core reviews).

    paths = download_amazon2018("Industrial_and_Scientific", "data/amazon2018")
    ds = read_amazon2018("data/amazon2018", "Industrial_and_Scientific")

Files are streamed to a temp file and renamed into place only once complete and readable as gzip,
so an interrupted run never leaves a half file under the final name. A file already present with
the size the server announces (or, without a Content-Length, a complete gzip) is not fetched again.
"""

from __future__ import annotations

import gzip
import logging
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from learn.data.schema import DataError
from learn.utils import atomic_path

log = logging.getLogger(__name__)

AMAZON2018_BASE = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2"
_CHUNK = 1 << 20


class DownloadError(DataError):
    """A file could not be fetched (HTTP error, unreachable host, truncated or corrupt body)."""


def amazon2018_files(category: str, base_url: str = AMAZON2018_BASE) -> list[tuple[str, str]]:
    """(url, local file name) of the metadata and the 5-core reviews of ``category``."""
    base = base_url.rstrip("/")
    return [
        (f"{base}/metaFiles2/meta_{category}.json.gz", f"meta_{category}.json.gz"),
        (f"{base}/categoryFilesSmall/{category}_5.json.gz", f"{category}_5.json.gz"),
    ]


def gzip_problem(path: Path) -> str | None:
    """None if ``path`` is a complete, readable gzip file, else what is wrong with it."""
    try:
        with open(path, "rb") as fh:
            if fh.read(2) != b"\x1f\x8b":
                return "not a gzip file (bad magic bytes)"
        with gzip.open(path, "rb") as fh:
            while fh.read(_CHUNK):  # reading to the end checks the CRC and length
                pass
    except (OSError, EOFError, zlib.error) as exc:
        return f"unreadable gzip ({exc})"
    return None


def download_file(url: str, target: str | Path, *, progress: bool = True, timeout: float = 60.0) -> bool:
    """Stream ``url`` to ``target`` atomically; False if ``target`` was already complete."""
    target = Path(target)
    request = urllib.request.Request(url, headers={"User-Agent": "learn-data-download/1"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot reach {url}: {reason}") from None
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.strip().isdigit() else None
        if target.is_file():
            size = target.stat().st_size
            if (total is not None and size == total) or (total is None and gzip_problem(target) is None):
                log.info("%s is complete (%d bytes); not downloading %s again", target, size, url)
                return False
        from tqdm import tqdm

        got = 0
        with atomic_path(target) as tmp:
            try:
                with open(tmp, "wb") as fh, tqdm(
                    total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
                    disable=not progress, leave=False,
                ) as bar:
                    while block := response.read(_CHUNK):
                        fh.write(block)
                        got += len(block)
                        bar.update(len(block))
            except (OSError, urllib.error.URLError) as exc:
                raise DownloadError(f"download of {url} failed after {got} bytes: {exc}") from None
            if total is not None and got != total:
                raise DownloadError(f"download of {url} is incomplete: got {got} of {total} bytes")
            problem = gzip_problem(tmp)
            if problem:
                raise DownloadError(f"download of {url}: the file is {problem}; expected a .json.gz file")
    log.info("downloaded %s -> %s (%d bytes)", url, target, got)
    return True


def download_amazon2018(
    category: str, dest_dir: str | Path, *, base_url: str = AMAZON2018_BASE, progress: bool = True
) -> list[Path]:
    """Download meta_<category>.json.gz and <category>_5.json.gz into ``dest_dir``; return both paths."""
    if not category or "/" in category or category.strip() != category:
        raise DownloadError(f"invalid category {category!r} (expected e.g. 'Industrial_and_Scientific')")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for url, name in amazon2018_files(category, base_url):
        download_file(url, dest / name, progress=progress)
        paths.append(dest / name)
    return paths

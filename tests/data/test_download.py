import gzip
import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from learn.data.amazon import read_amazon2018
from learn.data.download import DownloadError, amazon2018_files, download_amazon2018
from learn.data.schema import DataError

CAT = "Tiny_Category"


class Handler(SimpleHTTPRequestHandler):
    """Serves the fixture tree; counts GETs; can leave out Content-Length (then closes the connection)."""

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()

    def send_header(self, keyword, value):
        if keyword.lower() == "content-length" and self.server.no_length:
            return
        super().send_header(keyword, value)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "server"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    httpd.requests, httpd.no_length = [], False
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd, root, f"http://127.0.0.1:{httpd.server_address[1]}/amazon_v2"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def gz_lines(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)


def publish(root: Path) -> None:
    """Fixture files at the same relative paths as on the real server."""
    meta = [{"asin": f"I{k}", "title": f"Thing {k}", "brand": "B", "category": ["Top", f"Sub{k}"]} for k in range(3)]
    reviews = [{"reviewerID": f"u{u}", "asin": f"I{k}", "unixReviewTime": 100 * u + k}
               for u in range(3) for k in range(3)]
    gz_lines(root / "amazon_v2/metaFiles2" / f"meta_{CAT}.json.gz", meta)
    gz_lines(root / "amazon_v2/categoryFilesSmall" / f"{CAT}_5.json.gz", reviews)


def test_urls_follow_the_server_layout():
    (meta, _), (rev, _) = amazon2018_files("Industrial_and_Scientific")
    assert meta == ("https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2/metaFiles2/"
                    "meta_Industrial_and_Scientific.json.gz")
    assert rev == ("https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2/categoryFilesSmall/"
                   "Industrial_and_Scientific_5.json.gz")


def test_download_then_read_and_skip_complete_files(server, tmp_path):
    httpd, root, base = server
    publish(root)
    dest = tmp_path / "data"
    paths = download_amazon2018(CAT, dest, base_url=base, progress=False)
    assert [p.name for p in paths] == [f"meta_{CAT}.json.gz", f"{CAT}_5.json.gz"]
    assert paths[1].read_bytes() == (root / "amazon_v2/categoryFilesSmall" / f"{CAT}_5.json.gz").read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in paths)  # no temp files left
    ds = read_amazon2018(dest, CAT, min_core=3)
    assert ds.items["item_id"].tolist() == ["I0", "I1", "I2"]
    assert ds.items["category"].iloc[1] == "Top, Sub1"
    assert len(ds.interactions) == 9

    stats = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]
    download_amazon2018(CAT, dest, base_url=base, progress=False)
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths] == stats  # not rewritten

    # an incomplete local copy is fetched again
    paths[0].write_bytes(paths[0].read_bytes()[:10])
    download_amazon2018(CAT, dest, base_url=base, progress=True)
    assert paths[0].read_bytes() == (root / "amazon_v2/metaFiles2" / f"meta_{CAT}.json.gz").read_bytes()
    assert len(httpd.requests) == 6


def test_without_content_length_a_complete_gzip_is_kept(server, tmp_path):
    httpd, root, base = server
    publish(root)
    httpd.no_length = True
    dest = tmp_path / "data"
    paths = download_amazon2018(CAT, dest, base_url=base, progress=False)
    assert read_amazon2018(dest, CAT, min_core=1).interactions.shape[0] == 9
    stats = [p.stat().st_mtime_ns for p in paths]
    download_amazon2018(CAT, dest, base_url=base, progress=False)
    assert [p.stat().st_mtime_ns for p in paths] == stats
    paths[1].write_bytes(b"\x1f\x8b broken")
    download_amazon2018(CAT, dest, base_url=base, progress=False)
    assert read_amazon2018(dest, CAT, min_core=1).interactions.shape[0] == 9


def test_http_404_names_url_and_status(server, tmp_path):
    _, root, base = server
    publish(root)
    with pytest.raises(DownloadError, match=rf"{base}/metaFiles2/meta_Nope\.json\.gz failed: HTTP 404"):
        download_amazon2018("Nope", tmp_path / "data", base_url=base, progress=False)
    assert not list((tmp_path / "data").iterdir())
    assert issubclass(DownloadError, DataError)


def test_corrupt_body_is_rejected_and_not_kept(server, tmp_path):
    _, root, base = server
    publish(root)
    (root / "amazon_v2/categoryFilesSmall" / f"{CAT}_5.json.gz").write_bytes(b"<html>not here</html>")
    dest = tmp_path / "data"
    with pytest.raises(DownloadError, match=rf"{CAT}_5\.json\.gz: the file is not a gzip file"):
        download_amazon2018(CAT, dest, base_url=base, progress=False)
    assert [p.name for p in dest.iterdir()] == [f"meta_{CAT}.json.gz"]  # the good file stays, no temp left


def test_unreachable_host(tmp_path):
    with pytest.raises(DownloadError, match=r"cannot reach http://127\.0\.0\.1:9/x/metaFiles2"):
        download_amazon2018(CAT, tmp_path, base_url="http://127.0.0.1:9/x", progress=False)


def test_cli_download_then_detect_format(server, tmp_path, capsys):
    from learn.cli import main
    from learn.config import DataConfig
    from learn.data.load import detect_format, load_dataset

    _, root, base = server
    publish(root)
    dest = tmp_path / "cli"
    assert main(["data", "download", "--category", CAT, "--dest", str(dest), "--base-url", base]) == 0
    assert f"data.path={dest}" in capsys.readouterr().out
    cfg = DataConfig(path=str(dest), min_core=3)
    assert detect_format(cfg) == "amazon2018"
    ds = load_dataset(cfg)
    assert len(ds.interactions) == 9 and ds.has_clock

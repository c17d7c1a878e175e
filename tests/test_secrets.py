"""Credentials stay out of every file written and every line printed (learn/secrets.py)."""

import base64
import http.server
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from learn.config import flatten, load_config, to_dict
from learn.secrets import (PASSWORD_ENV, USER_ENV, export_credentials, redact, redact_uri, split_credentials,
                           with_env_credentials)
from learn.tracking.mlflow_run import _param_value, resolve_uri
from tests.servers import start_mlflow_server, stop_process_group

SECRET = "S3cretPw"
CONF = Path(__file__).resolve().parents[1] / "conf/tiny.yaml"


@pytest.fixture
def clean_env(monkeypatch):
    """MLflow's credential variables unset during the test and restored after it."""
    for var in (USER_ENV, PASSWORD_ENV, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("text, want", [
    (f"http://alice:{SECRET}@127.0.0.1:5000", "http://alice:***@127.0.0.1:5000"),
    (f"see https://bob:{SECRET}@h/x and s3://k:{SECRET}@b/p", "see https://bob:***@h/x and s3://k:***@b/p"),
    (f"https://{SECRET}@github.com/x.git", "https://***@github.com/x.git"),
    ("http://alice:@h", "http://alice:***@h"),
    ("http://127.0.0.1:5000/path?q=a@b", "http://127.0.0.1:5000/path?q=a@b"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("mail me at a@b.org", "mail me at a@b.org"),
])
def test_redact_uri(text, want):
    assert redact_uri(text) == want


def test_redact_walks_containers_and_masks_secret_keys():
    data = {"tracking": {"tracking_uri": f"http://alice:{SECRET}@h", "password": SECRET, "token": None},
            "aws.secret_access_key": SECRET, "api_key": SECRET, "keys": [f"http://u:{SECRET}@h", 3],
            "pair": (f"http://u:{SECRET}@h", None), "lr": 1e-3, "passage": "text"}
    out = redact(data)
    assert SECRET not in repr(out)
    assert out["tracking"] == {"tracking_uri": "http://alice:***@h", "password": "***", "token": None}
    assert out["aws.secret_access_key"] == out["api_key"] == "***"
    assert out["keys"] == ["http://u:***@h", 3] and out["pair"] == ("http://u:***@h", None)
    assert out["lr"] == 1e-3 and out["passage"] == "text"
    assert data["tracking"]["password"] == SECRET  # a copy: the input is unchanged


def test_config_to_dict_and_flatten_are_redacted():
    cfg = load_config(CONF, [f"tracking.tracking_uri=http://alice:{SECRET}@127.0.0.1:5000"])
    assert cfg.tracking.tracking_uri.endswith(f":{SECRET}@127.0.0.1:5000")  # the live config keeps it
    assert to_dict(cfg)["tracking"]["tracking_uri"] == "http://alice:***@127.0.0.1:5000"
    assert flatten(cfg)["tracking.tracking_uri"] == "http://alice:***@127.0.0.1:5000"
    assert SECRET not in repr(to_dict(cfg)) + repr(flatten(cfg))


def test_param_values_are_masked():
    assert _param_value("tracking.password", SECRET) == "***"
    assert _param_value("tracking.tracking_uri", f"http://a:{SECRET}@h") == "http://a:***@h"
    assert _param_value("train.lr", None) == "null"


def test_split_credentials():
    assert split_credentials(f"http://al%40ice:{SECRET}%2F@127.0.0.1:5000/p?x=1") == (
        "http://127.0.0.1:5000/p?x=1", "al@ice", f"{SECRET}/")
    assert split_credentials("https://tok@h") == ("https://h", "tok", None)
    assert split_credentials("sqlite:///mlflow.db") == ("sqlite:///mlflow.db", None, None)


def test_resolve_uri_moves_credentials_to_mlflows_env(clean_env):
    assert resolve_uri(f"http://alice:{SECRET}@127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert os.environ[USER_ENV] == "alice" and os.environ[PASSWORD_ENV] == SECRET
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds("http://127.0.0.1:5000")  # what MLflow sends as basic auth
    assert (creds.username, creds.password) == ("alice", SECRET)


def test_credentials_travel_to_workers_in_the_uri_only(clean_env):
    assert with_env_credentials("http://127.0.0.1:5000") == "http://127.0.0.1:5000"  # none set
    export_credentials(f"http://al:ice:{SECRET}@h:1")
    worker_uri = with_env_credentials("http://h:1/x")
    assert split_credentials(worker_uri) == ("http://h:1/x", "al", f"ice:{SECRET}")
    assert with_env_credentials("sqlite:///x.db") == "sqlite:///x.db"
    assert with_env_credentials("http://other:pw@h") == "http://other:pw@h"


# ---------------------------------------------------------------------------------------------
class _BasicAuthProxy(http.server.ThreadingHTTPServer):
    """Forwards to ``upstream`` only requests carrying the expected basic auth; 401 otherwise."""

    daemon_threads = True

    def __init__(self, upstream: str, user: str, password: str):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream
        self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.forwarded = self.refused = 0


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    HOP = {"host", "authorization", "content-length", "connection", "transfer-encoding", "server", "date"}

    def _forward(self):
        if self.headers.get("Authorization") != self.server.expected:
            self.server.refused += 1
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.forwarded += 1
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        req = urllib.request.Request(self.server.upstream + self.path, data=body or None, method=self.command,
                                     headers={k: v for k, v in self.headers.items() if k.lower() not in self.HOP})
        try:
            resp = urllib.request.urlopen(req, timeout=120)
        except urllib.error.HTTPError as err:
            resp = err
        with resp:
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.headers.items():
                if k.lower() not in self.HOP:
                    self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_no_password_in_any_written_file_or_printed_line(tmp_path, tiny_cfg, ray_local, capfd, clean_env):
    """A pipeline (Ray Train workers logging epochs, bundle, registered retriever) against a tracking
    server behind basic auth, its password in the URI: every request authenticates, and the password
    is in no file under tmp_path (runs, content store, Ray checkpoints, the server's store, artifacts
    and log, binary files included) and in nothing printed."""
    import mlflow

    from tests.flows import run_pipeline

    upstream, server = start_mlflow_server(tmp_path / "server")
    proxy = _BasicAuthProxy(upstream, "alice", SECRET)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    previous_uri = mlflow.get_tracking_uri()
    try:
        uri = f"http://alice:{SECRET}@127.0.0.1:{proxy.server_address[1]}"
        result = run_pipeline(tiny_cfg("tracking.artifact_location=null", f"tracking.tracking_uri={uri}",
                                       "train.epochs=1", "train.backend=ray", "train.num_workers=1",
                                       "tracking.system_metrics=false"), progress=False)
        client = mlflow.MlflowClient(tracking_uri=upstream)
        run = client.get_run(result.run_id)
        assert run.data.params["tracking.tracking_uri"] == "http://alice:***@127.0.0.1:" + uri.rsplit(":", 1)[1]
        assert "train_loss" in run.data.metrics  # logged by the Ray Train worker, through the proxy
        assert client.get_model_version_by_alias("learn-retriever", "challenger").run_id == result.run_id
    finally:
        proxy.shutdown()
        stop_process_group(server, timeout_s=30)
        mlflow.set_tracking_uri(previous_uri)
    assert proxy.refused == 0 and proxy.forwarded > 0

    out, err = capfd.readouterr()
    assert "View run" in out and SECRET not in out + err
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "metrics.json" for p in files) and any(p.name == "manifest.json" for p in files)
    ray_logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    files += [p for p in ray_logs.rglob("*") if p.is_file()]  # the workers' own output
    leaks = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaks, f"the password is in {leaks}"

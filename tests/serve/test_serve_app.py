"""The Ray Serve application on a free loopback port (the session's shared Ray): answers equal the
registered pyfunc's predict, routing by user hash, bad requests, the hot swap under load, the
assignment log and flows/compare.py --online over it, and a clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils

from learn.export.bundle import BundleInfo, write_bundle
from learn.serve import log_retriever
from learn.serve.app import BadRequest, ServeSettings, parse_request
from learn.serve.assignments import read_assignments
from learn.serve.routing import Router
from learn.towers.model import TowerConfig, TwinTowers
from tests.servers import assert_loopback_only, free_ports, listening_sockets, stop_process_group, wait_for_http

ROOT = Path(__file__).resolve().parents[2]

NAME = "serve-test"
N_ITEMS = 40
IDS = [f"sku-{i:02d}" for i in range(N_ITEMS)]
SHARE, SALT = 0.3, "test-salt"


def make_bundle(directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    content = torch.randn(N_ITEMS, 16) + 3.0
    cfg = TowerConfig(d_llm=16, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0, d_out=8, max_len=12)
    model = TwinTowers(cfg, content)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    write_bundle(model, IDS, content.numpy(), directory,
                 BundleInfo(encoder_id="test", dataset="test", dataset_fingerprint="test", run_id="test",
                            max_history=8, config=None))
    return directory


def publish(tmp: Path, experiment: str, seed: int) -> str:
    with mlflow.start_run(experiment_id=experiment):
        info = log_retriever(make_bundle(tmp / f"bundle-{seed}", seed), registered_model_name=NAME, max_history=8)
    return str(info.registered_model_version)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A sqlite registry with versions 1 (champion) and 2 (challenger); the previous MLflow URIs are
    restored afterwards. Yields (tmp dir, tracking uri, experiment id, client)."""
    tmp = tmp_path_factory.mktemp("serve-app")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    old_tracking, old_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        experiment = mlflow.create_experiment("serve-test", artifact_location=(tmp / "artifacts").as_uri())
        client = mlflow.MlflowClient(uri)
        for seed in (1, 2):
            publish(tmp, experiment, seed)
        client.set_registered_model_alias(NAME, "champion", "1")
        client.set_registered_model_alias(NAME, "challenger", "2")
        try:
            yield tmp, uri, experiment, client
        finally:
            if mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(old_tracking)
            registry_utils._registry_uri = old_registry


@pytest.fixture(scope="module")
def service(world, ray_local):
    """The application on a free loopback port; stopped (and Serve shut down) at the end."""
    from learn.serve.app import start, stop

    tmp, uri, _, _ = world
    settings = ServeSettings(tracking_uri=uri, model_name=NAME, challenger_share=SHARE, salt=SALT, poll_s=0.5,
                             log_dir=str(tmp / "assignments"), log_flush_rows=50, log_flush_s=0.5, max_k=25,
                             max_history_items=30, max_body_bytes=2048, replica_cpus=1.0, max_batch_size=8)
    (port,) = free_ports(1)
    url = start(settings, host="127.0.0.1", port=port, name="serve-test", timeout_s=240)
    try:
        yield url, settings
    finally:
        stop("serve-test")
        assert_port_closed(port)


def assert_port_closed(port: int) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
        except (urllib.error.URLError, OSError):
            return
        time.sleep(0.5)
    raise AssertionError(f"port {port} still answers after stop")


def post(url: str, body, raw: bool = False) -> tuple[int, dict, dict]:
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/recommend", data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def user_for(variant: str, start: int = 0) -> str:
    router = Router(SHARE, SALT)
    return next(u for u in (f"user-{i}" for i in range(start, 10_000)) if router.variant(u) == variant)


def test_parse_request_names_the_bad_field():
    ok = parse_request(b'{"user_id": "u", "history": ["a"], "k": 3, "exclude_history": true}', 10, 5, 1000)
    assert (ok.user_id, ok.history, ok.k, ok.exclude_history) == ("u", ("a",), 3, True)
    assert parse_request(b'{"user_id": "u"}', 10, 5, 1000).history == ()
    cases = {b"[1, 2]": "JSON object", b"{nope": "not valid JSON", b'{"histroy": ["a"]}': "unknown field",
             b'{}': "needs a 'user_id' or a non-empty 'history'", b'{"history": "a"}': "'history' must be a list",
             b'{"history": ["a", 3]}': "item 1 is int", b'{"user_id": 5, "history": ["a"]}': "'user_id' must be",
             b'{"history": ["a"], "k": 0}': "'k' must be an integer in \\[1, 10\\]",
             b'{"history": ["a"], "k": 11}': "'k'", b'{"history": ["a"], "k": true}': "'k'",
             b'{"history": ["a"], "exclude_history": "yes"}': "'exclude_history'",
             b'{"history": ["a","b","c","d","e","f"]}': "holds 6 ids, over the limit of 5",
             b'{"history": ["' + b"a" * 2000 + b'"]}': "over the limit of 1000"}
    for body, message in cases.items():
        with pytest.raises(BadRequest, match=message):
            parse_request(body, 10, 5, 1000)


@pytest.mark.parametrize("override, message", [
    ("serve.challenger_share=1.5", "serve.challenger_share"), ("serve.port=0", "serve.port"),
    ("serve.poll_s=0", "serve.poll_s"), ("serve.max_k=0", "serve.max_k"), ("serve.salt=", "serve.salt"),
    ("serve.batch_wait_s=-1", "serve.batch_wait_s"), ("serve.prot=80", "unknown key 'serve.prot'"),
    ("serve.access_log=maybe", "serve.access_log"),
])
def test_serve_config_names_the_bad_key(override, message):
    from learn.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "conf/tiny.yaml", [override])


def test_replicas_get_the_serve_environment_this_process_runs_with(monkeypatch):
    from learn.serve import SERVE_RAY_ENV, serve_ray_env, use_serve_ray_env

    for key in SERVE_RAY_ENV:
        monkeypatch.delenv(key, raising=False)
    assert serve_ray_env() == SERVE_RAY_ENV and SERVE_RAY_ENV["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # an operator's choice stays, replicas included
    use_serve_ray_env()
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and serve_ray_env()["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"


def test_haproxy_listeners_are_rebound_to_loopback():
    """The installed Ray's HAProxy template has the two all-interface listeners the setup hook moves
    to 127.0.0.1, and nothing else of it binds every interface afterwards."""
    import re

    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    from learn.serve.loopback import loopback_template

    patched = loopback_template(HAPROXY_CONFIG_TEMPLATE)
    binds = [b.strip() for b in re.findall(r"^\s*bind (.+)$", patched, flags=re.M)]
    assert "127.0.0.1:{{ config.metrics_port }}" in binds and "127.0.0.1:{{ config.stats_port }}" in binds
    assert not [b for b in binds if b.startswith((":", "*"))], binds  # the frontends take serve.host
    with pytest.raises(ValueError, match="template"):
        loopback_template("global\n  bind :9999\n")


def test_reserved_ports_come_from_below_the_ephemeral_range(tmp_path):
    """A port reserved now and bound when Serve starts must not be one an outgoing connection can take
    in between: those only get ports of the kernel's ephemeral range."""
    import socket

    from learn.serve.loopback import ephemeral_port_low, free_loopback_port

    low = ephemeral_port_low()
    ports = {free_loopback_port() for _ in range(5)}
    assert all(1024 <= p < low for p in ports), (ports, low)
    for port in ports:  # free to bind on loopback
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    (tmp_path / "range").write_text("40000\t60999\n")
    assert ephemeral_port_low(str(tmp_path / "range")) == 40000
    assert ephemeral_port_low(str(tmp_path / "missing")) == 32768


def test_settings_come_from_the_config(tmp_path):
    from learn.config import load_config
    from learn.serve.app import ServeError

    cfg = load_config(ROOT / "conf/tiny.yaml", [f"output_dir={tmp_path}", "tracking.tracking_uri=sqlite:///rel.db",
                                                "serve.challenger_share=0.25"])
    settings = ServeSettings.from_config(cfg)
    assert settings.log_dir == str(tmp_path / "assignments") and settings.challenger_share == 0.25
    assert settings.tracking_uri.startswith("sqlite:////")  # made absolute for replicas elsewhere
    assert "tracking_uri" not in repr(settings) and "salt" not in repr(settings)
    with pytest.raises(ServeError, match="tracking.registered_model"):
        ServeSettings.from_config(load_config(ROOT / "conf/tiny.yaml", ["tracking.registered_model="]))


def test_answers_equal_the_registered_pyfunc(service, world):
    url, _ = service
    client = world[3]
    histories = [[IDS[3], IDS[7], IDS[1]], [IDS[10]], [IDS[5], "ghost", IDS[6]], ["ghost"]]
    for variant, version in (("champion", "1"), ("challenger", "2")):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
        for i, history in enumerate(histories):
            for k, exclude in ((5, False), (12, True)):
                user = user_for(variant, start=100 * i)
                status, body, headers = post(url, {"user_id": user, "history": history, "k": k, "exclude_history": exclude})
                assert status == 200, body
                expected = model.predict(pd.DataFrame({"history": [history]}), params={"k": k, "exclude_history": exclude})
                assert (body["variant"], body["model_version"]) == (variant, version)
                assert body["item_ids"] == expected["item_ids"][0]
                np.testing.assert_allclose(body["scores"], expected["scores"][0], atol=1e-6, rtol=0)
                assert body["unknown_item_ids"] == expected["unknown_item_ids"][0]
                assert len(headers.get("x-request-id", "")) == 32
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"


def test_routing_is_sticky_and_anonymous_requests_go_to_champion(service):
    url, _ = service
    router = Router(SHARE, SALT)
    for i in range(20):
        user = f"sticky-{i}"
        seen = {post(url, {"user_id": user, "history": [IDS[i]]})[1]["variant"] for _ in range(2)}
        assert seen == {router.variant(user)}
    assert post(url, {"history": [IDS[2]]})[1]["variant"] == "champion"
    status, body, _ = post(url, {"user_id": user_for("challenger")})  # a user and no history: no results
    assert status == 200 and body["item_ids"] == [] and body["variant"] == "challenger"


def test_bad_requests_get_400_with_a_message(service):
    url, _ = service
    for body, message in [({}, "user_id"), ({"history": [1]}, "item 0"), ({"history": ["a"], "k": 26}, "k"),
                          ({"history": ["a"], "k": "3"}, "k"), ({"history": ["a"], "extra": 1}, "unknown field"),
                          ({"history": ["a"] * 31}, "max_history_items")]:
        status, answer, _ = post(url, body)
        assert status == 400 and message in answer["error"], (body, answer)
    status, answer, _ = post(url, b"x" * 5000, raw=True)
    assert status == 400 and "serve.max_body_bytes" in answer["error"]
    status, answer, _ = post(url, b"{not json", raw=True)
    assert status == 400 and "JSON" in answer["error"]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{url}/nowhere", timeout=10)
    assert err.value.code == 404
    health = json.loads(urllib.request.urlopen(f"{url}/healthz", timeout=10).read())
    assert health["status"] == "ok" and (health["champion"], health["challenger"]) == ("1", "2")


def test_hot_swap_under_load_no_failure_one_change(service, world):
    """A new version is published and champion moved onto it while a bounded request loop runs:
    no request fails, each client sees the version change once, nothing old after the first new."""
    url, settings = service
    tmp, _, experiment, client = world
    answers: dict[int, list[tuple[float, float, int, str]]] = {w: [] for w in range(4)}  # sent, received, status, version
    stop = threading.Event()

    def loop(worker: int):
        for i in range(3000):
            if stop.is_set():
                break
            sent = time.monotonic()
            status, body, _ = post(url, {"history": [IDS[(worker + i) % N_ITEMS]], "k": 5})  # anonymous: champion
            answers[worker].append((sent, time.monotonic(), status, body.get("model_version", "")))

    threads = [threading.Thread(target=loop, args=(w,)) for w in answers]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        version = publish(tmp, experiment, seed=3)
        moved_at = time.monotonic()
        client.set_registered_model_alias(NAME, "champion", version)
        deadline = time.time() + 60
        while time.time() < deadline and not any(a[3] == version for rows in answers.values() for a in rows[-3:]):
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        client.set_registered_model_alias(NAME, "champion", "1")
    every = [a for rows in answers.values() for a in rows]
    assert every and all(a[2] == 200 for a in every), [a for a in every if a[2] != 200][:5]
    for rows in answers.values():
        versions = [a[3] for a in rows]
        assert versions[0] == "1" and versions[-1] == version
        assert sum(x != y for x, y in zip(versions, versions[1:])) == 1, versions
    first_new = min(a[1] for a in every if a[3] == version)
    assert all(a[3] == version for a in every if a[0] > first_new)
    assert first_new - moved_at < settings.poll_s + 30
    deadline = time.time() + 60
    while json.loads(urllib.request.urlopen(f"{url}/healthz", timeout=10).read())["champion"] != "1":
        assert time.time() < deadline, "champion did not move back"
        time.sleep(0.2)


def test_assignment_log_and_online_compare(service, world, tmp_path):
    from flows.compare import compare_online

    url, settings = service
    tmp = world[0]
    users = [f"log-{i}" for i in range(60)]
    for u in users:
        assert post(url, {"user_id": u, "history": [IDS[len(u) % N_ITEMS], IDS[3]], "k": 4})[0] == 200
    deadline = time.time() + 30
    while True:  # parts are written every 0.5 s by the replica
        table = read_assignments(tmp / "assignments")
        logged = [h for h in table.column("user_hash").to_pylist() if h is not None]
        from learn.serve.routing import user_hash

        if {user_hash(u, SALT) for u in users} <= set(logged):
            break
        assert time.time() < deadline, "the answers did not reach the log"
        time.sleep(0.3)
    assert set(table.column("variant").to_pylist()) == {"champion", "challenger"}
    result = compare_online(str(tmp / "assignments"), out=str(tmp_path / "exposures.parquet"), log=False)
    assert result["requests"] == table.num_rows
    assert result["variants"]["challenger"]["requests"] > 0 and result["users_in_both_variants"] == 0
    assert 0.0 <= result["exposure_overlap"] <= 1.0
    exposures = pd.read_parquet(tmp_path / "exposures.parquet")
    assert len(exposures) == sum(len(x) for x in table.column("item_ids").to_pylist())


def test_the_service_keeps_serving_when_a_refresh_fails(world, monkeypatch):
    """Without Ray: a store that fails or a version that does not load leaves the snapshot as it
    was; a challenger alias on the champion's version means no challenger."""
    from mlflow.exceptions import MlflowException

    from learn.serve import app as serve_app
    from learn.serve.app import RecommendRequest, RetrievalService, ServeError

    tmp, uri, _, client = world
    settings = ServeSettings(tracking_uri=uri, model_name=NAME, challenger_share=SHARE, salt=SALT, poll_s=3600,
                             log_dir=str(tmp / "service-log"))
    service = RetrievalService(settings, start_polling=False)
    try:
        assert service.snapshot().versions() == ("1", "2")
        down = MlflowException("connection refused", error_code="INTERNAL_ERROR")
        with monkeypatch.context() as mp:
            mp.setattr(service._client, "get_model_version_by_alias", lambda *a: (_ for _ in ()).throw(down))
            with pytest.raises(ServeError, match="does not resolve|cannot read"):
                service.refresh()
        assert service.snapshot().versions() == ("1", "2")

        client.set_registered_model_alias(NAME, "challenger", "1")
        assert service.refresh() and service.snapshot().versions() == ("1", None)
        (answer, _), = service.recommend([RecommendRequest(user_for("challenger"), (IDS[1],))])
        assert (answer["variant"], answer["model_version"]) == ("champion", "1")

        def broken(name, version):
            raise ServeError(f"version {version} is broken")

        monkeypatch.setattr(serve_app, "load_version", broken)
        client.set_registered_model_alias(NAME, "challenger", "2")
        with pytest.raises(ServeError, match="version 2 is broken"):
            service.refresh()
        assert service.snapshot().versions() == ("1", None) and service.swaps == 1
    finally:
        client.set_registered_model_alias(NAME, "challenger", "2")
        service.close()
    assert read_assignments(tmp / "service-log").num_rows == 1  # the one answer, written at close


@pytest.mark.slow
def test_the_flow_serves_on_loopback_only_and_stops_cleanly(world, tmp_path):
    """flows/serve.py on its own local Ray: every listening socket of it and of the Ray it starts is
    on loopback; SIGTERM deletes the application, the replica writes its log, the flow exits 0."""
    from learn.serve.routing import user_hash

    _, uri, _, _ = world
    (port,) = free_ports(1)
    log = tmp_path / "flow.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a Ray of its own
    cmd = [sys.executable, str(ROOT / "flows/serve.py"), "--config", str(ROOT / "conf/tiny.yaml"),
           f"tracking.tracking_uri={uri}", f"tracking.registered_model={NAME}", f"serve.port={port}",
           f"serve.salt={SALT}", f"output_dir={tmp_path / 'out'}", "serve.log_flush_s=600", "tracking.system_metrics=false"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/healthz", proc, log, "flows/serve.py", 300)
        deadline = time.time() + 60
        while "POST http" not in log.read_text():  # printed once the flow's own signal handler is in place
            assert time.time() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        status, body, _ = post(url, {"user_id": "flow-user", "history": [IDS[1], IDS[2]]})
        assert status == 200 and body["model_version"] in ("1", "2"), body
        assert_loopback_only([proc.pid], {port})
        # the port clients address is HAProxy's (learn.serve.SERVE_RAY_ENV), not a Python proxy's
        assert {name for name, _, _, p in listening_sockets([proc.pid]) if p == port} == {"haproxy"}
        proc.send_signal(signal.SIGTERM)  # the flow alone: it stops Serve and its Ray itself
        assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        stop_process_group(proc)
    assert "[serve] stopped after 0 swap(s)" in log.read_text()
    logged = read_assignments(tmp_path / "out" / "assignments")  # flushed at shutdown, not by the timer
    assert logged.column("user_hash").to_pylist() == [user_hash("flow-user", SALT)]

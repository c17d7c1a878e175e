"""The MLflow run lifecycle (issue 15, items 4 and 6): concurrent first use of a fresh sqlite store,
SIGTERM / SIGINT marking a run KILLED, and a run left RUNNING by a dead process marked FAILED by the
next Tracker on the store."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import mlflow
import pytest

from learn.export.bundle import load_bundle
from learn.tracking.mlflow_run import (FAILURE_TAG, HOST_TAG, PID_START_TAG, PID_TAG, Tracker, _process_start,
                                       prepare_store, print_run_lists)

ROOT = Path(__file__).resolve().parents[1]


def _open_and_log(uri: str, barrier, index: int) -> None:
    barrier.wait()  # every process opens the fresh store at the same moment
    with Tracker(True, uri, "race", run_name=f"racer-{index}") as tracker:
        tracker.log_metrics({"x": float(index)})


def test_concurrent_first_runs_on_a_fresh_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_open_and_log, args=(uri, barrier, i)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["racer-0", "racer-1", "racer-2"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.metrics["x"] for r in runs) == [0.0, 1.0, 2.0]


# ---- 6: signals and abandoned runs, in-process (cheap) -----------------------------------------

def _runs(uri: str, experiment: str) -> dict:
    prepare_store(uri)  # the test reads while a pipeline subprocess may be creating the store
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return {} if exp is None else {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_run_killed_and_exits_128_plus_signum(tmp_path, signum):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = signal.getsignal(signum)
    with pytest.raises(SystemExit) as exit_info:
        with Tracker(True, uri, "sig", run_name="victim") as tracker:
            tracker.log_metrics({"x": 1.0})
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises here
            pytest.fail("the signal did not interrupt the run")
    assert exit_info.value.code == 128 + signum
    assert _runs(uri, "sig")["victim"].info.status == "KILLED"
    assert signal.getsignal(signum) is before  # restored once the run is closed


def test_a_signal_with_a_ray_up_before_the_run_raises_instead_of_leaving_the_process(tmp_path, monkeypatch):
    """A Ray the process had before the run (a test session's, an embedding program's) is not the run's:
    the signal ends the run KILLED and unwinds as SystemExit; only a Ray the run started makes it os._exit
    (this test session would otherwise end with 143 here)."""
    driver = types.SimpleNamespace(worker=types.SimpleNamespace(mode=0))  # SCRIPT_MODE, as in a driver
    fake_ray = types.SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: driver, WORKER_MODE=1)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(SystemExit) as exit_info:
        with Tracker(True, uri, "sig", run_name="ray-before"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            pytest.fail("the signal did not interrupt the run")
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert _runs(uri, "sig")["ray-before"].info.status == "KILLED"


def test_handlers_only_in_the_main_thread(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = signal.getsignal(signal.SIGTERM)
    errors = []

    def in_thread():
        try:
            with Tracker(True, uri, "thread", run_name="threaded") as tracker:
                tracker.log_metrics({"x": 1.0})
                assert signal.getsignal(signal.SIGTERM) is before
        except BaseException as exc:  # noqa: BLE001 (reported to the test thread)
            errors.append(exc)

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join(60)
    assert errors == []
    assert _runs(uri, "thread")["threaded"].info.status == "FINISHED"


def test_a_running_run_of_a_gone_process_is_marked_failed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with Tracker(True, uri, "abandon", run_name="setup"):
        pass
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = client.get_experiment_by_name("abandon").experiment_id
    host = mlflow.get_run(_runs(uri, "abandon")["setup"].info.run_id).data.tags[HOST_TAG]
    me, my_start = str(os.getpid()), _process_start(os.getpid())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owners = {"alive": (host, me, my_start),  # this very process: left alone
              "reused-pid": (host, me, "12.34"),  # our pid, another start time: a reused pid
              "gone": (host, gone.stdout.strip(), "12.34"),
              "other-host": ("elsewhere", gone.stdout.strip(), "12.34")}  # not ours to judge
    for name, (h, pid, start) in owners.items():
        client.create_run(exp_id, run_name=name, tags={HOST_TAG: h, PID_TAG: pid, PID_START_TAG: start})
    with Tracker(True, uri, "abandon", run_name="next"):
        pass
    runs = _runs(uri, "abandon")
    assert {n: r.info.status for n, r in runs.items()} == {
        "setup": "FINISHED", "next": "FINISHED", "alive": "RUNNING", "reused-pid": "FAILED", "gone": "FAILED",
        "other-host": "RUNNING"}
    assert "ended without closing the run" in runs["gone"].data.tags[FAILURE_TAG]
    assert FAILURE_TAG not in runs["alive"].data.tags


# ---- 6: a pipeline killed mid-training (two subprocesses) ---------------------------------------

@pytest.fixture(scope="module")
def killed_store(tmp_path_factory, model_cache, demo_store):
    """One MLflow store and output dir for the killed pipelines, sharing the tests' content store."""
    root = tmp_path_factory.mktemp("killed")
    args = [sys.executable, str(ROOT / "flows/full_pipeline.py"), "--config", str(ROOT / "conf/tiny.yaml"),
            "--no-progress", f"output_dir={root / 'runs'}", f"embed.cache_dir={model_cache}",
            f"embed.store={demo_store}", f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            f"tracking.artifact_location={root / 'artifacts'}", "tracking.system_metrics=false",
            "train.epochs=100000", "train.patience=0", "train.num_threads=1"]
    return root, args


def _start_and_wait_for_training(args: list[str], uri: str, name: str, timeout: float = 240):
    """Start the pipeline; return it and its run once the run has logged a train_loss."""
    prepare_store(uri)  # this process reads the store while the pipeline creates its run
    log = Path(uri[len("sqlite:///"):]).with_name(f"{name}.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([*args, f"tracking.run_name={name}"], cwd=ROOT, stdout=out, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        run = _runs(uri, "learn-tiny").get(name)
        if run is not None and "train_loss" in run.data.metrics:
            return proc, run
        time.sleep(0.5)
    proc.kill()
    _, err = proc.communicate()
    pytest.fail(f"no train_loss logged within {timeout} s (rc {proc.returncode}):\n{log.read_text()}\n{err}")


@pytest.mark.slow
def test_sigterm_mid_training_marks_the_run_killed(killed_store):
    root, args = killed_store
    uri = f"sqlite:///{root / 'mlflow.db'}"
    proc, run = _start_and_wait_for_training(args, uri, "terminated")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"interrupted by SIGTERM: run {run.info.run_id} marked KILLED" in err
    assert "Traceback" not in err
    assert _runs(uri, "learn-tiny")["terminated"].info.status == "KILLED"
    out_dir = root / "runs" / run.info.run_id
    assert not (out_dir / "metrics.json").exists()  # written only at the very end
    if (out_dir / "bundle").exists():  # none at all, or a complete, verified one
        load_bundle(out_dir / "bundle")
    assert not [p for p in out_dir.rglob("*") if ".tmp" in p.name]


@pytest.mark.slow
def test_sigkill_leaves_running_until_a_later_tracker_marks_it_failed(killed_store):
    root, args = killed_store
    uri = f"sqlite:///{root / 'mlflow.db'}"
    proc, run = _start_and_wait_for_training(args, uri, "sigkilled")
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _runs(uri, "learn-tiny")["sigkilled"].info.status == "RUNNING"  # nobody could end it
    with Tracker(True, uri, "learn-tiny", run_name="later") as tracker:
        tracker.log_metrics({"x": 1.0})
    runs = _runs(uri, "learn-tiny")
    assert runs["sigkilled"].info.status == "FAILED"
    assert f"process {proc.pid} " in runs["sigkilled"].data.tags[FAILURE_TAG]
    assert runs["later"].info.status == "FINISHED"


RAY_DRIVER = """
import os, signal, sys, time
import ray
from learn.tracking.mlflow_run import Tracker
with Tracker(True, sys.argv[1], "ray", run_name="ray-driver"):
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)  # sets its own SIGTERM handler
    assert ray.get(ray.remote(lambda: 1).remote()) == 1
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
"""


@pytest.mark.slow
def test_sigterm_after_ray_init_still_marks_the_run_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "-c", RAY_DRIVER, uri], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert _runs(uri, "ray")["ray-driver"].info.status == "KILLED"


# ---- 14: where the training runs are in the MLflow UI ---------------------------------------------

def test_print_run_lists_names_each_experiments_run_list(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with Tracker(True, uri, "learn-tiny", run_name="one") as tracker:
        exp_id = mlflow.get_run(tracker.run_id).info.experiment_id
    print_run_lists(uri, "http://127.0.0.1:5000")
    assert f"learn-tiny runs: http://127.0.0.1:5000/#/experiments/{exp_id}/runs" in capsys.readouterr().out.splitlines()

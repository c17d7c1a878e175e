"""`ray job submit` against a real local Ray head on 127.0.0.1: the job runs the flow and logs to MLflow."""

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.servers import assert_loopback_only, free_ports, stop_process_group, wait_for_http

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` bound to 127.0.0.1 with its own ports and its own auth token;
    signalling that one process (its own session) stops the whole head, nothing else is touched.
    Yields (dashboard URL, token, its process group, its GCS and metrics ports)."""
    gcs, dash, client, agent, agent_grpc, runtime_env, metrics, nm, om = free_ports(9)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           # single-node mode: the node address stays 127.0.0.1, so every Ray listener binds loopback
           # (see infra/local/cluster.sh)
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    log = open(tmp_path / "head.log", "w")
    proc = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
         "--metrics-export-port", str(metrics), "--node-manager-port", str(nm), "--object-manager-port", str(om),
         "--num-cpus", "2",  # worker ports: Ray's default range (10002-19999), below the OS's ephemeral ports
         "--temp-dir", str(Path("/tmp") / f"ray-test-{os.getpid()}"), "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    wait_for_http(f"{url}/api/version", proc, tmp_path / "head.log", "ray head", timeout_s=120)
    yield url, env["RAY_AUTH_TOKEN"], proc.pid, {gcs, dash, metrics}
    stop_process_group(proc, timeout_s=10)  # a throwaway head: killed after 10 s (its graceful stop took ~30)
    log.close()


@pytest.mark.slow
def test_ray_job_submit_runs_the_flow_and_logs_to_mlflow(ray_head, tmp_path, model_cache):
    from ray.job_submission import JobSubmissionClient

    db = tmp_path / "mlflow.db"
    entrypoint = (
        "python flows/full_pipeline.py --config conf/tiny.yaml --no-progress train.epochs=1 "
        f"output_dir={tmp_path / 'runs'} embed.cache_dir={model_cache} embed.store={tmp_path / 'c.parquet'} "
        f"tracking.tracking_uri=sqlite:///{db} tracking.artifact_location={tmp_path / 'artifacts'}")
    url, token, pgid, ports = ray_head
    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
    job = client.submit_job(entrypoint=entrypoint, runtime_env={
        "working_dir": str(ROOT),
        "excludes": [".venv", ".venv-vllm", ".git", ".cache", "runs", "mlruns", "*.db", "bench/results",
                     "**/__pycache__"]})
    logs = wait_for_job(client, job)
    run_id = logs.split("\nrun ")[-1].split(";")[0].strip()
    mlflow_client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert 0.0 <= run.data.metrics["test_ndcg_at_10"] <= 1.0
    assert run.data.params["data.path"] == "demo"
    assert_loopback_only([pgid], ports)  # the head and the job's workers, still alive

    # the scheduled re-embedding is a job too: same catalog, so it embeds nothing and publishes nothing
    reembed = entrypoint.replace("flows/full_pipeline.py", "flows/reembed.py").replace(" train.epochs=1", "")
    job = client.submit_job(entrypoint=reembed + " reembed.alias=challenger", runtime_env={
        "working_dir": str(ROOT),
        "excludes": [".venv", ".venv-vllm", ".git", ".cache", "runs", "mlruns", "*.db", "bench/results",
                     "**/__pycache__"]})
    logs = wait_for_job(client, job)
    run = mlflow_client.get_run(logs.split("\nrun ")[-1].split(";")[0].strip())
    assert run.data.tags["flow"] == "reembed" and run.data.metrics["items_embedded"] == 0
    assert run.data.tags["served_version"] == run.data.tags["source_model_version"]


def wait_for_job(client, job: str, timeout_s: float = 600) -> str:
    """Poll until the job ends; its logs, asserting it SUCCEEDED."""
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout_s
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, f"job did not finish in {timeout_s:.0f} s"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    return logs

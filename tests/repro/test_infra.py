"""Every file under infra/ parses and carries the fields its tool needs: Ray's own launcher schema,
KubeRay's RayCluster/RayJob shape, the MLflow server's options (checked against mlflow's CLI)."""

from __future__ import annotations

import configparser
import copy
import re
import shlex

import pytest
import ray
import yaml

from pipeline.config import load_job

from .conftest import REPO

INFRA = REPO / "infra"


def load_all(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((INFRA / name).read_text()) if doc is not None]


def test_every_infra_yaml_parses():
    files = sorted(p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*.yaml"))
    assert files == ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "mlflow/mlflow.yaml", "ray-cluster.yaml"]
    for name in files:
        assert load_all(name), name


def test_ray_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_all("ray-cluster.yaml")[0]
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's ray-schema.json + its own checks
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_8xh100"]["min_worker"] = 4  # a typo Ray must reject
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))
    workers = config["available_node_types"]["gpu_8xh100"]
    gpus = workers["min_workers"] * workers["resources"]["GPU"]
    assert gpus == load_job(REPO / "jobs/reproduce_81.yaml").scaling.num_workers
    assert any("pip install" in c and "/home/ray/spikformer" in c for c in config["setup_commands"])
    assert ray.__version__ in config["docker"]["image"]


def cluster_spec() -> dict:
    return load_all("kuberay/raycluster.yaml")[0]["spec"]


def test_kuberay_raycluster_shape():
    doc = load_all("kuberay/raycluster.yaml")[0]
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster") and doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265, 10001}
    assert "dashboard-host" in spec["headGroupSpec"]["rayStartParams"]
    (group,) = spec["workerGroupSpecs"]
    assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    worker = group["template"]["spec"]["containers"][0]
    gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert group["replicas"] * gpus == load_job(REPO / "jobs/reproduce_81.yaml").scaling.num_workers
    env = {e["name"] for e in worker["env"]}
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= env


def test_kuberay_rayjob_runs_a_real_spec_on_the_same_cluster():
    doc = load_all("kuberay/rayjob.yaml")[0]
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["rayClusterSpec"] == cluster_spec()
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and runtime_env["working_dir"]
    words = shlex.split(spec["entrypoint"])
    assert words[:4] == ["python", "-m", "pipeline", "run"]
    load_job(REPO / words[4])  # the entrypoint's job spec exists and validates


def test_mlflow_server_has_database_object_store_and_auth():
    from click import Context
    from mlflow.cli import server

    docs = {(d["kind"], d["metadata"]["name"]): d for d in load_all("mlflow/mlflow.yaml")}
    deployment = docs[("Deployment", "mlflow")]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(container["args"])
    options = dict(re.findall(r"(--[a-z-]+)(?: +([^-\s][^\s]*))?", command.split("mlflow server", 1)[1]))
    known = {opt for param in server.get_params(Context(server)) for opt in param.opts}
    assert set(options) <= known, set(options) - known  # every flag exists in the installed mlflow
    assert options["--backend-store-uri"].startswith("postgresql://")
    assert options["--artifacts-destination"].startswith("s3://") and "--serve-artifacts" in options
    assert options["--app-name"] == "basic-auth"
    assert docs[("StatefulSet", "mlflow-postgres")]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert ("Service", "mlflow") in docs and ("Service", "mlflow-postgres") in docs
    env = {e["name"] for e in container["env"]}
    assert {"MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_PASSWORD"} <= env
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(docs[("ConfigMap", "mlflow-auth")]["data"]["basic_auth.ini"])
    assert ini["mlflow"]["database_uri"].startswith("postgresql://")
    assert ini["mlflow"]["admin_username"] and ini["mlflow"]["default_permission"] in ("READ", "NO_PERMISSIONS")
    # the jobs point at this server
    service = docs[("Service", "mlflow")]
    url = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:5000"
    head_env = cluster_spec()["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": url} in head_env


def test_image_uses_the_installed_ray_version():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-", text, re.M)
    assert "constraints.txt" in text

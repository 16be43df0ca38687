"""The InferenceService renderer: valid against KServe's own CRD schema, hardened, and never stale."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from dicom_router.serving.inferenceservice import (
    InferenceServiceSpec,
    example_spec,
    image_tag,
    load_crd_schema,
    predictor_image,
    render_example,
    render_inference_service,
    to_yaml,
    validate_inference_service,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "serving" / "inferenceservice.example.yaml"
BUNDLE = "s3://dicom-router/mlflow/artifacts/1/abc/artifacts/bundle"
IMAGE = "ghcr.io/dicom-router/predictor:0.1.0"


@pytest.fixture(scope="module")
def crd_schema(shared_dir: Path) -> dict[str, Any]:
    return load_crd_schema(shared_dir / "k8s-schemas")


def spec(**overrides: Any) -> InferenceServiceSpec:
    return InferenceServiceSpec(**{"model_version": "7", "storage_uri": BUNDLE, "image": IMAGE, **overrides})


def predictor(doc: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = doc["spec"]["predictor"]
    return result


def test_gpu_render_validates_against_the_kserve_crd(crd_schema: dict[str, Any]) -> None:
    doc = render_inference_service(spec())
    assert validate_inference_service(doc, crd_schema) == []
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    container = predictor(doc)["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert predictor(doc)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert predictor(doc)["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_cpu_render_validates_and_asks_for_no_gpu(crd_schema: dict[str, Any]) -> None:
    doc = render_inference_service(spec(gpu=False))
    assert validate_inference_service(doc, crd_schema) == []
    limits = predictor(doc)["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits
    assert "tolerations" not in predictor(doc) and "nodeSelector" not in predictor(doc)


def test_predictor_stays_warm_batches_itself_and_listens_on_its_pod_address() -> None:
    doc = render_inference_service(spec())
    assert predictor(doc)["minReplicas"] == 1 and predictor(doc)["maxReplicas"] == 3
    assert "batcher" not in predictor(doc)  # its agent would call the server on loopback
    env = {e["name"]: e for e in predictor(doc)["containers"][0]["env"]}
    assert env["DICOM_ROUTER_SERVE_MAX_BATCH_SIZE"]["value"] == "16"
    assert env["DICOM_ROUTER_SERVE_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"


def test_model_comes_from_storage_uri_into_the_kserve_container() -> None:
    doc = render_inference_service(spec(model_version="12", port=9000))
    container = predictor(doc)["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["name"] == "kserve-container"
    assert env["STORAGE_URI"] == BUNDLE
    assert env["DICOM_ROUTER_LOW_CONFIDENCE"] == "0.5"
    assert container["args"] == ["serve", "--model", "/mnt/models", "--port", "9000"]
    assert container["ports"] == [{"containerPort": 9000, "protocol": "TCP"}]
    assert doc["metadata"]["labels"]["dicom-router/model-version"] == "12"
    assert predictor(doc)["labels"]["dicom-router/model-version"] == "12"


def test_every_container_has_probes_resources_and_a_non_root_context() -> None:
    for doc in (render_inference_service(spec()), render_inference_service(spec(gpu=False))):
        mounts = {v["name"] for v in predictor(doc)["volumes"]}
        for container in predictor(doc)["containers"]:
            assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
            assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
            assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] == 1000
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            # a read-only root still needs a writable /tmp, and it must be a declared volume
            assert {m["name"] for m in container["volumeMounts"]} <= mounts


def test_render_carries_no_secret_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_ROUTER_S3_SECRET_ACCESS_KEY", "sentinel-secret-value")
    monkeypatch.setenv("DICOM_ROUTER_S3_ACCESS_KEY_ID", "sentinel-key-id")
    doc = render_inference_service(spec())
    text = to_yaml(doc)
    assert "sentinel" not in text
    for container in predictor(doc)["containers"]:
        for env in container["env"]:
            looks_secret = any(w in env["name"] for w in ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY"))
            assert not (looks_secret and "value" in env), env["name"]
    assert predictor(doc)["serviceAccountName"] == "dicom-router-models"


def test_schema_errors_name_the_field(crd_schema: dict[str, Any]) -> None:
    good = render_inference_service(spec())
    bad = copy.deepcopy(good)
    predictor(bad)["minReplicas"] = "one"
    predictor(bad)["minReplica"] = 2  # misspelt: the API server would refuse or drop it
    predictor(bad)["containers"][0]["resources"]["limits"]["memory"] = "lots"
    errors = validate_inference_service(bad, crd_schema)
    assert any(e.startswith("spec.predictor.minReplicas: ") and "integer" in e for e in errors)
    assert any(e.startswith("spec.predictor: ") and "minReplica" in e for e in errors)
    assert any(e.startswith("spec.predictor.containers[0].resources.limits.memory: ") for e in errors)
    assert len(errors) == 3
    assert validate_inference_service(good, crd_schema) == []  # the good document was not touched


def test_wrong_kind_and_bad_name_are_reported(crd_schema: dict[str, Any]) -> None:
    doc = render_inference_service(spec())
    doc["kind"] = "Deployment"
    doc["metadata"]["name"] = "Bodypart_Router"
    errors = validate_inference_service(doc, crd_schema)
    assert any(e.startswith("kind: ") for e in errors)
    assert any(e.startswith("metadata.name: ") for e in errors)


@pytest.mark.parametrize(
    "image",
    [
        "ghcr.io/dicom-router/predictor",
        "ghcr.io/dicom-router/predictor:latest",
        "registry.local:5000/predictor",
        "predictor:",
        "predictor@",
    ],
)
def test_unpinned_images_are_refused(image: str) -> None:
    with pytest.raises(ValidationError, match="pinned"):
        spec(image=image)


@pytest.mark.parametrize(
    ("image", "tag"),
    [
        ("ghcr.io/dicom-router/predictor:0.1.0", "0.1.0"),
        ("registry.local:5000/predictor:2026.1", "2026.1"),
        ("ghcr.io/dicom-router/predictor@sha256:" + "a" * 64, "sha256:" + "a" * 64),
    ],
)
def test_pinned_images_are_accepted(image: str, tag: str) -> None:
    assert image_tag(image) == tag
    assert spec(image=image).image == image


@pytest.mark.parametrize(
    "uri",
    ["file:///mnt/bundle", "/mnt/bundle", "s3://", "http://example.org/bundle", "models:/bodypart-router/7"],
)
def test_unsupported_storage_uris_are_refused(uri: str) -> None:
    with pytest.raises(ValidationError, match="storage_uri"):
        spec(storage_uri=uri)


@pytest.mark.parametrize(
    "uri", ["s3://b/p/bundle", "gs://b/bundle", "pvc://models-pvc/bundle", "https://h/bundle.tgz"]
)
def test_supported_storage_uris_are_accepted(uri: str) -> None:
    assert spec(storage_uri=uri).storage_uri == uri


def test_scale_to_zero_and_inverted_replica_range_are_refused() -> None:
    with pytest.raises(ValidationError, match="min_replicas"):
        spec(min_replicas=0)
    with pytest.raises(ValidationError, match="max_replicas 1 < min_replicas 2"):
        spec(min_replicas=2, max_replicas=1)


def test_names_and_quantities_are_checked_before_rendering() -> None:
    with pytest.raises(ValidationError, match="name"):
        spec(name="Bodypart_Router")
    with pytest.raises(ValidationError, match="model_version"):
        spec(model_version="7 (champion)")
    with pytest.raises(ValidationError, match="memory_limit"):
        spec(memory_limit="8 GB")
    with pytest.raises(ValidationError, match="unknown_field"):
        InferenceServiceSpec(model_version="7", storage_uri=BUNDLE, image=IMAGE, unknown_field=1)  # type: ignore[call-arg]


def test_yaml_round_trips_with_strings_kept_strings() -> None:
    doc = render_inference_service(spec(model_version="1", low_confidence=0.25))
    assert yaml.safe_load(to_yaml(doc)) == doc  # "1", "true" and "0.25" stay strings


def test_checked_in_example_is_current(crd_schema: dict[str, Any]) -> None:
    regenerate = (
        ".venv/bin/python -c 'from dicom_router.serving.inferenceservice import render_example; "
        'print(render_example(), end="")\' > serving/inferenceservice.example.yaml'
    )
    assert EXAMPLE.read_text(encoding="utf-8") == render_example(), f"stale example; run: {regenerate}"
    loaded = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert loaded == render_inference_service(example_spec())
    assert validate_inference_service(loaded, crd_schema) == []


def test_schema_is_parsed_once_per_folder(shared_dir: Path) -> None:
    assert load_crd_schema(shared_dir / "k8s-schemas") is load_crd_schema(shared_dir / "k8s-schemas" / ".")


def test_gpu_nodes_get_the_cuda_predictor_image_and_cpu_nodes_the_lean_one() -> None:
    gpu = predictor_image("ghcr.io/dicom-router/", "0.1.0", gpu=True)
    assert gpu == "ghcr.io/dicom-router/predictor-gpu:0.1.0"
    assert predictor_image("registry.local", "2.0", gpu=False) == "registry.local/predictor:2.0"
    assert InferenceServiceSpec.release("r.local", "3", model_version="3", storage_uri=BUNDLE).image == (
        "r.local/predictor-gpu:3"  # the spec's default is a GPU node
    )
    cpu = InferenceServiceSpec.release("r.local", "3", model_version="3", storage_uri=BUNDLE, gpu=False)
    assert cpu.image == "r.local/predictor:3"
    example = render_inference_service(example_spec())
    assert predictor(example)["containers"][0]["image"].endswith("/predictor-gpu:0.1.0")

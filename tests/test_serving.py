"""The KServe predictor over HTTP: V1/V2 DICOM and tensors, typed 4xx, /metrics, batching, alias reload."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import torch

from dicom_router import LABELS, stack
from dicom_router.candidates import save_bundle
from dicom_router.config import Settings
from dicom_router.dicom.errors import InvalidPixelData, NotDicom
from dicom_router.inference import ALLOW_SPINNING, Bundle, PreprocessConfig
from dicom_router.models import BodyPartNet, export_bundle
from dicom_router.registry import connect, experiment, register_bundle
from dicom_router.serving.client import ModelClient, parse_statistics
from dicom_router.serving.predictor import check_images, v1_instances
from dicom_router.storage import S3Store, open_store, upload_folder
from dicom_router.synth import synthesize
from tests.dicom_factory import dicom_bytes


@pytest.fixture(scope="module")
def dicoms(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, 6, sites=2, seed=3, long_side_px=64)
    return [p.read_bytes() for p in sorted(out.rglob("*.dcm"))]


@pytest.fixture
def server(settings: Settings, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("DICOM_ROUTER_MODEL_URI", str(tiny_bundle))
    monkeypatch.setenv("DICOM_ROUTER_SERVE_MAX_REQUEST_BYTES", str(2_000_000))
    try:
        yield stack.model_server_up(Settings())
    finally:
        stack.down(settings)


def _wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ModelClient(url).ready():
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} never became ready")


def test_v1_and_v2_dicom_requests_get_labels_probabilities_and_the_version(
    server: str, dicoms: list[bytes]
) -> None:
    _wait_ready(server)
    v1 = httpx.post(
        f"{server}/v1/models/bodypart-router:predict",
        json={"instances": [{"b64": base64.b64encode(d).decode()} for d in dicoms[:3]]},
        timeout=30,
    )
    assert v1.status_code == 200
    predictions = v1.json()["predictions"]
    assert len(predictions) == 3
    for p in predictions:
        assert p["label"] in LABELS and list(p["probabilities"]) == list(LABELS)
        assert p["confidence"] == pytest.approx(max(p["probabilities"].values()))
        assert p["model"] == "bodypart-router" and p["version"] == "local"
        assert p["low_confidence"] is (p["confidence"] < 0.5)
        assert "review_threshold" not in p  # a model trained without cross-validation brings none
    answer = ModelClient(server).classify(dicoms[0], embedding=True)
    assert answer.label == predictions[0]["label"]
    assert answer.confidence == pytest.approx(predictions[0]["confidence"], abs=1e-6)
    assert answer.embedding is not None and answer.embedding.ndim == 1 and answer.model_version == "local"
    assert answer.review_threshold is None
    assert answer.statistics is not None and 0.0 <= answer.statistics["mean"] <= 1.0  # for the inference log


def test_preprocessed_tensors_are_accepted_and_checked(server: str) -> None:
    _wait_ready(server)
    image = np.zeros((1, 1, 32, 32), dtype=np.float32)
    ok = httpx.post(
        f"{server}/v2/models/bodypart-router/infer",
        json={
            "inputs": [
                {"name": "image", "shape": [1, 1, 32, 32], "datatype": "FP32", "data": image.ravel().tolist()}
            ]
        },
        timeout=30,
    )
    assert ok.status_code == 200
    names = {o["name"] for o in ok.json()["outputs"]}
    assert {"label", "probabilities", "confidence"} <= names
    wrong = httpx.post(
        f"{server}/v1/models/bodypart-router:predict",
        json={"instances": [{"image": [[0.0] * 8] * 8}]},
        timeout=30,
    )
    assert wrong.status_code == 422 and wrong.json()["type"] == "InvalidPixelData"


def test_bad_payloads_get_4xx_with_the_contract_error_type(server: str, dicoms: list[bytes]) -> None:
    _wait_ready(server)
    predict = f"{server}/v1/models/bodypart-router:predict"
    not_dicom = httpx.post(predict, json={"instances": [{"b64": base64.b64encode(b"hello world").decode()}]})
    assert not_dicom.status_code == 422 and not_dicom.json()["type"] == "NotDicom"
    truncated = httpx.post(predict, json={"instances": [{"b64": base64.b64encode(dicoms[0][:600]).decode()}]})
    assert truncated.status_code == 422 and truncated.json()["type"] in ("Truncated", "NoPixelData")
    empty = httpx.post(predict, json={"instances": []})
    assert empty.status_code == 422 and empty.json()["type"] == "NotDicom"
    too_big = httpx.post(predict, content=b"\0" * 2_000_001, headers={"content-type": "application/dicom"})
    assert too_big.status_code == 413 and too_big.json()["type"] == "ImageTooLarge"
    raw = httpx.post(predict, content=dicoms[0], headers={"content-type": "application/dicom"})
    assert raw.status_code == 200 and raw.json()["predictions"][0]["label"] in LABELS
    with pytest.raises(NotDicom):
        ModelClient(server).classify(b"not a dicom file")
    metrics = httpx.get(f"{server}/metrics").text
    assert 'dicom_router_rejected_total{type="NotDicom"}' in metrics
    assert 'dicom_router_rejected_total{type="ImageTooLarge"}' in metrics
    assert "dicom_router_batch_size_count" in metrics


def test_concurrent_requests_are_batched_into_fewer_model_runs(server: str, dicoms: list[bytes]) -> None:
    _wait_ready(server)
    from concurrent.futures import ThreadPoolExecutor

    def batches() -> float:
        for line in httpx.get(f"{server}/metrics").text.splitlines():
            if line.startswith("dicom_router_batch_size_count"):
                return float(line.split()[-1])
        return 0.0

    before = batches()
    client = ModelClient(server)
    with ThreadPoolExecutor(8) as pool:
        labels = list(pool.map(lambda d: client.classify(d).label, dicoms * 4))
    assert len(labels) == 24
    runs = batches() - before
    assert 1 <= runs < 24, f"{runs} model runs for 24 concurrent requests"


def _registered(settings: Settings, folders: list[Path], tmp_path: Path) -> list[str]:
    """Register each bundle folder as a version of the model; returns the versions."""
    experiment_id = experiment(settings, "serving-test")
    versions = []
    for i, folder in enumerate(folders):
        save_bundle(Bundle(folder), tmp_path / f"mlflow-{i}")
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_artifacts(str(tmp_path / f"mlflow-{i}"), "bundle")
        versions.append(str(register_bundle(settings, run.info.run_id, {}).version))
    return versions


def test_the_server_follows_the_champion_alias_without_restart(
    settings: Settings,
    tiny_bundle: Path,
    dicoms: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    client = connect(settings)
    copies = []
    for i in range(2):
        copies.append(tmp_path / f"v{i}")
        shutil.copytree(tiny_bundle, copies[-1])
        (copies[-1] / "card.json").write_text(json.dumps({"copy": i}))
    versions = _registered(settings, copies, tmp_path)
    monkeypatch.setenv("DICOM_ROUTER_MODEL_POLL_S", "0.3")
    url = stack.model_server_up(Settings())
    try:
        model = ModelClient(url)
        time.sleep(1.0)
        assert not model.ready(), "no champion yet: the server must be live but not ready"
        client.set_registered_model_alias(settings.registered_model, "champion", versions[0])
        _wait_ready(url)
        assert model.classify(dicoms[0]).model_version == versions[0]
        client.set_registered_model_alias(settings.registered_model, "champion", versions[1])
        deadline = time.monotonic() + 30
        while model.classify(dicoms[0]).model_version != versions[1]:
            assert time.monotonic() < deadline, "the server did not pick up the moved alias"
            time.sleep(0.2)
    finally:
        stack.down(settings)


def test_v1_bodies_are_parsed_strictly() -> None:
    assert v1_instances(b"\x00DICM") == [b"\x00DICM"]
    with pytest.raises(NotDicom):
        v1_instances({"instances": [{"b64": "***"}]})
    with pytest.raises(NotDicom):
        v1_instances({"instances": [{"url": "http://example.org/x.dcm"}]})
    image = check_images(np.zeros((2, 32, 32), np.float32), PreprocessConfig(image_size=32))
    assert image.shape == (2, 1, 32, 32)
    assert dicom_bytes(np.zeros((4, 4), np.uint16))  # the factory still builds valid input for the others


@pytest.fixture
def server_that_loses_decoders(
    killing_decoder: bytes, settings: Settings, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, bytes]]:
    monkeypatch.setenv("DICOM_ROUTER_MODEL_URI", str(tiny_bundle))
    try:
        yield stack.model_server_up(Settings()), killing_decoder
    finally:
        stack.down(settings)


def test_a_file_that_kills_its_decoder_fails_alone_and_the_server_keeps_serving(
    server_that_loses_decoders: tuple[str, bytes], dicoms: list[bytes]
) -> None:
    server, poison = server_that_loses_decoders
    _wait_ready(server)
    from concurrent.futures import ThreadPoolExecutor

    client = ModelClient(server)

    def classify(data: bytes) -> str:
        try:
            return client.classify(data).label
        except InvalidPixelData as exc:
            return f"refused: {exc.reason}"

    with ThreadPoolExecutor(8) as pool:  # the poison among good requests in flight in the same pool
        answers = list(pool.map(classify, [*dicoms[:3], poison, *dicoms[3:], *dicoms]))
    refused = [a for a in answers if a.startswith("refused")]
    assert len(refused) == 1 and "decoder process died" in refused[0]
    assert all(a in LABELS for a in answers if not a.startswith("refused"))
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200
    assert [client.classify(d).label for d in dicoms]  # later requests are served by the new pool
    metrics = httpx.get(f"{server}/metrics").text
    crashes = next(
        line for line in metrics.splitlines() if line.startswith("dicom_router_decoder_crashes_total ")
    )
    assert float(crashes.split()[-1]) >= 1


def test_answers_during_alias_swaps_come_from_the_model_whose_version_they_report(
    settings: Settings,
    tiny_bundle: Path,
    dicoms: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    torch.manual_seed(1)
    wider = export_bundle(BodyPartNet("resnet18").eval(), PreprocessConfig(image_size=48), {}, tmp_path / "w")
    folders = [tiny_bundle, wider]  # two input sizes: a mixed batch could not even run
    versions = _registered(settings, folders, tmp_path)
    local = {v: Bundle(folder) for v, folder in zip(versions, folders, strict=True)}
    expected: dict[str, list[dict[str, float]]] = {}
    for version, bundle in local.items():
        results, _ = bundle.predict_items([("d", d) for d in dicoms], max_pixels=10**8)
        expected[version] = [r.probabilities for r in results if not isinstance(r, Exception)]
    client = connect(settings)
    client.set_registered_model_alias(settings.registered_model, "champion", versions[0])
    monkeypatch.setenv("DICOM_ROUTER_MODEL_POLL_S", "0.1")
    url = stack.model_server_up(Settings())
    stop = threading.Event()

    def flip() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            client.set_registered_model_alias(settings.registered_model, "champion", versions[i % 2])
            time.sleep(0.15)

    try:
        _wait_ready(url)
        model = ModelClient(url)
        flipper = threading.Thread(target=flip)
        flipper.start()
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: (i, model.classify(dicoms[i % len(dicoms)])), range(240)))
        stop.set()
        flipper.join()
    finally:
        stop.set()
        stack.down(settings)
    assert {a.model_version for _, a in answers} == set(versions)  # both models answered under load
    for i, answer in answers:
        want = expected[answer.model_version][i % len(dicoms)]
        assert answer.probabilities == pytest.approx(want, abs=1e-4)


def test_image_statistics_survive_json_where_nan_is_null() -> None:
    output = np.array([b'{"mean": 0.5, "spacing": null}'], dtype=object)
    parsed = parse_statistics(output)
    assert parsed is not None and parsed["mean"] == 0.5 and math.isnan(parsed["spacing"])
    assert parse_statistics(np.array([b"not json"], dtype=object)) is None  # then the log decodes itself


def test_sigterm_lets_a_request_in_flight_finish_and_the_server_exits_as_a_containers_pid_1(
    settings: Settings, tiny_bundle: Path, dicoms: list[bytes], tmp_path: Path
) -> None:
    port = stack.free_port()
    exe = Path(sys.executable).parent / "dicom-router"
    serve = [str(exe), "serve", "--model", str(tiny_bundle), "--port", str(port)]
    as_pid_1 = ["unshare", "--pid", "--fork", "--kill-child"]  # PID 1 ignores signals it has no handler for
    env = {**os.environ, "DICOM_ROUTER_DATA_DIR": str(settings.data_dir)}
    with (tmp_path / "serve.log").open("wb") as out:
        proc = subprocess.Popen([*as_pid_1, *serve], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url)
        (server_pid,) = map(int, Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())
        status = Path(f"/proc/{server_pid}/status").read_text().splitlines()
        assert next(line for line in status if line.startswith("NSpid:")).split()[-1] == "1"
        body = json.dumps(
            {"inputs": [{"name": "dicom", "shape": [1], "datatype": "BYTES", "data": [_b64(dicoms[0])]}]}
        ).encode()
        rest_of_body = threading.Event()

        def chunks() -> Iterator[bytes]:
            yield body[:64]
            rest_of_body.wait(60)
            yield body[64:]

        answers: list[httpx.Response] = []
        request = threading.Thread(
            target=lambda: answers.append(
                httpx.post(
                    f"{url}/v2/models/bodypart-router/infer",
                    content=chunks(),
                    headers={"content-type": "application/json", "content-length": str(len(body))},
                    timeout=60,
                )
            )
        )
        request.start()
        time.sleep(1.0)  # the request is in flight: its head and part of its body were sent
        os.kill(server_pid, signal.SIGTERM)
        _wait_refused(url)  # it takes no new connection
        rest_of_body.set()
        request.join(60)
        assert len(answers) == 1 and answers[0].status_code == 200
        assert answers[0].json()["outputs"][0]["data"][0] in LABELS
        assert proc.wait(timeout=settings.serve_shutdown_grace_s) == 0
    finally:
        proc.kill()
        proc.wait()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _wait_refused(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/v2/health/live", timeout=2)
        except httpx.ConnectError:
            return
        time.sleep(0.1)
    raise AssertionError(f"{url} still accepts connections after SIGTERM")


def test_a_bundle_published_to_the_bucket_is_served_from_its_s3_uri(
    s3_settings: Settings, tiny_bundle: Path, dicoms: list[bytes]
) -> None:
    uri = f"s3://{s3_settings.s3_bucket}/models/bodypart-router/7"
    store = open_store(uri, s3_settings)
    assert isinstance(store, S3Store)
    store.ensure_bucket()
    upload_folder(tiny_bundle, store)
    settings = s3_settings.model_copy(update={"model_uri": uri})
    url = stack.model_server_up(settings)  # a plain Deployment's predictor: no storage initializer
    try:
        _wait_ready(url)
        answer = ModelClient(url).classify(dicoms[0])
        assert answer.label in LABELS and answer.model_version == "local"
        fetched = next((settings.data_dir / "bundles").iterdir())
        assert sorted(p.name for p in fetched.iterdir()) == sorted(p.name for p in tiny_bundle.iterdir())
    finally:
        stack.Process("model_server", settings).stop()


def test_bundle_sessions_do_not_spin_wait_so_a_shared_node_keeps_its_cpu(tiny_bundle: Path) -> None:
    """The model server shares its node with Orthanc and the router: idle ONNX threads must sleep."""
    options = Bundle(tiny_bundle).session.get_session_options()
    assert options.get_session_config_entry(ALLOW_SPINNING) == "0"

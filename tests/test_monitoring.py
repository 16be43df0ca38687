"""Drift monitoring: features, the inference log (local and S3), drift per group and its alerts, the
webhook, the Evidently workspace as the real UI serves it, and the reference stored with a model version.

Images are tiny synthetic radiographs scored by a real (untrained, exported) ONNX bundle, exactly as the
routing worker would log them; the receivers (HTTP webhook, Evidently UI, rclone S3) are real servers.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pydicom
import pytest
from evidently.core.report import Snapshot

from dicom_router import stack
from dicom_router.candidates import save_bundle
from dicom_router.catalog import ingest
from dicom_router.config import Settings
from dicom_router.dicom.decode import decode_bytes
from dicom_router.dicom.deid import load_key
from dicom_router.inference import Bundle, statistics_of
from dicom_router.monitoring.alerts import post_webhook
from dicom_router.monitoring.dashboard import (
    UI_ENV,
    UI_READY_PATH,
    evidently_ui_argv,
    log_report_to_mlflow,
    project_name,
)
from dicom_router.monitoring.drift import EXIT_ALERT, AlertRules, DriftInputError, exit_code, run_drift
from dicom_router.monitoring.features import (
    EMBEDDING_COLUMNS,
    image_statistics,
    project_embedding,
    projection_matrix,
)
from dicom_router.monitoring.inference_log import (
    InferenceLog,
    InstanceLogger,
    coarse_time,
    log_record,
    read_inference_log,
    read_window,
    records_frame,
    score_items,
)
from dicom_router.monitoring.job import DriftJob, drift_job, parse_window
from dicom_router.monitoring.reference import load_frame, load_reference, reference_for_model
from dicom_router.registry import connect, experiment, register_bundle
from dicom_router.synth import new_equipment_at, synthesize
from tests.conftest import familiar_bundle, run_cli

KEY = b"monitoring-test-pseudonym-key"
MAX_PIXELS = 10_000_000
SIDE = 48
GROUP_KEYS = {"by", "n_reference", "n_current", "new_source", "drift_share", "drifted_columns", "alert"}


def _logged(
    bundle: Bundle, out: Path, n: int, *, seed: int, site_profile: str | None = None, key: bytes = KEY
) -> pd.DataFrame:
    """Synthesize ``n`` images and log them as the routing worker would (decode, classify, record)."""
    records = synthesize(out, n, sites=4, seed=seed, site_profile=site_profile, long_side_px=SIDE)
    return _score(bundle, [out / r.file for r in records], key)


def _score(bundle: Bundle, files: list[Path], key: bytes = KEY) -> pd.DataFrame:
    rows, errors = score_items(
        [(str(f), f.read_bytes()) for f in files], bundle, key=key, max_pixels=MAX_PIXELS
    )
    assert not errors
    return records_frame(rows)


def _new_detector_at(site: str, out: Path, n: int, seed: int) -> list[Path]:
    return [out / r.file for r in new_equipment_at(site, out, n, seed=seed, long_side_px=SIDE)]


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return Bundle(tiny_bundle, version="1")


@pytest.fixture(scope="module")
def reference(bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The four known sites, 60 instances each."""
    return _logged(bundle, tmp_path_factory.mktemp("reference"), 240, seed=1)


# --- features --------------------------------------------------------------------------------------


def test_image_statistics_describe_the_displayed_image() -> None:
    pixels = np.zeros((40, 20), np.float32)
    pixels[:, 10:] = 1.0
    stats = image_statistics(pixels, 0.2)
    assert stats["mean"] == pytest.approx(0.5) and stats["std"] == pytest.approx(0.5)
    assert (stats["p1"], stats["p5"], stats["p95"], stats["p99"]) == (0.0, 0.0, 1.0, 1.0)
    assert stats["entropy"] == pytest.approx(1.0)
    assert stats["aspect"] == 2.0 and stats["spacing"] == 0.2
    assert math.isnan(image_statistics(pixels, None)["spacing"])
    ramp = np.linspace(0, 1, 10_001, dtype=np.float32).reshape(1, -1)
    assert image_statistics(ramp, None)["p50"] == pytest.approx(0.5, abs=1e-3)


def test_embedding_projection_is_fixed_by_the_embedding_width() -> None:
    embedding = np.random.default_rng(0).random((3, 512), np.float32)
    projected = project_embedding(embedding)
    assert projected.shape == (3, len(EMBEDDING_COLUMNS)) and projected.dtype == np.float32
    projection_matrix.cache_clear()
    np.testing.assert_array_equal(project_embedding(embedding), projected)
    assert not np.allclose(projection_matrix(256)[:8], projection_matrix(512)[:8])
    with pytest.raises(ValueError, match=r"\[n, D\]"):
        project_embedding(embedding[0])


# --- the inference log -----------------------------------------------------------------------------


def test_log_records_carry_the_catalogs_ids_and_no_patient_data(settings: Settings, tmp_path: Path) -> None:
    synthesize(tmp_path / "dicom", 6, sites=2, seed=5, long_side_px=SIDE)
    catalog = ingest(
        str(tmp_path / "dicom"),
        str(tmp_path / "catalog.parquet"),
        settings.model_copy(update={"workers": 1}),
        progress=False,
    ).catalog
    key = load_key(settings)
    for row in catalog.itertuples():
        data = (tmp_path / "dicom" / str(row.key)).read_bytes()
        decoded = decode_bytes(data, str(row.key), max_pixels=MAX_PIXELS)
        routed_at = datetime(2026, 3, 1, 14, 37, 12, 345, tzinfo=UTC)
        statistics = statistics_of(decoded)
        record = log_record(
            decoded.dataset, statistics, ("spine", 0.7), np.ones(512), "bodypart-router/1", routed_at, key=key
        )
        assert record["at"] == datetime(2026, 3, 1, 14, tzinfo=UTC)  # the hour, no finer
        assert record["age_years"] == int(record["age_years"]) or record["age_years"] < 2
        for column in ("sop_uid_hash", "site_id", "scanner_id", "manufacturer", "model_name", "kvp", "rows"):
            assert record[column] == getattr(row, column), column
        assert record["pred_label"] == "spine" and record["confidence"] == 0.7
        assert set(EMBEDDING_COLUMNS) <= set(record) and not math.isnan(record["emb_0"])
        text = json.dumps(record, default=str)
        ds = decoded.dataset
        assert "patient_hash" not in record and "patient" not in text.lower()
        for phi in (
            ds.PatientID,
            str(ds.PatientName),
            ds.PatientBirthDate,
            ds.AccessionNumber,
            ds.SOPInstanceUID,
        ):
            assert str(phi) not in text


def _timed_records(
    frame: pd.DataFrame, start: datetime, step: timedelta = timedelta(hours=6)
) -> list[dict[str, Any]]:
    """The frame's rows as log records stamped ``start``, ``start + step``, ..."""
    return [
        {**{str(k): v for k, v in row.items()}, "at": start + i * step}
        for i, row in enumerate(frame.to_dict("records"))
    ]


def test_inference_log_batches_in_the_background_and_reads_back_by_window(
    reference: pd.DataFrame, settings: Settings, tmp_path: Path
) -> None:
    prefix = str(tmp_path / "log")
    start = datetime(2026, 3, 1, 1, tzinfo=UTC)
    records = _timed_records(reference.head(10), start)  # 2.5 days: three date partitions
    with InferenceLog(prefix, settings, flush_every=4, flush_after_s=0.3) as log:
        began = time.perf_counter()
        for record in records[:9]:
            log.append(record)
        assert time.perf_counter() - began < 0.05  # appending never waits on storage
        assert log.flush(timeout=30)
        assert log.written == 9
        log.append(records[9])
        deadline = time.monotonic() + 10
        while log.written < 10 and time.monotonic() < deadline:  # the time limit flushes it, no call
            time.sleep(0.05)
        assert log.written == 10
    parts = sorted(p.relative_to(tmp_path / "log").as_posix() for p in (tmp_path / "log").rglob("*.parquet"))
    assert {p.split("/")[0] for p in parts} == {"date=2026-03-01", "date=2026-03-02", "date=2026-03-03"}
    assert all(p.split("/")[1].startswith("part-") for p in parts)
    frame = read_inference_log(prefix, settings)
    assert len(frame) == 10 and list(frame["sop_uid_hash"]) == [r["sop_uid_hash"] for r in records]
    recent = read_inference_log(prefix, settings, since=start + timedelta(hours=30))
    assert len(recent) == 5 and recent["at"].min() >= pd.Timestamp(start + timedelta(hours=30))


def test_the_inference_log_writes_to_s3(reference: pd.DataFrame, s3_settings: Settings) -> None:
    prefix = f"s3://{s3_settings.s3_bucket}/monitoring-test/log"
    with InferenceLog(prefix, s3_settings, flush_every=100) as log:
        for record in _timed_records(reference.head(3), datetime(2026, 3, 1, tzinfo=UTC)):
            log.append(record)
    assert log.written == 3 and all(p.startswith(prefix + "/date=2026-03-01/part-") for p in log.parts)
    frame = read_inference_log(prefix, s3_settings)
    assert list(frame.columns) == list(records_frame([]).columns) and len(frame) == 3


def test_a_storage_outage_loses_no_appends_and_raises_nothing(
    reference: pd.DataFrame, settings: Settings, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log's folder should be")
    log = InferenceLog(str(blocker / "log"), settings, flush_every=2, flush_after_s=0.1)
    for record in _timed_records(reference.head(5), datetime(2026, 3, 1, tzinfo=UTC)):
        log.append(record)
    assert log.flush(timeout=10) is False and log.written == 0
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.append({})


def test_records_lost_in_an_outage_are_counted_in_the_log_and_in_the_drift_report(
    reference: pd.DataFrame, settings: Settings, tmp_path: Path
) -> None:
    blocker = tmp_path / "log"
    blocker.write_text("a file where the log's folder should be")
    log = InferenceLog(str(blocker), settings, flush_every=100, flush_after_s=60, max_pending=3)
    for record in _timed_records(reference.head(5), datetime(2026, 3, 1, tzinfo=UTC)):
        log.append(record)
    assert log.flush(timeout=10) is False and log.dropped == 2  # the two oldest gave way
    blocker.unlink()  # storage is back
    assert log.flush(timeout=10) is True
    log.close()
    window = read_window(str(blocker), settings)
    assert (len(window.frame), window.lost) == (3, 2)
    ref_path = tmp_path / "reference.parquet"
    reference.to_parquet(ref_path)
    job = DriftJob(
        reference=str(ref_path),
        current=str(blocker),
        report_uri=str(tmp_path / "r.html"),
        log_to_mlflow=False,
    )
    result = drift_job(settings, job)
    assert result.document()["lost_records"] == 2
    assert "Inference-log records lost in this window: 2" in (tmp_path / "r.html").read_text()
    assert result.document()["window_report"] == str(tmp_path / "r.window" / "report.html")
    traffic = json.loads((tmp_path / "r.window" / "report.json").read_text())  # what the window held
    assert traffic["instances"] == 3 and traffic["studies"] is None  # the log keeps no study pseudonym
    assert sum(r["n"] for r in traffic["labels"]["predicted"]) == 3


@dataclass(frozen=True)
class _Answer:
    """The model server's answer as the routing worker holds it (``serving.client.Classification``)."""

    label: str
    confidence: float
    model_version: str
    embedding: np.ndarray | None
    statistics: dict[str, float] | None = None
    shadow_label: str | None = None
    shadow_confidence: float | None = None
    shadow_version: str | None = None
    novelty: float | None = None


def test_the_routing_hook_logs_each_classified_instance_off_the_routing_path(
    settings: Settings, tmp_path: Path
) -> None:
    records = synthesize(tmp_path / "dicom", 5, sites=2, seed=6, long_side_px=SIDE)
    first = (tmp_path / "dicom" / records[0].file).read_bytes()
    served = {**statistics_of(decode_bytes(first, "first", max_pixels=MAX_PIXELS)), "mean": 0.123}
    hook = InstanceLogger(InferenceLog(str(tmp_path / "log"), settings), settings)
    began = time.perf_counter()
    for i, record in enumerate(records):
        data = (tmp_path / "dicom" / record.file).read_bytes()
        answer = _Answer(
            "spine", 0.8, "3", np.ones(512, np.float32), served if i == 0 else None, novelty=0.5 + i
        )
        hook(f"orthanc-{i}", data, answer)
    hook("orthanc-bad", b"not a dicom", _Answer("spine", 0.8, "3", None))
    queued_s = time.perf_counter() - began
    hook.close()
    assert queued_s < 0.05 and hook.failed == 1 and hook.dropped == 0
    assert read_window(str(tmp_path / "log"), settings).lost == 1  # the unreadable one
    frame = read_inference_log(str(tmp_path / "log"), settings)
    assert len(frame) == 5 and set(frame["model_version"]) == {"bodypart-router/3"}
    assert frame["img_mean"].notna().all() and frame["emb_7"].notna().all()
    assert frame["site_id"].nunique() == 2
    assert (frame["img_mean"] == 0.123).sum() == 1  # taken from the answer, not decoded again
    assert sorted(frame["novelty"]) == [0.5, 1.5, 2.5, 3.5, 4.5]


# --- drift per group -------------------------------------------------------------------------------


def _document_shape(document: dict[str, Any]) -> None:
    assert set(document) >= {"alert", "groups", "report_html"}
    for group in document["groups"]:
        assert set(group) >= GROUP_KEYS
        assert isinstance(group["drift_share"], float) and isinstance(group["drifted_columns"], list)


def test_new_site_alerts_at_its_first_instance(
    bundle: Bundle, reference: pd.DataFrame, tmp_path: Path
) -> None:
    known = _logged(bundle, tmp_path / "known", 40, seed=7)
    newcomer = _logged(bundle, tmp_path / "new", 1, seed=8, site_profile="site-new")
    result = run_drift(reference, pd.concat([known, newcomer]), ["site_id", "scanner_id"], AlertRules())
    document = result.document()
    _document_shape(document)
    new_site = newcomer["site_id"].iloc[0]
    alerting = [g for g in document["groups"] if g["alert"]]
    assert {json.dumps(g["by"]) for g in alerting} == {
        json.dumps({"site_id": new_site}),
        json.dumps({"scanner_id": newcomer["scanner_id"].iloc[0]}),
    }
    site_group = next(g for g in alerting if "site_id" in g["by"])
    assert (
        site_group["new_source"] is True and site_group["n_current"] == 1 and site_group["n_reference"] == 0
    )
    assert document["groups"][0]["by"] == {} and document["groups"][0]["n_current"] == 40  # new site kept out
    assert document["alert"] is True and exit_code(result) == EXIT_ALERT == 3


def test_a_site_whose_images_the_model_does_not_know_drifts_in_novelty(tmp_path: Path) -> None:
    synthesize(tmp_path / "train", 80, sites=4, seed=21, long_side_px=SIDE)
    familiar = Bundle(familiar_bundle(tmp_path / "bundle", tmp_path / "train"), version="1")
    reference = _logged(familiar, tmp_path / "reference", 160, seed=22)
    records = synthesize(tmp_path / "window", 160, sites=4, seed=23, long_side_px=SIDE)
    files = [tmp_path / "window" / r.file for r in records]
    sites = list(_score(familiar, files)["site_id"])  # in file order
    site = sites[0]
    for path, at in zip(files, sites, strict=True):  # the site's own headers, but a view never trained on
        if at == site:
            ds = pydicom.dcmread(path)
            board = np.indices(ds.pixel_array.shape).sum(axis=0) // 6 % 2 * (2**ds.BitsStored - 1)
            ds.set_pixel_data(board.astype(ds.pixel_array.dtype), ds.PhotometricInterpretation, ds.BitsStored)
            ds.save_as(path)
    window = _score(familiar, files)
    assert reference["novelty"].notna().all() and window["novelty"].notna().all()  # logged per instance
    assert window.loc[window["site_id"] == site, "novelty"].min() > 1.0  # all unfamiliar there

    result = run_drift(reference, window, ["site_id"], AlertRules(column_sets=("prediction",)))
    by_site = {g.by.get("site_id"): g for g in result.groups if g.by}
    assert "novelty" in by_site[site].drifted_columns and by_site[site].alert
    assert all("novelty" not in g.drifted_columns for name, g in by_site.items() if name != site)


def test_in_distribution_windows_do_not_alert(
    bundle: Bundle, reference: pd.DataFrame, tmp_path: Path
) -> None:
    for seed in (2, 3):
        window = _logged(bundle, tmp_path / f"w{seed}", 160, seed=seed)
        result = run_drift(reference, window, ["site_id", "scanner_id"], AlertRules())
        assert len(result.groups) == 9 and all(g.evaluated for g in result.groups)
        assert not result.alert, [g.reason for g in result.groups if g.alert]
        assert exit_code(result) == 0


def test_a_known_site_with_a_new_detector_alerts(
    bundle: Bundle, reference: pd.DataFrame, tmp_path: Path
) -> None:
    others = _logged(bundle, tmp_path / "others", 90, seed=4)
    others = others[others["site_id"] != reference["site_id"].iloc[0]]
    changed = _score(bundle, _new_detector_at("site-a", tmp_path / "changed", 40, seed=9))
    site_a = changed["site_id"].iloc[0]
    assert site_a in set(reference["site_id"])  # same hospital, as the catalog identifies it

    result = run_drift(reference, pd.concat([others, changed]), ["site_id"], AlertRules())
    by_site = {g.by.get("site_id"): g for g in result.groups}
    assert by_site[site_a].alert and not by_site[site_a].new_source
    assert {"manufacturer", "model_name", "photometric", "img_mean"} <= set(by_site[site_a].drifted_columns)
    assert by_site[site_a].drift_share >= AlertRules().drift_share
    assert [g.name for g in result.groups[1:] if g.alert] == [f"site_id={site_a}"]  # the other sites: no
    evaluated = [g for g in result.groups if g.evaluated]
    assert len(evaluated) >= 2
    for group in evaluated:  # alert, HTML and dashboard read one Evidently run: they agree
        assert group.snapshot is not None
        count, share = _shown_drift(group.snapshot)
        assert count == len(group.drifted_columns) and share == pytest.approx(group.drift_share)
    by_scanner = run_drift(reference, changed, ["site_id", "scanner_id"], AlertRules())
    assert [g.new_source for g in by_scanner.groups if "scanner_id" in g.by] == [True]


def _shown_drift(snapshot: Snapshot) -> tuple[int, float]:
    """The drifted-columns count and share that the group's report and dashboard show."""
    (value,) = [
        m["value"] for m in snapshot.dict()["metrics"] if m["metric_name"].startswith("DriftedColumnsCount")
    ]
    return int(value["count"]), float(value["share"])


def test_rules_windows_and_inputs_are_checked_before_any_work(
    reference: pd.DataFrame, settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "drift_share: 0.4\nmin_samples: 50\ncritical_columns: [pred_label]\nset_shares: {image: 0.5}\n"
    )
    rules = AlertRules.from_yaml(path)
    assert (rules.drift_share, rules.min_samples, rules.critical_columns) == (0.4, 50, ("pred_label",))
    assert rules.set_shares == {"image": 0.5} and rules.threshold == 0.01 and rules.num_method == "ks"
    for bad in ("column_sets: [metadata, colours]\n", "set_shares: {colours: 0.5}\n"):
        path.write_text(bad)
        with pytest.raises(ValueError, match="unknown column sets"):
            AlertRules.from_yaml(path)
    assert parse_window("24h") == timedelta(hours=24) and parse_window("90m") == timedelta(minutes=90)
    with pytest.raises(ValueError, match="window"):
        parse_window("yesterday")
    with pytest.raises(DriftInputError, match="no such file"):
        load_frame(str(tmp_path / "missing.parquet"), settings)
    with pytest.raises(DriftInputError, match="--by hospital"):
        run_drift(reference, reference, ["hospital"], AlertRules())


# --- webhook, workspace and UI, MLflow ---------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A real HTTP endpoint on loopback that records the JSON bodies POSTed to it."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            assert self.headers["Content-Type"] == "application/json"
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hooks/drift", received
    finally:
        server.shutdown()
        server.server_close()


def test_webhook_receives_the_alert_document(receiver: tuple[str, list[dict[str, Any]]]) -> None:
    url, received = receiver
    document = {"alert": True, "groups": [{"by": {"site_id": "abc"}, "alert": True}], "report_html": "r.html"}
    assert post_webhook(url, document) is True
    assert received == [document]
    assert post_webhook("http://127.0.0.1:9/nothing-listens", document, timeout_s=2) is False


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_a_drift_job_alerts_the_webhook_and_the_ui_lists_its_snapshots(
    bundle: Bundle,
    reference: pd.DataFrame,
    settings: Settings,
    receiver: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    url, received = receiver
    reference_uri = str(tmp_path / "reference.parquet")
    reference.to_parquet(reference_uri)
    now = datetime.now(UTC)
    log_prefix = str(tmp_path / "log")
    window = pd.concat(
        [
            _logged(bundle, tmp_path / "known", 40, seed=11),
            _logged(bundle, tmp_path / "new", 3, seed=12, site_profile="site-new"),
        ]
    )
    with InferenceLog(log_prefix, settings) as log:
        for record in _timed_records(window, now - timedelta(minutes=5), timedelta(0)):
            log.append(record)
        log.append(_timed_records(window.head(1), now - timedelta(days=3))[0])  # outside the window
    workspace = tmp_path / "workspace"
    job = DriftJob(
        reference=reference_uri,
        current=log_prefix,
        by=("site_id",),
        window=parse_window("24h"),
        webhook=url,
        workspace=workspace,
        deployment="test",
        log_to_mlflow=False,
    )
    result = drift_job(settings, job, now=now)
    assert result.alert and result.document()["window_report"]
    assert received == [{**result.document(), "window_report": None}]  # the alert left before that report
    assert sum(g["n_current"] for g in received[0]["groups"][1:]) == 43
    html = Path(str(result.report_html)).read_text()
    assert html.startswith("<html") or "<!DOCTYPE" in html[:200]

    port = stack.free_port()
    ui = stack.Process("evidently-test", settings)
    base = f"http://127.0.0.1:{port}"
    ui.start(evidently_ui_argv(workspace, port), lambda: stack.http_ok(base + UI_READY_PATH), env=UI_ENV)
    try:
        projects = _get(f"{base}/api/projects")
        project = next(p for p in projects if p["name"] == project_name("test"))
        snapshots = _get(f"{base}/api/projects/{project['id']}/snapshots")
        assert len(snapshots) == len(result.groups) == 6
        groups = {s["metadata"]["group"] for s in snapshots}
        assert {"overall", *(f"site_id={g.by['site_id']}" for g in result.groups[1:])} == groups
        dashboard = _get(f"{base}/api/v2/dashboards/{project['id']}")
        tabs = [t["title"] for t in dashboard["tabs"]]
        assert tabs[0] == "Overview" and len(tabs) == 1 + 5  # one tab per site

        result = drift_job(settings, job, now=now + timedelta(minutes=1))  # the UI picks up a later run
        deadline = time.monotonic() + 20
        while (
            len(_get(f"{base}/api/projects/{project['id']}/snapshots")) < 12 and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        assert len(_get(f"{base}/api/projects/{project['id']}/snapshots")) == 12
    finally:
        ui.stop()


def test_the_reference_is_stored_with_the_model_version(
    bundle: Bundle, settings: Settings, tmp_path: Path
) -> None:
    synthesize(tmp_path / "dicom", 24, sites=2, seed=13, long_side_px=SIDE)
    catalog_uri = str(tmp_path / "catalog.parquet")
    labels = str(tmp_path / "dicom" / "labels.csv")
    one_worker = settings.model_copy(update={"workers": 1})
    catalog = ingest(
        str(tmp_path / "dicom"), catalog_uri, one_worker, labels_uri=labels, progress=False
    ).catalog
    validation = set(catalog["sop_uid_hash"][:10])
    connect(settings)
    with (
        mlflow.start_run(experiment_id=experiment(settings, "monitoring-test")) as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        save_bundle(bundle, Path(tmp) / "bundle")
        mlflow.log_artifacts(str(Path(tmp) / "bundle"), "bundle")
        assignment = {h: ("val" if h in validation else "train") for h in catalog["sop_uid_hash"]}
        mlflow.log_dict({"seed": 0, "assignment": assignment}, "split.json")
    version = register_bundle(settings, run.info.run_id, {}).version

    built = reference_for_model(settings, f"models:/bodypart-router/{version}", catalog_uri)
    assert set(built["sop_uid_hash"]) == validation and built["label"].notna().all()
    stored = load_reference(settings, "models:/bodypart-router/1")
    pd.testing.assert_frame_equal(stored, built)

    result = run_drift(stored, stored, ["site_id"], AlertRules(min_samples=1, min_reference=1))
    assert not result.alert
    uri = log_report_to_mlflow(settings, "models:/bodypart-router/1", result, result.render_html())
    assert uri.endswith("drift/latest.html")
    tags = connect(settings).get_model_version("bodypart-router", version).tags
    assert tags["drift.alert"] == "false" and tags["drift.reference"].endswith("reference/reference.parquet")

    mixed = stored.copy()  # CUR right after a promotion: records of the previous champion too
    mixed["model_version"] = [
        f"bodypart-router/{version}" if i % 2 else "bodypart-router/99" for i in range(len(mixed))
    ]
    mixed.to_parquet(tmp_path / "current.parquet")
    job = DriftJob(
        reference=f"models:/bodypart-router/{version}",
        current=str(tmp_path / "current.parquet"),
        by=("site_id",),
        rules=AlertRules(min_samples=1, min_reference=1),
        report_uri=str(tmp_path / "drift.html"),
        log_to_mlflow=False,
    )
    document = drift_job(settings, job).document()
    assert document["model_version"] == f"bodypart-router/{version}"
    assert document["other_versions"] == len(mixed) // 2 + len(mixed) % 2
    assert max(g["n_current"] for g in document["groups"]) <= len(mixed) // 2


@pytest.mark.usefixtures("settings")
def test_the_drift_command_exits_3_on_an_alert_and_0_without(
    bundle: Bundle, reference: pd.DataFrame, tmp_path: Path
) -> None:
    ref = tmp_path / "reference.parquet"
    reference.to_parquet(ref)
    quiet = tmp_path / "quiet.parquet"
    _logged(bundle, tmp_path / "known", 60, seed=11).to_parquet(quiet)
    loud = tmp_path / "loud.parquet"
    pd.concat(
        [
            _logged(bundle, tmp_path / "k2", 40, seed=12),
            _logged(bundle, tmp_path / "n", 3, seed=13, site_profile="site-new"),
        ]
    ).to_parquet(loud)
    ok = run_cli("drift", "--reference", str(ref), "--current", str(quiet), "--json", "--no-dashboard")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["alert"] is False
    alert = run_cli("drift", "--reference", str(ref), "--current", str(loud), "--by", "site_id", "--json")
    assert alert.returncode == 3, alert.stderr
    document = json.loads(alert.stdout)
    assert document["alert"] is True and Path(document["report_html"]).is_file()
    assert [g["by"] for g in document["groups"] if g["new_source"]] != []
    bad = run_cli("drift", "--reference", str(ref), "--current", str(loud), "--window", "soon")
    assert bad.returncode == 64


def test_a_window_that_starts_mid_hour_holds_the_records_of_that_hour(
    reference: pd.DataFrame, settings: Settings, tmp_path: Path
) -> None:
    prefix = str(tmp_path / "log")
    routed = datetime(2026, 3, 1, 14, 37, tzinfo=UTC)
    with InferenceLog(prefix, settings, flush_every=1, flush_after_s=0.1) as log:
        row = {str(k): v for k, v in reference.head(1).to_dict("records")[0].items()}
        log.append({**row, "at": coarse_time(routed)})
        assert log.flush(timeout=30)
    assert len(read_inference_log(prefix, settings, since=routed)) == 1  # logged as 14:00, asked from 14:37
    assert len(read_inference_log(prefix, settings, since=routed + timedelta(hours=1))) == 0

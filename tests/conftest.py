"""Shared fixtures: the shared data folder (skip or fail by setting) and one real S3 server per session."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pydicom
import pytest
import yaml

from dicom_router import LABELS, stack
from dicom_router.config import Settings
from dicom_router.orthanc.send import dcmsend
from dicom_router.routing.queue import RoutingQueue
from tests.dicom_factory import dicom_bytes, dicom_dataset, to_bytes

# Tests reach loopback only: timm's hub must fail at once instead of trying the network.
os.environ["HF_HUB_OFFLINE"] = "1"


def _settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` (or DICOM_ROUTER_SHARED_DIR); skipped when absent unless CI requires it."""
    settings = Settings()
    if settings.shared_dir.is_dir():
        return settings.shared_dir
    reason = f"shared data not found at {settings.shared_dir} (set DICOM_ROUTER_SHARED_DIR)"
    if settings.require_shared:
        pytest.fail(reason + " and DICOM_ROUTER_REQUIRE_SHARED is set")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def xray_real(shared_dir: Path) -> Path:
    return shared_dir / "xray-real"


@pytest.fixture(scope="session")
def dicom_corpus(shared_dir: Path) -> Path:
    return shared_dir / "dicom-corpus"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings with a fresh data directory, also exported for CLI subprocesses."""
    monkeypatch.setenv("DICOM_ROUTER_DATA_DIR", str(tmp_path / "data"))
    return _settings(tmp_path / "data")


@pytest.fixture(scope="session")
def s3_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A real ``rclone serve s3`` on loopback for the whole session; its data dir is the settings'."""
    settings = _settings(tmp_path_factory.mktemp("s3-stack"))
    stack.s3_up(settings)
    try:
        yield settings
    finally:
        stack.down(settings)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``dicom-router`` as a user would (a separate process, exit code and streams)."""
    exe = Path(sys.executable).parent / "dicom-router"
    return subprocess.run(
        [str(exe), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )


def untrained_bundle(out: Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """An exported (untrained, seeded) model bundle: real ONNX, real preprocessing, fast."""
    import torch

    from dicom_router.inference import PreprocessConfig
    from dicom_router.models import BodyPartNet, export_bundle

    torch.manual_seed(seed)
    return export_bundle(
        BodyPartNet("resnet18").eval(), PreprocessConfig(image_size=image_size), {"note": "test"}, out
    )


def familiar_bundle(out: Path, labelled: Path, *, image_size: int = 32) -> Path:
    """An untrained bundle whose novelty is fitted on a labelled folder's images (they are its training
    and held-out set): 95% of them are familiar to it, a view unlike them is not."""
    import pandas as pd
    import torch

    from dicom_router.inference import PreprocessConfig, prepare
    from dicom_router.models import BodyPartNet, Scorer, export_bundle
    from dicom_router.novelty import Novelty, fit_novelty

    config = PreprocessConfig(image_size=image_size)
    rows = pd.read_csv(labelled / "labels.csv")
    images = np.stack(
        [prepare((labelled / f).read_bytes(), f, config, max_pixels=10**8).image for f in rows["file"]]
    )
    torch.manual_seed(0)
    scorer = Scorer([BodyPartNet("resnet18").eval()]).eval()
    with torch.no_grad():
        embedding = scorer(torch.from_numpy(images))[1].numpy()
    labels = np.array([LABELS.index(label) for label in rows["label"]])
    scorer.novelty = Novelty(fit_novelty(embedding, labels, embedding))
    return export_bundle(scorer, config, {"note": "test"}, out)


def unfamiliar_dicom() -> bytes:
    """A checkerboard: unlike any radiograph ``synth`` renders (novelty ~16 for ``familiar_bundle``)."""
    return dicom_bytes((np.indices((64, 64)).sum(axis=0) // 8 % 2 * 4000).astype(np.uint16))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32 px untrained bundle."""
    return untrained_bundle(tmp_path_factory.mktemp("bundle") / "b")


DECODER_KILLER = b"KILL-THE-DECODER"
"""An instance carrying this text kills the decode process that reads it (see ``killing_decoder``)."""

_SITECUSTOMIZE = """
# Test fault injection: the decoder dies on marked input, as a codec segfault or the OOM killer would
# kill it (SIGKILL: nothing is raised, nothing is cleaned up).
import functools
import os
import signal

import dicom_router.inference as inference

_prepare = inference.prepare


@functools.wraps(_prepare)
def prepare(data, *args, **kwargs):
    if MARK in data:
        os.kill(os.getpid(), signal.SIGKILL)
    return _prepare(data, *args, **kwargs)


inference.prepare = prepare
"""


@pytest.fixture
def killing_decoder(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """Processes started from here on (the model server and its decode workers) die on
    ``DECODER_KILLER``; returns a real DICOM that carries it."""
    folder = tmp_path_factory.mktemp("sitecustomize")
    (folder / "sitecustomize.py").write_text(f"MARK = {DECODER_KILLER!r}\n" + _SITECUSTOMIZE)
    path = [str(folder), os.environ.get("PYTHONPATH")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, path)))
    poison = dicom_dataset(np.full((64, 64), 900, np.uint16), ImageComments=DECODER_KILLER.decode())
    return to_bytes(poison)


# --- a routed stack: Orthanc with the hook, the model server, a destination Orthanc -------------------

DESTINATION_AET = "DESTINATION"


def rules_for(port: int) -> dict[str, object]:
    """CR goes one way, DX another, non-radiographs to the archive; review is a destination too."""
    where = {"host": "127.0.0.1", "port": port}
    return {
        "destinations": {
            "cr-pacs": {"aet": "CRPACS", **where},
            "dx-pacs": {"aet": "DXPACS", **where},
            "archive": {"aet": "ARCHIVE", **where},
            "review-station": {"aet": "REVIEW", **where},
        },
        "review": {"destination": "review-station", "below_confidence": 0.0},
        "rules": [
            {"name": "non-radiograph", "when": {"body_part": "unrouted"}, "route": "archive"},
            {"name": "cr", "when": {"modality": "CR"}, "route": "cr-pacs"},
        ],
        "default": "dx-pacs",
    }


def send(folder: Path, port: int, *, calling_aet: str = "MODALITY") -> None:
    dcmsend(folder, port=port, called_aet="DICOMROUTER", calling_aet=calling_aet)


@pytest.fixture
def routed_stack(
    settings: Settings, tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    destination = stack.destination_up(settings, name="destination", aet=DESTINATION_AET)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rules_for(destination["dicom_port"])))
    for key, value in {
        "MODEL_URI": str(tiny_bundle),
        "ROUTE_RULES": str(rules),
        "ROUTE_RETRY_BASE_S": "0.2",
        "ROUTE_RETRY_CAP_S": "1.0",
        "ROUTE_POLL_S": "0.05",
    }.items():
        monkeypatch.setenv(f"DICOM_ROUTER_{key}", value)
    configured = Settings()
    stack.model_server_up(configured)
    stack.orthanc_up(configured)
    try:
        yield configured
    finally:
        stack.down(configured)
        stack.Process("destination", configured).stop()


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, progress: Callable[[], object] | None = None
) -> None:
    """Wait for ``predicate``. With ``progress``, ``timeout`` bounds a stall, not the wait: the deadline
    moves on whenever what ``progress()`` returns changes, since a busy CI machine is slow, not stuck."""
    seen = progress() if progress else None
    deadline = time.monotonic() + timeout
    while not predicate():
        if progress is not None and (now := progress()) != seen:
            seen, deadline = now, time.monotonic() + timeout
        stalled = f": nothing moved for {timeout:.0f} s, last {seen}" if progress else ""
        assert time.monotonic() < deadline, f"timed out waiting for {what}{stalled}"
        time.sleep(0.2)


def queue_progress(queue: RoutingQueue) -> tuple[object, ...]:
    """What moves while routing works: rows per state, attempts spent, audit entries and the errors of
    unfinished rows (which a failure message then quotes). Deferrals while the model server is away
    change none of it, so an outage that never ends is a stall."""
    with closing(sqlite3.connect(queue.path)) as db:
        attempts, audited = db.execute(
            "SELECT COALESCE(SUM(attempts), 0), (SELECT COUNT(*) FROM audit) FROM queue"
        ).fetchone()
        errors = db.execute(
            "SELECT DISTINCT last_error FROM queue WHERE state != 'done' AND last_error IS NOT NULL"
        ).fetchall()
    return queue.counts(), attempts, audited, sorted(error for (error,) in errors)


def wait_for_queue(settings: Settings, counts: dict[str, int], what: str, stall_s: float = 180.0) -> None:
    """Wait until the queue's rows per state are ``counts`` as long as routing keeps moving; a stall
    fails quoting the queue and the end of each router's log."""
    queue = RoutingQueue(settings.routing_queue)
    try:
        wait_until(lambda: queue.counts() == counts, stall_s, what, progress=lambda: queue_progress(queue))
    except AssertionError as stalled:
        tails = [
            f"{log.name} ends: " + " | ".join(log.read_text(errors="replace").splitlines()[-15:])
            for log in sorted((settings.stack_dir / "logs").glob("router*.log"))
        ]
        raise AssertionError("\n".join([str(stalled), *tails])) from None


def configure(monkeypatch: pytest.MonkeyPatch, rules: Path, document: dict[str, Any], **env: str) -> Settings:
    rules.write_text(yaml.safe_dump(document))
    monkeypatch.setenv("DICOM_ROUTER_ROUTE_RULES", str(rules))
    for key, value in env.items():
        monkeypatch.setenv(f"DICOM_ROUTER_{key.upper()}", value)
    return Settings()


def received_by(folder: Path) -> Counter[str]:
    """How many times ``storescp`` received each SOP instance."""
    return Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in folder.iterdir())


def storescp(folder: Path, port: int, aet: str) -> subprocess.Popen[bytes]:
    """dcmtk's receiver writing every object it gets to a file of its own: it never de-duplicates.
    Returned once it listens, so no forward meets a closed port and spends its attempts."""
    folder.mkdir(parents=True, exist_ok=True)
    argv = ["storescp", "+xa", "--aetitle", aet, "--output-directory", str(folder), "--unique-filenames"]
    argv.append(str(port))
    log = folder.with_name(f"{folder.name}.storescp.log")
    with log.open("wb") as out:
        receiver = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    while not _listens(receiver.pid, port):
        if receiver.poll() is not None:
            reason = log.read_text(errors="replace").strip()
            raise AssertionError(f"storescp on port {port} exited with {receiver.returncode}: {reason}")
        time.sleep(0.05)
    return receiver


def _listens(pid: int, port: int) -> bool:
    """Whether ``pid`` itself listens on ``port`` (another process holding it would make ours exit)."""
    try:
        sockets = psutil.Process(pid).connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in sockets)


PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "StudyInstanceUID",
    "SOPInstanceUID",
)


def phi_values(folder: Path) -> set[str]:
    """Every identifier the source files hold, to look for in what the platform writes or serves."""
    values = set()
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in PHI_KEYWORDS:
            if ds.get(keyword):
                values.add(str(ds.get(keyword)))
    return values

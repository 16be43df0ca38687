"""The embedded stack's S3 server: a real rclone on loopback, started, restarted and stopped by the CLI."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dicom_router import stack
from dicom_router.config import Settings
from dicom_router.errors import StorageError
from dicom_router.storage import S3Store, open_store
from tests.conftest import run_cli


def _status() -> dict[str, dict[str, object]]:
    result = run_cli("stack", "status", "--json")
    assert result.returncode == 0, result.stderr
    status: dict[str, dict[str, object]] = json.loads(result.stdout)
    return status


def _listening_addresses(pid: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process(pid).connections() if c.status == psutil.CONN_LISTEN}


@pytest.fixture
def stack_settings(settings: Settings) -> Iterator[Settings]:
    """A data dir of its own, and whatever the test started is stopped even when it fails."""
    yield settings
    stack.down(settings)


def test_stack_up_status_down_round_trip_keeps_data_and_credentials(stack_settings: Settings) -> None:
    settings = stack_settings
    up = run_cli("stack", "up", "--json")
    assert up.returncode == 0, up.stderr
    state = json.loads(up.stdout)
    assert set(state) >= {"s3", "mlflow", "model_server", "orthanc", "evidently"}
    assert state["s3"]["running"] is True and state["s3"]["endpoint"].startswith("http://127.0.0.1:")
    assert set(state["orthanc"]) == {"url", "http_port", "dicom_port", "aet", "calling_aet", "running"}
    assert (
        state["orthanc"]["running"] is True
        and state["orthanc"]["calling_aet"] == settings.orthanc_calling_aet
    )
    assert state["model_server"]["running"] is True and state["router"]["running"] is True
    assert state["evidently"]["running"] is True and state["drift"]["running"] is True
    server_pid = stack.Process("model_server", settings).pid()
    assert server_pid is not None
    assert _listening_addresses(server_pid) == {"127.0.0.1"}
    router_pid = stack.Process("router", settings).pid()
    assert router_pid is not None and _listening_addresses(router_pid) == {"127.0.0.1"}  # /health
    orthanc_config = json.loads((settings.stack_dir / "orthanc" / "orthanc.json").read_text())
    assert orthanc_config["RemoteAccessAllowed"] is False and orthanc_config["DicomAlwaysAllowStore"] is False
    assert stat.S_IMODE((settings.stack_dir / "orthanc" / "orthanc.json").stat().st_mode) == 0o600

    creds = settings.secrets_dir / "s3-credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    pid = stack.Process("s3", settings).pid()
    assert pid is not None
    assert _listening_addresses(pid) == {"127.0.0.1"}

    store = open_store(f"s3://{settings.s3_bucket}/keep", settings)
    assert isinstance(store, S3Store)
    store.write("a.txt", b"survives a restart")

    assert run_cli("stack", "down").returncode == 0
    assert _status()["s3"]["running"] is False
    assert run_cli("stack", "up").returncode == 0
    assert _status()["s3"] == state["s3"]  # same port, same credentials
    assert store.read("a.txt") == b"survives a restart"


def test_ranged_reads_and_listing_work_against_the_real_server(s3_settings: Settings) -> None:
    store = open_store(f"s3://{s3_settings.s3_bucket}/ranges", s3_settings)
    payload = bytes(range(256)) * 1000
    store.write("dir/blob.bin", payload)
    assert store.read("dir/blob.bin", 100) == payload[:100]
    assert store.read("dir/blob.bin") == payload
    [info] = list(store.list())
    assert (info.key, info.size) == ("dir/blob.bin", len(payload))
    assert info.md5 is not None and len(info.md5) == 32
    assert store.exists("dir/blob.bin") and not store.exists("dir/missing.bin")


def test_keys_with_spaces_and_unicode_are_signed_and_read(s3_settings: Settings) -> None:
    store = open_store(f"s3://{s3_settings.s3_bucket}/odd keys", s3_settings)
    key = "Ärzte + Röntgen/2024 01/bild (1)~.dcm"
    store.write(key, b"0123456789")
    assert store.read(key, 4, offset=3) == b"3456"
    assert [o.key for o in store.list()] == [key]


def test_a_missing_object_raises_a_storage_error(s3_settings: Settings) -> None:
    store = open_store(f"s3://{s3_settings.s3_bucket}/nothing-here", s3_settings)
    with pytest.raises(StorageError, match="HTTP 404"):
        store.read("absent.dcm", 100)


def test_a_local_folder_works_like_a_bucket(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "bucket"), Settings(data_dir=tmp_path))
    store.write("a/b.dcm", b"123456")
    assert [(o.key, o.size) for o in store.list()] == [("a/b.dcm", 6)]
    assert store.read("a/b.dcm", 3) == b"123"


def test_a_stale_pid_file_never_signals_a_process_the_stack_did_not_start(settings: Settings) -> None:
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        proc = stack.Process("router", settings)
        proc.pid_file.parent.mkdir(parents=True, exist_ok=True)
        proc.pid_file.write_text(f"{bystander.pid} 1")  # the pid was reused: another start time
        assert proc.pid() is None
        assert proc.stop() is False
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_service_that_exits_at_start_fails_quoting_its_log(settings: Settings) -> None:
    proc = stack.Process("broken", settings)
    script = "import sys; print('listening failed: port 1 in use'); sys.exit(3)"
    with pytest.raises(stack.StackError, match=r"code 3.*listening failed: port 1 in use"):
        proc.start([sys.executable, "-c", script], lambda: False)
    assert proc.pid() is None


def test_a_failed_stack_up_stops_what_it_had_started(
    stack_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(_: Settings) -> str:
        raise stack.StackError("model_server not ready: simulated")

    monkeypatch.setattr(stack, "model_server_up", fails)
    with pytest.raises(stack.StackError, match="simulated"):
        stack.up(stack_settings)
    assert not any(service["running"] for service in stack.status(stack_settings).values())
    for name in ("s3", "mlflow"):
        assert stack.Process(name, stack_settings).pid() is None

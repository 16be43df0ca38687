"""Shared fixtures: the shared data folder (skip or fail by setting) and one real S3 server per session."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_router import stack
from dicom_router.config import Settings

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


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported (untrained, seeded) 32 px model bundle: real ONNX, real preprocessing, fast."""
    import torch

    from dicom_router.inference import PreprocessConfig
    from dicom_router.models import BodyPartNet, export_bundle

    torch.manual_seed(0)
    return export_bundle(
        BodyPartNet("resnet18").eval(),
        PreprocessConfig(image_size=32),
        {"note": "test"},
        tmp_path_factory.mktemp("bundle") / "b",
    )

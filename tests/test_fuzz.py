"""Property-based fuzzing of the read paths with mutated real DICOM files: only the contract's typed
errors come out, never a crash, a hang or an allocation the size limit should have refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from dicom_router.dicom.errors import ERROR_TYPES
from tests.dicom_fuzz import check, mutated, seeds

OUTCOMES = {"ok", *(cls.type for cls in ERROR_TYPES)}


@pytest.fixture(scope="module")
def originals(xray_real: Path, dicom_corpus: Path) -> list[bytes]:
    return seeds([dicom_corpus, xray_real], limit=16)


def test_mutated_real_files_only_ever_give_typed_errors(originals: list[bytes]) -> None:
    @settings(
        max_examples=300,
        deadline=10_000,  # ms: a hang fails the case
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=True,
        database=None,
    )
    @given(mutated(originals))
    def reads_cleanly(data: bytes) -> None:
        assert check(data) in OUTCOMES  # an untyped exception fails the case before this line

    reads_cleanly()

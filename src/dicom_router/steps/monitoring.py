"""Monitoring steps: profile a new version's drift reference, run one scheduled drift analysis."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from dicom_router.config import Settings
from dicom_router.steps import CATALOG_FILE

log = logging.getLogger(__name__)


def profile_reference(version: str, catalog_dir: str, settings: Settings) -> int:
    """The drift reference of ``version`` (its validation/test images through the model), stored with
    the version in MLflow, so ``drift --reference models:/…`` works; the number of rows."""
    from dicom_router.monitoring.reference import reference_for_model

    model = f"models:/{settings.registered_model}/{version}"
    return len(reference_for_model(settings, model, f"{catalog_dir}/{CATALOG_FILE}"))


def run_drift_job(
    settings: Settings,
    *,
    reference: str,
    current: str,
    by: Sequence[str],
    window: str,
    webhook: str,
    report: str,
) -> dict[str, Any]:
    """One scheduled drift analysis (the drift pipeline's step): the contract's ``drift`` document."""
    from dicom_router.monitoring.drift import AlertRules
    from dicom_router.monitoring.job import DriftJob, by_columns, drift_job, parse_window

    job = DriftJob(
        reference=reference,
        current=current,
        by=by_columns(by),
        rules=AlertRules.from_yaml(settings.drift_rules) if settings.drift_rules else AlertRules(),
        window=parse_window(window) if window else None,
        webhook=webhook or settings.drift_webhook_url,
        workspace=settings.evidently_dir,
        deployment=settings.deployment,
        report_uri=report,
    )
    return drift_job(settings, job).document()

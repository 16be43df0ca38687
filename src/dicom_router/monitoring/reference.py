"""The reference profile: what the champion's data looked like, stored with the model version in MLflow.

It has the inference log's columns, computed by the same code (``inference_log.score_items``) over the
training catalog's images of the validation and test splits the model was trained with: header fields as
the catalog has them, image statistics, the champion's prediction and confidence (on images it never
trained on, so confidence is not inflated) and the embedding projection. It is stored as the artifact
``reference/reference.parquet`` of the version's run, so ``--reference models:/bodypart-router/3`` works.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.entities.model_registry import ModelVersion

from dicom_router.catalog import read_catalog
from dicom_router.config import Settings
from dicom_router.dicom.deid import load_key
from dicom_router.errors import ModelNotFound, StorageError
from dicom_router.inference import Bundle
from dicom_router.monitoring.drift import DriftInputError
from dicom_router.monitoring.inference_log import LogWindow, read_window, records_frame, score_items
from dicom_router.registry import connect, load_bundle, model_version
from dicom_router.storage import is_s3, open_store, read_uri

REFERENCE_ARTIFACT = "reference/reference.parquet"
REFERENCE_TAG = "drift.reference"
DEFAULT_SPLITS = ("val", "test")


def build_reference(
    catalog: pd.DataFrame, source: str, bundle: Bundle, settings: Settings, *, threads: int = 8
) -> pd.DataFrame:
    """Profile the catalog rows' images (read from ``source``, the catalog's origin) with the bundle.

    Rows whose image cannot be decoded are left out. The catalog's ``label`` (ground truth) is kept
    beside the prediction, for looking at the reference; drift never compares it.
    """
    store = open_store(source, settings)
    keys = [str(k) for k in catalog["key"]]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        blobs = list(pool.map(store.read, keys))
    records, _ = score_items(
        list(zip(keys, blobs, strict=True)),
        bundle,
        key=load_key(settings),
        max_pixels=settings.max_image_pixels,
    )
    frame = records_frame(records)
    if "label" in catalog.columns:
        labels = dict(zip(catalog["sop_uid_hash"], catalog["label"], strict=True))
        frame["label"] = frame["sop_uid_hash"].map(labels)
    return frame


def split_keys(settings: Settings, version: ModelVersion, splits: Sequence[str]) -> set[str]:
    """The SOP UID pseudonyms of the version's persisted split parts (``split.json`` of its run)."""
    if version.run_id is None:
        raise ModelNotFound(f"{version.name} version {version.version} has no training run")
    connect(settings)
    text = mlflow.artifacts.load_text(f"runs:/{version.run_id}/split.json")
    assignment: dict[str, str] = json.loads(text)["assignment"]
    return {key for key, part in assignment.items() if part in splits}


def reference_for_model(
    settings: Settings, model_uri: str, catalog_uri: str, *, splits: Sequence[str] | None = DEFAULT_SPLITS
) -> pd.DataFrame:
    """Build the version's reference from its training catalog and store it with the version.

    ``splits`` None profiles every catalog row (a catalog the model was not trained on, or no split).
    """
    version = model_version(settings, model_uri)
    catalog, source = read_catalog(catalog_uri, settings)
    if splits is not None:
        keys = split_keys(settings, version, splits)
        catalog = catalog[catalog["sop_uid_hash"].isin(keys)]
        if catalog.empty:
            raise DriftInputError(
                f"{catalog_uri} has no instance of the {'/'.join(splits)} split of {model_uri}"
            )
    bundle = load_bundle(settings, f"models:/{version.name}/{version.version}")
    frame = build_reference(catalog, source, bundle, settings)
    save_reference(settings, version, frame)
    return frame


def save_reference(settings: Settings, version: ModelVersion, frame: pd.DataFrame) -> str:
    """Log the frame as ``reference/reference.parquet`` of the version's run and tag the version."""
    if version.run_id is None:
        raise ModelNotFound(f"{version.name} version {version.version} has no run to store a reference in")
    client = connect(settings)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(REFERENCE_ARTIFACT).name
        frame.to_parquet(path, index=False, compression="zstd")
        client.log_artifact(version.run_id, str(path), str(Path(REFERENCE_ARTIFACT).parent))
    uri = f"runs:/{version.run_id}/{REFERENCE_ARTIFACT}"
    client.set_model_version_tag(version.name, version.version, REFERENCE_TAG, uri)
    client.set_model_version_tag(version.name, version.version, "drift.reference_rows", str(len(frame)))
    return uri


def load_reference(settings: Settings, model_uri: str) -> pd.DataFrame:
    """The reference stored with ``models:/name/version`` or ``models:/name@alias``."""
    version = model_version(settings, model_uri)
    connect(settings)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=version.run_id, artifact_path=REFERENCE_ARTIFACT, dst_path=tmp
            )
        except (mlflow.exceptions.MlflowException, OSError):
            raise ModelNotFound(
                f"{model_uri} (version {version.version}) has no drift reference; build it with "
                f"`dicom-router drift --reference {model_uri} --reference-catalog CATALOG ...`"
            ) from None
        return pd.read_parquet(path)


def load_frame(uri: str, settings: Settings, since: datetime | None = None) -> pd.DataFrame:
    """REF or CUR of ``drift``: ``models:/…`` (a stored reference), a ``.parquet`` file (catalog,
    reference or one log part), or an inference-log prefix; rows before ``since`` left out when timed."""
    return load_window(uri, settings, since).frame


def load_window(uri: str, settings: Settings, since: datetime | None = None) -> LogWindow:
    """``load_frame`` with the records an inference-log prefix lost in the window (0 for files)."""
    if not is_s3(uri) and not uri.startswith("models:/") and not Path(uri).exists():
        raise DriftInputError(f"{uri}: no such file or folder")
    if uri.startswith("models:/"):
        frame = load_reference(settings, uri)
    elif uri.endswith(".parquet"):
        try:
            frame = pq.read_table(io.BytesIO(read_uri(uri, settings))).to_pandas()
        except (StorageError, pa.ArrowInvalid) as exc:
            raise DriftInputError(f"{uri}: not a readable Parquet file ({exc})") from None
    else:
        return read_window(uri, settings, since=since)
    if since is not None and "at" in frame.columns:
        start = pd.Timestamp(since)
        start = start.tz_localize("UTC") if start.tzinfo is None else start
        frame = frame[pd.to_datetime(frame["at"], utc=True) >= start]
    return LogWindow(frame)

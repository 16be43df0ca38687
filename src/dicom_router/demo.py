"""``dicom-router demo``: the main job end to end on the embedded default, one stage after another.

Each stage is the same library call the CLI verbs make; the demo only chains them and says what
happened, so a person can re-run any stage by hand on the objects it leaves in the bucket.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dicom_router import stack, synth
from dicom_router.candidates import load_labelled, train_candidates
from dicom_router.catalog import ingest, summary_table
from dicom_router.config import Settings
from dicom_router.inference import Prediction
from dicom_router.promotion import promote
from dicom_router.registry import CHAMPION, load_bundle
from dicom_router.storage import S3Store, Store, open_store
from dicom_router.train import TrainConfig

log = logging.getLogger(__name__)

DEMO_IMAGES = 300
DEMO_SITES = 3
DEMO_LONG_SIDE = 128
DEMO_TRAINING = TrainConfig(arch="resnet18", epochs=10, image_size=96, batch_size=32)
"""Small enough for a laptop CPU in under a minute; real training sizes are flags of ``train``."""


def upload_folder(folder: Path, store: Store, threads: int = 8) -> int:
    """Copy every file under ``folder`` to ``store`` under the same relative keys."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: store.write(p.relative_to(folder).as_posix(), p.read_bytes()), files))
    return len(files)


def run_demo(settings: Settings, console: Console) -> int:
    endpoint = stack.s3_up(settings)
    mlflow_url = stack.mlflow_up(settings)
    console.print(f"[bold]1/6[/] local S3 (rclone) at {endpoint}; MLflow UI at {mlflow_url}")
    local = settings.data_dir / "demo" / "synth"
    records = synth.synthesize(
        local, DEMO_IMAGES, sites=DEMO_SITES, seed=7, long_side_px=DEMO_LONG_SIDE, progress=True
    )
    raw = f"s3://{settings.s3_bucket}/demo/raw"
    store = open_store(raw, settings)
    if isinstance(store, S3Store):
        store.ensure_bucket()
    uploaded = upload_folder(local, store)
    console.print(
        f"[bold]2/6[/] {len(records)} synthetic X-rays from {DEMO_SITES} sites → {raw} ({uploaded} objects)"
    )
    catalog = f"s3://{settings.s3_bucket}/demo/catalog.parquet"
    result = ingest(raw, catalog, settings, labels_uri=f"{raw}/labels.csv")
    console.print("[bold]3/6[/] de-identified catalog")
    console.print(summary_table(result))

    labelled = load_labelled(settings, catalog=catalog)
    [candidate], _ = train_candidates(settings, labelled, [DEMO_TRAINING], register=True, seed=0)
    console.print(
        f"[bold]4/6[/] trained {DEMO_TRAINING.arch} ({DEMO_TRAINING.image_size} px, "
        f"{DEMO_TRAINING.epochs} epochs): test macro-F1 {candidate.report['macro_f1']:.3f} → "
        f"{settings.registered_model} version {candidate.version}"
    )
    decision = promote(settings, version=candidate.version)
    verdict = "promoted to champion" if decision["promoted"] else "refused"
    console.print(
        f"[bold]5/6[/] promotion gate: version {candidate.version} {verdict} ({decision['reason']})"
    )

    unseen = settings.data_dir / "demo" / "unseen"
    fresh = synth.synthesize(unseen, 10, sites=DEMO_SITES, seed=99, long_side_px=DEMO_LONG_SIDE)
    bundle = load_bundle(settings, f"models:/{settings.registered_model}@{CHAMPION}")
    items = [(str(unseen / r.file), (unseen / r.file).read_bytes()) for r in fresh]
    predictions, ms = bundle.predict_items(items, max_pixels=settings.max_image_pixels)
    table = Table(title=f"6/6 champion (version {bundle.version}) on 10 new images, {ms:.1f} ms/image")
    for column in ("file", "true label", "predicted", "confidence"):
        table.add_column(column)
    for record, prediction in zip(fresh, predictions, strict=True):
        if isinstance(prediction, Prediction):
            mark = "" if prediction.label == record.label else " ✗"
            table.add_row(record.file, record.label, prediction.label + mark, f"{prediction.confidence:.3f}")
    console.print(table)
    console.print(
        f"MLflow UI: {mlflow_url} · the stack keeps running; stop it with `dicom-router stack down`."
    )
    return 2 if result.errors else 0

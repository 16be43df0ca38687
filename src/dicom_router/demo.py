"""``dicom-router demo``: the main job end to end on the embedded default, one stage after another.

Each stage is the same library call the CLI verbs make; the demo only chains them and says what
happened, so a person can re-run any stage by hand on the objects it leaves in the bucket.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console

from dicom_router import stack, synth
from dicom_router.catalog import ingest, summary_table
from dicom_router.config import Settings
from dicom_router.storage import S3Store, Store, open_store

log = logging.getLogger(__name__)

DEMO_IMAGES = 150
DEMO_SITES = 3
DEMO_LONG_SIDE = 256


def upload_folder(folder: Path, store: Store, threads: int = 8) -> int:
    """Copy every file under ``folder`` to ``store`` under the same relative keys."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: store.write(p.relative_to(folder).as_posix(), p.read_bytes()), files))
    return len(files)


def run_demo(settings: Settings, console: Console) -> int:
    endpoint = stack.s3_up(settings)
    console.print(f"[bold]1/3[/] local S3 (rclone) at {endpoint}, bucket s3://{settings.s3_bucket}")
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
        f"[bold]2/3[/] {len(records)} synthetic X-rays from {DEMO_SITES} sites → {raw} ({uploaded} objects)"
    )
    result = ingest(
        raw, f"s3://{settings.s3_bucket}/demo/catalog.parquet", settings, labels_uri=f"{raw}/labels.csv"
    )
    console.print("[bold]3/3[/] de-identified catalog")
    console.print(summary_table(result))
    console.print("The stack keeps running for the next stages; stop it with `dicom-router stack down`.")
    return 2 if result.errors else 0

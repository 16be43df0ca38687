"""Header-only ingest from the local S3 server against a same-run baseline; decoder throughput.

Baseline (the issue's): one reused boto3 client, a sequential loop that GETs each whole object and runs
``pydicom.dcmread`` on it. Two object sets: small (~250 KB, like ../shared/xray-real) and full-size DX
(2,500 x 2,000 16-bit, ~10 MB). Prints objects/s for both and the ratio; targets: >= 2x (small) and
>= 20x (full-size). Also decode throughput (images/s) of ``inspect``'s decoder on ../shared/xray-real.

    .venv/bin/python bench/ingest.py [--small 2000] [--large 100]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from dicom_router import stack
from dicom_router.catalog import ingest
from dicom_router.config import Settings
from dicom_router.dicom.decode import decode_bytes
from dicom_router.storage import S3Store, open_store
from dicom_router.synth import synthesize

TARGETS = {"small": 2.0, "full-size": 20.0}


def _variants(template: Path, count: int, seed: str) -> list[bytes]:
    """``count`` distinct instances of one synthetic file (new UIDs and patient, fresh noise in the
    lowest bit, as real detectors give): real-sized objects without rendering a phantom for each."""
    ds = pydicom.dcmread(template)
    pixels = ds.pixel_array
    rng = np.random.default_rng(abs(hash(seed)) % 2**32)
    out = []
    for i in range(count):
        ds.PixelData = (pixels ^ rng.integers(0, 2, pixels.shape, dtype=pixels.dtype)).tobytes()
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = f"BENCH-{seed}-{i:05d}"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def populate(store: S3Store, work: Path, name: str, count: int, long_side: int, profile: str) -> float:
    """Upload ``count`` objects of one profile; returns their mean size in bytes."""
    records = synthesize(work / name, min(count, 20), site_profile=profile, long_side_px=long_side, seed=3)
    templates = [work / name / r.file for r in records]
    per = -(-count // len(templates))
    payloads = [p for i, t in enumerate(templates) for p in _variants(t, per, f"{name}{i}")][:count]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: store.write(f"{kv[0]:06d}.dcm", kv[1]), enumerate(payloads)))
    return sum(map(len, payloads)) / len(payloads)


def baseline(store: S3Store) -> tuple[int, float]:
    """The issue's baseline: sequential whole-object GET + full dcmread, one reused client."""
    client = store.client
    start = time.perf_counter()
    keys = [o.key for o in store.list()]
    for key in keys:
        body = client.get_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}")["Body"].read()
        pydicom.dcmread(io.BytesIO(body))
    return len(keys), time.perf_counter() - start


def ours(store: S3Store, settings: Settings, work: Path) -> tuple[int, float]:
    start = time.perf_counter()
    result = ingest(store.uri, str(work / f"{store.prefix}.parquet"), settings, progress=False)
    elapsed = time.perf_counter() - start
    assert not result.errors, result.errors[:3]
    return len(result.catalog), elapsed


def decode_throughput(settings: Settings) -> str:
    folder = settings.shared_dir / "xray-real"
    if not folder.is_dir():
        return f"decode: skipped, {folder} not found (set DICOM_ROUTER_SHARED_DIR)"
    files = [p.read_bytes() for p in sorted(folder.rglob("*.dcm"))]
    start = time.perf_counter()
    for i, data in enumerate(files):
        decode_bytes(data, str(i), max_pixels=settings.max_image_pixels)
    elapsed = time.perf_counter() - start
    rate = len(files) / elapsed
    return f"decode: {len(files)} xray-real images in {elapsed:.2f} s = {rate:.0f} images/s (1 core)"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", type=int, default=2000, help="small objects (~250 KB)")
    parser.add_argument("--large", type=int, default=100, help="full-size objects (~10 MB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        settings = Settings(data_dir=work / "data")
        stack.s3_up(settings)
        try:
            for name, count, long_side, profile in (
                ("small", args.small, 384, "site-a"),  # 384 x 307 x 16-bit words: ~240 KB
                ("full-size", args.large, 2500, "site-a"),  # 2,500 x 2,000 x 16-bit words: ~10 MB
            ):
                store = open_store(f"s3://{settings.s3_bucket}/{name}", settings)
                assert isinstance(store, S3Store)
                store.ensure_bucket()
                size = populate(store, work, name, count, long_side, profile)
                # rclone hashes every object for its ETag at the first listing (an artefact of the
                # embedded server; real S3 stores ETags): timed once, then excluded from both sides.
                start = time.perf_counter()
                list(store.list())
                first_listing = time.perf_counter() - start
                n_base, t_base = baseline(store)
                n_ours, t_ours = ours(store, settings, work)
                assert n_base == n_ours == count
                ratio = (n_ours / t_ours) / (n_base / t_base)
                cold = (n_ours / t_ours) / (n_base / (t_base + first_listing))
                print(
                    f"{name}: {count} objects of {size / 1e6:.2f} MB: baseline {n_base / t_base:.0f}/s, "
                    f"ingest {n_ours / t_ours:.0f}/s ({settings.workers} processes) = {ratio:.1f}x "
                    f"(target >= {TARGETS[name]:.0f}x: {'met' if ratio >= TARGETS[name] else 'NOT met'}); "
                    f"with rclone's first-listing hashing ({first_listing:.2f} s) in the baseline: "
                    f"{n_base / (t_base + first_listing):.0f}/s, {cold:.1f}x",
                    flush=True,
                )
            print(decode_throughput(settings), flush=True)
        finally:
            stack.down(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())

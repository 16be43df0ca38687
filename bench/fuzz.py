"""Fuzzing benchmark: mutated real DICOM files through every read path, and through the model server.

1. ``--cases`` mutations (default 10,000) of real files (../shared) through ``inspect``'s decode, ingest's
   header read and the model's preprocessing (``tests.dicom_fuzz.check``): outcomes by contract error
   type, untyped failures (must be 0), the slowest case and the peak RSS.
2. ``--server-cases`` of them POSTed to a real model server (a small bundle): answers by HTTP status;
   a 5xx is a failure (a bad file must be a typed 4xx), the server must still be ready at the end.

    .venv/bin/python bench/fuzz.py [--cases 10000] [--server-cases 1000]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from hypothesis import HealthCheck, given, settings
from rich.progress import track

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_router import stack
from dicom_router.config import Settings
from dicom_router.inference import PreprocessConfig
from dicom_router.models import BodyPartNet, export_bundle
from tests.dicom_fuzz import check, mutated, seeds


def generate(originals: list[bytes], n: int) -> list[bytes]:
    cases: list[bytes] = []

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutated(originals))
    def collect(data: bytes) -> None:
        cases.append(data)

    collect()
    return cases


def read_paths(cases: list[bytes]) -> None:
    outcomes: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    slowest = 0.0
    for data in track(cases, description="read paths"):
        start = time.perf_counter()
        try:
            outcomes[check(data)] += 1
        except BaseException as exc:  # anything but a typed error is what the fuzzing looks for
            if isinstance(exc, KeyboardInterrupt):
                raise
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            failures[f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}"] += 1
        slowest = max(slowest, time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n1. read paths: {len(cases)} mutated cases")
    for name, count in outcomes.most_common():
        print(f"   {name:28} {count:6}")
    print(f"   untyped failures           {sum(failures.values()):6}  {dict(failures) or ''}")
    print(f"   slowest case {slowest * 1000:.0f} ms, peak RSS {peak_mb:.0f} MiB")


def server(cases: list[bytes], work: Path) -> None:
    torch.manual_seed(0)
    bundle = export_bundle(BodyPartNet("resnet18").eval(), PreprocessConfig(image_size=64), {}, work / "b")
    configured = Settings(data_dir=work / "data", model_uri=str(bundle))
    os.environ.update(configured.as_env())
    url = stack.model_server_up(configured)
    statuses: Counter[int] = Counter()
    try:
        with httpx.Client(timeout=120) as http:
            predict = f"{url}/v1/models/bodypart-router:predict"

            def post(data: bytes) -> int:
                headers = {"content-type": "application/dicom"}
                return http.post(predict, content=data, headers=headers).status_code

            with ThreadPoolExecutor(4) as pool:
                for status in track(pool.map(post, cases), total=len(cases), description="server"):
                    statuses[status] += 1
            ready = http.get(f"{url}/v2/health/ready").status_code
    finally:
        stack.down(configured)
    print(f"\n2. model server: {len(cases)} mutated cases over HTTP")
    for status, count in sorted(statuses.items()):
        print(f"   HTTP {status}  {count:6}")
    errors = sum(c for s, c in statuses.items() if s >= 500)
    print(f"   5xx answers {errors} (target 0); /v2/health/ready at the end: {ready}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--server-cases", type=int, default=1000)
    args = parser.parse_args()
    shared = Path(os.environ.get("DICOM_ROUTER_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
    originals = seeds([shared / "dicom-corpus", shared / "xray-real"], limit=24)
    print(f"{len(originals)} real files to mutate (from {shared})")
    cases = generate(originals, args.cases)
    read_paths(cases)
    with tempfile.TemporaryDirectory() as tmp:
        server(cases[: args.server_cases], Path(tmp))


if __name__ == "__main__":
    main()

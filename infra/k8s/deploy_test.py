"""The checks of ``make deploy-test`` (infra/k8s/deploy-test.sh runs them; the script holds the wiring).

publish  a seeded 32 px bundle (real ONNX, real preprocessing) and a few synthetic radiographs; the bundle
         goes to the in-cluster S3 where the plain-Deployment predictor fetches it
route    C-STORE the radiographs to the Orthanc Service; every SOP instance must arrive exactly once at
         the destination Orthanc pod, and the router's audit (read inside the worker container) must
         show each classified by the predictor pod and delivered to the rule's destination
drift    the drift CronJob's job (started by the script) ends with the contract's exit code 0 or 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pydicom

from dicom_router import LABELS
from dicom_router.config import Settings
from dicom_router.orthanc.send import dcmsend
from dicom_router.storage import S3Store, open_store, upload_folder
from dicom_router.synth import synthesize

INSTANCES = 12


def wait(what: str, done: Callable[[], bool], timeout_s: float = 600.0) -> None:
    """Poll ``done`` until it holds; the error says what never happened."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"deploy-test: timed out waiting for {what}")
        time.sleep(2)


def publish(bundle_uri: str, sample: Path) -> None:
    import torch

    from dicom_router.inference import PreprocessConfig
    from dicom_router.models import BodyPartNet, export_bundle

    torch.manual_seed(0)
    bundle = export_bundle(
        BodyPartNet("resnet18").eval(), PreprocessConfig(image_size=32), {"note": "deploy-test"}, sample / "b"
    )
    store = open_store(bundle_uri, Settings())
    assert isinstance(store, S3Store)
    store.ensure_bucket()
    upload_folder(bundle, store)
    synthesize(sample / "dicom", INSTANCES, sites=2, seed=7, long_side_px=64)
    print(f"published {bundle_uri}; {INSTANCES} radiographs in {sample / 'dicom'}")


def route(sample: Path, orthanc: str, destination: str, namespace: str, pod: str) -> None:
    sent = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in (sample / "dicom").rglob("*.dcm")
    }
    dcmsend(sample / "dicom", host=orthanc, port=4242, called_aet="DICOMROUTER", calling_aet="MODALITY")
    auth = ("test", os.environ["DICOM_ROUTER_DEPLOY_TEST_PASSWORD"])
    with httpx.Client(base_url=destination, auth=auth, timeout=30) as client:

        def arrived() -> list[str]:
            ids: list[str] = client.get("/instances").json()
            return ids

        wait(f"{len(sent)} instances at the destination", lambda: len(arrived()) >= len(sent))
        time.sleep(5)  # anything sent twice would arrive now
        received = Counter(
            client.get(f"/instances/{i}").json()["MainDicomTags"]["SOPInstanceUID"] for i in arrived()
        )
    assert set(received) == sent, f"delivered {sorted(received)} != sent {sorted(sent)}"
    assert set(received.values()) == {1}, f"delivered more than once: {received}"
    audit = kubectl(
        namespace, "exec", pod, "-c", "worker", "--", "dicom-router", "route", "--history", "--json"
    )
    delivered = [e for e in json.loads(audit) if e["outcome"] == "delivered"]
    assert len(delivered) == len(sent), audit
    for entry in delivered:
        assert entry["body_part"] in LABELS and entry["model_version"] and entry["routed_to"] == "pacs", entry
    print(f"{len(sent)} instances classified by the predictor pod and delivered once each to pacs")


def drift(namespace: str, job: str) -> None:
    def finished() -> bool:
        status: dict[str, Any] = json.loads(kubectl(namespace, "get", "job", job, "-o", "json"))["status"]
        return bool(status.get("succeeded") or status.get("failed"))

    wait(f"job {job}", finished)
    pods = json.loads(kubectl(namespace, "get", "pods", "-l", f"job-name={job}", "-o", "json"))["items"]
    codes = [
        s["state"]["terminated"]["exitCode"]
        for p in pods
        for s in p["status"].get("containerStatuses", [])
        if "terminated" in s["state"]
    ]
    logs = kubectl(namespace, "logs", f"job/{job}")
    assert codes and set(codes) <= {0, 3}, f"drift exit codes {codes}:\n{logs[-3000:]}"
    print(f"drift job ran: exit {codes[0]} ({'alert' if codes[0] == 3 else 'no alert'})")


def kubectl(namespace: str, *args: str) -> str:
    done = subprocess.run(["kubectl", "-n", namespace, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    p = steps.add_parser("publish")
    p.add_argument("--bundle-uri", required=True)
    p.add_argument("--sample", type=Path, required=True)
    r = steps.add_parser("route")
    r.add_argument("--sample", type=Path, required=True)
    r.add_argument("--orthanc", required=True)
    r.add_argument("--destination", required=True)
    r.add_argument("--namespace", required=True)
    r.add_argument("--pod", required=True)
    d = steps.add_parser("drift")
    d.add_argument("--namespace", required=True)
    d.add_argument("--job", required=True)
    args = parser.parse_args(argv)
    if args.step == "publish":
        publish(args.bundle_uri, args.sample)
    elif args.step == "route":
        route(args.sample, args.orthanc, args.destination, args.namespace, args.pod)
    else:
        drift(args.namespace, args.job)


if __name__ == "__main__":
    main(sys.argv[1:])

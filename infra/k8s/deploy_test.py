"""The checks of ``make deploy-test`` (infra/k8s/deploy-test.sh runs them; the script holds the wiring).

ready    every Deployment Available; each change of its pods printed, and on a stall (or a pod that cannot
         start: an image missing, a crash loop) the node's conditions, events and the failing logs
publish  a seeded 32 px bundle (real ONNX, real preprocessing) and a few synthetic radiographs; the bundle
         goes to the in-cluster S3 where the plain-Deployment predictor fetches it
route    C-STORE the radiographs to the Orthanc Service; every SOP instance must arrive exactly once at
         the destination Orthanc pod, and the router's audit (read inside the worker container) must
         show each classified by the predictor pod and delivered to the rule's destination
drift    the drift CronJob's job (started by the script) ends with the contract's exit code 0 or 3
step     one compiled pipeline task as a Kubernetes Job: the components image, the IR's command and
         arguments and exactly its Secret and ConfigMap wiring; its output must be the step's result
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
import yaml

from dicom_router import LABELS
from dicom_router.config import Settings
from dicom_router.orthanc.send import dcmsend
from dicom_router.storage import S3Store, open_store, upload_folder
from dicom_router.synth import synthesize

INSTANCES = 12
SAMPLE_URI = "s3://dicom-router/deploy-test/dicom"


# How long nothing may change before a wait gives up: a busy machine is slow, a stuck one is still.
STALL_S = 900.0
HOPELESS = {
    "ErrImageNeverPull",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
}
MAX_RESTARTS = 5


def wait(
    what: str, probe: Callable[[], tuple[bool, tuple[Any, ...]]], namespace: str, stall_s: float = STALL_S
) -> None:
    """Poll ``probe`` (done, state) until done. It gives up only when the state has not changed for
    ``stall_s`` (no fixed deadline: CI machines are busy), printing each change and, on failure, what
    the cluster says about the namespace."""
    last: tuple[Any, ...] | None = None
    changed = time.monotonic()
    while True:
        done, state = probe()
        if done:
            return
        if state != last:
            last, changed = state, time.monotonic()
            print(f"[wait] {what}: {_describe(state)}", flush=True)
        elif time.monotonic() - changed > stall_s:
            diagnose(namespace)
            raise SystemExit(f"deploy-test: {what}: nothing changed for {stall_s:.0f} s ({_describe(state)})")
        time.sleep(2)


def _describe(state: tuple[Any, ...]) -> str:
    parts = (" ".join(part) if isinstance(part, tuple) else str(part) for part in state)
    return "; ".join(parts) or "no pods yet"


def pod_states(namespace: str, selector: list[str]) -> tuple[tuple[str, ...], ...]:
    """Each pod's name, phase, ready containers, restarts and why a container waits: what a wait
    watches for progress (and fails fast on when it cannot come)."""
    pods = json.loads(kubectl(namespace, "get", "pods", *selector, "-o", "json"))["items"]
    states = []
    for pod in pods:
        statuses = _statuses(pod)
        ready = sum(bool(s.get("ready")) for s in pod["status"].get("containerStatuses", []))
        restarts = sum(int(s.get("restartCount", 0)) for s in statuses)
        waiting = sorted(
            {s["state"]["waiting"].get("reason", "") for s in statuses if "waiting" in s["state"]}
        )
        reason = f" waiting {','.join(waiting)}" if waiting else ""
        states.append(
            (
                pod["metadata"]["name"],
                pod["status"].get("phase", "?"),
                f"{ready}/{len(pod['spec']['containers'])} ready",
                f"{restarts} restarts{reason}",
            )
        )
        if HOPELESS & set(waiting) or restarts >= MAX_RESTARTS:
            diagnose(namespace)
            raise SystemExit(f"deploy-test: a pod cannot start: {' '.join(states[-1])}")
    return tuple(sorted(states))


def _statuses(pod: dict[str, Any]) -> list[dict[str, Any]]:
    status = pod["status"]
    return list(status.get("initContainerStatuses", [])) + list(status.get("containerStatuses", []))


def ready(namespace: str) -> None:
    """Every Deployment of the namespace Available with its pods of the current template ready."""

    def probe() -> tuple[bool, tuple[Any, ...]]:
        deployments = json.loads(kubectl(namespace, "get", "deployments", "-o", "json"))["items"]
        available = all(
            any(c["type"] == "Available" and c["status"] == "True" for c in d["status"].get("conditions", []))
            and d["status"].get("updatedReplicas", 0) == d["spec"].get("replicas", 1)
            and d["status"].get("readyReplicas", 0) == d["spec"].get("replicas", 1)
            and d["status"].get("observedGeneration") == d["metadata"]["generation"]
            for d in deployments
        )
        return available, pod_states(namespace, [])

    wait("every Deployment Available", probe, namespace)
    print(f"every Deployment of {namespace} Available", flush=True)


def diagnose(namespace: str) -> None:
    """What a person would look at first when the cluster does not get there: node conditions, pods,
    recent events, and the logs of containers that are not ready (this one and the last run)."""
    sections = [
        (
            "node conditions",
            [
                "kubectl",
                "get",
                "nodes",
                "-o",
                "custom-columns=NAME:.metadata.name,"
                "CONDITIONS:.status.conditions[*].type,STATUS:.status.conditions[*].status",
            ],
        ),
        ("pods", ["kubectl", "-n", namespace, "get", "pods", "-o", "wide"]),
        ("events", ["kubectl", "-n", namespace, "get", "events", "--sort-by=.lastTimestamp"]),
    ]
    listed = _run(["kubectl", "-n", namespace, "get", "pods", "-o", "json"])
    pods = json.loads(listed.stdout) if listed.returncode == 0 else {"items": []}  # stderr is no JSON
    for pod in pods["items"]:
        for status in _statuses(pod):
            if status.get("ready") or "terminated" in status["state"]:
                continue
            name, container = pod["metadata"]["name"], status["name"]
            logs = ["kubectl", "-n", namespace, "logs", name, "-c", container, "--tail", "40"]
            sections.append((f"logs {name}/{container}", logs))
            if status.get("restartCount"):
                sections.append((f"logs {name}/{container}, last run", [*logs, "--previous"]))
    for title, command in sections:
        done = _run(command)
        print(f"--- {title}\n{(done.stdout + done.stderr)[-6000:]}", file=sys.stderr, flush=True)


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    """A command whose failure is itself part of the diagnosis (``kubectl`` stops on one)."""
    return subprocess.run(command, capture_output=True, text=True, check=False)


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
    source = open_store(SAMPLE_URI, Settings())
    for path in sorted((sample / "dicom").rglob("*.dcm")):  # the pipeline step's source
        source.write(path.relative_to(sample / "dicom").as_posix(), path.read_bytes())
    print(f"published {bundle_uri}; {INSTANCES} radiographs in {sample / 'dicom'} and {SAMPLE_URI}")


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

        def probe() -> tuple[bool, tuple[Any, ...]]:
            n = len(arrived())
            return n >= len(sent), (f"{n} of {len(sent)} arrived", *pod_states(namespace, []))

        wait(f"{len(sent)} instances at the destination", probe, namespace)
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
    wait(f"job {job}", lambda: job_finished(namespace, job), namespace)
    pods = json.loads(kubectl(namespace, "get", "pods", "-l", f"job-name={job}", "-o", "json"))["items"]
    codes = [
        s["state"]["terminated"]["exitCode"]
        for p in pods
        for s in p["status"].get("containerStatuses", [])
        if "terminated" in s["state"]
    ]
    logs = kubectl(namespace, "logs", f"job/{job}")
    assert codes and set(codes) <= {0, 3}, f"drift exit codes {codes}:\n{logs[-3000:]}"
    # the archive report of the window's traffic, made in the worker image on its read-only root
    assert "window report: " in logs, f"no report of the window's traffic:\n{logs[-3000:]}"
    print(f"drift job ran: exit {codes[0]} ({'alert' if codes[0] == 3 else 'no alert'}), window reported")


def step(namespace: str, pipeline: Path, task: str, source: str) -> None:
    """Run the ``plan-shards`` task of the compiled pipeline over ``source`` (the sample in the bucket)."""
    ir, platform = list(yaml.safe_load_all(pipeline.read_text()))[:2]
    executor = f"exec-{task}"
    container = ir["deploymentSpec"]["executors"][executor]["container"]
    wiring = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][executor]
    env = _from_refs(wiring["secretAsEnv"], "secretKeyRef", "secretName", "secretKey") + _from_refs(
        wiring["configMapAsEnv"], "configMapKeyRef", "configMapName", "configMapKey"
    )
    executor_input = {
        "inputs": {"parameterValues": {"source": source, "objects_per_shard": 5, "max_shards": 4}},
        "outputs": {
            "parameters": {"Output": {"outputFile": "/tmp/outputs/Output"}},
            "outputFile": "/tmp/outputs/executor_output.json",
        },
    }
    args = [json.dumps(executor_input) if a == "{{$}}" else a for a in container["args"]]
    restricted = {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    resources = {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"step-{task}"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
                    "initContainers": [
                        {
                            "name": "step",
                            "image": container["image"],
                            "imagePullPolicy": "Never",
                            "command": container["command"],
                            "args": args,
                            "env": [*env, {"name": "HOME", "value": "/tmp"}],
                            "resources": resources,
                            "securityContext": restricted,
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        }
                    ],
                    "containers": [
                        {
                            "name": "outputs",
                            "image": container["image"],
                            "imagePullPolicy": "Never",
                            "command": ["cat", "/tmp/outputs/executor_output.json"],
                            "resources": resources,
                            "securityContext": restricted,
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        }
                    ],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                }
            },
        },
    }
    applied = subprocess.run(
        ["kubectl", "-n", namespace, "apply", "-f", "-"], input=json.dumps(job), text=True, check=False
    )
    assert applied.returncode == 0, "the step's Job was refused"

    wait(f"the {task} Job", lambda: job_finished(namespace, f"step-{task}"), namespace)
    output = json.loads(kubectl(namespace, "logs", f"job/step-{task}", "-c", "outputs"))
    plan = output["parameterValues"]["Output"]
    assert plan == [{"index": i, "count": 3} for i in range(3)], output
    print(f"pipeline task {task} ran as a Job in the components image: {plan}")


def _from_refs(sources: list[dict[str, Any]], ref: str, name: str, key: str) -> list[dict[str, Any]]:
    """The IR's ``secretAsEnv`` / ``configMapAsEnv`` entries as a container's ``env`` (what KFP's
    launcher does with them)."""
    return [
        {
            "name": pair["envVar"],
            "valueFrom": {
                ref: {"name": source[name], "key": pair[key], "optional": source.get("optional", False)}
            },
        }
        for source in sources
        for pair in source["keyToEnv"]
    ]


def job_finished(namespace: str, job: str) -> tuple[bool, tuple[Any, ...]]:
    status: dict[str, Any] = json.loads(kubectl(namespace, "get", "job", job, "-o", "json"))["status"]
    finished = bool(status.get("succeeded") or status.get("failed"))
    return finished, pod_states(namespace, ["-l", f"job-name={job}"])


def kubectl(namespace: str, *args: str) -> str:
    done = _run(["kubectl", "-n", namespace, *args])
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
    t = steps.add_parser("step")
    t.add_argument("--namespace", required=True)
    t.add_argument("--pipeline", type=Path, required=True)
    t.add_argument("--task", required=True)
    t.add_argument("--source", required=True)
    w = steps.add_parser("ready")
    w.add_argument("--namespace", required=True)
    d = steps.add_parser("drift")
    d.add_argument("--namespace", required=True)
    d.add_argument("--job", required=True)
    args = parser.parse_args(argv)
    if args.step == "publish":
        publish(args.bundle_uri, args.sample)
    elif args.step == "route":
        route(args.sample, args.orthanc, args.destination, args.namespace, args.pod)
    elif args.step == "ready":
        ready(args.namespace)
    elif args.step == "step":
        step(args.namespace, args.pipeline, args.task, args.source)
    else:
        drift(args.namespace, args.job)


if __name__ == "__main__":
    main(sys.argv[1:])

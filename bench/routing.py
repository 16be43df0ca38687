"""Routing benchmarks, every ratio against a baseline measured in the same run.

1. Hook overhead: C-STORE time (dcmsend of a fresh folder) into an Orthanc with the enqueue-only
   plugin vs a plain Orthanc, alternating, several rounds (target <= 1.05x).
2. Ingest → routed: the whole chain (hook, queue, router, KServe model server on CPU, metadata,
   forward to a destination Orthanc): per-instance latency p50/p99 from the hook's enqueue
   to the confirmed delivery, and sustained throughput.
3. The model server's images/s (HTTP + base64 + decode in its workers) vs ``predict`` in-process on
   the same files: the overhead ratio.
4. Shadow (``--only shadow``): 2. without and then with a challenger in shadow (the same model run a
   second time per instance, both answers logged): the latency and throughput ratios (target <= 1.3x).

Files: ../shared/xray-real (real radiographs) when present, else synthetic. Model: a bundle of the shape
``make train-real`` promotes (the fine-tune recipe's members, one graph when several, its input size and
preprocessing), untrained, unless ``--bundle`` or ``--arch`` says otherwise.

    .venv/bin/python bench/routing.py [--rounds 3] [--arch A]... [--image-size PX] [--bundle DIR]
        [--only hook|server|routed|shadow]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pydicom
import torch
import yaml
from pydicom.uid import generate_uid

from dicom_router import stack
from dicom_router.config import Settings
from dicom_router.inference import Bundle
from dicom_router.models import BodyPartNet, Scorer, export_bundle
from dicom_router.orthanc.send import dcmsend
from dicom_router.routing.queue import RoutingQueue
from dicom_router.serving.client import ModelClient
from dicom_router.synth import synthesize
from dicom_router.train import RECIPE_ARCHS, recipe_config


def fresh_copy(source: Path, out: Path, only: str = "*.dcm") -> Path:
    """The same files with new UIDs, so Orthanc stores (and the hook sees) every one again."""
    for path in sorted(source.rglob(only)):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        target = out / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
    return out


def timed_send(folder: Path, port: int, aet: str, calling: str) -> float:
    start = time.perf_counter()
    dcmsend(folder, port=port, called_aet=aet, calling_aet=calling)
    return time.perf_counter() - start


def hook_overhead(source: Path, work: Path, rounds: int) -> None:
    settings = Settings(data_dir=work / "overhead")  # its own Orthancs and queue, nothing routes them
    plain = stack.orthanc_up(settings, name="plain", hook=False)
    hooked = stack.orthanc_up(settings, name="orthanc", hook=True)
    calling = settings.orthanc_calling_aet
    times: dict[str, list[float]] = {"plain": [], "hook": []}
    for r in range(rounds):
        a = fresh_copy(source, work / f"plain{r}")
        b = fresh_copy(source, work / f"hook{r}")
        order = [("plain", a, plain), ("hook", b, hooked)]
        for name, folder, server in order if r % 2 == 0 else order[::-1]:
            times[name].append(timed_send(folder, server["dicom_port"], server["aet"], calling))
    n = len(list(source.rglob("*.dcm")))
    plain_s, hook_s = statistics.median(times["plain"]), statistics.median(times["hook"])
    print(f"\n1. hook overhead: {n} instances per round, {rounds} rounds (median)")
    print(f"   plain Orthanc   {plain_s:6.2f} s  ({n / plain_s:6.0f} instances/s)  rounds {times['plain']}")
    print(f"   with the hook   {hook_s:6.2f} s  ({n / hook_s:6.0f} instances/s)  rounds {times['hook']}")
    print(f"   ratio           {hook_s / plain_s:6.2f}x  (target <= 1.05x)")
    for name in ("plain", "orthanc"):
        stack.Process(name, settings).stop()


CHAIN = ("orthanc", "router", "model_server", "destination")
"""The chain's servers, whose CPU time the routed benchmark divides among the instances."""


def cpu_seconds(settings: Settings) -> dict[str, float]:
    """User + system CPU seconds each of the chain's servers has used so far, with its child processes
    (those alive, and those it has reaped: ``children_user`` and ``children_system``)."""
    used: dict[str, float] = {}
    for name in CHAIN:
        pid = stack.Process(name, settings).pid()
        if pid is None:
            continue
        parent = psutil.Process(pid)
        used[name] = 0.0
        for process in (parent, *parent.children(recursive=True)):
            try:
                used[name] += sum(process.cpu_times()[:4])
            except psutil.NoSuchProcess:  # ended since it was listed: its parent counts it once reaped
                continue
    return used


def routed_latency(settings: Settings, source: Path, work: Path, title: str = "") -> dict[str, float]:
    work.mkdir(parents=True, exist_ok=True)
    destination = stack.destination_up(settings, name="destination", aet="DEST")
    rules = work / "rules.yaml"
    where = {"host": stack.HOST, "port": destination["dicom_port"]}
    rules.write_text(
        yaml.safe_dump(
            {
                "destinations": {"pacs": {"aet": "PACS", **where}},
                "review": {"destination": "pacs"},
                "default": "pacs",
            }
        )
    )
    settings = settings.model_copy(update={"route_rules": rules})
    queue = RoutingQueue(settings.routing_queue)
    already = queue.counts().get("done", 0)
    stack.orthanc_up(settings)
    stack.router_up(settings)
    folder = fresh_copy(source, work / "routed")
    n = len(list(folder.rglob("*.dcm")))
    port = stack.orthanc_status(settings)["dicom_port"]
    cpu_before = cpu_seconds(settings)
    dcmsend(
        folder,
        port=port,
        called_aet=settings.orthanc_aet,
        calling_aet=settings.orthanc_calling_aet,
    )
    deadline = time.monotonic() + 900
    while queue.counts().get("done", 0) < already + n and time.monotonic() < deadline:
        time.sleep(0.2)
    cpu_after = cpu_seconds(settings)
    rows = (
        sqlite3.connect(settings.routing_queue)
        .execute("SELECT enqueued_at, done_at FROM queue WHERE state = 'done' ORDER BY enqueued_at")
        .fetchall()[-n:]
    )
    latencies = np.array([done - queued for queued, done in rows])
    span = max(d for _, d in rows) - min(q for q, _ in rows)
    print(f"\n2. ingest → routed{title} (hook enqueue to confirmed delivery), {n} instances in one dcmsend")
    print(f"   latency p50 {np.percentile(latencies, 50):.2f} s, p99 {np.percentile(latencies, 99):.2f} s")
    print(f"   sustained throughput {n / span:.1f} instances/s ({span:.1f} s for {n})")
    per_instance = {name: 1000 * (cpu_after[name] - cpu_before[name]) / n for name in cpu_after}
    print(
        "   CPU per instance: "
        + ", ".join(f"{name} {ms:.1f} ms" for name, ms in per_instance.items())
        + f" (all {sum(per_instance.values()):.1f} ms; {os.cpu_count()} cores)"
    )
    single = []
    for i, path in enumerate(sorted(folder.rglob("*.dcm"))[:10]):
        one = fresh_copy(path.parent, work / f"one{i}", only=path.name)
        done_before = queue.counts().get("done", 0)
        start = time.perf_counter()
        dcmsend(one, port=port, called_aet=settings.orthanc_aet, calling_aet=settings.orthanc_calling_aet)
        while queue.counts().get("done", 0) <= done_before:
            time.sleep(0.02)
        single.append(time.perf_counter() - start)
    print(
        f"   one at a time (C-STORE to confirmed delivery, 10 instances): p50 {np.median(single):.2f} s, "
        f"max {max(single):.2f} s"
    )
    stack.Process("router", settings).stop()
    stack.Process("destination", settings).stop()
    return {
        "p50": float(np.percentile(latencies, 50)),
        "throughput": n / span,
        "single_p50": float(np.median(single)),
    }


def shadow_overhead(settings: Settings, source: Path, work: Path, bundle_dir: Path) -> None:
    """Routing without, then with, a challenger in shadow (the same bundle, so the model's work doubles)."""
    plain = routed_latency(settings, source, work / "plain", " without shadow")
    stack.Process("model_server", settings).stop()
    os.environ["DICOM_ROUTER_SHADOW_MODEL_URI"] = str(bundle_dir)
    shadowed = settings.model_copy(update={"shadow_model_uri": str(bundle_dir)})
    stack.model_server_up(shadowed)
    wait_ready(shadowed)
    with_shadow = routed_latency(shadowed, source, work / "shadow", " with a challenger in shadow")
    print("\n4. shadow overhead (with / without, same run)")
    print(f"   one at a time p50  {with_shadow['single_p50'] / plain['single_p50']:.2f}x (target <= 1.3x)")
    print(f"   batch latency p50  {with_shadow['p50'] / plain['p50']:.2f}x")
    print(f"   throughput         {plain['throughput'] / with_shadow['throughput']:.2f}x slower")


def wait_ready(settings: Settings) -> None:
    deadline = time.monotonic() + 120
    while not ModelClient(stack.model_server_url(settings)).ready() and time.monotonic() < deadline:
        time.sleep(0.2)


def server_vs_inprocess(settings: Settings, bundle_dir: Path, source: Path) -> None:
    files = [p.read_bytes() for p in sorted(source.rglob("*.dcm"))]
    bundle = Bundle(bundle_dir)
    bundle.predict_items([("warm", files[0])], max_pixels=settings.max_image_pixels)
    start = time.perf_counter()
    bundle.predict_items([(str(i), f) for i, f in enumerate(files)], max_pixels=settings.max_image_pixels)
    inprocess = len(files) / (time.perf_counter() - start)
    client = ModelClient(stack.model_server_url(settings))
    client.classify(files[0])
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client.classify, files))
    served = len(files) / (time.perf_counter() - start)
    print(f"\n3. model server vs in-process predict, {len(files)} files, {bundle.preprocess.image_size} px")
    print(f"   in-process predict  {inprocess:6.1f} images/s (one process, batches of 32)")
    print(f"   model server        {served:6.1f} images/s (8 concurrent clients, V2 over HTTP)")
    print(f"   ratio               {inprocess / served:6.2f}x (HTTP + base64 + inter-process overhead)")


def untrained_bundle(archs: tuple[str, ...] | list[str], image_size: int | None, work: Path) -> Path:
    """The members (one graph when several) with the fine-tune recipe's preprocessing: the cost of
    serving the promoted model, without training it."""
    torch.manual_seed(0)
    config = recipe_config("fine-tune", arch=archs[0], **({"image_size": image_size} if image_size else {}))
    members = [BodyPartNet(arch).eval() for arch in archs]
    return export_bundle(Scorer(members), config.preprocess, {}, work / "bundle")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--arch", action="append", help=f"Members, averaged (default: {'+'.join(RECIPE_ARCHS['fine-tune'])})"
    )
    parser.add_argument("--image-size", type=int, help="Input size (default: the fine-tune recipe's)")
    parser.add_argument(
        "--only",
        choices=("hook", "server", "routed", "shadow"),
        help="Run one of them (shadow: only with --only)",
    )
    parser.add_argument("--bundle", type=Path, help="A model bundle directory to serve instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        settings = Settings(data_dir=work / "data")
        real = settings.shared_dir / "xray-real"
        source = real
        if not real.is_dir():
            source = work / "synth"
            synthesize(source, 200, seed=1)
        print(f"files: {source} ({len(list(source.rglob('*.dcm')))} DICOM)")
        bundle_dir = args.bundle or untrained_bundle(
            args.arch or RECIPE_ARCHS["fine-tune"], args.image_size, work
        )
        print(f"model: {json.loads((bundle_dir / 'card.json').read_text()).get('arch')} ({bundle_dir})")
        settings = settings.model_copy(update={"model_uri": str(bundle_dir)})
        os.environ["DICOM_ROUTER_MODEL_URI"] = str(bundle_dir)
        try:
            if args.only in (None, "hook"):
                hook_overhead(source, work, args.rounds)
            if args.only == "hook":
                return
            stack.model_server_up(settings)
            wait_ready(settings)
            if args.only == "shadow":
                shadow_overhead(settings, source, work, bundle_dir)
                return
            if args.only in (None, "server"):
                server_vs_inprocess(settings, bundle_dir, source)
            if args.only in (None, "routed"):
                routed_latency(settings, source, work)
        finally:
            stack.down(settings)
            stack.Process("destination", settings).stop()


if __name__ == "__main__":
    main()

"""Fault benchmark: sustained C-STORE while the router, the model server, Orthanc and the destination are
killed (SIGKILL) and restarted at random moments; nothing may be lost or delivered twice.

Phase 1 sends for ``--baseline-s`` without faults (the C-STORE latency baseline, same run); phase 2
sends for ``--seconds`` with faults. Several senders C-STORE fresh copies of ../shared/xray-real (new
UIDs) one file per association, retrying a refused store as a modality would. The destination is
dcmtk's ``storescp`` writing every received object to a file of its own, so a duplicate is counted,
never merged. After the senders stop, every service is brought back and the queue drained; then per
SOP instance: acknowledged by Orthanc, delivered (files at ``storescp``), in review (dead letters and
unroutable files), lost, duplicated; the maximum queue depth; ingest→delivered p50/p99; C-STORE
p50/p99 with faults against the baseline (target ≤ 1.5x).

    .venv/bin/python bench/faults.py [--seconds 60] [--baseline-s 30] [--senders 3]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import torch
import yaml

from dicom_router import stack
from dicom_router.config import Settings
from dicom_router.inference import PreprocessConfig
from dicom_router.models import BodyPartNet, export_bundle
from dicom_router.orthanc.send import SendError, dcmsend
from dicom_router.routing.queue import RoutingQueue

SERVICES = ("router", "model_server", "orthanc", "destination")


class Destination:
    """``storescp`` on a fixed port: one file per received object (``--unique-filenames``)."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def up(self) -> None:
        argv = ["storescp", "+xa", "--aetitle", "PACS", "--output-directory", str(self.folder)]
        self.proc = subprocess.Popen([*argv, "--unique-filenames", str(self.port)], stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def received(self) -> Counter[str]:
        return Counter(
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.folder.iterdir()
        )


class Senders:
    """Threads that C-STORE one fresh file per association until stopped; a refused store is retried."""

    def __init__(self, settings: Settings, originals: list[Path], work: Path, count: int) -> None:
        self.settings, self.originals, self.work, self.count = settings, originals, work, count
        self.acknowledged: list[str] = []
        self.latencies: list[float] = []
        self.refused = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def _one(self, rng: random.Random) -> None:
        ds = pydicom.dcmread(rng.choice(self.originals))
        uid = pydicom.uid.generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.StudyInstanceUID = pydicom.uid.generate_uid()
        folder = self.work / uid
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / "x.dcm", enforce_file_format=True)
        while not self.stop.is_set():
            port = stack.orthanc_status(self.settings)["dicom_port"]
            start = time.perf_counter()
            try:
                dcmsend(
                    folder,
                    port=port,
                    called_aet=self.settings.orthanc_aet,
                    calling_aet=self.settings.orthanc_calling_aet,
                    timeout_s=60,
                )
            except (SendError, subprocess.TimeoutExpired):
                with self.lock:
                    self.refused += 1
                time.sleep(0.5)
                continue
            with self.lock:
                self.latencies.append(time.perf_counter() - start)
                self.acknowledged.append(uid)
            return

    def run(self, seconds: float) -> None:
        self.stop.clear()
        deadline = time.monotonic() + seconds

        def sender(k: int) -> None:
            rng = random.Random(k)
            while time.monotonic() < deadline:
                self._one(rng)

        threads = [threading.Thread(target=sender, args=(k,)) for k in range(self.count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def kill(settings: Settings, name: str, destination: Destination) -> None:
    if name == "destination":
        destination.kill()
        return
    pid = stack.Process(name, settings).pid()
    if pid is not None:
        os.killpg(pid, signal.SIGKILL)


def restart(settings: Settings, name: str, destination: Destination) -> None:
    if name == "destination":
        destination.up()
    elif name == "router":
        stack.router_up(settings)
    elif name == "model_server":
        stack.model_server_up(settings)
    else:
        stack.orthanc_up(settings)


def faults(settings: Settings, destination: Destination, stop: threading.Event, log: list[str]) -> None:
    rng = random.Random(7)
    order = rng.sample(SERVICES, len(SERVICES))  # every service in turn, in a random order
    turn = 0
    while not stop.wait(rng.uniform(5, 10)):
        name = order[turn % len(order)]
        turn += 1
        kill(settings, name, destination)
        log.append(name)
        time.sleep(rng.uniform(1, 3))
        restart(settings, name, destination)


def depth_monitor(queue: RoutingQueue, stop: threading.Event, peak: list[int]) -> None:
    while not stop.wait(0.5):
        counts = queue.counts()
        peak[0] = max(peak[0], counts.get("pending", 0) + counts.get("forwarding", 0))


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"p50 {np.percentile(values, 50):.2f} s, p99 {np.percentile(values, 99):.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--baseline-s", type=float, default=30.0)
    parser.add_argument("--senders", type=int, default=3)
    args = parser.parse_args()
    shared = Path(os.environ.get("DICOM_ROUTER_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
    originals = sorted((shared / "xray-real").rglob("*.dcm"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        net = BodyPartNet("resnet18").eval()
        bundle = export_bundle(net, PreprocessConfig(image_size=128), {}, work / "b")
        destination = Destination(work / "received", stack.free_port())
        rules = work / "rules.yaml"
        where = {"aet": "PACS", "host": stack.HOST, "port": destination.port}
        rules.write_text(
            yaml.safe_dump(
                {"destinations": {"pacs": where}, "review": {"below_confidence": 0.0}, "default": "pacs"}
            )
        )
        settings = Settings(
            data_dir=work / "data",
            model_uri=str(bundle),
            route_rules=rules,
            route_lease_s=15.0,
            route_retry_cap_s=5.0,
        )
        os.environ.update(settings.as_env())
        destination.up()
        stack.model_server_up(settings)
        stack.orthanc_up(settings)
        stack.router_up(settings)
        queue = RoutingQueue(settings.routing_queue)
        senders = Senders(settings, originals, work / "out", args.senders)
        try:
            senders.run(args.baseline_s)
            baseline = list(senders.latencies)
            stop, peak = threading.Event(), [0]
            killed: list[str] = []
            threads = [
                threading.Thread(target=faults, args=(settings, destination, stop, killed)),
                threading.Thread(target=depth_monitor, args=(queue, stop, peak)),
            ]
            for t in threads:
                t.start()
            senders.latencies.clear()
            senders.run(args.seconds)
            stop.set()
            for t in threads:
                t.join()
            with_faults = list(senders.latencies)
            if destination.proc is None or destination.proc.poll() is not None:
                destination.up()
            stack.model_server_up(settings)
            stack.orthanc_up(settings)
            stack.router_up(settings)
            acknowledged = set(senders.acknowledged)
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                counts = queue.counts()
                waiting = counts.get("pending", 0) + counts.get("forwarding", 0)
                if not waiting and sum(counts.values()) > 0:
                    stored = len(stack.orthanc_client(settings).instances())
                    if stored >= len(acknowledged):
                        break
                time.sleep(1.0)
            time.sleep(2.0)  # the last deliveries' files are written
            received = destination.received()
            rows = (
                sqlite3.connect(settings.routing_queue)
                .execute("SELECT instance_id, state, enqueued_at, done_at, routed_to FROM queue")
                .fetchall()
            )
            orthanc = stack.orthanc_client(settings)
            in_review = {
                str(orthanc.simplified_tags(i)["SOPInstanceUID"])
                for i, state, _, _, routed in rows
                if state == "dead" or routed == "review"
            }
        finally:
            stack.down(settings)
            destination.kill()
        delivered = set(received)
        lost = acknowledged - delivered - in_review
        duplicates = sum(n - 1 for n in received.values() if n > 1)
        latencies = [done - queued for _, state, queued, done, _ in rows if state == "done" and done]
        ratio = np.percentile(with_faults, 99) / np.percentile(baseline, 99) if baseline else 0.0
        print(f"\nfaults: {args.seconds:.0f} s of C-STORE, {args.senders} senders; killed {Counter(killed)}")
        for name, value in (
            ("sent (acknowledged by Orthanc)", f"{len(acknowledged)} (refused, resent: {senders.refused})"),
            ("stored in Orthanc / queued", len(rows)),
            ("delivered at storescp (SOPs)", len(delivered & acknowledged)),
            ("in review (dead letters etc.)", len(in_review)),
            ("lost", f"{len(lost)} (target 0)"),
            ("duplicates at storescp", f"{duplicates} (target 0)"),
            ("max queue depth", peak[0]),
            ("ingest → delivered", percentiles(latencies)),
            ("C-STORE without faults", percentiles(baseline)),
            ("C-STORE with faults", f"{percentiles(with_faults)} (p99 {ratio:.2f}x, target <= 1.5x)"),
        ):
            print(f"   {name:32} {value}")


if __name__ == "__main__":
    main()

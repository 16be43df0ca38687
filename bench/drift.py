"""Drift monitoring measured: detection delay, false alarms, analysis cost, logging overhead.

Data: synthetic radiographs (``--side`` px) of the four known site profiles, logged exactly as the routing
worker logs them (decode, the exported ResNet-18 bundle, image statistics, embedding projection). The model
is trained for ``--train-epochs`` on ``--train-n`` other synthetic images of those sites (0: an untrained,
seeded one, whose prediction is one class for everything, so a body-part mix change cannot show in it).
The reference is ``--reference-n`` instances (seed 100); rules are ``AlertRules()`` defaults.

1. False alarms: ``--windows`` windows of ``--window-n`` in-distribution instances (seeds 1..N) from the
   known sites, ``run_drift`` by site_id and scanner_id (9 groups); the share of windows in which any
   group alerts. Target <= 5 %.
2. Detection delay: known site ``site-a`` changes, same InstitutionName (same ``site_id``):
   (a) new detector: another vendor's equipment (the site-new profile) → a new ``scanner_id``, so by
       scanner it is a new source (alert at instance 1); by site only it needs statistics;
   (b) processing change: same headers and scanner, the stored pixels re-processed (contrast, gamma,
       noise: a detector software update);
   (c) body-part mix: only chest images from then on.
   The window holds the site's first k changed instances plus the other sites' normal traffic; k grows
   by ``--step``; the delay is the first k at which the site's group alerts (by site_id), median and
   worst over ``--repeats`` seeds. Target <= 100.
3. Cost: all false-alarm windows together (windows x window-n instances, 10,000 by default) appended to
   an inference log (Parquet parts), then one ``drift_job`` (read the log, a report per group, HTML,
   Evidently snapshots) and ``run_drift`` alone.
4. Logging overhead on the routing path: ``log_record`` on a full-size radiograph, ``InferenceLog.append``.

    .venv/bin/python bench/drift.py [--windows 20] [--window-n 500] [--reference-n 1000] [--side 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydicom import dcmread

from dicom_router import LABELS
from dicom_router.config import Settings
from dicom_router.data import CachedImages
from dicom_router.dicom.decode import decode_bytes
from dicom_router.dicom.deid import acquisition_fields
from dicom_router.inference import Bundle, PreprocessConfig, letterbox, metadata_vector, statistics_of
from dicom_router.models import BodyPartNet, export_bundle
from dicom_router.monitoring.drift import AlertRules, run_drift
from dicom_router.monitoring.inference_log import InferenceLog, log_record, records_frame, score_items
from dicom_router.monitoring.job import DriftJob, drift_job
from dicom_router.synth import PROFILES, new_equipment_at, synthesize
from dicom_router.train import TrainConfig, train_candidate

KEY = b"bench-drift-pseudonym-key"
MAX_PIXELS = 64_000_000
TARGET_DELAY = 100
TARGET_FALSE_ALARMS = 0.05
CHANGED_SITE = "site-a"


def cached(out: Path, n: int, seed: int, side: int) -> CachedImages:
    """Synthetic labelled images preprocessed as training caches them (letterboxed, uint16)."""
    records = synthesize(out, n, sites=4, seed=seed, long_side_px=side)
    decoded = [decode_bytes((out / r.file).read_bytes(), r.file, max_pixels=MAX_PIXELS) for r in records]
    images = np.stack([letterbox(d.pixels, side) for d in decoded])
    return CachedImages(
        [r.file for r in records],
        np.rint(images * 65535).astype(np.uint16),
        np.array([LABELS.index(r.label) for r in records], np.int64),
        np.stack([metadata_vector(acquisition_fields(d.dataset)) for d in decoded]),
    )


def model(work: Path, side: int, epochs: int, n: int) -> Bundle:
    """The exported bundle the bench logs with: trained briefly on synthetic images, or untrained."""
    torch.manual_seed(0)
    net = BodyPartNet("resnet18").eval()
    if epochs:
        config = TrainConfig(arch="resnet18", epochs=epochs, image_size=side, patience=epochs)
        train, val = cached(work / "train", n, 50, side), cached(work / "val", n // 4, 51, side)
        result = train_candidate(config, train, val, work / "best.pt", progress=False)
        net = result.net
        f1 = result.best_val_macro_f1
        print(f"model: ResNet-18 trained {epochs} epochs on {n} synthetic images, val macro-F1 {f1:.3f}")
    return Bundle(export_bundle(net, PreprocessConfig(image_size=side), {}, work / "bundle"))


def score(bundle: Bundle, files: list[Path]) -> pd.DataFrame:
    rows, errors = score_items(
        [(str(f), f.read_bytes()) for f in files], bundle, key=KEY, max_pixels=MAX_PIXELS
    )
    if errors:
        raise RuntimeError(f"{len(errors)} synthetic images failed to decode: {errors[0]}")
    return records_frame(rows)


def logged(bundle: Bundle, out: Path, n: int, seed: int, side: int) -> pd.DataFrame:
    """``n`` instances of the four known sites, logged as the routing worker logs them."""
    records = synthesize(out, n, sites=4, seed=seed, long_side_px=side)
    return score(bundle, [out / r.file for r in records])


def new_detector(out: Path, n: int, seed: int, side: int) -> list[Path]:
    """site-a installs another vendor's detector (site-new equipment, site-a's InstitutionName)."""
    return [out / r.file for r in new_equipment_at(CHANGED_SITE, out, n, seed=seed, long_side_px=side)]


def reprocessed(
    out: Path, n: int, seed: int, side: int, contrast: float, gamma: float, noise: float
) -> list[Path]:
    """site-a's own detector and headers, its stored pixels re-processed (a software update)."""
    records = synthesize(out, n, seed=seed, site_profile=CHANGED_SITE, long_side_px=side)
    rng = np.random.default_rng(seed)
    for record in records:
        ds = dcmread(out / record.file)
        top = (1 << int(ds.BitsStored)) - 1
        x = ds.pixel_array.astype(np.float64) / top
        x = 0.5 + contrast * (np.power(x, gamma) - 0.5) + noise * rng.standard_normal(x.shape)
        ds.PixelData = np.clip(np.rint(x * top), 1, top - 1).astype(np.uint16).tobytes()
        ds.save_as(out / record.file)
    return [out / r.file for r in records]


def chests_only(out: Path, n: int, seed: int, side: int) -> list[Path]:
    """site-a's usual equipment, but only chest images (a chest clinic opened)."""
    records = synthesize(out, n * 3, seed=seed, site_profile=CHANGED_SITE, long_side_px=side)
    chests = [out / r.file for r in records if r.label in ("adult_chest", "pediatric_chest")]
    return chests[:n]


def detection_delay(
    reference: pd.DataFrame, others: pd.DataFrame, changed: pd.DataFrame, step: int, rules: AlertRules
) -> int | None:
    """The first k (multiple of ``step``) at which the changed site's group alerts, by site_id."""
    site = changed["site_id"].iloc[0]
    for k in range(step, len(changed) + 1, step):
        result = run_drift(reference, pd.concat([others, changed.head(k)]), ["site_id"], rules)
        if any(g.alert for g in result.groups if g.by.get("site_id") == site):
            return k
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--window-n", type=int, default=500)
    parser.add_argument("--reference-n", type=int, default=1000)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--step", type=int, default=10)
    parser.add_argument("--max-k", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--processing",
        nargs=3,
        type=float,
        action="append",
        metavar=("CONTRAST", "GAMMA", "NOISE"),
        help="a processing change (repeatable); default 0.85 1.15 0.02, 0.95 1.05 0.01, 0.98 1.02 0.005",
    )
    parser.add_argument("--train-epochs", type=int, default=4)
    parser.add_argument("--train-n", type=int, default=600)
    args = parser.parse_args()
    rules = AlertRules()
    work = Path(tempfile.mkdtemp(prefix="bench-drift-"))
    settings = Settings(data_dir=work / "data")

    bundle = model(work, args.side, args.train_epochs, args.train_n)
    began = time.perf_counter()
    reference = logged(bundle, work / "reference", args.reference_n, 100, args.side)
    print(f"reference: {len(reference)} instances, 4 sites, profiled in {time.perf_counter() - began:.1f} s")

    # 1. false alarms
    windows, alarms, seconds = [], [], []
    for seed in range(1, args.windows + 1):
        window = logged(bundle, work / f"window-{seed}", args.window_n, seed, args.side)
        windows.append(window)
        began = time.perf_counter()
        result = run_drift(reference, window, ["site_id", "scanner_id"], rules)
        seconds.append(time.perf_counter() - began)
        alarms.append([g.name for g in result.groups if g.alert])
        shares = ", ".join(f"{g.drift_share:.2f}" for g in result.groups)
        verdict = f"ALERT {alarms[-1]}" if alarms[-1] else "no alert"
        print(f"  window {seed:2d}: {verdict} (drift shares {shares})")
    share = sum(bool(a) for a in alarms) / len(alarms)
    print(
        f"false alarms: {sum(bool(a) for a in alarms)}/{len(alarms)} windows = {share:.0%} "
        f"(target <= {TARGET_FALSE_ALARMS:.0%}) {'PASS' if share <= TARGET_FALSE_ALARMS else 'FAIL'}; "
        f"run_drift {statistics.median(seconds):.2f} s per window of {args.window_n} (9 groups)"
    )

    # 2. detection delay
    site_a = reference.loc[reference["manufacturer"] == PROFILES[CHANGED_SITE].manufacturer, "site_id"].iloc[
        0
    ]
    scenarios: dict[str, Callable[[Path, int, int], list[Path]]] = {
        "new detector": lambda out, n, seed: new_detector(out, n, seed, args.side)
    }
    for contrast, gamma, noise in args.processing or [
        (0.85, 1.15, 0.02),
        (0.95, 1.05, 0.01),
        (0.98, 1.02, 0.005),
    ]:
        scenarios[f"processing (contrast {contrast}, gamma {gamma}, noise {noise})"] = partial(
            reprocessed, side=args.side, contrast=contrast, gamma=gamma, noise=noise
        )
    scenarios["body-part mix (chests only)"] = lambda out, n, seed: chests_only(out, n, seed, args.side)
    for number, (name, make) in enumerate(scenarios.items()):
        delays: list[int | None] = []
        for repeat in range(args.repeats):
            seed = 200 + 10 * repeat
            others = windows[repeat][windows[repeat]["site_id"] != site_a].head(150)
            changed = score(bundle, make(work / f"changed-{number}-{repeat}", args.max_k, seed))
            assert (changed["site_id"] == site_a).all()
            delays.append(detection_delay(reference, others, changed, args.step, rules))
        found = [d for d in delays if d is not None]
        worst = max(found) if len(found) == len(delays) else None
        verdict = "PASS" if worst is not None and worst <= TARGET_DELAY else "FAIL"
        median = statistics.median(found) if found else None
        print(
            f"detection delay, {name}: {delays} instances (median {median}, worst "
            f"{worst if worst is not None else f'> {args.max_k}'}; target <= {TARGET_DELAY}) {verdict}"
        )
        if name == "new detector":
            by_scanner = run_drift(
                reference, pd.concat([others, changed.head(1)]), ["site_id", "scanner_id"], rules
            )
            first = [g.name for g in by_scanner.groups if g.alert and g.new_source]
            print(f"  by scanner_id as well: alert at the first instance: {bool(first)} ({first})")

    # 3. cost of 10,000 logged instances
    everything = pd.concat(windows, ignore_index=True)
    now = datetime.now(UTC)
    prefix = str(work / "inference-log")
    began = time.perf_counter()
    with InferenceLog(prefix, settings) as log:
        for i, record in enumerate(everything.to_dict("records")):
            log.append({**{str(k): v for k, v in record.items()}, "at": now - timedelta(seconds=i)})
    written_s = time.perf_counter() - began
    print(
        f"cost: {len(everything)} records appended and written in {written_s:.2f} s ({len(log.parts)} parts)"
    )
    reference_uri = str(work / "reference.parquet")
    reference.to_parquet(reference_uri)
    job = DriftJob(reference=reference_uri, current=prefix, workspace=work / "workspace", log_to_mlflow=False)
    began = time.perf_counter()
    result = drift_job(settings, job)
    job_s = time.perf_counter() - began
    began = time.perf_counter()
    run_drift(reference, everything, ["site_id", "scanner_id"], rules)
    drift_s = time.perf_counter() - began
    print(
        f"cost: drift_job over {len(everything)} logged instances {job_s:.1f} s (read the log, "
        f"{len(result.groups)} group reports, HTML, workspace snapshots); run_drift alone {drift_s:.1f} s; "
        f"alert={result.alert}"
    )

    # 4. logging overhead on the routing path
    big = synthesize(work / "big", 1, seed=7, sites=1, long_side_px=3000)  # a detector-size radiograph
    decoded = decode_bytes((work / "big" / big[0].file).read_bytes(), "big", max_pixels=MAX_PIXELS)
    embedding = np.random.default_rng(0).random(512, np.float32)
    times = []
    for _ in range(20):
        began = time.perf_counter()
        facts = statistics_of(decoded)
        sample = log_record(
            decoded.dataset, facts, ("spine", 0.9), embedding, "bodypart-router/1", now, key=KEY
        )
        times.append(time.perf_counter() - began)
    with InferenceLog(str(work / "overhead-log"), settings, flush_every=256) as log:
        began = time.perf_counter()
        for _ in range(10_000):
            log.append(sample)
        append_us = (time.perf_counter() - began) / 10_000 * 1e6
    rows, columns = decoded.pixels.shape
    print(
        f"routing overhead: log_record {statistics.median(times) * 1000:.1f} ms on a {rows}x{columns} image, "
        f"InferenceLog.append {append_us:.1f} µs"
    )
    print(f"(work folder: {work})")


if __name__ == "__main__":
    main()

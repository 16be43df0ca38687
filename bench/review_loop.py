"""What reviewers' labels buy, measured through the real loop: Orthanc → router → review API →
``review export`` → training with the reviewed labels.

1. Adaptation to a new hospital (a learning curve per held-out source). One public collection of
   ``../shared/xray-real`` plays the new hospital: a model is trained on everything else (the rest of
   xray-real and xray-more), the held-out images are routed through the real stack, N of them are
   labelled through the router's REST API (N = 0, 10, 20, 40, as far as half the source allows), the
   corrections are exported and the model is retrained with them; macro-F1 and accuracy are measured on
   the held-out images that were never labelled (the same ones for every N).
2. Uncertainty sampling vs random: a model trained on synthetic data only routes all of xray-real; 40
   images are labelled from ``GET /review?suggest=40`` (lowest margin, spread over sites) or at random
   among the auto-routed ones; each is retrained on synthetic + those 40 and scored on the xray-real
   images that no strategy picked, macro-F1 overall and averaged over sources, for several seeds.

Every figure is logged to MLflow (experiment ``review-loop``) and printed as a table.

    .venv/bin/python bench/review_loop.py [--quick] [--only adaptation|sampling] [--seeds 3]
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import pydicom
import yaml

from dicom_router import LABELS, stack
from dicom_router.candidates import load_labelled, train_candidates
from dicom_router.config import Settings
from dicom_router.dicom.deid import load_key, uid_hash
from dicom_router.dicom.errors import DicomInputError
from dicom_router.evaluate import evaluation_report
from dicom_router.inference import Bundle
from dicom_router.orthanc.send import dcmsend
from dicom_router.registry import connect, experiment
from dicom_router.routing.queue import RoutingQueue
from dicom_router.synth import synthesize
from dicom_router.train import TrainConfig, recipe_config

FOLDERS = {"real": "xray-real", "more": "xray-more"}
"""The labelled folders of ``../shared`` used, by the prefix their files get in a ``Row``."""
Row = dict[str, str]
"""A labels.csv row, ``file`` relative to its folder (``real/…`` or ``more/…`` here)."""


def shared_rows(shared: Path) -> list[Row]:
    rows: list[Row] = []
    for name, folder in FOLDERS.items():
        with (shared / folder / "labels.csv").open(newline="") as f:
            for row in csv.DictReader(f):
                rows.append({"file": f"{name}/{row['file']}", "label": row["label"], "source": row["source"]})
    return rows


def shared_file(shared: Path, row: Row) -> Path:
    """Where a row's file lies in ``../shared``."""
    name, _, rest = row["file"].partition("/")
    return shared / FOLDERS[name] / rest


def labelled_folder(out: Path, rows: list[Row], shared: Path) -> Path:
    """A labelled folder of symbolic links to the shared files (nothing copied) and its labels.csv."""
    for row in rows:
        target = out / row["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(shared_file(shared, row))
    with (out / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "label", "source"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def train(settings: Settings, folders: list[Path], config: TrainConfig, seed: int) -> Bundle:
    """One candidate on these labelled folders (one split of them), its bundle downloaded."""
    labelled = load_labelled(settings, data=[str(f) for f in folders])
    (candidate,), _ = train_candidates(
        settings, labelled, [config], register=False, seed=seed, progress=False
    )
    path = mlflow.artifacts.download_artifacts(
        run_id=candidate.run_id, artifact_path="bundle", dst_path=tempfile.mkdtemp(dir=settings.data_dir)
    )
    return Bundle(Path(path))


def score(bundle: Bundle, rows: list[Row], shared: Path, settings: Settings) -> dict[str, Any]:
    """Macro-F1, accuracy and per-source macro-F1 of ``bundle`` on ``rows``."""
    items = [(r["file"], shared_file(shared, r).read_bytes()) for r in rows]
    results, ms = bundle.predict_items(items, max_pixels=settings.max_image_pixels)
    kept = [(r, p) for r, p in zip(rows, results, strict=True) if not isinstance(p, DicomInputError)]
    truth = np.array([LABELS.index(r["label"]) for r, _ in kept])
    probabilities = np.array([[p.probabilities[label] for label in LABELS] for _, p in kept])
    report = evaluation_report(truth, probabilities, LABELS, ms, resamples=200)
    by_source = {}
    for source in sorted({r["source"] for r, _ in kept}):
        chosen = [i for i, (r, _) in enumerate(kept) if r["source"] == source]
        by_source[source] = evaluation_report(truth[chosen], probabilities[chosen], LABELS, ms, resamples=50)[
            "macro_f1"
        ]
    return {
        "n": len(kept),
        "macro_f1": report["macro_f1"],
        "accuracy": report["accuracy"],
        "source_macro_f1": statistics.fmean(by_source.values()),
    }


@contextmanager
def routing_stack(settings: Settings, model: Path) -> Iterator[Settings]:
    """Orthanc with the hook, the model server serving ``model``, the router, a destination."""
    destination = stack.destination_up(settings, name="destination", aet="DEST")
    rules = settings.data_dir / "rules.yaml"
    where = {"host": stack.HOST, "port": destination["dicom_port"]}
    rules.write_text(
        yaml.safe_dump(
            {
                "destinations": {"pacs": {"aet": "PACS", **where}},
                "review": {"below_confidence": 0.0},
                "default": "pacs",
            }
        )
    )
    configured = settings.model_copy(
        update={
            "model_uri": str(model),
            "route_rules": rules,
            "route_changes_poll_s": 1.0,
            "route_poll_s": 0.05,
            "inference_log_uri": str(settings.data_dir / "inference-log"),
        }
    )
    try:
        stack.model_server_up(configured)
        stack.orthanc_up(configured)
        stack.router_up(configured)
        yield configured
    finally:
        stack.down(configured)
        stack.Process("destination", configured).stop()


def route(settings: Settings, rows: list[Row], shared: Path, work: Path) -> dict[str, Row]:
    """Send the files of ``rows`` (copies outside the repository) and wait until each is routed;
    returns the rows by SOP hash."""
    folder = work / "send"
    key = load_key(settings)
    by_hash: dict[str, Row] = {}
    for row in rows:
        source = shared_file(shared, row)
        target = folder / row["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        by_hash[str(uid_hash(key, pydicom.dcmread(source, stop_before_pixels=True), "SOPInstanceUID"))] = row
    port = stack.orthanc_status(settings)["dicom_port"]
    dcmsend(folder, port=port, called_aet=settings.orthanc_aet, calling_aet=settings.orthanc_calling_aet)
    queue = RoutingQueue(settings.routing_queue)
    wait(lambda: queue.counts().get("done", 0) + queue.counts().get("dead", 0) >= len(rows), "routing")
    return by_hash


def label(settings: Settings, picks: list[str], truth: dict[str, Row]) -> None:
    """Label through the router's REST API, then wait until each is routed by its label."""
    router = str(stack.router_status(settings)["url"])
    headers = {"Authorization": f"Bearer {stack.review_token(settings)}"}
    for sop_hash in picks:
        body = {"label": truth[sop_hash]["label"], "reviewer": "bench"}
        answer = httpx.post(f"{router}/review/{sop_hash}/label", json=body, headers=headers, timeout=30)
        answer.raise_for_status()
    queue = RoutingQueue(settings.routing_queue)
    wait(lambda: not queue.counts().get("pending") and not queue.counts().get("forwarding"), "re-routing")


def export(settings: Settings, out: Path, keep: set[str] | None = None) -> Path:
    """``review export`` through the CLI's own function; ``keep`` limits the folder to those SOP hashes."""
    from dicom_router.routing import review

    orthanc = stack.orthanc_client(settings)
    review.export(RoutingQueue(settings.routing_queue), orthanc.instance_file, out)
    if keep is not None:
        with (out / "labels.csv").open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["file"].removesuffix(".dcm") in keep]
        with (out / "labels.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "label", "label_source"])
            writer.writeheader()
            writer.writerows(rows)
    return out


def figures(f: dict[str, Any]) -> str:
    return (
        f"macro-F1 {f['macro_f1']:.3f}, source-averaged {f['source_macro_f1']:.3f}, "
        f"accuracy {f['accuracy']:.3f} (on {f['n']})"
    )


def wait(done: Any, what: str, timeout_s: float = 900.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)


def log_run(settings: Settings, name: str, params: dict[str, Any], metrics: dict[str, float]) -> None:
    connect(settings)
    with mlflow.start_run(experiment_id=experiment(settings, "review-loop"), run_name=name):
        mlflow.log_params(params)
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})


def adaptation(
    args: argparse.Namespace, shared: Path, work: Path, config: TrainConfig, mlflow_dir: Path
) -> None:
    rows = shared_rows(shared)
    real = [r for r in rows if r["file"].startswith("real/")]
    sizes: dict[str, int] = {}
    for r in real:
        sizes[r["source"]] = sizes.get(r["source"], 0) + 1
    held_out = [s for s, n in sorted(sizes.items(), key=lambda kv: -kv[1]) if n >= 20][: args.sources]
    print(f"\n1. adaptation: {len(held_out)} held-out sources, {config.arch} {config.image_size} px")
    for index, source in enumerate(held_out):
        short = source.split("(")[0].strip()[:40]
        settings = Settings(
            data_dir=work / f"adapt-{index}", mlflow_tracking_uri=f"sqlite:///{mlflow_dir}/mlflow.db"
        )
        settings.data_dir.mkdir(parents=True)
        target = [r for r in real if r["source"] == source]
        random.Random(0).shuffle(target)
        pool_size = min(40, len(target) // 2)
        pool, evaluation = target[:pool_size], target[pool_size:]
        rest = [r for r in rows if r["source"] != source]
        base_folder = labelled_folder(settings.data_dir / "base", rest, shared)
        base = train(settings, [base_folder], config, seed=0)
        found = {0: score(base, evaluation, shared, settings)}
        with routing_stack(settings, base.path) as live:
            truth = route(live, target, shared, settings.data_dir)
            hashes = {r["file"]: h for h, r in truth.items()}
            labelled_so_far = 0
            for n in [n for n in args.steps if 0 < n <= pool_size]:
                label(live, [hashes[r["file"]] for r in pool[labelled_so_far:n]], truth)
                labelled_so_far = n
                reviewed = export(live, live.data_dir / f"reviewed-{n}")
                found[n] = score(
                    train(live, [base_folder, reviewed], config, seed=0), evaluation, shared, live
                )
        for n, f in found.items():
            log_run(
                settings, f"adapt {short} N={n}", {"held_out": source, "n_reviewed": n, "eval_n": f["n"]}, f
            )
            print(f"   {short:40} N={n:2d}  {figures(f)}")


def sampling(
    args: argparse.Namespace, shared: Path, work: Path, config: TrainConfig, mlflow_dir: Path
) -> None:
    settings = Settings(data_dir=work / "sampling", mlflow_tracking_uri=f"sqlite:///{mlflow_dir}/mlflow.db")
    settings.data_dir.mkdir(parents=True)
    synthetic = settings.data_dir / "synthetic"
    synthesize(synthetic, args.synthetic, sites=4, seed=1, long_side_px=256)
    base = train(settings, [synthetic], config, seed=0)
    real = [r for r in shared_rows(shared) if r["file"].startswith("real/")]
    print(f"\n2. uncertainty sampling vs random: synthetic-only {config.arch}, {len(real)} xray-real routed")
    with routing_stack(settings, base.path) as live:
        truth = route(live, real, shared, live.data_dir)
        router = str(stack.router_status(live)["url"])
        headers = {"Authorization": f"Bearer {stack.review_token(live)}"}
        suggested = [
            e["sop_hash"]
            for e in httpx.get(f"{router}/review", params={"suggest": args.budget}, headers=headers).json()
        ]
        auto = [
            i.sop_hash
            for i in RoutingQueue(live.routing_queue).finished()
            if i.routed_to != "review" and i.sop_hash
        ]
        picks = {"uncertainty": suggested}
        for seed in range(args.seeds):
            picks[f"random-{seed}"] = random.Random(seed).sample(sorted(str(h) for h in auto), args.budget)
        everything = sorted({h for chosen in picks.values() for h in chosen})
        label(live, everything, truth)
        evaluation = [r for h, r in truth.items() if h not in set(everything)]
        results: dict[str, list[dict[str, Any]]] = {"uncertainty": [], "random": []}
        for seed in range(args.seeds):
            for strategy in ("uncertainty", f"random-{seed}"):
                folder = export(
                    live, live.data_dir / f"reviewed-{strategy}-{seed}", keep=set(picks[strategy])
                )
                f = score(train(live, [synthetic, folder], config, seed=seed), evaluation, shared, live)
                kind = strategy.split("-")[0]
                results[kind].append(f)
                log_run(
                    live,
                    f"{kind} seed={seed}",
                    {"strategy": kind, "seed": seed, "budget": args.budget, "eval_n": f["n"]},
                    f,
                )
                print(f"   {kind:12} seed {seed}: {figures(f)}")
    base_f = score(base, evaluation, shared, settings)
    print(f"   synthetic only: {figures(base_f)}")
    for kind, found in results.items():
        values = [f["macro_f1"] for f in found]
        grouped = [f["source_macro_f1"] for f in found]
        mean, grouped_mean = statistics.fmean(values), statistics.fmean(grouped)
        print(
            f"   {kind:12} mean macro-F1 {mean:.3f} (source-averaged {grouped_mean:.3f}), {len(found)} seeds"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="Tiny settings: checks the loop runs")
    parser.add_argument("--only", choices=("adaptation", "sampling"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sources", type=int, default=4, help="Held-out sources (largest first)")
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--synthetic", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--work", type=Path, help="Keep everything here (default: a temporary folder)")
    args = parser.parse_args()
    args.steps = (0, 10, 20, 40)
    if args.quick:
        args.seeds, args.sources, args.synthetic, args.image_size, args.epochs = 1, 1, 60, 64, 1
        args.steps = (0, 10)
    config = recipe_config(
        "fine-tune",
        arch="tf_efficientnet_lite0",
        epochs=args.epochs,
        image_size=args.image_size,
        batch_size=32,
    )
    shared = Settings().shared_dir
    work = args.work or Path(tempfile.mkdtemp(prefix="review-loop-"))
    mlflow_dir = work / "mlflow"
    mlflow_dir.mkdir(parents=True, exist_ok=True)
    print(f"work: {work}; MLflow: sqlite:///{mlflow_dir}/mlflow.db (experiment review-loop)")
    if args.only in (None, "adaptation"):
        adaptation(args, shared, work, config, mlflow_dir)
    if args.only in (None, "sampling"):
        sampling(args, shared, work, config, mlflow_dir)


if __name__ == "__main__":
    main()

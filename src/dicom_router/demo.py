"""``dicom-router demo``: the main job end to end on the embedded default, one stage after another.

Each stage is the same library call the CLI verbs make; the demo only chains them and says what
happened, so a person can re-run any stage by hand on the objects it leaves in the bucket (with
``DICOM_ROUTER_DATA_DIR`` set to the demo's own data directory).
"""

from __future__ import annotations

import csv
import logging
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pydicom
import yaml
from rich.console import Console
from rich.table import Table

from dicom_router import stack, synth
from dicom_router.catalog import summary_table
from dicom_router.config import Settings
from dicom_router.dicom.deid import load_key, pseudonym
from dicom_router.kfp_runs import run_local
from dicom_router.orthanc.send import dcmsend
from dicom_router.report.figures import archive_report, open_archive
from dicom_router.report.render import summary, write_report
from dicom_router.routing.queue import RoutingQueue
from dicom_router.routing.rules import EXAMPLE_RULES, RoutingRules
from dicom_router.serving.client import ModelClient
from dicom_router.steps.ingest import read_ingest_result
from dicom_router.storage import S3Store, open_store, upload_folder
from dicom_router.train import recipe_config

log = logging.getLogger(__name__)

DEMO_IMAGES = 300
DEMO_SITES = 3
DEMO_LONG_SIDE = 128
DEMO_RECIPE = "fine-tune"
DEMO_TRAINING = recipe_config(
    DEMO_RECIPE, arch="tf_efficientnet_lite0", epochs=8, image_size=96, batch_size=32
)
"""The fine-tuning recipe from the packaged ImageNet weights, small enough for a laptop CPU in about a
minute; real training sizes are flags of ``train``."""
DEMO_OBJECTS_PER_SHARD = 101
"""300 images and labels.csv: ingest fans out over 3 shards."""
DEMO_ROUTED = 40
DEMO_WEEK = 120
DEMO_NEW_SITE = 30
NEW_SITE = "site-new"
"""Week two: more traffic from the known sites, and a hospital with equipment the model never saw."""
DEMO_REVIEWED = 12
"""Week three: how many instances in review the demo's reviewer labels."""


def demo_rules(settings: Settings, destination_port: int) -> Path:
    """The shipped example rules, with every destination pointed at the demo's PACS Orthanc."""
    rules = RoutingRules.load(EXAMPLE_RULES)
    moved = {
        name: destination.model_copy(update={"port": destination_port})
        for name, destination in rules.destinations.items()
    }
    path = settings.data_dir / "routing-rules.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(rules.model_copy(update={"destinations": moved}).model_dump(mode="json")))
    return path


def route_and_show(settings: Settings, console: Console, sources: list[tuple[str, Path]]) -> None:
    """Send each folder to Orthanc with dcmsend; show where the router put every instance."""
    pacs = stack.destination_up(settings, name="pacs", aet="PACS")
    settings = settings.model_copy(update={"route_rules": demo_rules(settings, pacs["dicom_port"])})
    model_url = stack.model_server_up(settings)
    orthanc = stack.orthanc_up(settings)
    stack.router_up(settings)
    client = ModelClient(model_url)
    wait(client.ready, 120, "the model server to load the champion")
    expected: dict[str, tuple[str, str]] = {}  # SOPInstanceUID → (source, true label)
    started = time.monotonic()
    for name, folder in sources:
        expected |= {uid: (name, label or "?") for uid, label in labels_by_uid(folder).items()}
        dcmsend(
            folder,
            port=orthanc["dicom_port"],
            called_aet=orthanc["aet"],
            calling_aet=settings.orthanc_calling_aet,
        )
    queue = RoutingQueue(settings.routing_queue)
    rest = stack.orthanc_client(settings)
    wait(lambda: queue.counts().get("done", 0) >= len(rest.instances()), 600, "every instance to be routed")
    elapsed = time.monotonic() - started
    outcome: Counter[tuple[str, str, str]] = Counter()
    right: Counter[str] = Counter()
    for instance in rest.instances():
        meta = rest.metadata("instances", instance)
        uid = str(rest.instance(instance)["MainDicomTags"]["SOPInstanceUID"])
        source, truth = expected.get(uid, ("?", "?"))
        outcome[(source, meta.get("BodyPart", "-"), meta["RoutedTo"])] += 1
        right[source] += int(meta.get("BodyPart") == truth)
    table = Table(title=f"6/10 routed {len(expected)} instances sent with dcmsend in {elapsed:.1f} s")
    for column in ("source", "BodyPart", "RoutedTo", "instances"):
        table.add_column(column)
    for (source, body_part, routed_to), n in sorted(outcome.items()):
        table.add_row(source, body_part, routed_to, str(n))
    console.print(table)
    for name, _ in sources:
        total = sum(n for (source, _, _), n in outcome.items() if source == name)
        console.print(f"{name}: BodyPart matches the label for {right[name]} of {total}")
    console.print(f"Orthanc: {orthanc['url']} · audit: `dicom-router route --history` · PACS: {pacs['url']}")


def new_hospital(settings: Settings, console: Console, catalog: str) -> list[Path]:
    """Fresh traffic from the known sites plus a hospital never seen in training; drift per site.
    Returns the folders sent."""
    from dicom_router.monitoring.drift import AlertRules
    from dicom_router.monitoring.inference_log import read_inference_log
    from dicom_router.monitoring.job import DriftJob, drift_job

    started = datetime.now(UTC)
    seed = int(started.timestamp())  # new instances on every run, so a second demo has traffic too
    traffic = settings.data_dir / f"week2-{seed}"
    known = synth.synthesize(
        traffic / "known", DEMO_WEEK, sites=DEMO_SITES, seed=seed, long_side_px=DEMO_LONG_SIDE
    )
    new = synth.synthesize(
        traffic / "new", DEMO_NEW_SITE, site_profile=NEW_SITE, seed=seed + 1, long_side_px=DEMO_LONG_SIDE
    )
    orthanc = stack.orthanc_status(settings)
    for folder in (traffic / "known", traffic / "new"):
        dcmsend(
            folder,
            port=orthanc["dicom_port"],
            called_aet=orthanc["aet"],
            calling_aet=settings.orthanc_calling_aet,
        )
    expected = len(known) + len(new)
    wait(
        lambda: len(read_inference_log(settings.inference_log, settings, since=started)) >= expected,
        300,
        "the router to log the new traffic",
    )
    ui = stack.evidently_up(settings)
    job = DriftJob(
        reference=f"models:/{settings.registered_model}@champion",
        current=settings.inference_log,
        rules=AlertRules(),
        window=datetime.now(UTC) - started,
        workspace=settings.evidently_dir,
        deployment=settings.deployment,
        reference_catalog=catalog,  # only used if the pipeline's profile step did not store it
    )
    result = drift_job(settings, job)
    table = Table(title=f"7/10 drift of {expected} new instances vs the champion's reference (Evidently)")
    for column in ("group", "reference", "current", "new source", "drift share", "alert"):
        table.add_column(column)
    for group in result.groups:
        table.add_row(
            group.name,
            str(group.n_reference),
            str(group.n_current),
            "yes" if group.new_source else "",
            f"{group.drift_share:.2f}" if group.evaluated else "-",
            "[bold red]ALERT[/]" if group.alert else "ok",
        )
    console.print(table)
    console.print(
        f"{len(known)} images from the {DEMO_SITES} known sites, {len(new)} from a new hospital "
        f"({NEW_SITE}: different equipment) · report {result.report_html} · Evidently UI {ui}"
    )
    return [traffic / "known", traffic / "new"]


def labels_by_uid(folder: Path) -> dict[str, str | None]:
    """The label of every DICOM file of a labelled folder (None: not in its labels.csv), by
    SOPInstanceUID."""
    with (folder / "labels.csv").open(newline="") as f:
        labels = {row["file"]: row["label"] for row in csv.DictReader(f)}
    return {
        str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID).strip(): labels.get(
            path.relative_to(folder).as_posix()
        )
        for path in sorted(folder.rglob("*.dcm"))
    }


def truth_by_hash(settings: Settings, folders: list[Path]) -> dict[str, str]:
    """The true label of every file sent, by SOP hash (how the worklist names instances)."""
    key = load_key(settings)
    return {
        pseudonym(key, "SOPInstanceUID", uid): label
        for folder in folders
        for uid, label in labels_by_uid(folder).items()
        if label
    }


def review_loop(settings: Settings, console: Console, training: Path, sent: list[Path]) -> None:
    """Week three: a reviewer labels what landed in review, the model is retrained with those labels,
    the new version answers in shadow beside the champion, and a person approves its promotion."""
    from dicom_router import promotion
    from dicom_router.candidates import load_labelled, train_candidates
    from dicom_router.monitoring.compare import compare, write_report
    from dicom_router.monitoring.inference_log import read_inference_log
    from dicom_router.routing import review

    queue = RoutingQueue(settings.routing_queue)
    truth = truth_by_hash(settings, sent)
    waiting = [i for i in review.worklist(queue) if i.sop_hash in truth][:DEMO_REVIEWED]
    kinds = Counter(
        review.correct(queue, str(i.sop_hash), truth[str(i.sop_hash)], reviewer="demo", via="cli")["kind"]
        for i in waiting
    )
    wait(lambda: not queue.counts().get("pending"), 300, "the reviewed instances to be routed")
    console.print(
        f"[bold]8/10[/] review: {len(review.worklist(queue)) + len(waiting)} instances were in review; "
        f"the demo labelled {len(waiting)} ({dict(kinds)}) with `dicom-router review label` "
        "and the router forwarded each where its label routes"
    )
    orthanc = stack.orthanc_client(settings)
    exported = review.export(queue, orthanc.instance_file, settings.data_dir / "reviewed")
    labelled = load_labelled(settings, data=[str(training), exported["folder"]])
    (candidate,), _ = train_candidates(settings, labelled, [DEMO_TRAINING], register=True, progress=False)
    version = str(candidate.version)
    promotion.shadow(settings, version, reviewer="demo")
    client = ModelClient(stack.model_server_url(settings))
    probe = next(training.rglob("*.dcm")).read_bytes()
    wait(lambda: client.classify(probe, embedding=True).shadow_label is not None, 120, "the challenger")
    console.print(
        f"[bold]9/10[/] retrained with {exported['exported']} reviewed labels (label_source=review): "
        f"version {version}, test macro-F1 {candidate.report['macro_f1']:.3f}, now in shadow (alias "
        "challenger): it answers every instance beside the champion and routes nothing"
    )
    started = datetime.now(UTC)
    folder = settings.data_dir / f"week3-{int(started.timestamp())}"
    week = synth.synthesize(
        folder, DEMO_ROUTED, sites=DEMO_SITES, seed=int(started.timestamp()) + 3, long_side_px=DEMO_LONG_SIDE
    )
    status = stack.orthanc_status(settings)
    dcmsend(
        folder,
        port=status["dicom_port"],
        called_aet=status["aet"],
        calling_aet=settings.orthanc_calling_aet,
    )

    def shadowed() -> pd.DataFrame:
        """Week three's records: the log keeps only the hour, so those with the challenger's answer."""
        records = read_inference_log(settings.inference_log, settings, since=started)
        return records[records["shadow_version"] == f"{settings.registered_model}/{version}"]

    wait(lambda: len(shadowed()) >= len(week), 300, "the router to log week three")
    document = compare(shadowed(), review.reviewed_labels(queue), started)
    page = write_report(
        document,
        lambda _: None,
        settings.data_dir / "compare.html",
        max_pixels=settings.max_image_pixels,
    )
    overall = document["overall"]
    console.print(
        f"      week three: {overall['n']} instances answered by both; champion and challenger agree on "
        f"{overall['agreement']:.0%}; page {page} (`dicom-router compare --since 7d`)"
    )
    decision = promotion.promote(settings, version=version)
    if decision.get("request"):
        approved = promotion.settle(
            settings, decision["request"], approve=True, reviewer="demo", note="the demo approves its own"
        )
        console.print(
            f"[bold]10/10[/] the gate passed ({decision['reason']}); request {decision['request']} "
            f"approved by {approved['reviewer']}: version {version} is the champion "
            "(`dicom-router promote --history`)"
        )
    else:
        console.print(f"[bold]10/10[/] version {version}: {decision['reason']} (the champion stays)")


def wait(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise stack.StackError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def demo_settings(settings: Settings) -> Settings:
    """The demo's own deployment under ``DATA_DIR/demo``: a registry, bucket, key and servers of its own, so
    it can be re-run at will and never trains against, shadows or replaces a hospital's champion (such as
    the one ``make train-real`` promotes)."""
    return settings.model_copy(update={"data_dir": settings.data_dir / "demo"})


def run_demo(settings: Settings, console: Console) -> int:
    settings = demo_settings(settings)
    endpoint = stack.s3_up(settings)
    mlflow_url = stack.mlflow_up(settings)
    console.print(
        f"[bold]1/10[/] the demo's own deployment in {settings.data_dir}: local S3 (rclone) at {endpoint}; "
        f"MLflow UI at {mlflow_url}",
        highlight=False,
    )
    local = settings.data_dir / "synth"
    records = synth.synthesize(
        local, DEMO_IMAGES, sites=DEMO_SITES, seed=7, long_side_px=DEMO_LONG_SIDE, progress=True
    )
    raw = f"s3://{settings.s3_bucket}/demo/raw"
    store = open_store(raw, settings)
    if isinstance(store, S3Store):
        store.ensure_bucket()
    uploaded = upload_folder(local, store)
    console.print(
        f"[bold]2/10[/] {len(records)} synthetic X-rays from {DEMO_SITES} sites → {raw} ({uploaded} objects)"
    )
    catalog = f"s3://{settings.s3_bucket}/demo/catalog.parquet"
    log_file = settings.data_dir / "pipeline.log"
    console.print(f"[bold]3-5/10[/] training pipeline, run locally with kfp.local (task logs: {log_file})")
    run = run_local(
        "training",
        {
            "source": raw,
            "catalog_uri": catalog,
            "archs": [DEMO_TRAINING.arch],
            "epochs": DEMO_TRAINING.epochs,
            "image_size": DEMO_TRAINING.image_size,
            "batch_size": DEMO_TRAINING.batch_size,
            "recipe": DEMO_RECIPE,
            "objects_per_shard": DEMO_OBJECTS_PER_SHARD,
        },
        settings,
        log_file=log_file,
    )
    result = read_ingest_result(catalog, settings)
    shards = sum(t.task.endswith("/ingest-shard") for t in run.tasks)
    console.print(f"[bold]3/10[/] de-identified catalog, ingested in {shards} parallel shards")
    console.print(summary_table(result))
    document = archive_report(open_archive(catalog, settings), settings)
    page = write_report(document, settings.data_dir / "report")
    for line in summary(document):
        console.print(f"      {line}", highlight=False)
    console.print(f"      archive report (hierarchy, population, acquisition, quality, PHI audit): {page}")
    version, decision = run.outputs["version"], run.decision or {}
    console.print(
        f"[bold]4/10[/] fine-tuned {DEMO_TRAINING.arch} from ImageNet weights "
        f"({DEMO_TRAINING.image_size} px, {DEMO_TRAINING.epochs} epochs): "
        f"test macro-F1 {decision['candidate']['macro_f1']:.3f} → "
        f"{settings.registered_model} version {version}"
    )
    verdict = "promoted to champion" if decision.get("promoted") else "refused"
    console.print(f"[bold]5/10[/] promotion gate: version {version} {verdict} ({decision.get('reason')})")
    steps = ", ".join(f"{t.task.rpartition('/')[2]} {t.seconds:.0f}s" for t in run.tasks)
    console.print(f"      pipeline {run.wall_s:.0f} s: {steps}; artifacts under {run.run_dir}")

    unseen = settings.data_dir / "unseen"
    synth.synthesize(unseen, DEMO_ROUTED, sites=DEMO_SITES, seed=99, long_side_px=DEMO_LONG_SIDE)
    sources = [("synthetic (unseen)", unseen)]
    if (settings.shared_dir / "xray-real" / "labels.csv").is_file():
        sources.append(("real radiographs", settings.shared_dir / "xray-real"))
    route_and_show(settings, console, sources)
    week_two = new_hospital(settings, console, catalog)
    review_loop(settings, console, local, [folder for _, folder in sources] + week_two)
    console.print(
        f"MLflow UI: {mlflow_url} · the demo's stack keeps running in its own data directory; stop it "
        f"with `DICOM_ROUTER_DATA_DIR={settings.data_dir} dicom-router stack down`.",
        highlight=False,
    )
    return 2 if result.errors else 0

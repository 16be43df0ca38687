"""The ``dicom-router`` command: the contract's verbs, flags, exit codes and JSON shapes (CONTRACT.md)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from dicom_router import __version__
from dicom_router.config import Settings
from dicom_router.dicom.errors import DicomInputError, NotDicom
from dicom_router.errors import ModelNotFound, StorageError

EXIT_OK = 0
EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_GATE_REFUSED = 4
EXIT_USAGE = 64


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="dicom-router", message="%(prog)s %(version)s")
def app() -> None:
    """Learn the body part of DICOM X-rays and route each new image to the right place."""


stdout = Console(width=None if sys.stdout.isatty() else 200)  # tables stay whole when piped
stderr = Console(stderr=True)
log = logging.getLogger("dicom_router")


def _emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def _report_errors(errors: list[Any]) -> None:
    """The contract's error line on stderr: ``<path>: <ErrorType>: <reason>``."""
    for error in errors:
        sys.stderr.write(f"{error.path}: {error.type}: {error.reason}\n")


@app.command()
@click.argument("out_dir", type=click.Path(path_type=Path), required=False)
@click.option("--n", "n", type=click.IntRange(min=1), default=100, show_default=True, help="Number of images")
@click.option(
    "--sites", type=click.IntRange(min=1), default=3, show_default=True, help="Site profiles to use"
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same files)")
@click.option("--site-profile", help="Use only this site profile")
@click.option("--long-side", type=click.IntRange(min=16), help="Image long side in pixels")
@click.option(
    "--variety",
    is_flag=True,
    help="Also the views real archives hold (laterals, cervical spines, DXA, contrast)",
)
@click.option("--list-profiles", is_flag=True, help="List site profiles")
def synth(
    out_dir: Path | None,
    n: int,
    sites: int,
    seed: int,
    site_profile: str | None,
    long_side: int | None,
    variety: bool,
    list_profiles: bool,
) -> int:
    """Synthetic multi-site X-ray DICOMs of the five classes, plus labels.csv (file,label,site)."""
    from dicom_router import synth as synthetic

    if list_profiles:
        for profile in synthetic.list_profiles():
            stdout.print(
                f"{profile.name}: {profile.manufacturer} {profile.model_name} {profile.modality} "
                f"{profile.bits_stored}-bit {profile.photometric} {profile.transfer_syntax}"
            )
        return EXIT_OK
    if out_dir is None:
        raise click.UsageError("OUT_DIR is required unless --list-profiles is given")
    try:
        records = synthetic.synthesize(
            out_dir,
            n,
            sites=sites,
            seed=seed,
            site_profile=site_profile,
            long_side_px=long_side,
            variety=variety,
            progress=True,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    log.info("wrote %d synthetic images and labels.csv to %s", len(records), out_dir)
    return EXIT_OK


def _expand(paths: tuple[Path, ...]) -> list[Path]:
    from dicom_router.catalog import SIDECAR_SUFFIXES

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.endswith(SIDECAR_SUFFIXES)
            )
        else:
            files.append(path)
    return files


def _read_file(path: Path) -> bytes | DicomInputError:
    """A file's bytes, or the contract's error when it cannot be read (the batch goes on)."""

    try:
        return path.read_bytes()
    except OSError as exc:
        return NotDicom(str(path), f"cannot read: {exc.strerror}")


@app.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout")
def inspect(paths: tuple[Path, ...], as_json: bool) -> int:
    """Decode each DICOM and print key metadata and pixel facts."""
    from dicom_router.dicom.decode import decode_bytes

    settings = Settings()
    results: list[dict[str, Any]] = []
    errors: list[DicomInputError] = []
    for path in _expand(paths):
        data = _read_file(path)
        if isinstance(data, DicomInputError):
            error: DicomInputError = data
        else:
            try:
                facts = decode_bytes(data, str(path), max_pixels=settings.max_image_pixels).facts
            except DicomInputError as exc:
                error = exc
            else:
                results.append(_inspect_record(str(path), facts.as_dict()))
                if not as_json:
                    stdout.print(_inspect_line(results[-1]), highlight=False)
                continue
        errors.append(error)
        results.append({"file": str(path), "ok": False, "error": error.as_dict()})
    _report_errors(errors)
    if as_json:
        _emit_json(results)
    return EXIT_BAD_INPUT if errors else EXIT_OK


def _inspect_record(path: str, facts: dict[str, Any]) -> dict[str, Any]:
    record = {"file": path, "ok": True}
    record |= {k: facts[k] for k in ("sop_class", "modality", "transfer_syntax", "photometric")}
    record |= {k: facts[k] for k in ("rows", "columns", "bits_stored", "frames")}
    record["pixel"] = {"min": facts["pixel_min"], "max": facts["pixel_max"], "mean": facts["pixel_mean"]}
    record |= {k: facts[k] for k in ("windowing", "inverted", "multi_frame", "converted_to_grey")}
    record["padding_pixels"] = facts["padding_pixels"]
    return record


def _inspect_line(r: dict[str, Any]) -> str:
    from pydicom.uid import UID

    flags = [name for name in ("inverted", "multi_frame", "converted_to_grey") if r[name]]
    px = r["pixel"]
    return (
        f"{r['file']}: {r['modality'] or '?'} {r['photometric']} {r['columns']}x{r['rows']} "
        f"{r['bits_stored']}-bit {r['frames']} frame(s) {UID(r['transfer_syntax']).name}; "
        f"values {px['min']:g}..{px['max']:g} mean {px['mean']:.1f}; {r['windowing']} window"
        + (f"; {', '.join(flags)}" if flags else "")
    )


@app.command()
@click.argument("source")
@click.option("--catalog", required=True, help="Parquet catalog to write (local path or s3://)")
@click.option("--labels", help="labels.csv with file,label[,...] (local path or s3://)")
@click.option("--json", "as_json", is_flag=True, help="Print the QA summary as JSON")
def ingest(source: str, catalog: str, labels: str | None, as_json: bool) -> int:
    """De-identified Parquet catalog of every DICOM under SOURCE (headers only), plus CATALOG.qa.json."""
    from dicom_router.catalog import ingest as run_ingest
    from dicom_router.catalog import summary_table

    settings = Settings()
    result = run_ingest(source, catalog, settings, labels_uri=labels, progress=sys.stderr.isatty())
    _report_errors(result.errors)
    if as_json:
        _emit_json(result.qa)
    else:
        stdout.print(summary_table(result))
    log.info("cataloged %d of %d objects into %s", len(result.catalog), result.qa["objects"], catalog)
    return EXIT_BAD_INPUT if result.errors else EXIT_OK


@app.command()
@click.argument("action", type=click.Choice(["up", "down", "status"]))
@click.option("--json", "as_json", is_flag=True, help="Status as JSON")
def stack(action: str, as_json: bool) -> int:
    """The embedded local stack: S3, MLflow, the model server, Orthanc with its hook and the router,
    and the Evidently UI, all on loopback."""
    from dicom_router import stack as local

    settings = Settings()
    state = {"up": local.up, "down": local.down, "status": local.status}[action](settings)
    if as_json:
        _emit_json(state)
    else:
        for name, service in state.items():
            where = next((v for k, v in service.items() if k in ("endpoint", "uri", "url")), None)
            stdout.print(f"{name:13} {'running' if service['running'] else 'stopped':8} {where or ''}")
    return EXIT_OK


class _Folds(click.ParamType):  # type: ignore[type-arg]
    """A number of folds (≥ 2) or ``loo`` (leave one group out)."""

    name = "K|loo"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value in (None, "loo"):
            return None
        try:
            folds = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a number of folds nor 'loo'", param, ctx)
        if folds < 2:
            self.fail("at least 2 folds", param, ctx)
        return folds


@app.command()
@click.option(
    "--recipe",
    default="scratch",
    show_default=True,
    help="Named defaults for the options below: scratch, or fine-tune (ImageNet weights, warm-up, views…)",
)
@click.option("--catalog", help="Labelled catalog (ingest --labels output), local or s3://")
@click.option(
    "--data",
    "data_dirs",
    multiple=True,
    help="Labelled folder (DICOM + labels.csv), local or s3:// (repeatable)",
)
@click.option(
    "--with-reviewed",
    is_flag=True,
    help="Add reviewers' labels (exported from the router's corrections; label_source=review)",
)
@click.option(
    "--collections",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CSV source,collection: sources that are one collection (a 'collection' column for --cv-by)",
)
@click.option(
    "--arch",
    "archs",
    multiple=True,
    help="timm architecture (repeatable); default: the recipe's (scratch: MobileNet-V1; fine-tune: "
    "the pair make train-real promotes)",
)
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--image-size", type=click.IntRange(min=32), default=256, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate (the head's)")
@click.option(
    "--backbone-lr-scale",
    type=click.FloatRange(min=0.0),
    default=1.0,
    show_default=True,
    help="The backbone's learning rate relative to --lr",
)
@click.option(
    "--warmup-epochs",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Epochs training the head alone on a frozen backbone first",
)
@click.option(
    "--frozen-stages",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Leading backbone parameter groups (stem, stages) kept frozen",
)
@click.option("--views", is_flag=True, help="Augmentation mimicking other sites and views")
@click.option(
    "--average-epochs",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="Keep a moving average of the fine-tuned weights over about this many epochs (0: off)",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Split, sampling and weight seed")
@click.option(
    "--patience", type=click.IntRange(min=1), default=8, show_default=True, help="Early-stopping epochs"
)
@click.option("--fusion", is_flag=True, help="Also train each architecture with header-feature fusion")
@click.option("--equalize", is_flag=True, help="Histogram-equalise images in preprocessing")
@click.option(
    "--pretrained",
    is_flag=True,
    help="Start from ImageNet weights (--init-weights, DICOM_ROUTER_WEIGHTS_DIR, packaged, timm's hub)",
)
@click.option("--init-weights", help="ImageNet weights file or folder (implies --pretrained)")
@click.option(
    "--pretrain-synthetic", type=click.IntRange(min=0), default=0, help="Synthetic images to pretrain on"
)
@click.option("--pretrain-epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--mix-synthetic",
    type=click.IntRange(min=0),
    default=0,
    help="Synthetic images mixed into the training set itself",
)
@click.option(
    "--mix-share",
    type=click.FloatRange(min=0.0, max=1.0, max_open=True),
    default=0.25,
    show_default=True,
    help="Share of each epoch's draws that are mixed-in synthetic images",
)
@click.option("--synthetic-variety", is_flag=True, help="Synthetic images also show the views archives hold")
@click.option("--ensemble", is_flag=True, help="Also publish all architectures as one averaged bundle")
@click.option("--tta", is_flag=True, help="Bundles average each image with its mirror image")
@click.option("--register", is_flag=True, help="Register each candidate in MLflow (tag candidate)")
@click.option("--cv-by", help="First cross-validate with folds grouped by this column (e.g. source)")
@click.option(
    "--folds", type=_Folds(), default="3", show_default=True, help="Folds for --cv-by, or loo (one per group)"
)
@click.option("--json", "as_json", is_flag=True, help="Candidates' test metrics as JSON")
@click.pass_context
def train(
    ctx: click.Context,
    recipe: str,
    catalog: str | None,
    data_dirs: tuple[str, ...],
    collections: Path | None,
    with_reviewed: bool,
    archs: tuple[str, ...],
    epochs: int,
    image_size: int,
    batch_size: int,
    lr: float,
    backbone_lr_scale: float,
    warmup_epochs: int,
    frozen_stages: int,
    views: bool,
    average_epochs: float,
    seed: int,
    patience: int,
    fusion: bool,
    equalize: bool,
    pretrained: bool,
    init_weights: str | None,
    pretrain_synthetic: int,
    pretrain_epochs: int,
    mix_synthetic: int,
    mix_share: float,
    synthetic_variety: bool,
    ensemble: bool,
    tta: bool,
    register: bool,
    cv_by: str | None,
    folds: int | None,
    as_json: bool,
) -> int:
    """Train candidate CNNs, log each to MLflow with its persisted split, optionally register them."""
    from dicom_router.candidates import (
        calibration_of,
        cross_validate_for_rules,
        initial_weights,
        load_labelled,
        train_candidates,
    )
    from dicom_router.train import RECIPE_ARCHS, RECIPES, TrainConfig
    from dicom_router.weights import PretrainedUnavailable

    if (catalog is None) == (not data_dirs):
        raise click.UsageError("give exactly one of --catalog or --data")
    if with_reviewed and catalog is not None:
        raise click.UsageError("--with-reviewed adds a labelled folder: use it with --data")
    if recipe not in RECIPES:
        raise click.UsageError(f"no recipe {recipe!r}; known: {', '.join(RECIPES)}")
    settings = Settings()
    given = {
        "epochs": epochs,
        "image_size": image_size,
        "batch_size": batch_size,
        "lr": lr,
        "backbone_lr_scale": backbone_lr_scale,
        "warmup_epochs": warmup_epochs,
        "frozen_stages": frozen_stages,
        "views": views,
        "average_epochs": average_epochs,
        "seed": seed,
        "patience": patience,
        "pretrained": pretrained or init_weights is not None,
        "init_weights": init_weights,
        "equalize": equalize,
        "pretrain_synthetic": pretrain_synthetic,
        "pretrain_epochs": pretrain_epochs,
        "mix_synthetic": mix_synthetic,
        "mix_share": mix_share,
        "synthetic_variety": synthetic_variety,
    }
    # the recipe's values replace the options' defaults, never what the user gave
    explicit = {
        key: value
        for key, value in given.items()
        if ctx.get_parameter_source(key) not in (None, click.core.ParameterSource.DEFAULT)
    }
    configs = [
        TrainConfig(**{**given, **RECIPES[recipe], **explicit}, arch=arch, metadata=meta)
        for arch in archs or RECIPE_ARCHS[recipe]
        for meta in ((False, True) if fusion else (False,))
    ]
    for config in configs:
        try:
            init = initial_weights(settings, config)
        except (PretrainedUnavailable, ValueError) as exc:
            raise click.UsageError(str(exc)) from None
        if init is not None:
            log.info("%s starts from %s", config.arch, init.source)
    if with_reviewed:
        exported = _export_reviewed(settings, settings.data_dir / "reviewed")
        log.info("%d reviewed instances added from %s", exported["exported"], exported["folder"])
        data_dirs = (*data_dirs, exported["folder"]) if exported["exported"] else data_dirs
    labelled = load_labelled(settings, catalog=catalog, data=data_dirs, collections=collections)
    cv: dict[str, dict[str, Any]] = {}
    if cv_by:
        cv = cross_validate_for_rules(settings, labelled, configs, group_by=cv_by, folds=folds, seed=seed)
        if not as_json:
            for name, report in cv.items():
                _print_report(f"{name}: {folds or 'leave-one-out'} folds grouped by {cv_by}", report)
    calibration = calibration_of(cv)
    candidates, errors = train_candidates(
        settings,
        labelled,
        configs,
        register=register,
        ensemble=ensemble,
        tta=tta,
        calibration=calibration,
        seed=seed,
    )
    _report_errors(errors)
    rows = [
        {
            "arch": c.name,
            "metadata": c.metadata,
            "run_id": c.run_id,
            "version": c.version,
            "test_macro_f1": c.report["macro_f1"],
            "test_macro_f1_ci": c.report["macro_f1_ci"],
            **({"cv": cv[c.name]} if c.name in cv else {}),
        }
        for c in candidates
    ]
    if as_json:
        _emit_json(rows)
    else:
        for row in rows:
            ci = row["test_macro_f1_ci"]
            stdout.print(
                f"{row['arch']}: test macro-F1 {row['test_macro_f1']:.4f} "
                f"[{ci[0]:.3f}, {ci[1]:.3f}] run {row['run_id']}"
                + (f" → {settings.registered_model} version {row['version']}" if row["version"] else "")
            )
    return EXIT_BAD_INPUT if errors else EXIT_OK


@app.command()
@click.option(
    "--model", "model_uri", required=True, help="models:/bodypart-router@champion, models:/NAME/V or a dir"
)
@click.option("--data", "data_dir", required=True, help="Labelled folder (DICOM + labels.csv)")
@click.option("--split", type=click.Choice(["all", "test"]), default="all", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The evaluation as one JSON document")
def evaluate(model_uri: str, data_dir: str, split: str, as_json: bool) -> int:
    """Metrics of a model on a labelled folder (``--split test``: only its persisted test split)."""
    from dicom_router.candidates import load_labelled
    from dicom_router.promotion import score
    from dicom_router.registry import load_bundle
    from dicom_router.routing.rules import EXAMPLE_RULES, RoutingRules

    settings = Settings()
    bundle = load_bundle(settings, model_uri)
    labelled = load_labelled(settings, data=[data_dir])
    review = RoutingRules.load(settings.route_rules or EXAMPLE_RULES).review
    frame = labelled.frame
    if split == "test":
        test = {item["sop_uid_hash"] for item in bundle.card.get("test_items", [])}
        frame = frame[frame["sop_uid_hash"].isin(test)]
        if frame.empty:
            raise click.UsageError(f"no file of {data_dir} is in the model's test split")
    items = [
        {"key": str(k), "label": str(v), "sop_uid_hash": str(h)}
        for k, v, h in zip(frame["key"], frame["label"], frame["sop_uid_hash"], strict=True)
    ]
    report = score(
        bundle,
        labelled.source,
        items,
        settings,
        review_threshold=review.confidence_threshold(bundle.review_threshold),
        above_novelty=review.above_novelty,
    )
    for error in report["errors"]:
        sys.stderr.write(f"{error['file']}: {error['type']}: {error['message']}\n")
    if as_json:
        _emit_json(report)
    else:
        _print_report(f"{bundle.name} {bundle.version}", report)
    return EXIT_BAD_INPUT if report["errors"] else EXIT_OK


def _print_report(title: str, report: dict[str, Any]) -> None:
    lo, hi = report["macro_f1_ci"]
    stdout.print(
        f"{title} on {report['n']} images: accuracy {report['accuracy']:.4f}, "
        f"macro-F1 {report['macro_f1']:.4f} [{lo:.3f}, {hi:.3f}], ECE {report['ece']:.4f}, "
        f"{report['ms_per_image']:.1f} ms/image"
    )
    for label, row in report["per_class"].items():
        stdout.print(
            f"  {label:16} precision {row['precision']:.3f} recall {row['recall']:.3f} "
            f"F1 {row['f1']:.3f} (n={row['support']})"
        )
    if "abstention" in report:
        unfamiliar = report["abstention"].get("unfamiliar", 0.0)
        if unfamiliar:
            stdout.print(f"  unlike the training images (novelty check): {unfamiliar:.1%} to review")
        abstention = report["abstention"]
        rules_99 = abstention["at_review_threshold"]["threshold"] == abstention["threshold_for_target"]
        for key, what in (
            ("at_review_threshold", "rules' review threshold" + (", the 99% one" if rules_99 else "")),
            ("without_novelty_check", "the same without the novelty check"),
            ("at_threshold_for_target", "99%"),
        ):
            if key not in abstention or (key == "at_threshold_for_target" and rules_99):
                continue
            at = abstention[key]
            stdout.print(
                f"  review below {at['threshold']:.3f} ({what}): {at['coverage']:.1%} routed automatically, "
                f"{at['auto_routed_accuracy']:.2%} of them right ({int(at['misrouted'])} misrouted)"
            )


@app.command()
@click.option("--model", "name", help="Registered model name (default: the configured one)")
@click.option("--version", help="The version to judge (default: the newest candidate)")
@click.option("--force", is_flag=True, help="Promote even if the gate refuses (rollback); recorded")
@click.option("--request", "request_version", metavar="VERSION", help="Run the gate; file a request")
@click.option("--approve", metavar="REQUEST", help="Approve a request: champion moves (with --reviewer)")
@click.option("--reject", metavar="REQUEST", help="Reject a request (with --reviewer)")
@click.option("--shadow", "shadow_version", metavar="VERSION", help="Serve VERSION in shadow (challenger)")
@click.option("--reviewer", help="Who approves, rejects or acts (recorded)")
@click.option("--note", help="Why, for the record (with --approve / --reject)")
@click.option("--history", "show_history", is_flag=True, help="Every gate decision, request and approval")
@click.option("--json", "as_json", is_flag=True, help="JSON output")
def promote(
    name: str | None,
    version: str | None,
    force: bool,
    request_version: str | None,
    approve: str | None,
    reject: str | None,
    shadow_version: str | None,
    reviewer: str | None,
    note: str | None,
    show_history: bool,
    as_json: bool,
) -> int:
    """The promotion gate (candidate vs champion on the candidate's test split), approval-gated on a
    live deployment; shadow deployment; the history of all of them."""
    from dicom_router import promotion
    from dicom_router.registry import RequestError, history

    settings = Settings()
    if name:
        settings = settings.model_copy(update={"registered_model": name})
    modes = {
        "--request": request_version,
        "--approve": approve,
        "--reject": reject,
        "--shadow": shadow_version,
        "--history": show_history,
    }
    chosen = [flag for flag, value in modes.items() if value]
    if len(chosen) > 1:
        raise click.UsageError(f"{' and '.join(chosen)}: one at a time")
    if show_history:
        entries = history(settings)
        if as_json:
            _emit_json(entries)
        for d in [] if as_json else entries:
            stdout.print(
                f"{d['at']} version {d['candidate']['version']}: {_verdict(d)} ({d['reason']})",
                highlight=False,
                markup=False,
            )
        return EXIT_OK
    try:
        if approve or reject:
            if not reviewer:
                raise click.UsageError("--approve and --reject need --reviewer NAME")
            decision = promotion.settle(
                settings, str(approve or reject), approve=bool(approve), reviewer=reviewer, note=note
            )
        elif shadow_version:
            decision = promotion.shadow(settings, shadow_version, reviewer=reviewer)
        else:
            decision = promotion.promote(
                settings,
                version=request_version or version,
                force=force,
                request=request_version is not None,
                reviewer=reviewer,
            )
    except RequestError as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        _emit_json(decision)
    else:
        stdout.print(
            f"version {decision['candidate']['version']}: {_verdict(decision)} ({decision['reason']})",
            highlight=False,
            markup=False,
        )
    refused = decision.get("action", "gate") == "gate" and not decision.get("passed", decision["promoted"])
    return EXIT_GATE_REFUSED if refused else EXIT_OK


def _verdict(decision: dict[str, Any]) -> str:
    """A history entry in words: what happened, by whom, under which request."""
    action = decision.get("action", "gate")
    if action == "gate":
        what = "promoted" if decision["promoted"] else "refused"
        if decision.get("request"):
            what = "awaiting approval"
    else:
        what = {"request": "requested", "approve": "approved", "reject": "rejected"}.get(action, action)
    who = f" by {decision['reviewer']}" if decision.get("reviewer") else ""
    request = f" [request {decision['request']}]" if decision.get("request") else ""
    return f"{what}{who}{request}"


@app.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_uri", help="MODEL_URI (default: models:/bodypart-router@champion)")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout")
def predict(paths: tuple[Path, ...], model_uri: str | None, as_json: bool) -> int:
    """Classify DICOM files with the model bundle, exactly as the model server does."""
    from dicom_router.promotion import prediction_record
    from dicom_router.registry import load_bundle

    settings = Settings()
    bundle = load_bundle(settings, model_uri or f"models:/{settings.registered_model}@champion")
    files = _expand(paths)
    readable: list[tuple[str, bytes]] = []
    unreadable: dict[str, DicomInputError] = {}
    for path in files:
        data = _read_file(path)
        if isinstance(data, DicomInputError):
            unreadable[str(path)] = data
        else:
            readable.append((str(path), data))
    results, _ = bundle.predict_items(readable, max_pixels=settings.max_image_pixels)
    by_path = dict(zip((p for p, _ in readable), results, strict=True)) | unreadable
    records = [prediction_record(str(p), by_path[str(p)], bundle) for p in files]
    errors = [r for r in by_path.values() if isinstance(r, DicomInputError)]
    _report_errors(errors)
    if as_json:
        _emit_json(records)
    else:
        for record in records:
            if "label" in record:
                stdout.print(
                    f"{record['file']}: {record['label']} ({record['confidence']:.3f})", highlight=False
                )
    return EXIT_BAD_INPUT if errors else EXIT_OK


@app.command()
@click.option("--model", "model_uri", help="MODEL_URI (default: models:/bodypart-router@champion, followed)")
@click.option("--port", type=click.IntRange(1, 65535), help="HTTP port (default: the configured one)")
@click.option("--host", help="Interface to bind (default: the configured one, loopback; a pod's own address)")
def serve(model_uri: str | None, port: int | None, host: str | None) -> int:
    """The KServe model server: V1/V2 inference on DICOM bytes or tensors, /metrics, alias reload."""
    from dicom_router.serving.server import serve as run_server

    settings = Settings()
    run_server(
        settings,
        model_uri=model_uri,
        host=host or settings.serve_host,
        port=port or settings.serve_port or 8080,
    )
    return EXIT_OK


def _since(value: str | None) -> float | None:
    """``--since``: an ISO date/time, or a duration back from now (``30m``, ``2h``, ``1d``)."""
    if value is None:
        return None
    from dicom_router.durations import parse_duration

    try:
        return time.time() - parse_duration(value).total_seconds()
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.UsageError(f"--since {value!r}: use an ISO date/time or 30m / 2h / 1d") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


@app.command()
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@click.option("--rules", "rules_file", type=click.Path(path_type=Path), help="Routing rules YAML")
@click.option("--dry-run", is_flag=True, help="Show which rule each FILE would hit (nothing is sent)")
@click.option("--history", "show_history", is_flag=True, help="The routing audit")
@click.option("--since", help="With --history: ISO time or 30m / 2h / 1d")
@click.option("--model", "model_uri", help="With --dry-run: MODEL_URI (default: the champion)")
@click.option("--once", is_flag=True, help="Route what is waiting, then exit")
@click.option("--dead-letter", is_flag=True, help="Instances that exhausted their attempts (in review)")
@click.option("--replay", metavar="SOP_HASH", help="Route this dead letter again (--all: every one)")
@click.option("--all", "replay_all", is_flag=True, help="With --replay: every dead letter")
@click.option("--json", "as_json", is_flag=True, help="JSON output")
def route(
    files: tuple[Path, ...],
    rules_file: Path | None,
    dry_run: bool,
    show_history: bool,
    since: str | None,
    model_uri: str | None,
    once: bool,
    dead_letter: bool,
    replay: str | None,
    replay_all: bool,
    as_json: bool,
) -> int:
    """The routing worker (Orthanc queue → model server → rules → forward), its dry run, its audit and
    its dead letters."""
    from dicom_router.routing.rules import EXAMPLE_RULES, RoutingRules, RulesError

    settings = Settings()
    if files and not dry_run:
        raise click.UsageError("FILE arguments need --dry-run")
    if dead_letter or replay or replay_all:
        return _dead_letters(settings, replay, replay_all or replay == "--all", as_json)
    if show_history:
        from dicom_router.routing.queue import RoutingQueue

        entries = RoutingQueue(settings.routing_queue).history(_since(since))
        if as_json:
            _emit_json(entries)
        for e in [] if as_json else entries:
            at = datetime.fromtimestamp(e["at"], UTC).isoformat(timespec="seconds")
            conf = "" if e["confidence"] is None else f" ({e['confidence']:.3f})"
            stdout.print(
                f"{at} {e['instance_id']} {e['outcome']:14} {e['body_part'] or '-'}{conf} "
                f"rule={e['rule']} → {e['routed_to']} {e['model_version'] or ''}",
                highlight=False,
            )
        return EXIT_OK
    try:
        rules = RoutingRules.load(rules_file or settings.route_rules or EXAMPLE_RULES)
    except RulesError as exc:
        raise click.UsageError(str(exc)) from None
    if dry_run:
        return _route_dry_run(settings, rules, files, model_uri, as_json)
    from dicom_router import stack
    from dicom_router.routing import service

    endpoints = service.Endpoints(stack.orthanc_client(settings), stack.model_server_url(settings))
    if once:
        counts = service.drain(settings, rules, endpoints)
        stdout.print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())), highlight=False)
        return EXIT_OK
    service.run_forever(settings, rules, endpoints)
    return EXIT_OK


def _dead_letters(settings: Settings, replay: str | None, replay_all: bool, as_json: bool) -> int:
    """``route --dead-letter`` lists them; ``--replay KEY`` / ``--replay --all`` sends them back."""
    from dicom_router.routing.queue import RoutingQueue

    queue = RoutingQueue(settings.routing_queue)
    if replay or replay_all:
        ids = queue.replay(None if replay_all else replay)
        if not ids and not replay_all:
            raise click.UsageError(f"--replay {replay}: no dead letter has that SOP hash or instance id")
        if as_json:
            _emit_json({"replayed": ids})
        else:
            stdout.print(f"{len(ids)} dead letter(s) back in the routing queue", highlight=False)
        return EXIT_OK
    letters = [
        {
            "sop_hash": i.sop_hash,
            "instance_id": i.instance_id,
            "attempts": i.attempts,
            "reason": i.last_error,
            "at": datetime.fromtimestamp(i.done_at or i.enqueued_at, UTC).isoformat(timespec="seconds"),
            "body_part": i.body_part,
            "destination": i.destination,
        }
        for i in queue.dead_letters()
    ]
    if as_json:
        _emit_json(letters)
    for d in [] if as_json else letters:
        stdout.print(
            f"{d['at']} {d['sop_hash'] or d['instance_id']} attempts={d['attempts']} {d['reason']}",
            highlight=False,
        )
    return EXIT_OK


def _route_dry_run(
    settings: Settings, rules: Any, files: tuple[Path, ...], model_uri: str | None, as_json: bool
) -> int:
    from dicom_router.routing.dry_run import dry_run

    if not files:
        raise click.UsageError("--dry-run needs FILE arguments")
    paths = _expand(files)
    readable: list[tuple[str, bytes]] = []
    errors: list[DicomInputError] = []
    for path in paths:
        data = _read_file(path)
        if isinstance(data, DicomInputError):
            errors.append(data)
        else:
            readable.append((str(path), data))
    records = dry_run(settings, rules, readable, model_uri or f"models:/{settings.registered_model}@champion")
    _report_errors(errors)
    if as_json:
        _emit_json(records + [{"file": e.path, "error": e.as_dict()} for e in errors])
    else:
        for r in records:
            what = r["error"] or f"{r['body_part']}" + (
                "" if r["confidence"] is None else f" ({r['confidence']:.3f})"
            )
            threshold = r["review_threshold"] if r["rule"] == "low-confidence" else None
            below = "" if threshold is None else f" (below {threshold:.3f})"
            stdout.print(f"{r['file']}: {what} → rule {r['rule']}{below} → {r['routed_to']}", highlight=False)
            for step in r["rules"]:
                if step["matched"]:
                    break
                stdout.print(f"    {step['rule']}: no ({step['why_not']})", highlight=False)
    return EXIT_BAD_INPUT if errors or any(r["error"] for r in records) else EXIT_OK


@app.group()
def review() -> None:
    """The review worklist and reviewers' corrections (also the router's REST API under /review)."""


@review.command("list")
@click.option("--site", help="Only this site_id")
@click.option("--suggest", "suggest_n", type=click.IntRange(min=1), help="The N instances to label next")
@click.option("--json", "as_json", is_flag=True, help="JSON output")
def review_list(site: str | None, suggest_n: int | None, as_json: bool) -> int:
    """Instances in review (low confidence, errors, conflicts, dead letters) that nobody labelled yet;
    with --suggest N the auto-routed ones a label would teach the model most (lowest margin, by site)."""
    from dicom_router.routing import review as worklist
    from dicom_router.routing.queue import RoutingQueue

    items = worklist.worklist(RoutingQueue(Settings().routing_queue), site=site, suggest_n=suggest_n)
    entries = [worklist.entry(item) for item in items]
    if as_json:
        _emit_json(entries)
    for e in [] if as_json else entries:
        conf = "" if e["confidence"] is None else f" ({e['confidence']:.3f})"
        why = e["reason"] or f"routed to {e['routed_to']}, margin {e['margin']:.3f}"
        stdout.print(
            f"{e['at']} {e['sop_hash'] or e['instance_id']} site={e['site_id']} "
            f"{e['body_part'] or '-'}{conf}: {why}",
            highlight=False,
        )
    return EXIT_OK


def _correct(key: str, label: str | None, reviewer: str | None, note: str | None) -> int:
    import getpass

    from dicom_router.routing import review as worklist
    from dicom_router.routing.queue import RoutingQueue

    queue = RoutingQueue(Settings().routing_queue)
    try:
        correction = worklist.correct(
            queue, key, label, reviewer=reviewer or getpass.getuser(), via="cli", note=note
        )
    except worklist.ReviewError as exc:
        sys.stderr.write(f"{key}: {type(exc).__name__}: {exc}\n")
        return EXIT_BAD_INPUT
    stdout.print(
        f"{key}: {correction['kind']} {correction['label']} (model said {correction['previous'] or '-'}); "
        "the router forwards it where that label goes",
        highlight=False,
    )
    return EXIT_OK


@review.command("label")
@click.argument("sop_hash")
@click.argument("label")
@click.option("--reviewer", help="Who labelled it [default: the login name]")
@click.option("--note", help="Why, for the record")
def review_label(sop_hash: str, label: str, reviewer: str | None, note: str | None) -> int:
    """Label an instance (in review, or routed and found wrong); it is forwarded where LABEL routes."""
    return _correct(sop_hash, label, reviewer, note)


@review.command("accept")
@click.argument("sop_hash")
@click.option("--reviewer", help="Who checked it [default: the login name]")
@click.option("--note", help="Why, for the record")
def review_accept(sop_hash: str, reviewer: str | None, note: str | None) -> int:
    """The model was right: the instance is forwarded where its predicted label routes."""
    return _correct(sop_hash, None, reviewer, note)


@review.command("export")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="JSON output")
def review_export(out_dir: Path, as_json: bool) -> int:
    """Reviewed instances (their newest label) as a labelled folder: DICOM from Orthanc and labels.csv
    with label_source=review, for ingest and training (what train --with-reviewed does itself)."""
    exported = _export_reviewed(Settings(), out_dir)
    if as_json:
        _emit_json(exported)
    else:
        stdout.print(
            f"{exported['exported']} reviewed instances in {exported['folder']}"
            + (f" ({exported['gone']} no longer in Orthanc)" if exported["gone"] else ""),
            highlight=False,
        )
    return EXIT_OK


def _export_reviewed(settings: Settings, out_dir: Path) -> dict[str, Any]:
    from dicom_router import stack
    from dicom_router.routing import review as worklist
    from dicom_router.routing.queue import RoutingQueue

    orthanc = stack.orthanc_client(settings)
    return worklist.export(RoutingQueue(settings.routing_queue), orthanc.instance_file, out_dir)


@app.command()
@click.option("--since", default="7d", show_default=True, help="ISO time or 7d / 24h: the window compared")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), help="HTML page path")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout")
def compare(since: str, out: Path | None, as_json: bool) -> int:
    """Champion vs challenger on live traffic, per site and scanner: agreement, accuracy of each on
    reviewed labels (bootstrap CIs), and a page of the instances they disagree on."""
    from dicom_router import stack
    from dicom_router.monitoring.compare import compare as compared
    from dicom_router.monitoring.compare import write_report
    from dicom_router.monitoring.inference_log import read_window
    from dicom_router.orthanc.rest import InstanceGone, OrthancUnavailable
    from dicom_router.routing.queue import RoutingQueue
    from dicom_router.routing.review import reviewed_labels

    settings = Settings()
    start = _since(since)
    moment = None if start is None else datetime.fromtimestamp(start, UTC)
    queue = RoutingQueue(settings.routing_queue)
    reviewed = reviewed_labels(queue)
    document = compared(read_window(settings.inference_log, settings, since=moment).frame, reviewed, moment)
    orthanc = stack.orthanc_client(settings)

    def fetch(sop_hash: str) -> bytes | None:
        item = queue.find(sop_hash)
        try:
            return None if item is None else orthanc.instance_file(item.instance_id)
        except (InstanceGone, OrthancUnavailable):
            return None

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = out or settings.data_dir / "compare" / f"{stamp}.html"
    page = write_report(document, fetch, target, max_pixels=settings.max_image_pixels)
    document["report_html"] = str(page)
    if as_json:
        _emit_json(document)
    else:
        o = document["overall"]
        agreement = "–" if o["agreement"] is None else f"{o['agreement']:.1%}"
        stdout.print(
            f"{o['n']} instances answered by both; agreement {agreement}; {o['reviewed']} reviewed; "
            f"{len(document['disagreements'])} disagreements; page: {page}",
            highlight=False,
        )
    return EXIT_OK


@app.command()
@click.argument("catalog")
@click.option(
    "--by", "by", multiple=True, help="Group column (repeatable); default --by site_id --by scanner_id"
)
@click.option(
    "--inference-log", "inference_log", help="Inference-log prefix: the model's answers beside labels"
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), help="Report folder")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout")
def report(
    catalog: str, by: tuple[str, ...], inference_log: str | None, out_dir: Path | None, as_json: bool
) -> int:
    """Archive analytics over CATALOG (a catalog file or a folder of Parquet, local or s3://): hierarchy,
    population, acquisition, quality and a de-identification audit, as HTML, PNG plots and JSON."""
    from dicom_router.monitoring.inference_log import read_inference_log
    from dicom_router.report.figures import DEFAULT_BY, ReportInputError, archive_report, open_archive
    from dicom_router.report.render import summary, write_report

    settings = Settings()
    predictions = read_inference_log(inference_log, settings) if inference_log else None
    try:
        with stderr.status(f"report over {catalog}: DuckDB scanning the catalog"):
            document = archive_report(
                open_archive(catalog, settings), settings, by=by or DEFAULT_BY, predictions=predictions
            )
    except ReportInputError as exc:
        raise click.UsageError(str(exc)) from None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    page = write_report(document, out_dir or settings.data_dir / "reports" / stamp)
    document["report_html"] = str(page)
    if as_json:
        _emit_json(document)
    else:
        for line in [*summary(document), f"report: {page}"]:
            stdout.print(line, highlight=False)
    return EXIT_OK


@app.command()
@click.option(
    "--reference", required=True, help="models:/NAME@ALIAS or /VERSION, a catalog/reference Parquet, a log"
)
@click.option(
    "--current", help="Inference-log prefix or Parquet (local or s3://) [default: the router's log]"
)
@click.option(
    "--by", "by", multiple=True, help="Group column (repeatable); default --by site_id --by scanner_id"
)
@click.option("--window", help="Only CURRENT records newer than this (30m, 24h, 7d)")
@click.option("--rules", "rules_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--webhook", help="POST the JSON document here when an alert fires")
@click.option(
    "--report", "report_uri", help="HTML report path or s3:// URI (default DATA_DIR/drift/<time>.html)"
)
@click.option("--reference-catalog", help="Build a missing models:/ reference from this training catalog")
@click.option("--no-dashboard", is_flag=True, help="Write no Evidently snapshots")
@click.option("--every", help="Repeat every interval (1h) until stopped: the embedded schedule")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout")
def drift(
    reference: str,
    current: str | None,
    by: tuple[str, ...],
    window: str | None,
    rules_file: Path | None,
    webhook: str | None,
    report_uri: str | None,
    reference_catalog: str | None,
    no_dashboard: bool,
    every: str | None,
    as_json: bool,
) -> int:
    """Evidently drift of CURRENT vs REFERENCE, overall and per site and scanner; exit 3 on an alert."""
    from dicom_router.monitoring.drift import AlertRules, DriftInputError, exit_code
    from dicom_router.monitoring.job import DriftJob, by_columns, drift_job, parse_window, repeat

    settings = Settings()
    try:
        rules_path = rules_file or settings.drift_rules
        rules = AlertRules.from_yaml(rules_path) if rules_path else AlertRules()
        recent = parse_window(window) if window else None
        interval = parse_window(every) if every else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    job = DriftJob(
        reference=reference,
        current=current or settings.inference_log,
        by=by_columns(by),
        rules=rules,
        window=recent,
        webhook=webhook or settings.drift_webhook_url,
        workspace=None if no_dashboard else settings.evidently_dir,
        deployment=settings.deployment,
        report_uri=report_uri,
        reference_catalog=reference_catalog,
    )
    if interval is not None:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        repeat(lambda: drift_job(settings, job), interval, stop)
        return EXIT_OK
    try:
        result = drift_job(settings, job)
    except DriftInputError as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        _emit_json(result.document())
    else:
        for g in result.groups:
            stdout.print(f"{'ALERT' if g.alert else 'ok':5} {g.name}: {g.reason}", highlight=False)
        stdout.print(f"report: {result.report_html}", highlight=False)
        if result.window_report:
            stdout.print(f"window report: {result.window_report}", highlight=False)
    return exit_code(result)


@app.group()
def pipeline() -> None:
    """Kubeflow pipelines: compile the IR YAML, or run a pipeline here (--local) or on a cluster."""


@pipeline.command("compile")
@click.argument("name", required=False)
def pipeline_compile(name: str | None) -> int:
    """Write pipelines/compiled/NAME.yaml (no NAME: every pipeline)."""
    from dicom_router.kfp_runs import PIPELINES, compile_pipelines

    if name is not None and name not in PIPELINES:
        raise click.UsageError(f"no pipeline {name!r}; known: {', '.join(PIPELINES)}")
    for path in compile_pipelines([name] if name else None, settings=Settings()):
        stdout.print(f"wrote {path}", highlight=False)
    return EXIT_OK


@pipeline.command("run")
@click.argument("name")
@click.option("--local", "run_here", is_flag=True, help="Run on this machine (kfp.local, embedded stack)")
@click.option("--host", help="Kubeflow Pipelines endpoint (without --local; default DICOM_ROUTER_KFP_HOST)")
@click.option(
    "--prefix",
    help="DICOM objects, s3://bucket/prefix [default: s3://<bucket>/demo/raw, where the demo puts its "
    "images in its own deployment, DICOM_ROUTER_DATA_DIR=DATA_DIR/demo]",
)
@click.option("--labels", help="labels.csv [default: PREFIX/labels.csv]")
@click.option("--reviewed", help="Reviewers' labels: the labels.csv of a review export under PREFIX")
@click.option("--catalog", help="Also write the merged catalog here (local path or s3://)")
@click.option("--arch", "archs", multiple=True, help="timm architecture, or an ensemble a+b (repeatable)")
@click.option("--epochs", type=click.IntRange(min=1))
@click.option("--image-size", type=click.IntRange(min=32))
@click.option("--batch-size", type=click.IntRange(min=1))
@click.option("--seed", type=int)
@click.option("--recipe", help="Training recipe: scratch or fine-tune (ImageNet weights, warm-up, ...)")
@click.option("--tta", is_flag=True, default=None, help="Bundles average each image with its mirror image")
@click.option(
    "--cv-by", help="Cross-validate each candidate first, folds grouped by this catalog column (e.g. site_id)"
)
@click.option("--cv-folds", type=click.IntRange(min=2), help="Folds of that cross-validation [default: 3]")
@click.option("--objects-per-shard", type=click.IntRange(min=1), help="Ingest fan-out: objects per shard")
@click.option("--max-shards", type=click.IntRange(min=1), help="Ingest fan-out: at most this many shards")
@click.option("--gate-margin", type=click.FloatRange(min=0.0), help="Promotion gate's recall margin")
@click.option(
    "--cluster", help="Deploy to: in-cluster or a kubeconfig path (default DICOM_ROUTER_K8S_CLUSTER)"
)
def pipeline_run(
    name: str,
    run_here: bool,
    host: str | None,
    prefix: str | None,
    labels: str | None,
    reviewed: str | None,
    catalog: str | None,
    archs: tuple[str, ...],
    epochs: int | None,
    image_size: int | None,
    batch_size: int | None,
    seed: int | None,
    recipe: str | None,
    tta: bool | None,
    cv_by: str | None,
    cv_folds: int | None,
    objects_per_shard: int | None,
    max_shards: int | None,
    gate_margin: float | None,
    cluster: str | None,
) -> int:
    """Run pipeline NAME; options left out take the pipeline's defaults."""
    from dicom_router.kfp_runs import PIPELINES, run_local, submit

    if name not in PIPELINES:
        raise click.UsageError(f"no pipeline {name!r}; known: {', '.join(PIPELINES)}")
    settings = Settings()
    host = host or settings.kfp_host
    if not run_here and not host:
        raise click.UsageError("give --local, or --host (or DICOM_ROUTER_KFP_HOST) with a Kubeflow endpoint")
    given = {
        "source": prefix or f"s3://{settings.s3_bucket}/demo/raw",
        "labels_uri": labels,
        "reviewed_uri": reviewed,
        "catalog_uri": catalog,
        "archs": list(archs) or None,
        "epochs": epochs,
        "image_size": image_size,
        "batch_size": batch_size,
        "seed": seed,
        "recipe": recipe,
        "tta": tta,
        "cv_by": cv_by,
        "cv_folds": cv_folds,
        "objects_per_shard": objects_per_shard,
        "max_shards": max_shards,
        "gate_margin": gate_margin,
        "cluster": cluster or settings.k8s_cluster,
    }
    params = {k: v for k, v in given.items() if v is not None}
    if not run_here:
        stdout.print(f"started run {submit(name, params, settings, host=host or '')} on {host}")
        return EXIT_OK
    run = run_local(name, params, settings)
    for task in run.tasks:
        stdout.print(f"{task.task:40} {task.seconds:8.1f} s", highlight=False)
    decision = run.decision
    verdict = "promoted" if decision and decision["promoted"] else "refused"
    if decision and decision.get("request"):
        verdict = f"awaiting approval (request {decision['request']})"
    reason = decision["reason"] if decision else "no decision"
    stdout.print(
        f"{name}: {run.wall_s:.1f} s; catalog {run.outputs.get('catalog')}; "
        f"version {run.outputs.get('version')} {verdict} ({reason})"
        + (f"; manifest {run.manifest}" if run.manifest else "")
        + f"; artifacts under {run.run_dir}",
        highlight=False,
    )
    return EXIT_OK


@app.command()
def demo() -> int:
    """The main job end to end on the embedded default."""
    from dicom_router.demo import run_demo

    return run_demo(Settings(), stdout)


def main() -> None:
    """Entry point: maps usage errors to 64 and unexpected exceptions to 1, as the contract says."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # our one-line logs; libraries stay at WARNING
    try:
        code = app.main(standalone_mode=False)
    except click.UsageError as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except ModelNotFound as exc:  # the caller named something the registry does not have
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_BUG)
    except click.Abort:
        sys.exit(130)
    except StorageError as exc:  # storage down or denied after retries: say so, never as bad input
        sys.stderr.write(f"error: storage: {exc}\n")
        sys.exit(EXIT_BUG)
    except Exception:
        log.exception("internal error (a bug; please report it with this trace)")
        sys.exit(EXIT_BUG)
    sys.exit(code if isinstance(code, int) else EXIT_OK)

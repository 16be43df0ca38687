"""The ``dicom-router`` command: the contract's verbs, flags, exit codes and JSON shapes (CONTRACT.md)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from dicom_router.config import Settings

EXIT_OK = 0
EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_USAGE = 64


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--list-profiles", is_flag=True, help="List site profiles")
def synth(
    out_dir: Path | None,
    n: int,
    sites: int,
    seed: int,
    site_profile: str | None,
    long_side: int | None,
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


@app.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout")
def inspect(paths: tuple[Path, ...], as_json: bool) -> int:
    """Decode each DICOM and print key metadata and pixel facts."""
    from dicom_router.dicom.decode import decode_bytes
    from dicom_router.dicom.errors import DicomInputError, NotDicom

    settings = Settings()
    results: list[dict[str, Any]] = []
    errors: list[DicomInputError] = []
    for path in _expand(paths):
        try:
            data = path.read_bytes()
        except OSError as exc:
            error: DicomInputError = NotDicom(str(path), f"cannot read: {exc.strerror}")
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
    """The embedded local stack (S3 now; later stages add MLflow, model server, Orthanc, Evidently UI)."""
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
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_BUG)
    except click.Abort:
        sys.exit(130)
    except Exception:
        log.exception("internal error (a bug; please report it with this trace)")
        sys.exit(EXIT_BUG)
    sys.exit(code if isinstance(code, int) else EXIT_OK)

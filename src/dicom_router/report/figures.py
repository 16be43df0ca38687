"""The figures of an archive report, computed by DuckDB over the catalog's Parquet where it lies.

The catalog is one file or a folder of partitioned files: local files are scanned by DuckDB's own
Parquet reader, ``s3://`` ones as a pyarrow dataset over pyarrow's filesystem (DuckDB's S3 support is an
extension it would download at run time). Either way DuckDB reads only the columns each query needs and
never holds the catalog in memory; the few groupings several figures share (by study) are kept as small
temporary tables. Every figure is a count, a quantile
or a pseudonym: no header value that identifies anyone exists in the catalog to begin with, and the
report prints no object key (a file name may carry a patient's name).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dicom_router import LABELS
from dicom_router.catalog import CARRIED_COLUMNS, CATALOG_SCHEMA, SOURCE_METADATA
from dicom_router.config import Settings
from dicom_router.dicom.deid import BURNED_IN, PHI_TAGS, PRIVATE_ELEMENTS, PSEUDONYM_HEX
from dicom_router.monitoring.inference_log import LOG_SCHEMA
from dicom_router.storage import s3_connection

DEFAULT_BY = ("site_id", "scanner_id")
AGE_BANDS: tuple[tuple[str, float], ...] = (
    ("0", 1),
    ("1-4", 5),
    ("5-11", 12),
    ("12-17", 18),
    ("18-39", 40),
    ("40-64", 65),
    ("65-79", 80),
    ("80+", math.inf),
)
"""Age bands in whole years, each up to (not including) its bound (the catalog's ages are already whole
years from 2, capped at 90)."""
NUMERIC = ("kvp", "exposure", "pixel_spacing", "rows", "columns")
CATEGORICAL = ("modality", "manufacturer", "model_name", "photometric", "bits_stored", "transfer_syntax")
STUDY_CONSISTENCY = {"patients": "patient_hash", "modalities": "modality", "sites": "site_id"}
"""What every instance of one study should share."""
STUDY_CONSISTENCY_NOUN = {"patients": "patient", "modalities": "modality", "sites": "site"}
PSEUDONYM_COLUMNS = (
    "sop_uid_hash",
    "study_uid_hash",
    "series_uid_hash",
    "patient_hash",
    "site_id",
    "scanner_id",
)
OUTLIER_IQR = 3.0
"""An instance is an outlier of its scanner beyond this many interquartile ranges outside the quartiles."""
FLEET_Z = 3.5
"""A scanner stands apart from the fleet when the robust z-score of its median passes this."""
FLEET_MIN_SCANNERS = 5
FLEET_MIN_GAP = 0.25
"""... and differs from the fleet's median by more than this share of it: with thousands of instances per
scanner the medians agree so closely that a robust z-score alone flags differences nobody would act on."""
BODY_PART_GROUPS = ("chest", "abdominal", "spine", "others")
"""What BodyPartExamined and the model's answer are compared on (the two chest classes are one here:
a header does not say adult or pediatric)."""
_BODY_PART_SQL = """CASE
  WHEN {c} IS NULL OR trim({c}) = '' THEN NULL
  WHEN regexp_matches({c}, 'CHEST|THORAX|LUNG|RIB') THEN 'chest'
  WHEN regexp_matches({c}, 'SPINE|COCCYX|SACRUM') THEN 'spine'
  WHEN regexp_matches({c}, 'ABD|KUB') THEN 'abdominal'
  ELSE 'others' END"""
_CLASS_SQL = """CASE
  WHEN {c} IN ('adult_chest', 'pediatric_chest') THEN 'chest' WHEN {c} IS NULL THEN NULL ELSE {c} END"""


class ReportInputError(ValueError):
    """The catalog cannot be read, or a grouping column it lacks was asked for."""


@dataclass
class ArchiveSource:
    """A catalog opened for analytics: its Parquet files, and the ingest QA documents beside them."""

    uri: str
    filesystem: pafs.FileSystem
    files: list[str]
    base: str | None
    """The folder the files were found under (None: one catalog file)."""
    qa: list[dict[str, Any]] = field(default_factory=list)

    @cached_property
    def schema(self) -> pa.Schema:
        return pq.read_schema(self.files[0], filesystem=self.filesystem)

    @cached_property
    def partitions(self) -> set[str]:
        """Columns that come from hive folder names (``site_id=…/``), not from the files."""
        if self.base is None:
            return set()
        return {
            part.split("=", 1)[0]
            for name in self.files
            for part in name[len(self.base) :].strip("/").split("/")[:-1]
            if "=" in part
        }

    @property
    def columns(self) -> set[str]:
        return set(self.schema.names) | self.partitions

    @property
    def source(self) -> str | None:
        """Where the cataloged objects live (the catalog's metadata), for the report's title."""
        value = (self.schema.metadata or {}).get(SOURCE_METADATA.encode())
        return value.decode() if value else None

    def register(self, con: duckdb.DuckDBPyConnection) -> None:
        """The view ``source`` over the files: DuckDB's own Parquet reader on local files (parallel,
        columns and row groups skipped), pyarrow's dataset on object storage (DuckDB's S3 support is an
        extension it would download)."""
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            con.execute(
                "CREATE VIEW source AS SELECT * FROM read_parquet($files, union_by_name = true, "
                f"hive_partitioning = {'true' if self.partitions else 'false'})".replace(
                    "$files", _list(self.files)
                )
            )
        else:
            dataset = pads.dataset(
                self.files,
                filesystem=self.filesystem,
                format="parquet",
                partitioning="hive",
                partition_base_dir=self.base,
            )
            con.register("source", dataset)


def _list(values: Sequence[str]) -> str:
    return "[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


def _filesystem(uri: str, settings: Settings) -> tuple[pafs.FileSystem, str]:
    if not uri.startswith("s3://"):
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    conn = s3_connection(settings)
    endpoint = urlsplit(conn.endpoint_url) if conn.endpoint_url else None
    fs = pafs.S3FileSystem(
        access_key=conn.access_key_id,
        secret_key=conn.secret_access_key,
        region=conn.region,
        endpoint_override=endpoint.netloc if endpoint else None,
        scheme=endpoint.scheme if endpoint else "https",
    )
    return fs, uri.removeprefix("s3://").rstrip("/")


def open_archive(uri: str, settings: Settings) -> ArchiveSource:
    """A catalog file, or a folder of Parquet files (hive partitions such as ``site_id=…/`` become
    columns), local or ``s3://``; the ``*.qa.json`` files beside it are the ingest's QA."""
    fs, path = _filesystem(uri, settings)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            listed = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = sorted(f.path for f in listed if f.is_file and f.path.endswith(".parquet"))
            qa_files = sorted(f.path for f in listed if f.is_file and f.path.endswith(".qa.json"))
            base: str | None = path
        elif info.type == pafs.FileType.File:
            files, base = [path], None
            qa_files = [path + ".qa.json"] if fs.get_file_info(path + ".qa.json").is_file else []
        else:
            raise ReportInputError(f"{uri}: no catalog there")
        if not files:
            raise ReportInputError(f"{uri}: no Parquet files in it")
        qa = []
        for name in qa_files:
            with fs.open_input_stream(name) as stream:
                qa.append(json.loads(stream.read()))
        archive = ArchiveSource(uri, fs, files, base, qa)
        _ = archive.schema
    except (OSError, pa.ArrowInvalid) as exc:
        raise ReportInputError(f"{uri}: {exc.__class__.__name__}: {exc}") from None
    return archive


def _connect(settings: Settings) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(
        config={
            "threads": max(1, settings.workers),
            "memory_limit": settings.report_memory_limit,
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        }
    )


def _rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
    cursor = con.execute(sql)
    names = [d[0] for d in cursor.description or []]
    return [dict(zip(names, (_plain(v) for v in row), strict=True)) for row in cursor.fetchall()]


def _plain(value: Any) -> Any:
    """JSON-ready: NaN becomes None, numpy and decimal scalars become Python numbers."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def archive_report(
    archive: ArchiveSource,
    settings: Settings,
    *,
    by: Sequence[str] = DEFAULT_BY,
    predictions: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Every figure of the report as one JSON-ready document.

    ``predictions``: the inference log's ``sop_uid_hash, pred_label, at`` rows; the newest answer per
    instance is set beside the catalog's labels and its BodyPartExamined. A source that carries its own
    ``pred_label`` (an inference-log window) needs none.
    """
    columns = archive.columns
    unknown = [c for c in by if c not in columns]
    if unknown:
        raise ReportInputError(f"--by {', '.join(unknown)}: not a column of {archive.uri}")
    con = _connect(settings)
    try:
        archive.register(con)
        view = "SELECT * FROM source"
        if predictions is not None and "sop_uid_hash" in columns and "pred_label" not in columns:
            latest = predictions.sort_values("at").drop_duplicates("sop_uid_hash", keep="last")
            con.register("answers", latest[["sop_uid_hash", "pred_label"]])
            view = "SELECT s.*, a.pred_label FROM source s LEFT JOIN answers a USING (sop_uid_hash)"
            columns = columns | {"pred_label"}
        con.execute(f"CREATE VIEW catalog AS {view}")
        return {
            "catalog": archive.uri,
            "source": archive.source,
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "by": list(by),
            **_hierarchy(con, columns, by),
            "population": _population(con, columns),
            "labels": _labels(con, columns),
            "acquisition": _acquisition(con, columns),
            "quality": _quality(con, columns, archive.qa),
            "deidentification": _deidentification(con, columns, archive.partitions),
        }
    finally:
        con.close()


def _distinct(column: str, columns: set[str]) -> str:
    return f"count(DISTINCT {column})" if column in columns else "NULL"


def _hierarchy(con: duckdb.DuckDBPyConnection, columns: set[str], by: Sequence[str]) -> dict[str, Any]:
    """Patients, studies, series and instances, overall and per group; instances per study and series.

    Leaves the table ``studies`` (one row per study: its size and how many patients, modalities and
    sites its instances name) for the quality section, so the catalog is grouped by study once.
    """
    counts = (
        f"count(*) AS instances, {_distinct('study_uid_hash', columns)} AS studies, "
        f"{_distinct('series_uid_hash', columns)} AS series, {_distinct('patient_hash', columns)} AS patients"
    )
    sites = f"{_distinct('site_id', columns)} AS sites, {_distinct('scanner_id', columns)} AS scanners"
    totals = _rows(con, f"SELECT {counts}, {sites} FROM catalog")[0]
    groups: list[dict[str, Any]] = []
    if by:
        keys = ", ".join(_ident(c) for c in by)
        groups = _rows(con, f"SELECT {keys}, {counts} FROM catalog GROUP BY ALL ORDER BY instances DESC")
    per: dict[str, Any] = {}
    if "study_uid_hash" in columns:
        inner = ", ".join(
            f"{_distinct(column, columns)} AS {name}" for name, column in STUDY_CONSISTENCY.items()
        )
        con.execute(
            f"CREATE TEMP TABLE studies AS SELECT count(*) AS size, {inner} FROM catalog "
            "WHERE study_uid_hash IS NOT NULL GROUP BY study_uid_hash"
        )
        per["instances_per_study"] = _distribution(con, "SELECT size FROM studies")
    if "series_uid_hash" in columns:
        per["instances_per_series"] = _distribution(
            con,
            "SELECT count(*) AS size FROM catalog WHERE series_uid_hash IS NOT NULL GROUP BY series_uid_hash",
        )
    return {**totals, "hierarchy": {"groups": groups, **per}}


def _distribution(con: duckdb.DuckDBPyConnection, sizes: str) -> dict[str, Any]:
    """How many instances each study (or series) holds: a histogram of ``sizes`` (a query with a column
    ``size``) and its quantiles."""
    histogram = _rows(con, f"SELECT size, count(*) AS n FROM ({sizes}) GROUP BY size ORDER BY size")
    return {"histogram": histogram, **histogram_quantiles(histogram)}


def histogram_quantiles(histogram: Sequence[Mapping[str, int]]) -> dict[str, int | None]:
    """min, median, p90, p99 and max of a ``{size, n}`` histogram (lower quantiles: a size that occurs)."""
    total = sum(int(h["n"]) for h in histogram)
    out: dict[str, int | None] = dict.fromkeys(("min", "p50", "p90", "p99", "max"))
    if not total:
        return out
    out["min"], out["max"] = int(histogram[0]["size"]), int(histogram[-1]["size"])
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        seen, rank = 0, math.ceil(q * total)
        for h in histogram:
            seen += int(h["n"])
            if seen >= rank:
                out[name] = int(h["size"])
                break
    return out


def _age_band_sql(column: str = "age_years") -> str:
    cases = " ".join(
        f"WHEN {column} < {upper} THEN '{name}'" for name, upper in AGE_BANDS if math.isfinite(upper)
    )
    return f"CASE WHEN {column} IS NULL THEN 'unknown' {cases} ELSE '{AGE_BANDS[-1][0]}' END"


def _population(con: duckdb.DuckDBPyConnection, columns: set[str]) -> dict[str, Any]:
    """Patients by sex and studies by age band, per site (a patient or study counted once per value)."""
    if not {"site_id", "sex", "age_years"} <= columns:
        return {"skipped": "the source has no site_id, sex or age_years"}
    person = "patient_hash" if "patient_hash" in columns else "sop_uid_hash"
    visit = "study_uid_hash" if "study_uid_hash" in columns else "sop_uid_hash"
    sex = _rows(
        con,
        f"SELECT site_id, coalesce(sex, 'unknown') AS sex, count(DISTINCT {person}) AS n FROM catalog "
        "GROUP BY ALL ORDER BY site_id NULLS LAST, sex",
    )
    age = _rows(
        con,
        f"SELECT site_id, {_age_band_sql()} AS band, count(DISTINCT {visit}) AS n FROM catalog "
        "GROUP BY ALL ORDER BY site_id NULLS LAST, band",
    )
    return {
        "sex": sex,
        "sex_counts": "patients" if person == "patient_hash" else "instances",
        "age": age,
        "age_counts": "studies" if visit == "study_uid_hash" else "instances",
        "age_bands": [name for name, _ in AGE_BANDS] + ["unknown"],
    }


def _labels(con: duckdb.DuckDBPyConnection, columns: set[str]) -> dict[str, Any]:
    """The label mix per site, and the model's answers beside it when the report was given them."""
    site = "site_id" if "site_id" in columns else "NULL"
    out: dict[str, Any] = {"vocabulary": list(LABELS)}
    for name, column in (("labelled", "label"), ("predicted", "pred_label")):
        if column in columns:
            out[name] = _rows(
                con,
                f"SELECT {site} AS site_id, {column} AS label, count(*) AS n FROM catalog "
                f"WHERE {column} IS NOT NULL GROUP BY ALL ORDER BY 1 NULLS LAST, 2",
            )
    return out


def _acquisition(con: duckdb.DuckDBPyConnection, columns: set[str]) -> dict[str, Any]:
    """Per scanner: the categorical facts' counts, the numeric ones' quantiles with outlying instances,
    and scanners whose median stands apart from the fleet's."""
    if "scanner_id" not in columns:
        return {"skipped": "the source has no scanner_id"}
    categorical = _categorical(con, [c for c in CATEGORICAL if c in columns])
    numeric_columns = [c for c in NUMERIC if c in columns]
    stats = ",\n".join(
        f"count({c}) AS {c}_n, quantile_cont({c}, [0.05, 0.25, 0.5, 0.75, 0.95]) AS {c}_q, "
        f"min({c}) AS {c}_min, max({c}) AS {c}_max"
        for c in numeric_columns
    )
    numeric: list[dict[str, Any]] = []
    if numeric_columns:
        per_scanner = _rows(
            con, f"SELECT scanner_id, count(*) AS instances, {stats} FROM catalog GROUP BY scanner_id"
        )
        outliers = _outliers(con, numeric_columns, per_scanner)
        for row in per_scanner:
            for c in numeric_columns:
                q = row[f"{c}_q"] or [None] * 5
                numeric.append(
                    {
                        "scanner_id": row["scanner_id"],
                        "column": c,
                        "n": row[f"{c}_n"],
                        "min": row[f"{c}_min"],
                        "p5": q[0],
                        "p25": q[1],
                        "p50": q[2],
                        "p75": q[3],
                        "p95": q[4],
                        "max": row[f"{c}_max"],
                        "outliers": outliers.get((row["scanner_id"], c), 0),
                    }
                )
        numeric.sort(key=lambda r: (str(r["scanner_id"]), r["column"]))
    return {"categorical": categorical, "numeric": numeric, "flags": fleet_flags(numeric)}


def _categorical(con: duckdb.DuckDBPyConnection, present: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Counts of each value per scanner, every column in one scan (grouping sets)."""
    if not present:
        return {}
    values = ", ".join(f"CAST({c} AS VARCHAR) AS {c}" for c in present)
    sets = ", ".join(f"(scanner_id, {c})" for c in present)
    which = ", ".join(f"GROUPING({c}) AS g_{c}" for c in present)
    rows = _rows(
        con,
        f"SELECT scanner_id, {', '.join(present)}, {which}, count(*) AS n FROM (SELECT scanner_id, {values} "
        f"FROM catalog) GROUP BY GROUPING SETS ({sets}) ORDER BY scanner_id NULLS LAST, n DESC",
    )
    return {
        c: [{"scanner_id": r["scanner_id"], "value": r[c], "n": r["n"]} for r in rows if r[f"g_{c}"] == 0]
        for c in present
    }


def _outliers(
    con: duckdb.DuckDBPyConnection, numeric_columns: Sequence[str], per_scanner: Sequence[Mapping[str, Any]]
) -> dict[tuple[str | None, str], int]:
    """Instances beyond ``OUTLIER_IQR`` interquartile ranges outside their scanner's quartiles."""
    bounds: dict[str, list[Any]] = {"scanner_id": []}
    for c in numeric_columns:
        bounds[f"{c}_lo"], bounds[f"{c}_hi"] = [], []
    for row in per_scanner:
        bounds["scanner_id"].append(row["scanner_id"])
        for c in numeric_columns:
            q = row[f"{c}_q"]
            low = high = None
            if q is not None and q[1] is not None:
                spread = q[3] - q[1]
                low, high = q[1] - OUTLIER_IQR * spread, q[3] + OUTLIER_IQR * spread
            bounds[f"{c}_lo"].append(low)
            bounds[f"{c}_hi"].append(high)
    con.register("bounds", pd.DataFrame(bounds))
    sums = ", ".join(
        f"count(*) FILTER (WHERE c.{c} < b.{c}_lo OR c.{c} > b.{c}_hi) AS {c}" for c in numeric_columns
    )
    found = _rows(
        con,
        f"SELECT c.scanner_id, {sums} FROM catalog c JOIN bounds b "
        "ON c.scanner_id IS NOT DISTINCT FROM b.scanner_id GROUP BY c.scanner_id",
    )
    return {(row["scanner_id"], c): int(row[c]) for row in found for c in numeric_columns if row[c]}


def fleet_flags(numeric: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Scanners whose median exposure, kVp or spacing stands apart from the other scanners' (robust
    z-score over scanner medians; ``FLEET_MIN_SCANNERS`` at least), and scanners with outlying
    instances: a setting that moved, or a detector swapped, is often the first sign of drift."""
    flags: list[dict[str, Any]] = []
    for column in ("kvp", "exposure", "pixel_spacing"):
        rows = [r for r in numeric if r["column"] == column and r["p50"] is not None]
        medians = [float(r["p50"]) for r in rows]
        if len(medians) >= FLEET_MIN_SCANNERS:
            centre = statistics.median(medians)
            mad = 1.4826 * statistics.median(abs(m - centre) for m in medians)
            for r in rows:
                gap = float(r["p50"]) - centre
                z = gap / mad if mad > 0 else 0.0
                if abs(z) > FLEET_Z and abs(gap) > FLEET_MIN_GAP * abs(centre):
                    flags.append(
                        {
                            "scanner_id": r["scanner_id"],
                            "column": column,
                            "reason": "median apart from the fleet",
                            "median": r["p50"],
                            "fleet_median": centre,
                            "robust_z": round(z, 2),
                        }
                    )
        for r in rows:
            if r["outliers"]:
                flags.append(
                    {
                        "scanner_id": r["scanner_id"],
                        "column": column,
                        "reason": f"instances beyond {OUTLIER_IQR:g} IQR of the scanner's quartiles",
                        "instances": r["outliers"],
                        "of": r["n"],
                    }
                )
    return flags


def _quality(
    con: duckdb.DuckDBPyConnection, columns: set[str], qa: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Missing tags, studies whose instances disagree, duplicates, unreadable objects, and how often
    BodyPartExamined disagrees with the model (or the label): a finding per site, not an error."""
    out: dict[str, Any] = {}
    if "missing_tags" in columns:
        out["missing_required"] = {
            r["tag"]: r["n"]
            for r in _rows(
                con,
                "SELECT tag, count(*) AS n FROM (SELECT unnest(missing_tags) AS tag FROM catalog) "
                "GROUP BY tag ORDER BY n DESC, tag",
            )
        }
    if "study_uid_hash" in columns:
        present = [name for name, column in STUDY_CONSISTENCY.items() if column in columns]
        several = ", ".join(f"count(*) FILTER (WHERE {name} > 1) AS {name}" for name in present)
        out["inconsistent_studies"] = _rows(con, f"SELECT count(*) AS studies, {several} FROM studies")[0]
    if {"patient_hash", "sex"} <= columns:
        out["patients_with_several_sexes"] = _rows(
            con,
            "SELECT count(*) AS n FROM (SELECT patient_hash FROM catalog WHERE patient_hash IS NOT NULL "
            "AND sex IS NOT NULL GROUP BY patient_hash HAVING count(DISTINCT sex) > 1)",
        )[0]["n"]
    duplicates: dict[str, Any] = {}
    for name, column in (
        ("sop_uid", "sop_uid_hash"),
        ("content", "content_hash"),
        ("pixels", "pixel_fingerprint"),
    ):
        if column not in columns:
            continue
        if name == "pixels" and qa:  # the ingest hashed the whole pixel data of every fingerprint match
            confirmed = [group for doc in qa for group in doc.get("duplicates", {}).get("pixels", [])]
            duplicates[name] = {"groups": len(confirmed), "instances": sum(len(g) for g in confirmed)}
        else:
            duplicates[name] = _rows(
                con,
                f"SELECT count(*) AS groups, coalesce(sum(n), 0) AS instances FROM (SELECT count(*) AS n "
                f"FROM catalog WHERE {column} IS NOT NULL GROUP BY {column} HAVING count(*) > 1)",
            )[0]
        if name == "pixels":
            duplicates[name]["confirmed"] = bool(qa)
    out["duplicates"] = duplicates
    if qa:
        out["unreadable"] = dict(
            Counter(str(e["type"]) for doc in qa for e in doc.get("unreadable", [])).most_common()
        )
        out["could_not_read"] = sum(len(doc.get("could_not_read", [])) for doc in qa)
    if "body_part_examined" in columns:
        out["body_part"] = _body_part(con, columns)
    return out


def _body_part(con: duckdb.DuckDBPyConnection, columns: set[str]) -> dict[str, Any]:
    header = _BODY_PART_SQL.format(c="body_part_examined")
    site = "site_id" if "site_id" in columns else "NULL"
    answers = [
        (name, column)
        for name, column in (("vs_predicted", "pred_label"), ("vs_label", "label"))
        if column in columns
    ]
    against = "".join(f", {_CLASS_SQL.format(c=column)} AS {name}" for name, column in answers)
    con.execute(
        f"CREATE TEMP TABLE body_parts AS SELECT {site} AS site_id, {header} AS h{against} FROM catalog "
        f"WHERE body_part_examined IS NOT NULL"
    )
    out: dict[str, Any] = {
        "with_header": _rows(con, "SELECT count(*) AS n FROM body_parts WHERE h IS NOT NULL")[0]["n"],
        "groups": list(BODY_PART_GROUPS),
    }
    for name, _ in answers:
        out[name] = _rows(
            con,
            f"SELECT site_id, count(*) AS compared, count(*) FILTER (WHERE h <> {name}) AS disagree, "
            f"round(count(*) FILTER (WHERE h <> {name}) / count(*), 4) AS rate FROM body_parts "
            f"WHERE h IS NOT NULL AND {name} IS NOT NULL GROUP BY ALL ORDER BY compared DESC",
        )
    return out


def _deidentification(
    con: duckdb.DuckDBPyConnection, columns: set[str], partitions: set[str]
) -> dict[str, Any]:
    """Which PHI-bearing elements the source objects carried (counts by element, never values), what
    the catalog kept of each, and checks that nothing identifying reached the catalog."""
    out: dict[str, Any] = {}
    tests: list[tuple[str, str, str]] = []  # (check, detail, condition of a violating row)
    present = [c for c in PSEUDONYM_COLUMNS if c in columns]
    if present:
        pattern = f"[0-9a-f]{{{PSEUDONYM_HEX}}}"
        tests.append(
            (
                "identifiers are keyed pseudonyms",
                f"{', '.join(present)}: {PSEUDONYM_HEX} hex digits of an HMAC, or empty",
                " OR ".join(f"NOT regexp_full_match({c}, '{pattern}')" for c in present),
            )
        )
    if "age_years" in columns:
        tests.append(
            (
                "ages are coarsened",
                "whole years from 2, capped at 90; whole months below",
                "NOT isnan(age_years) AND (age_years > 90 OR age_years < 0 OR "
                "(age_years >= 2 AND age_years <> floor(age_years)))",
            )
        )
    if "body_part_examined" in columns:
        tests.append(
            (
                "BodyPartExamined is a code string",
                "upper case, digits, space, underscore, at most 16 characters (free text dropped)",
                "NOT regexp_full_match(body_part_examined, '[A-Z0-9 _]{1,16}')",
            )
        )
    audited = "count(phi_tags)" if "phi_tags" in columns else "0"
    violations = "".join(
        f", count(*) FILTER (WHERE {condition}) AS v{i}" for i, (_, _, condition) in enumerate(tests)
    )
    counts = _rows(con, f"SELECT {audited} AS audited{violations} FROM catalog")[0]
    checks = [_columns_check(columns, partitions)] + [
        {"check": check, "detail": detail, "violations": counts[f"v{i}"]}
        for i, (check, detail, _) in enumerate(tests)
    ]
    if "phi_tags" in columns:
        found = {
            r["tag"]: r["n"]
            for r in _rows(
                con,
                "SELECT tag, count(*) AS n FROM (SELECT unnest(phi_tags) AS tag FROM catalog) GROUP BY tag",
            )
        }
        treatment = {**PHI_TAGS, PRIVATE_ELEMENTS: "dropped", BURNED_IN: "in the pixels: review before use"}
        out["objects_audited"] = counts["audited"]
        out["tags"] = [
            {"tag": tag, "objects": found[tag], "catalog": treatment.get(tag, "dropped")}
            for tag in sorted(found, key=lambda t: (-found[t], t))
        ]
    else:
        out["skipped"] = (
            "no phi_tags column: the source objects' PHI elements were not recorded (an inference log, "
            "or a catalog ingested before the audit existed)"
        )
    for check in checks:
        check["passed"] = check["violations"] == 0
    out["checks"] = checks
    out["passed"] = all(c["passed"] for c in checks)
    return out


_DERIVED_COLUMNS = frozenset(
    {"pred_label", "collection", *CARRIED_COLUMNS, *(f"labels_{c}" for c in CARRIED_COLUMNS)}
)


def _normal(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _columns_check(columns: set[str], partitions: set[str]) -> dict[str, Any]:
    """No column is a PHI element under its own name, and every column is one ingest (or the inference
    log) writes, or a partition folder's: a column added by hand has not been through de-identification."""
    phi = {_normal(tag) for tag in PHI_TAGS}
    named_phi = sorted(c for c in columns if _normal(c) in phi)
    known = set(CATALOG_SCHEMA.names) | set(LOG_SCHEMA.names) | _DERIVED_COLUMNS
    unknown = sorted(columns - known - partitions - set(named_phi))
    problems = [f"{c} (a PHI element)" for c in named_phi] + [f"{c} (not written by ingest)" for c in unknown]
    return {
        "check": "columns are the de-identified schema",
        "detail": "; ".join(problems) if problems else f"{len(columns)} columns, all written by ingest",
        "violations": len(problems),
    }


BODY_PART_FINDING_RATE = 0.05
"""A site whose headers disagree with the model on more than this share is named in the findings
(headers are wrong in about 15% of archives: a finding about the archive, not an error)."""


def findings(document: Mapping[str, Any]) -> list[str]:
    """What a data manager should look at first, one line each (pseudonyms and counts only)."""
    out: list[str] = []
    quality = document["quality"]
    if missing := quality.get("missing_required"):
        out.append("missing required tags: " + ", ".join(f"{t} ×{n}" for t, n in missing.items()))
    for name, n in (quality.get("inconsistent_studies") or {}).items():
        if name != "studies" and n:
            out.append(f"{n} studies whose instances name more than one {STUDY_CONSISTENCY_NOUN[name]}")
    if n := quality.get("patients_with_several_sexes"):
        out.append(f"{n} patients recorded with more than one sex")
    for name, found in quality.get("duplicates", {}).items():
        if found["groups"]:
            tentative = "" if found.get("confirmed", True) else " (fingerprint matches, unconfirmed)"
            out.append(
                f"{found['groups']} groups of duplicate {name} ({found['instances']} instances){tentative}"
            )
    if unreadable := quality.get("unreadable"):
        out.append("unreadable objects: " + ", ".join(f"{t} ×{n}" for t, n in unreadable.items()))
    for against in ("vs_predicted", "vs_label"):
        for site in quality.get("body_part", {}).get(against, []):
            if site["rate"] > BODY_PART_FINDING_RATE:
                who = "model" if against == "vs_predicted" else "label"
                out.append(
                    f"site {site['site_id']}: BodyPartExamined disagrees with the {who} on "
                    f"{site['rate']:.0%} of {site['compared']} instances"
                )
    outlying: defaultdict[str, list[int]] = defaultdict(list)
    for flag in document["acquisition"].get("flags", []):
        if "robust_z" in flag:
            out.append(
                f"scanner {flag['scanner_id']}: median {flag['column']} {flag['median']:.3g} apart from the "
                f"fleet's {flag['fleet_median']:.3g} (robust z {flag['robust_z']:+.1f})"
            )
        else:
            outlying[flag["column"]].append(flag["instances"])
    for column, counts in outlying.items():
        out.append(
            f"{sum(counts)} instances with an outlying {column} on {len(counts)} scanners (beyond "
            f"{OUTLIER_IQR:g} IQR of their scanner's quartiles)"
        )
    audit = document["deidentification"]
    for check in audit["checks"]:
        if not check["passed"]:
            out.append(f"de-identification check failed: {check['check']} ({check['detail']})")
    burned = next((t["objects"] for t in audit.get("tags", []) if t["tag"] == BURNED_IN), 0)
    if burned:
        out.append(f"{burned} source objects declare burned-in annotation (text in the pixels)")
    return out

# mypy: disable-error-code="import-untyped"
"""Ingest components: plan the fan-out, catalog one shard, merge the parts (calls into the library)."""

# No `from __future__ import annotations`: KFP reads these annotations at compile and run time, and each
# function's source is shipped on its own, so every import is inside the body.

from kfp.dsl import Dataset, Input, Metrics, Output


def plan_shards(source: str, objects_per_shard: int, max_shards: int) -> list[dict[str, int]]:
    """List the bucket prefix once and decide how many ingest shards to fan out to."""
    from dicom_router.steps import ingest, step_settings

    return ingest.plan_shards(
        source, step_settings(), objects_per_shard=objects_per_shard, max_shards=max_shards
    )


def ingest_shard(
    source: str, labels_uri: str, reviewed_uri: str, index: int, count: int, part: Output[Dataset]
) -> None:
    """De-identified part catalog (+ QA) of the objects of shard ``index`` of ``count``."""
    from dicom_router.steps import ingest, step_settings

    ingest.ingest_shard(
        source,
        part.path,
        step_settings(),
        shard=index,
        count=count,
        labels_uri=labels_uri,
        reviewed_uri=reviewed_uri,
    )


def merge_catalog(
    parts: Input[list[Dataset]], catalog_uri: str, catalog: Output[Dataset], summary: Output[Metrics]
) -> None:
    """One catalog and QA summary from the parts; also written to ``catalog_uri`` when set."""
    from dicom_router.steps import ingest, step_settings

    result = ingest.merge_catalogs(
        [p.path for p in parts], catalog.path, step_settings(), catalog_uri=catalog_uri
    )
    summary.log_metric("objects", result.qa["objects"])
    summary.log_metric("cataloged", result.qa["cataloged"])
    summary.log_metric("unreadable", len(result.qa["unreadable"]))

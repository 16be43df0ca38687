# mypy: disable-error-code="import-untyped"
"""KFP components, one per stage: thin lightweight Python components over the ``dicom_router`` library.

The functions live in this package's modules; ``make(base_image)`` turns them into components on the
image of this exact library version (taken from settings when a pipeline is compiled). No packages are
installed at run time: the image already holds the library and kfp (``kfp.local`` runs them in this
Python).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kfp import dsl

from components import evaluate, ingest, monitoring, registry, train


@dataclass(frozen=True)
class Components:
    """The pipeline's building blocks, bound to one image."""

    plan_shards: Any
    ingest_shard: Any
    merge_catalog: Any
    preprocess: Any
    train: Any
    evaluate: Any
    register: Any
    gate: Any
    promote: Any
    deploy: Any
    profile: Any
    drift: Any


def _component(func: Callable[..., Any], base_image: str) -> Any:
    return dsl.component(func, base_image=base_image, install_kfp_package=False)


def make(base_image: str) -> Components:
    """Every component on ``base_image``."""
    return Components(
        plan_shards=_component(ingest.plan_shards, base_image),
        ingest_shard=_component(ingest.ingest_shard, base_image),
        merge_catalog=_component(ingest.merge_catalog, base_image),
        preprocess=_component(train.preprocess, base_image),
        train=_component(train.train, base_image),
        evaluate=_component(evaluate.evaluate, base_image),
        register=_component(registry.register, base_image),
        gate=_component(registry.gate, base_image),
        promote=_component(registry.promote, base_image),
        deploy=_component(registry.deploy, base_image),
        profile=_component(monitoring.profile, base_image),
        drift=_component(monitoring.drift, base_image),
    )

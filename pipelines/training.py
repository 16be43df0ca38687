# mypy: disable-error-code="import-untyped"
"""The training pipeline: ingest (fanned out over shards of the bucket prefix) → preprocess → train
candidates in parallel on GPU nodes → evaluate → register → gate; promote and deploy only if it passes.

``build(base_image, resources)`` returns the ``@dsl.pipeline``; ``dicom-router pipeline compile``
writes it to ``compiled/training.yaml`` and ``dicom-router pipeline run training --local`` runs it here.
"""

from typing import Any, NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Dataset

from dicom_router.deployment import Resources
from pipelines.pods import pod

NAME = "dicom-router-training"


class TrainingOutputs(NamedTuple):
    catalog: Dataset
    version: str


def build(base_image: str, resources: Resources) -> Any:
    """The pipeline, its components on ``base_image``."""
    from components import make  # (here, not at the top: the import sorts the same however ruff ranks it)

    c = make(base_image)

    def training(
        source: str,
        labels_uri: str = "",
        reviewed_uri: str = "",
        catalog_uri: str = "",
        archs: list[str] = ["mobilenetv2_100", "resnet18", "efficientnet_b0"],  # noqa: B006 (KFP default)
        epochs: int = 0,
        image_size: int = 0,
        batch_size: int = 32,
        seed: int = 0,
        recipe: str = "scratch",
        tta: bool = False,
        cv_by: str = "",
        cv_folds: int = 3,
        objects_per_shard: int = 2000,
        max_shards: int = 16,
        mlflow_tracking_uri: str = "",
        gate_margin: float = 0.02,
        cluster: str = "",
    ) -> TrainingOutputs:
        """Ingest → preprocess → train candidates in parallel (GPU) → evaluate → register → gate →
        promote and deploy the new champion only when the gate passes.

        Args:
            source: DICOM objects, ``s3://bucket/prefix``.
            labels_uri: ``labels.csv`` (file,label[,...]); empty means ``<source>/labels.csv``.
            reviewed_uri: reviewers' labels to train with: the ``labels.csv`` of a ``review export``
                placed under ``source`` (``label_source=review``, counted per site in MLflow); empty: none.
            catalog_uri: also write the merged catalog (+ ``.qa.json``) here; empty: only the artifact.
            archs: timm architectures to train, one GPU task each; ``a+b`` trains an ensemble.
            epochs: training epochs per candidate; 0: the recipe's.
            image_size: input size in pixels; 0: the recipe's.
            batch_size: training batch size.
            seed: split, sampling and weight seed (one split shared by all candidates).
            recipe: named training recipe: ``scratch`` or ``fine-tune`` (ImageNet weights, warm-up, ...).
            tta: bundles average each image with its mirror image.
            cv_by: a catalog column (``site_id``, or one labels.csv carries such as ``source``): each
                candidate is first cross-validated with folds grouped by it, and its bundle brings the
                temperature and the review threshold for 99% auto-routed accuracy found there (the
                router's ``below_confidence: model``); empty: none (the rules' fallback, 0.97).
            cv_folds: folds of that cross-validation (at least 2; each task trains this many times more).
            objects_per_shard: ingest fan-out: one shard per this many objects.
            max_shards: ingest fan-out: at most this many shards.
            mlflow_tracking_uri: MLflow tracking server; empty means the deployment's.
            gate_margin: promotion gate: the most any class's recall may drop.
            cluster: deploy target: ``in-cluster`` or a kubeconfig path; empty means a dry run.
        """
        plan = pod(
            c.plan_shards(source=source, objects_per_shard=objects_per_shard, max_shards=max_shards),
            cpu=resources.cpu,
            memory=resources.memory,
        )
        with dsl.ParallelFor(plan.output, name="ingest-shards") as shard:
            part = pod(
                c.ingest_shard(
                    source=source,
                    labels_uri=labels_uri,
                    reviewed_uri=reviewed_uri,
                    index=shard.index,
                    count=shard.count,
                ),
                cpu=resources.cpu,
                memory=resources.memory,
            )
        merged = pod(
            c.merge_catalog(parts=dsl.Collected(part.outputs["part"]), catalog_uri=catalog_uri),
            cpu=resources.cpu,
            memory=resources.memory,
        )
        catalog = merged.outputs["catalog"]
        cache = pod(
            c.preprocess(catalog=catalog, image_size=image_size, recipe=recipe),
            cpu=resources.cpu,
            memory=resources.memory,
        )
        with dsl.ParallelFor(archs, name="candidates") as arch:
            train = pod(
                c.train(
                    catalog=catalog,
                    cache=cache.outputs["cache"],
                    arch=arch,
                    epochs=epochs,
                    image_size=image_size,
                    batch_size=batch_size,
                    seed=seed,
                    recipe=recipe,
                    tta=tta,
                    cv_by=cv_by,
                    cv_folds=cv_folds,
                    mlflow_tracking_uri=mlflow_tracking_uri,
                ),
                cpu=resources.train_cpu,
                memory=resources.train_memory,
            )
            train.set_accelerator_type(resources.gpu_type).set_accelerator_limit(resources.gpu_limit)
            kubernetes.add_node_selector(train, *resources.gpu_node_selector)
            kubernetes.add_toleration(
                train, key=resources.gpu_toleration, operator="Exists", effect="NoSchedule"
            )
        evaluated = pod(
            c.evaluate(models=dsl.Collected(train.outputs["model"]), mlflow_tracking_uri=mlflow_tracking_uri),
            cpu=resources.cpu,
            memory=resources.memory,
        )
        registered = pod(
            c.register(model=evaluated.outputs["best"], mlflow_tracking_uri=mlflow_tracking_uri),
            cpu=resources.cpu,
            memory=resources.memory,
        )
        version = registered.output
        pod(  # the new version's drift reference, stored with it in MLflow
            c.profile(version=version, catalog=catalog, mlflow_tracking_uri=mlflow_tracking_uri),
            cpu=resources.cpu,
            memory=resources.memory,
        )
        verdict = pod(
            c.gate(version=version, mlflow_tracking_uri=mlflow_tracking_uri, gate_margin=gate_margin),
            cpu=resources.cpu,
            memory=resources.memory,
        )
        with dsl.If(verdict.output == True, name="gate-passed"):  # noqa: E712 (a KFP condition, not Python)
            promoted = pod(
                c.promote(
                    version=version,
                    expect_promoted=True,
                    mlflow_tracking_uri=mlflow_tracking_uri,
                    gate_margin=gate_margin,
                ),
                cpu=resources.cpu,
                memory=resources.memory,
            )
            pod(
                c.deploy(version=version, cluster=cluster, mlflow_tracking_uri=mlflow_tracking_uri),
                cpu=resources.cpu,
                memory=resources.memory,
            ).after(promoted)
        with dsl.Else(name="gate-refused"):
            pod(
                c.promote(
                    version=version,
                    expect_promoted=False,
                    mlflow_tracking_uri=mlflow_tracking_uri,
                    gate_margin=gate_margin,
                ),
                cpu=resources.cpu,
                memory=resources.memory,
            ).set_display_name("record-refusal")
        return TrainingOutputs(catalog=catalog, version=version)

    return dsl.pipeline(name=NAME)(training)

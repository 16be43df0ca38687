"""The training pipeline run locally (``kfp.local``) against the same library steps called directly in this
process, both in this run, per step: the orchestration overhead ratio.

Workload: the demo's data (300 synthetic X-rays from 3 sites, 128 px long side) in the local S3; the
demo's candidate (ResNet-18, 96 px, 10 epochs) unless ``--arch``/``--epochs``/``--image-size`` say
otherwise; ingest in 3 shards. Baseline: the same ``dicom_router.steps`` calls in the same order in
this process (imports paid once, no subprocesses, no artifact passing, loops run one after another).
Each mode gets its own data directory (MLflow, cache, registry) so neither profits from the other's
cache; both read the same bucket.

    .venv/bin/python bench/pipeline.py [--arch resnet18]... [--epochs 10] [--image-size 96] [--local-first]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicom_router import stack, synth
from dicom_router.config import Settings
from dicom_router.demo import DEMO_IMAGES, DEMO_LONG_SIDE, DEMO_SITES, DEMO_TRAINING
from dicom_router.kfp_runs import run_local
from dicom_router.steps import ingest, release, training
from dicom_router.storage import S3Store, open_store, s3_connection, upload_folder


def direct(settings: Settings, params: dict[str, Any], work: Path) -> list[tuple[str, float]]:
    """The pipeline's steps as plain calls, timed one by one (the baseline)."""
    times: list[tuple[str, float]] = []

    def timed(step: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = call(*args, **kwargs)
        times.append((step, time.perf_counter() - start))
        return result

    source, size = params["source"], params["image_size"]
    plan = timed(
        "plan-shards",
        ingest.plan_shards,
        source,
        settings,
        objects_per_shard=params["objects_per_shard"],
        max_shards=16,
    )
    parts = [str(work / f"part{item['index']}") for item in plan]
    for item, part in zip(plan, parts, strict=True):
        timed(
            "ingest-shard",
            ingest.ingest_shard,
            source,
            part,
            settings,
            shard=item["index"],
            count=item["count"],
        )
    catalog, cache, best = str(work / "catalog"), str(work / "cache"), str(work / "best")
    timed("merge-catalog", ingest.merge_catalogs, parts, catalog, settings)
    timed("preprocess", training.preprocess, catalog, cache, settings, image_size=size)
    models = [str(work / f"model-{arch}") for arch in params["archs"]]
    for arch, model in zip(params["archs"], models, strict=True):
        timed(
            "train",
            training.train_one,
            catalog,
            cache,
            model,
            settings,
            arch=arch,
            epochs=params["epochs"],
            image_size=size,
            batch_size=params["batch_size"],
        )
    timed("evaluate", training.evaluate_candidates, models, best, settings)
    version = timed("register", release.register_candidate, best, settings)
    passed = timed("gate", release.gate, version, settings)["promoted"]
    timed("promote", release.promote_version, version, settings, expect_promoted=passed)
    if passed:
        timed("deploy", release.deploy, version, str(work / "deploy"), settings)
    return times


def step_of(task: str) -> str:
    """``for-loop-2-iteration-0/train`` → ``train``; ``promote-2`` (the refusal branch) → ``promote``."""
    return re.sub(r"-\d+$", "", task.rpartition("/")[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--arch", action="append", dest="archs")
    parser.add_argument("--epochs", type=int, default=DEMO_TRAINING.epochs)
    parser.add_argument("--image-size", type=int, default=DEMO_TRAINING.image_size)
    parser.add_argument("--objects-per-shard", type=int, default=101)
    parser.add_argument("--local-first", action="store_true", help="Run the pipeline before the baseline")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        base = Settings(data_dir=root / "stack")
        stack.s3_up(base)
        try:
            conn = s3_connection(base)
            folder = root / "synth"
            synth.synthesize(folder, DEMO_IMAGES, sites=DEMO_SITES, seed=7, long_side_px=DEMO_LONG_SIDE)
            source = f"s3://{base.s3_bucket}/bench/raw"
            store = open_store(source, base)
            assert isinstance(store, S3Store)
            store.ensure_bucket()
            upload_folder(folder, store)
            params: dict[str, Any] = {
                "source": source,
                "archs": args.archs or [DEMO_TRAINING.arch],
                "epochs": args.epochs,
                "image_size": args.image_size,
                "batch_size": DEMO_TRAINING.batch_size,
                "objects_per_shard": args.objects_per_shard,
            }

            def mode(name: str) -> Settings:
                return Settings(
                    data_dir=root / name,
                    s3_endpoint_url=conn.endpoint_url,
                    s3_access_key_id=conn.access_key_id,
                    s3_secret_access_key=conn.secret_access_key,
                    deid_key="bench-pseudonym-key",  # the same pseudonyms in both modes
                )

            if args.local_first:
                run = run_local("training", params, mode("local"))
            start = time.perf_counter()
            direct_times = direct(mode("direct"), params, root / "direct-work")
            direct_wall = time.perf_counter() - start
            if not args.local_first:
                run = run_local("training", params, mode("local"))
        finally:
            stack.down(base)

    direct_by: defaultdict[str, list[float]] = defaultdict(list)
    for step, seconds in direct_times:
        direct_by[step].append(seconds)
    local_by: defaultdict[str, list[float]] = defaultdict(list)
    for task in run.tasks:
        local_by[step_of(task.task)].append(task.seconds)
    print(
        f"\n{DEMO_IMAGES} images, {len(local_by['ingest-shard'])} ingest shard(s), "
        f"candidates {params['archs']} ({params['image_size']} px, {params['epochs']} epochs); "
        f"gate: {'promoted' if run.decision and run.decision['promoted'] else 'refused'}\n"
    )
    print(f"{'step':15} {'n':>3} {'direct s':>9} {'local s':>9} {'ratio':>6} {'overhead s':>10}")
    for step in dict.fromkeys([s for s, _ in direct_times] + list(local_by)):
        d, loc = sum(direct_by[step]), sum(local_by[step])
        ratio = f"{loc / d:6.2f}" if d > 0 else "     -"
        print(f"{step:15} {len(local_by[step]):>3} {d:9.2f} {loc:9.2f} {ratio} {loc - d:10.2f}")
    total_direct = sum(seconds for _, seconds in direct_times)
    total_local = sum(t.seconds for t in run.tasks)
    overall = total_local / total_direct
    print(
        f"{'sum of steps':15} {'':>3} {total_direct:9.2f} {total_local:9.2f} {overall:6.2f} "
        f"{total_local - total_direct:10.2f}"
    )
    print(
        f"{'wall':15} {'':>3} {direct_wall:9.2f} {run.wall_s:9.2f} {run.wall_s / direct_wall:6.2f} "
        f"{run.wall_s - direct_wall:10.2f}"
    )
    print(
        "\nlocal s: each task's subprocess (interpreter start, imports, KFP executor, the step); wall "
        "includes kfp.local's orchestration between tasks and runs loop iterations 2 at a time."
    )


if __name__ == "__main__":
    main()

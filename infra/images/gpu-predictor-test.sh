#!/usr/bin/env bash
# Build the GPU predictor image (Dockerfile target predictor-gpu) and prove what a machine without a GPU
# can: it holds ONNX Runtime's CUDA provider and NVIDIA's CUDA/cuDNN libraries, they load, and the image
# serves a model bundle (here ONNX Runtime falls back to the CPU; on a GPU node the same image runs on the
# GPU: bench/bundle.py --bundle DIR measures that). Prints the image size and the times. Root (podman).
#
# Usage: infra/images/gpu-predictor-test.sh        (make gpu-image)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
VENV_PY="$ROOT/.venv/bin/python"
REGISTRY="${REGISTRY:-ghcr.io/dicom-router}"
VERSION="${VERSION:-$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')}"
IMAGE="$REGISTRY/predictor-gpu:$VERSION"
WORK="$(mktemp -d)"
NAME="dicom-router-gpu-test-$$"
T0=$(date +%s)
log() { printf '[gpu-predictor-test %4ss] %s\n' $(( $(date +%s) - T0 )) "$*"; }
cleanup() { podman rm -f "$NAME" >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT

log "building $IMAGE"
infra/images/build.sh predictor-gpu
BUILD_S=$(( $(date +%s) - T0 ))
RUN=(podman run --rm --runtime runc --network host --ulimit nofile=1024:1024 --ulimit nproc=1000:1000)

log "ONNX Runtime's providers and the CUDA libraries in the image"
"${RUN[@]}" --entrypoint python "$IMAGE" -c '
import onnxruntime as ort
providers = ort.get_available_providers()
assert "CUDAExecutionProvider" in providers, providers
ort.preload_dlls()  # libcudart, libcublas, libcudnn ... from the nvidia-* wheels: they must load
print("onnxruntime", ort.__version__, providers)
import torch  # noqa: F401  (must fail: the predictor carries no torch)
' 2>&1 | tee "$WORK/providers.log" | grep -v "^Traceback\|^  \|ModuleNotFoundError" || true
grep -q "onnxruntime .*CUDAExecutionProvider" "$WORK/providers.log" || { cat "$WORK/providers.log"; exit 1; }
grep -q "No module named 'torch'" "$WORK/providers.log" || { log "error: the GPU predictor imports torch"; exit 1; }

log "serving a bundle from the image (no GPU here: ONNX Runtime falls back to the CPU)"
"$VENV_PY" - "$WORK" <<'PY'
import sys
from pathlib import Path

from dicom_router.synth import synthesize
from dicom_router.train import RECIPE_ARCHS

sys.path.insert(0, "bench")
from routing import untrained_bundle  # noqa: E402  (the benchmark's bundle, not a copy)

work = Path(sys.argv[1])
untrained_bundle(RECIPE_ARCHS["fine-tune"], None, work)  # the shape make train-real promotes, at work/bundle
synthesize(work / "dicom", 4, seed=5, long_side_px=256)
PY
chmod -R a+rX "$WORK"
PORT=$("$VENV_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"${RUN[@]}" -d --name "$NAME" -e DICOM_ROUTER_SERVE_HOST=127.0.0.1 -v "$WORK/bundle:/mnt/models:ro" \
  "$IMAGE" --port "$PORT" >/dev/null
for _ in $(seq 600); do
  curl -fs "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null && break
  podman container exists "$NAME" || { log "error: the container exited"; exit 1; }
  sleep 0.5
done
curl -fs "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null || { podman logs "$NAME" | tail -20; exit 1; }
for file in "$WORK"/dicom/*/*.dcm; do
  curl -fs -H 'Content-Type: application/dicom' --data-binary "@$file" \
    "http://127.0.0.1:$PORT/v1/models/bodypart-router:predict" > "$WORK/answer.json"
  "$VENV_PY" -c 'import json, sys; p = json.load(open(sys.argv[1]))["predictions"][0]; assert p["label"] and 0 < p["confidence"] <= 1, p' \
    "$WORK/answer.json"
done
log "served $(ls "$WORK"/dicom/*/*.dcm | wc -l) DICOM files; the server said: $(podman logs "$NAME" 2>&1 | grep -o 'serving .* on [A-Za-z]*' | head -1)"
SIZE=$(podman image inspect "$IMAGE" --format '{{.Size}}')
log "passed: $IMAGE $(( SIZE / 1000000 )) MB (CPU predictor: $(( $(podman image inspect "$REGISTRY/predictor:$VERSION" --format '{{.Size}}' 2>/dev/null || echo 0) / 1000000 )) MB); build ${BUILD_S}s"

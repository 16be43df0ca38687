"""Speed of a model bundle as it serves: ONNX Runtime ms/image on CPU (2 threads, the serving
default here) at batch 1 and 64, and GPU images/s at batch 1 and 64 where CUDA is present, against the
paper's MobileNet-V1 exported at the same input size and timed in the same run (its 29.5 ms/image was
on an RTX 2080 Ti at 512 px).

    .venv/bin/python bench/bundle.py --bundle DIR [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from dicom_router.inference import PreprocessConfig
from dicom_router.models import BodyPartNet, export_bundle


def _session(model: Path, provider: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), options, providers=[provider])


def _ms_per_image(session: ort.InferenceSession, size: int, batch: int, repeats: int) -> float:
    images = np.random.default_rng(0).random((batch, 1, size, size), dtype=np.float32)
    session.run(["probabilities"], {"image": images})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(["probabilities"], {"image": images})
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000.0 / batch


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    card = json.loads((args.bundle / "card.json").read_text())
    size = PreprocessConfig.model_validate_json((args.bundle / "preprocess.json").read_text()).image_size
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.append("CUDAExecutionProvider")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        baseline = export_bundle(
            BodyPartNet("mobilenetv1_100").eval(), PreprocessConfig(image_size=size), {}, Path(tmp) / "mnv1"
        )
        print(f"bundle {card.get('arch')} at {size} px; baseline mobilenetv1_100 at {size} px")
        for provider in providers:
            ours = _session(args.bundle / "model.onnx", provider)
            paper = _session(baseline / "model.onnx", provider)
            for batch in (1, 64):
                a = _ms_per_image(ours, size, batch, args.repeats)
                b = _ms_per_image(paper, size, batch, args.repeats)
                print(
                    f"{provider} batch {batch}: {a:.2f} ms/image ({1000 / a:.0f} images/s); "
                    f"mobilenetv1_100 {b:.2f} ms/image; ratio {a / b:.2f}x",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput and inference latency of the zoo, measured in one run on this machine.

- training: images/s of forward + backward + Adam step at 256 px, batch 16 (CPU; AMP + channels_last
  at 512 px when a GPU is present), for mobilenetv1_100 and efficientnet_b0;
- inference: ms/image at batch 1 and 32, ONNX Runtime (the serving path) against torch eager on the
  same weights and inputs; the paper reports 29.5 ms/image for MobileNet-V1 at 512 px (RTX 2080 Ti).

    .venv/bin/python bench/models.py [--archs mobilenetv1_100 efficientnet_b0] [--sizes 256 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dicom_router.inference import Bundle, PreprocessConfig
from dicom_router.models import BodyPartNet, export_bundle
from dicom_router.train import device


def _timed(fn: object, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    assert callable(fn)
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def training_throughput(arch: str, size: int, batch: int, steps: int) -> float:
    dev = device()
    cuda = dev.type == "cuda"
    net = BodyPartNet(arch).to(dev)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    loss_fn = torch.nn.CrossEntropyLoss()
    images = torch.rand(batch, 1, size, size, device=dev)
    labels = torch.randint(0, 5, (batch,), device=dev)

    def step() -> None:
        with torch.autocast(dev.type, enabled=cuda):
            logits, _ = net(images)
            loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if cuda:
            torch.cuda.synchronize()

    return batch / _timed(step, steps)


def inference_latency(arch: str, size: int, work: Path) -> list[str]:
    net = BodyPartNet(arch).eval()
    bundle = Bundle(export_bundle(net, PreprocessConfig(image_size=size), {}, work / f"{arch}-{size}"))
    lines = []
    for batch in (1, 32):
        images = np.random.default_rng(0).random((batch, 1, size, size), dtype=np.float32)
        tensor = torch.from_numpy(images)
        with torch.no_grad():
            eager = _timed(lambda t=tensor: net(t), 5 if batch == 1 else 2)
        onnx = _timed(lambda x=images: bundle.run(x), 5 if batch == 1 else 2)
        lines.append(
            f"inference {arch} {size} px batch {batch}: ONNX Runtime {onnx * 1e3 / batch:.1f} ms/image, "
            f"torch eager {eager * 1e3 / batch:.1f} ms/image = {eager / onnx:.1f}x"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=["mobilenetv1_100", "efficientnet_b0"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    args = parser.parse_args()
    torch.manual_seed(0)
    train_size = 512 if device().type == "cuda" else 256
    print(f"device: {device()} ({torch.get_num_threads()} threads)", flush=True)
    for arch in args.archs:
        rate = training_throughput(arch, train_size, batch=16, steps=3)
        print(f"training {arch} {train_size} px batch 16: {rate:.1f} images/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            for size in args.sizes:
                for line in inference_latency(arch, size, Path(tmp)):
                    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

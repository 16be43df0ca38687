"""Import boundaries that match the images: the router and the model server's inference path run without
torch (and the router without kserve), routing does not depend on the local process manager, the package
has no import cycle, and the torch-free preprocessing is what training caches."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dicom_router.config import REPO_ROOT, Settings
from dicom_router.data import build_cache
from dicom_router.inference import PreprocessConfig, prepare

PACKAGE = REPO_ROOT / "src" / "dicom_router"


def _loaded_after(modules: list[str], *, blocked: tuple[str, ...] = ()) -> set[str]:
    """Top-level packages in ``sys.modules`` after importing ``modules`` in a fresh interpreter;
    importing a ``blocked`` package there fails, as it would in an image without it."""
    code = (
        "import sys\n"
        + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
        + "".join(f"import {m}\n" for m in modules)
        + "print(' '.join(sorted({n.partition('.')[0] for n, m in sys.modules.items() if m})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return set(result.stdout.split())


def test_the_router_and_the_serving_client_import_neither_torch_nor_kserve() -> None:
    loaded = _loaded_after(
        ["dicom_router.routing.service", "dicom_router.routing.worker", "dicom_router.serving.client"],
        blocked=("torch", "kserve", "mlflow", "timm"),
    )
    assert "dicom_router" in loaded and not loaded & {"torch", "kserve", "mlflow", "timm", "torchvision"}


def test_the_model_servers_inference_path_imports_no_torch() -> None:
    loaded = _loaded_after(
        ["dicom_router.serving.server", "dicom_router.serving.predictor", "dicom_router.inference"],
        blocked=("torch", "mlflow", "timm"),
    )
    assert "kserve" in loaded and not loaded & {"torch", "mlflow", "timm", "torchvision"}


def _imports(path: Path) -> set[str]:
    """Every ``dicom_router`` module ``path`` imports, at module level or inside a function."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            base = (
                ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
            )
            origin = ".".join(p for p in (base, node.module or "") if p)
            found.add(origin)
            found.update(f"{origin}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("dicom_router")}


def _graph() -> dict[str, set[str]]:
    """Module → the modules of the package it imports (names resolved to modules that exist)."""
    files = {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    return {
        module: {m for n in _imports(path) if (m := resolve(n)) is not None and m != module}
        for module, path in files.items()
    }


def test_routing_does_not_depend_on_the_local_process_manager() -> None:
    graph = _graph()
    routing = [m for m in graph if m.startswith("dicom_router.routing")]
    assert len(routing) >= 5
    assert {m: sorted(graph[m] & {"dicom_router.stack", "dicom_router.demo"}) for m in routing} == {
        m: [] for m in routing
    }


def test_the_package_has_no_import_cycle() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert len(graph) > 40 and cycles == []


def test_the_torch_free_serving_path_prepares_real_radiographs_as_training_caches_them(
    xray_real: Path, settings: Settings, tmp_path: Path
) -> None:
    files = sorted(xray_real.rglob("*.dcm"))[::25][:8]
    config = PreprocessConfig(image_size=224, equalize=True)
    out = tmp_path / "served.npy"
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from pathlib import Path\n"
        "from dicom_router.inference import PreprocessConfig, prepare\n"
        f"config = PreprocessConfig.model_validate_json({config.model_dump_json()!r})\n"
        f"files = {[str(f) for f in files]!r}\n"
        "images = [prepare(Path(f).read_bytes(), f, config, max_pixels=10**9).image for f in files]\n"
        f"np.save({str(out)!r}, np.stack(images))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    served = np.load(out)

    import torch  # training's process has torch loaded: the result must not depend on it

    assert torch.__version__
    trained = np.stack([prepare(f.read_bytes(), str(f), config, max_pixels=10**9).image for f in files])
    assert served.shape == (len(files), 1, 224, 224) and float(np.abs(served - trained).max()) <= 1e-6
    frame = pd.DataFrame(
        {
            "key": [f.relative_to(xray_real).as_posix() for f in files],
            "sop_uid_hash": [f"h{i}" for i in range(len(files))],
            "label": ["others"] * len(files),
        }
    )
    cached, errors = build_cache(frame, str(xray_real), config, settings, progress=False)
    assert errors == [] and cached.keys == list(frame["sop_uid_hash"])
    quantum = 0.5 / 65535  # the cache keeps uint16
    assert float(np.abs(cached.images / 65535.0 - served[:, 0]).max()) <= quantum + 1e-6

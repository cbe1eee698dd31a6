"""ONNX Runtime's GPU build with the standard install's CPU build of torch: `--backend onnx --device cuda` is
accepted, the sampler's tensors stay on the host, and ONNX Runtime does the copies.

No GPU is needed: the GPU build is simulated by its provider list, and its sessions by CPU sessions that report
CUDA as active. The real GPU run is `test_backends.py::test_onnx_cuda_io_binding_matches_cpu`.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime
import pytest
import torch
import yaml

from histosynth.bundle.store import load_bundle
from histosynth.bundle.testing import tiny_bundle
from histosynth.errors import InputError, RunError
from histosynth.sampling import backends
from histosynth.sampling.backends import OnnxBackend, choose_backend
from histosynth.sampling.runner import GenerateOptions, generate

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a machine whose torch has no CUDA")

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


@pytest.fixture
def gpu_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu as ONNX Runtime reports it: the CUDA provider is available."""
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA_EP, CPU_EP])


@pytest.fixture
def gpu_sessions(gpu_build: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sessions that say CUDA is active (as on a GPU) but compute on the CPU."""
    real = backends._session

    class CudaLooking:
        def __init__(self, session: object) -> None:
            self._session = session

        def get_providers(self) -> list[str]:
            return [CUDA_EP, CPU_EP]

        def __getattr__(self, name: str) -> object:
            return getattr(self._session, name)

    monkeypatch.setattr(backends, "_session", lambda ort, path, providers: CudaLooking(real(ort, path, [CPU_EP])))


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("b"), num_classes=2, tile_size=32)


def test_cuda_is_chosen_for_onnx_without_cuda_torch(gpu_build: None) -> None:
    assert choose_backend("onnx", "cuda:1") == backends.BackendChoice("onnx", torch.device("cuda:1"), torch.float32)
    assert choose_backend("auto", "cuda").backend == "onnx"  # torch cannot run CUDA here; ORT can
    with pytest.raises(InputError, match="CUDA is not available"):
        choose_backend("torch", "cuda")
    with pytest.raises(InputError, match="is not a device"):
        choose_backend("onnx", "cuda:x")


def test_without_the_gpu_build_cuda_stays_an_input_error() -> None:
    with pytest.raises(InputError, match="CUDA is not available"):
        choose_backend("onnx", "cuda")


def test_a_gpu_build_without_a_gpu_is_a_clear_run_error(gpu_build: None, bundle_dir: Path) -> None:
    with pytest.raises(RunError, match=f"did not activate {CUDA_EP}"):
        OnnxBackend(load_bundle(bundle_dir), "cuda")  # the CPU wheel falls back to CPU, as a GPU build would


def test_generate_on_onnx_cuda_keeps_tensors_on_the_host(gpu_sessions: None, bundle_dir: Path,
                                                        tmp_path: Path) -> None:
    backend = OnnxBackend(load_bundle(bundle_dir), "cuda:0")
    assert (backend.device, backend.tensor_device, backend.io_binding) == ("cuda:0", "cpu", False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"bundle": str(bundle_dir), "balanced": {"per_class": 2},
                                      "sampler": {"name": "ddim", "steps": 3, "eta": 0.5}}))
    on_cuda = generate(recipe, tmp_path / "cuda", GenerateOptions(backend="onnx", device="cuda"))
    assert (on_cuda.backend, on_cuda.device, on_cuda.made) == ("onnx", "cuda:0", 4)
    generate(recipe, tmp_path / "cpu", GenerateOptions(backend="onnx", device="cpu"))
    for png in sorted((tmp_path / "cpu").glob("*/*.png")):
        assert (tmp_path / "cuda" / png.relative_to(tmp_path / "cpu")).read_bytes() == png.read_bytes()
    assert "cuda:0" in (tmp_path / "cuda" / "manifest.csv").read_text()

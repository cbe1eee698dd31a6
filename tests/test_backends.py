"""Torch and ONNX Runtime backends: same outputs, same images, and no silent CPU fallback."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from histosynth.bundle.store import Bundle, load_bundle
from histosynth.bundle.testing import tiny_bundle
from histosynth.diffusion.samplers import sample
from histosynth.diffusion.schedule import NoiseSchedule
from histosynth.errors import InputError
from histosynth.imageops import to_uint8
from histosynth.sampling.backends import (
    Backend,
    OnnxBackend,
    TorchBackend,
    active_providers,
    available_providers,
    make_backend,
)

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(tiny_bundle(tmp_path_factory.mktemp("b"), num_classes=3, tile_size=32))


@pytest.fixture(scope="module")
def backends(bundle: Bundle) -> tuple[Backend, Backend]:
    return make_backend(bundle, "torch", "cpu", "fp32"), make_backend(bundle, "onnx", "cpu", "fp32")


def test_backends_follow_the_protocol(backends: tuple[Backend, Backend]) -> None:
    torch_backend, onnx_backend = backends
    assert isinstance(torch_backend, TorchBackend) and isinstance(onnx_backend, OnnxBackend)
    for b in backends:
        assert isinstance(b, Backend) and b.device == "cpu"
    assert onnx_backend.providers == ["CPUExecutionProvider"]
    assert onnx_backend.describe()["providers"] == "CPUExecutionProvider"
    assert torch_backend.describe() == {"backend": "torch", "device": "cpu", "unet_dtype": "fp32",
                                        "decoder_dtype": "fp32", "providers": ""}


@pytest.mark.parametrize("batch", [1, 5])
def test_denoise_agrees_across_backends(backends: tuple[Backend, Backend], batch: int) -> None:
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, 4, (batch,), generator=gen)  # the null id 3 included
    a, b = (backend.denoise(x, t, y) for backend in backends)
    assert a.shape == b.shape == x.shape and a.dtype == b.dtype == torch.float32
    assert a.abs().max() > 0.1  # a non-trivial network, or agreement would prove nothing
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    # Class conditioning reaches the output through both backends.
    other = backends[1].denoise(x, t, (y + 1) % 4)
    assert not torch.allclose(other, b, atol=1e-3)


def test_decode_agrees_across_backends(backends: tuple[Backend, Backend]) -> None:
    latents = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    a, b = (backend.decode(latents) for backend in backends)
    assert a.shape == b.shape == (3, 32, 32, 3) and a.dtype == b.dtype == np.uint8
    assert a.std() > 5  # not a flat image
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # rounding at a level boundary at most


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_backends_make_the_same_images(bundle: Bundle, backends: tuple[Backend, Backend], sampler: str) -> None:
    schedule = NoiseSchedule(bundle.manifest.schedule)
    noise = torch.randn(2, *bundle.manifest.latent_shape, generator=torch.Generator().manual_seed(2))
    class_ids = torch.tensor([0, 2])
    images = [b.decode(sample(b.denoise, schedule, noise, class_ids, sampler=sampler, steps=4)) for b in backends]
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 2


def test_a_four_channel_latent_bundle_exports_and_generates(tmp_path) -> None:
    # Round 4's autoencoder has 4 latent channels: the bundle format, the ONNX parity check at export and both
    # backends must carry the channel count through from the checkpoints' configs.
    four = load_bundle(tiny_bundle(tmp_path, num_classes=2, tile_size=32, latent_channels=4))
    assert four.manifest.latent_shape[0] == 4
    schedule = NoiseSchedule(four.manifest.schedule)
    noise = torch.randn(2, *four.manifest.latent_shape, generator=torch.Generator().manual_seed(3))
    images = [b.decode(sample(b.denoise, schedule, noise, torch.tensor([0, 1]), sampler="dpmpp2m", steps=4))
              for b in (make_backend(four, "torch", "cpu", "fp32"), make_backend(four, "onnx", "cpu", "fp32"))]
    assert images[0].shape == (2, 32, 32, 3) and images[0].std() > 5
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 2


def test_to_uint8_maps_the_range() -> None:
    images = torch.tensor([-1.5, -1.0, 0.0, 1.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert to_uint8(images)[0, 0, :, 0].tolist() == [0, 0, 128, 255]


def test_auto_picks_onnx_on_cpu(bundle: Bundle) -> None:
    if not NO_CUDA:
        pytest.skip("auto picks torch where CUDA is present")
    assert make_backend(bundle).name == "onnx"


def test_bad_options_are_input_errors(bundle: Bundle) -> None:
    with pytest.raises(InputError, match="--backend: unknown value 'tensorrt'; allowed: auto, onnx, torch"):
        make_backend(bundle, "tensorrt", "cpu")
    with pytest.raises(InputError, match="--dtype: unknown value 'fp8'"):
        make_backend(bundle, "torch", "cpu", "fp8")
    with pytest.raises(InputError, match="fp16 is only supported on CUDA"):
        make_backend(bundle, "torch", "cpu", "fp16")
    with pytest.raises(InputError, match="ONNX backend runs fp32 only"):
        make_backend(bundle, "onnx", "cpu", "bf16")
    with pytest.raises(InputError, match="--device: 'gpu' is not a device"):
        make_backend(bundle, "torch", "gpu")


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("backend", ["torch", "onnx", "auto"])
def test_cuda_requested_without_cuda_is_an_error(bundle: Bundle, backend: str) -> None:
    with pytest.raises(InputError, match="CUDA is not available"):
        make_backend(bundle, backend, "cuda")


@pytest.mark.skipif("CUDAExecutionProvider" in available_providers(), reason="onnxruntime-gpu is installed")
def test_onnx_on_cuda_needs_the_gpu_build(bundle: Bundle) -> None:
    with pytest.raises(InputError, match="needs onnxruntime-gpu"):
        OnnxBackend(bundle, "cuda:0")


def test_active_providers_come_from_a_live_session() -> None:
    active = active_providers()
    assert "CPUExecutionProvider" in active and set(active) <= set(available_providers())


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_torch_cuda_matches_cpu(bundle: Bundle, backends: tuple[Backend, Backend], dtype: str) -> None:
    cuda = make_backend(bundle, "torch", "cuda", dtype)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t, y = torch.tensor([1, 200, 600, 999]), torch.tensor([0, 1, 2, 3])
    out = cuda.denoise(x.cuda(), t.cuda(), y.cuda())
    assert out.device.type == "cuda" and out.dtype == torch.float32
    atol = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}[dtype]
    assert torch.allclose(out.cpu(), backends[0].denoise(x, t, y), atol=atol)
    images = cuda.decode(x.cuda())
    assert np.abs(images.astype(int) - backends[0].decode(x).astype(int)).max() <= 2


# The standard install (README) has the CPU builds of torch and onnxruntime, so this test skips there on any
# machine, a GPU one included. It runs wherever onnxruntime-gpu is installed and its CUDA provider starts (a GPU
# and its libraries): with a CUDA build of torch through zero-copy I/O binding, with the CPU build of torch
# through host memory. `histosynth info` shows whether the provider is active.
ORT_CUDA_ACTIVE = "CUDAExecutionProvider" in active_providers()


@pytest.mark.skipif(not ORT_CUDA_ACTIVE, reason="ONNX Runtime's CUDA provider is not active here: the standard "
                    "install has the CPU build of onnxruntime (pip uninstall onnxruntime && pip install onnxruntime-gpu "
                    "on a GPU machine; docs/bundle.md)")
def test_onnx_cuda_io_binding_matches_cpu(bundle: Bundle, backends: tuple[Backend, Backend]) -> None:
    gpu = make_backend(bundle, "onnx", "cuda")
    assert gpu.providers[0] == "CUDAExecutionProvider"
    assert gpu.io_binding == torch.cuda.is_available()  # zero-copy needs CUDA torch tensors
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    t, y = torch.tensor([1, 200, 600, 999]), torch.tensor([0, 1, 2, 3])
    where = torch.device(gpu.tensor_device)
    out = gpu.denoise(x.to(where), t.to(where), y.to(where))
    assert out.device.type == where.type
    assert torch.allclose(out.cpu(), backends[1].denoise(x, t, y), atol=1e-4)
    images = gpu.decode(x.to(where))
    assert np.abs(images.astype(int) - backends[1].decode(x).astype(int)).max() <= 1


def test_time_backend_measures_a_call(bundle: Bundle, backends: tuple[Backend, Backend]) -> None:
    from histosynth.sampling.backends import time_backend

    seconds = time_backend(backends[1], bundle, batch_size=2, repeats=2)
    assert 0 < seconds < 5


def test_onnx_sessions_do_not_spin_and_the_guide_runs_in_both_backends(tmp_path) -> None:
    """Two or three sessions take turns on the same cores: none may keep them busy spin-waiting after its call."""
    guided = load_bundle(tiny_bundle(tmp_path, num_classes=3, tile_size=32, name="guided", guide=True))
    onnx_backend = make_backend(guided, "onnx", "cpu", "fp32")
    torch_backend = make_backend(guided, "torch", "cpu", "fp32")
    for session in (onnx_backend.unet_session, onnx_backend.guide_session, onnx_backend.decoder_session):
        assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    x = torch.randn(2, *guided.manifest.latent_shape)
    t, y = torch.tensor([10, 900]), torch.tensor([0, 2])
    guide_onnx, guide_torch = onnx_backend.denoise_guide(x, t, y), torch_backend.denoise_guide(x, t, y)
    torch.testing.assert_close(guide_onnx, guide_torch, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(guide_torch, torch_backend.denoise(x, t, y))  # a network of its own


def test_both_backends_run_each_timestep_on_its_experts_network(tmp_path) -> None:
    split = load_bundle(tiny_bundle(tmp_path, num_classes=3, tile_size=32, name="split", experts=(500,)))
    onnx_backend = make_backend(split, "onnx", "cpu", "fp32")
    torch_backend = make_backend(split, "torch", "cpu", "fp32")
    base, expert = split.build_unet(), split.build_unet_experts()[0][1]
    x = torch.randn(4, *split.manifest.latent_shape)
    t, y = torch.tensor([10, 499, 500, 900]), torch.tensor([0, 1, 2, 3])
    with torch.inference_mode():
        expected = torch.cat([base(x[:2], t[:2], y[:2]), expert(x[2:], t[2:], y[2:])])
        assert not torch.allclose(base(x, t, y), expert(x, t, y), atol=1e-3)  # two networks of their own
    torch.testing.assert_close(torch_backend.denoise(x, t, y), expected)
    torch.testing.assert_close(onnx_backend.denoise(x, t, y), expected, atol=1e-4, rtol=1e-4)

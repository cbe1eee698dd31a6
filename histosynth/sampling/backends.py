"""Inference backends: one `denoise(x, t, class_ids)` and one `decode(latents)` over torch or ONNX Runtime.

The sampler loop (`histosynth.diffusion.samplers`) is written once over torch tensors; a backend only runs
the two networks. Both backends take tensors on any device and return results on the device and dtype of
their input, so the loop's arithmetic never crosses devices. Asking for CUDA where it is not active is an
error, never a silent CPU fallback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from histosynth.bundle.manifest import DECODER_INPUT, DECODER_OUTPUT, UNET_INPUTS, UNET_OUTPUT
from histosynth.bundle.store import Bundle
from histosynth.diffusion.experts import switch_denoiser
from histosynth.errors import InputError, RunError
from histosynth.imageops import to_uint8
from histosynth.runtime.devices import resolve_device

BACKENDS = ("auto", "onnx", "torch")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"
# Providers that run no model on this machine: Azure forwards requests to a remote endpoint, yet ORT reports
# it as active in every session of the standard wheel. They are never what runs a bundle.
_REMOTE_EPS = frozenset({"AzureExecutionProvider"})
ORT_SPINNING = "0"  # ONNX Runtime's session.intra_op.allow_spinning for every session ("1" only to benchmark it)


@runtime_checkable
class Backend(Protocol):
    """What the sampler and the writers need from a model runtime."""

    name: str  # "torch" or "onnx"
    device: str  # "cpu", "cuda:0", ...: where the networks run
    tensor_device: str  # where the sampler's tensors live: `device`, or "cpu" (ONNX Runtime on CUDA, CPU torch)
    providers: list[str]  # ONNX Runtime execution providers really in use ([] for torch)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """UNet output for noisy latents `x (N, C, h, w)`, train timesteps `t (N,)`, `class_ids (N,)` int64
        (the noise-range expert of each row's `t` where the bundle has experts)."""
        ...

    def denoise_guide(self, x: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """The bundle's guide UNet (autoguidance), same inputs and output as `denoise`; `InputError` without one."""
        ...

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Diffusion-space latents (N, C, h, w) -> uint8 images (N, H, W, 3)."""
        ...

    def describe(self) -> dict[str, str]:
        """Backend, device, dtypes and providers, for run manifests."""
        ...


class TorchBackend:
    """The bundle's networks as torch modules; fp16/bf16 for the UNet on CUDA only, decoder fp32 by default."""

    name = "torch"

    def __init__(
        self,
        bundle: Bundle,
        device: str | torch.device = "cpu",
        unet_dtype: torch.dtype = torch.float32,
        decoder_dtype: torch.dtype = torch.float32,
    ) -> None:
        dev = torch.device(device)
        for what, dtype in (("unet", unet_dtype), ("decoder", decoder_dtype)):
            if dtype not in DTYPES.values():
                raise InputError(f"--dtype: {dtype} is not supported for the {what}; allowed: fp32, fp16, bf16")
            if dtype != torch.float32 and dev.type != "cuda":
                # Half precision convolutions on the CPU are slow or missing; refuse rather than crawl.
                raise InputError(f"--dtype: {_dtype_name(dtype)} is only supported on CUDA; use fp32 on {dev}")
        self._device = dev
        self.device = self.tensor_device = str(dev)
        self.unet_dtype = unet_dtype
        self.decoder_dtype = decoder_dtype
        self.providers: list[str] = []
        self.unet = bundle.build_unet(dev, unet_dtype)
        self.experts = bundle.build_unet_experts(dev, unet_dtype)
        self._denoise = switch_denoiser(partial(self._run_unet, self.unet),
                                        [(t_min, partial(self._run_unet, e)) for t_min, e in self.experts])
        self.guide = bundle.build_guide_unet(dev, unet_dtype) if bundle.has_guide else None
        self._bundle_path = bundle.path
        self.decoder = bundle.build_decoder(dev, decoder_dtype)

    @torch.inference_mode()
    def denoise(self, x: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        return self._denoise(x, t, class_ids)

    @torch.inference_mode()
    def denoise_guide(self, x: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        if self.guide is None:
            raise _no_guide(self._bundle_path)
        return self._run_unet(self.guide, x, t, class_ids)

    def _run_unet(self, unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                  class_ids: torch.Tensor) -> torch.Tensor:
        out = unet(x.to(self._device, self.unet_dtype), t.to(self._device), class_ids.to(self._device, torch.int64))
        return out.to(x.device, x.dtype)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return to_uint8(self.decoder(latents.to(self._device, self.decoder_dtype)))

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "device": self.device, "unet_dtype": _dtype_name(self.unet_dtype),
                "decoder_dtype": _dtype_name(self.decoder_dtype), "providers": ""}


class OnnxBackend:
    """The bundle's ONNX graphs in ONNX Runtime (fp32).

    On CUDA with a CUDA build of torch the inputs and outputs are bound to torch CUDA tensors (I/O binding by
    `data_ptr`), so latents stay on the GPU between sampler steps. The standard install has the CPU build of
    torch: there (onnxruntime-gpu in place of onnxruntime) the sampler's tensors stay on the CPU and ONNX
    Runtime copies each call's inputs to the GPU and its output back. On the CPU numpy views are passed.
    """

    name = "onnx"

    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu") -> None:
        import onnxruntime as ort

        dev = torch.device(device)
        self._device = dev
        self.device = str(dev)
        # Zero-copy I/O binding needs torch CUDA tensors; without them the loop's tensors stay on the host.
        self.io_binding = dev.type == "cuda" and torch.cuda.is_available()
        self._tensor_device = dev if dev.type == "cpu" or self.io_binding else torch.device("cpu")
        self.tensor_device = str(self._tensor_device)
        self._ort = ort
        _check_onnx_device(dev)
        providers: list[Any] = [_CPU_EP]
        if dev.type == "cuda":
            providers = [(_CUDA_EP, {"device_id": dev.index or 0}), _CPU_EP]
        self.unet_session = _session(ort, bundle.unet_onnx, providers)
        self.expert_sessions = [(t_min, _session(ort, bundle.expert_onnx(t_min), providers))
                                for t_min in bundle.unet_experts]
        self._denoise = switch_denoiser(partial(self._run_unet, self.unet_session),
                                        [(t_min, partial(self._run_unet, s)) for t_min, s in self.expert_sessions])
        self.guide_session = _session(ort, bundle.guide_unet_onnx, providers) if bundle.has_guide else None
        self._bundle_path = bundle.path
        self.decoder_session = _session(ort, bundle.decoder_onnx, providers)
        active = self.unet_session.get_providers()
        if dev.type == "cuda" and active[0] != _CUDA_EP:
            # ORT quietly drops CUDA when its libraries (cuDNN, CUDA runtime) fail to load.
            raise RunError(f"ONNX Runtime did not activate {_CUDA_EP} for {dev} (active: {', '.join(active)}); "
                           "check the CUDA/cuDNN libraries that onnxruntime-gpu needs")
        self.providers = list(active)
        image_size = bundle.manifest.tile_size
        self._image_shape = (3, image_size, image_size)
        t_input = next(i for i in self.unet_session.get_inputs() if i.name == UNET_INPUTS[1])
        self._t_dtype = torch.int64 if t_input.type == "tensor(int64)" else torch.float32

    def denoise(self, x: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        return self._denoise(x, t, class_ids)

    def denoise_guide(self, x: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        if self.guide_session is None:
            raise _no_guide(self._bundle_path)
        return self._run_unet(self.guide_session, x, t, class_ids)

    def _run_unet(self, session: Any, x: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        # Every UNet graph (experts, guide) comes from the same exporter, so they share the time input's dtype.
        inputs = {
            UNET_INPUTS[0]: x.to(self._tensor_device, torch.float32).contiguous(),
            UNET_INPUTS[1]: t.to(self._tensor_device, self._t_dtype).contiguous(),
            UNET_INPUTS[2]: class_ids.to(self._tensor_device, torch.int64).contiguous(),
        }
        out = self._run(session, inputs, UNET_OUTPUT, tuple(x.shape))
        return out.to(x.device, x.dtype)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        inputs = {DECODER_INPUT: latents.to(self._tensor_device, torch.float32).contiguous()}
        images = self._run(self.decoder_session, inputs, DECODER_OUTPUT, (latents.shape[0], *self._image_shape))
        return to_uint8(images)

    def _run(self, session: Any, inputs: dict[str, torch.Tensor], output: str, shape: tuple[int, ...]) -> torch.Tensor:
        if not self.io_binding:  # CPU, or CUDA fed from host memory (ORT copies in and out)
            result = session.run([output], {k: v.numpy() for k, v in inputs.items()})[0]
            return torch.from_numpy(result)
        binding = session.io_binding()
        index = self._device.index or 0
        for name, tensor in inputs.items():
            binding.bind_input(name, "cuda", index, _NP_TYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        result = torch.empty(shape, dtype=torch.float32, device=self._device)
        binding.bind_output(output, "cuda", index, np.float32, shape, result.data_ptr())
        # ORT runs on its own CUDA stream: make torch's pending writes to the inputs visible first.
        torch.cuda.current_stream(self._device).synchronize()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return result

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "device": self.device, "unet_dtype": "fp32", "decoder_dtype": "fp32",
                "providers": ",".join(self.providers)}


_NP_TYPES = {torch.float32: np.float32, torch.int64: np.int64}


def _no_guide(bundle_path: Any) -> InputError:
    return InputError(f"bundle {bundle_path}: ships no guide network; autoguidance needs one (allowed: 1, off)")


def _check_onnx_device(dev: torch.device) -> None:
    """The ONNX backend runs on the CPU, or on CUDA with an ONNX Runtime build that has the CUDA provider."""
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise InputError(f"--device {dev}: the ONNX backend runs on cpu or cuda")
    import onnxruntime as ort

    if _CUDA_EP not in ort.get_available_providers():
        raise InputError(
            f"--device {dev} with --backend onnx needs onnxruntime-gpu (installed: onnxruntime "
            f"{ort.__version__}, providers {', '.join(ort.get_available_providers())}); see docs/bundle.md"
        )


def _session(ort: Any, path: Any, providers: list[Any]) -> Any:
    options = ort.SessionOptions()
    # Match torch's thread budget so two runtimes never oversubscribe the cores together.
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    # A bundle runs two or three sessions in turn (UNet, guide UNet, decoder), each with its own thread pool:
    # threads that spin-wait after their session's call would take the cores from the next session's
    # (benchmarks/ort_spinning.py: autoguided sampling 1.4x faster on 2 cores without spinning).
    options.add_session_config_entry("session.intra_op.allow_spinning", ORT_SPINNING)
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # ORT's own exception classes
        raise RunError(f"{path}: ONNX Runtime cannot load it: {e}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def available_providers() -> list[str]:
    """Execution providers the installed ONNX Runtime build offers (not proof that they work)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def active_providers() -> list[str]:
    """Providers that really run here: a one-node ONNX model is loaded with every available local provider.

    Remote providers (Azure) run no model on this machine and are left out. ORT drops a provider whose
    libraries fail to load (a GPU build without CUDA/cuDNN, no GPU), so `get_providers()` of a live session
    is the truth; `available_providers()` is only the wish list.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)  # readable by older ORT builds too
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failing provider must not spam; its absence is the answer
    local = [p for p in ort.get_available_providers() if p not in _REMOTE_EPS]
    session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=local)
    return list(session.get_providers())


def environment_info() -> dict[str, str]:
    """Versions, devices and ONNX Runtime providers (installed and really active), for `histosynth info`."""
    import platform
    from importlib import metadata

    import histosynth

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    ort_builds = {d: v for d in ("onnxruntime", "onnxruntime-gpu") if (v := version(d))}
    if list(ort_builds) == ["onnxruntime"]:
        ort_text = ort_builds["onnxruntime"]  # the row's name already says which package
    else:  # the GPU build, or both: name each distribution
        ort_text = ", ".join(f"{v} ({d})" for d, v in ort_builds.items())
    info = {
        "histosynth": histosynth.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": version("onnx") or "not installed",
        # Both builds installed at once is a broken setup (they share the module); show it plainly.
        "onnxruntime": ort_text or "not installed",
        "torch devices": ", ".join(["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                                              for i in range(torch.cuda.device_count())]),
    }
    if len(ort_builds) > 1:
        info["onnxruntime"] += "  (both installed: uninstall both, then install one; see docs/bundle.md)"
    try:
        info["ONNX Runtime providers (available)"] = ", ".join(available_providers())
        info["ONNX Runtime providers (active)"] = ", ".join(active_providers())
    except Exception as e:  # a broken ORT install must not hide the rest of the report
        info["ONNX Runtime providers (active)"] = f"unavailable: {e}"
    return info


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto|fp32|fp16|bf16` -> the UNet's torch dtype; `auto` is fp16 on CUDA, fp32 elsewhere."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if spec not in DTYPES:
        raise InputError(f"--dtype: unknown value {spec!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


@dataclass(frozen=True)
class BackendChoice:
    """A checked `--backend/--device/--dtype` with every `auto` resolved; nothing is loaded yet."""

    backend: str  # "onnx" | "torch"
    device: torch.device
    unet_dtype: torch.dtype


def choose_backend(backend: str = "auto", device: str = "auto", dtype: str = "auto") -> BackendChoice:
    """Check the user's `--backend`, `--device` and `--dtype` together without loading any model.

    Raises `InputError` for an unknown value, CUDA that is not there, a dtype the backend cannot run, or an ONNX
    Runtime build without the CUDA provider, so that callers can refuse before they create anything.
    `auto` is torch on CUDA (fp16/bf16 UNets, no ORT GPU build needed) and ONNX Runtime on the CPU, where it
    was never slower (see `make_backend`).
    """
    if backend not in BACKENDS:
        raise InputError(f"--backend: unknown value {backend!r}; allowed: {', '.join(BACKENDS)}")
    spec = dtype.strip().lower()
    if spec != "auto" and spec not in DTYPES:
        raise InputError(f"--dtype: unknown value {dtype!r}; allowed: auto, {', '.join(DTYPES)}")
    dev = _resolve_device(device, backend)
    if backend == "auto":
        backend = "torch" if dev.type == "cuda" and torch.cuda.is_available() else "onnx"
    if backend == "onnx":
        if spec not in ("auto", "fp32"):
            raise InputError(f"--dtype {dtype}: the ONNX backend runs fp32 only; use --backend torch for fp16/bf16")
        _check_onnx_device(dev)
        return BackendChoice("onnx", dev, torch.float32)
    unet_dtype = resolve_dtype(spec, dev)
    if unet_dtype != torch.float32 and dev.type != "cuda":
        # Half precision convolutions on the CPU are slow or missing; refuse rather than crawl.
        raise InputError(f"--dtype: {_dtype_name(unet_dtype)} is only supported on CUDA; use fp32 on {dev}")
    return BackendChoice("torch", dev, unet_dtype)


def _resolve_device(spec: str, backend: str) -> torch.device:
    """`resolve_device`, except that ONNX Runtime's GPU build runs `cuda[:N]` without a CUDA build of torch.

    The standard install has CPU torch; a GPU user swaps onnxruntime for onnxruntime-gpu (docs/bundle.md) and
    asks for `--device cuda`. Whether a GPU really answers is checked when the session starts.
    """
    try:
        return resolve_device(spec)
    except InputError:
        s = spec.strip().lower()
        index = s.removeprefix("cuda").removeprefix(":")
        if (backend in ("auto", "onnx") and s.startswith("cuda") and (index == "" or index.isdigit())
                and not torch.cuda.is_available() and _ort_has_cuda()):
            return torch.device(f"cuda:{int(index or 0)}")
        raise


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return _CUDA_EP in ort.get_available_providers()


def make_backend(
    bundle: Bundle,
    backend: Literal["auto", "onnx", "torch"] | str = "auto",
    device: str = "auto",
    dtype: Literal["auto", "fp32", "fp16", "bf16"] | str = "auto",
) -> Backend:
    """Choose (`choose_backend`) and build a backend from the user's `--backend`, `--device` and `--dtype`.

    `auto` is torch on CUDA (fp16/bf16 UNets, no ORT GPU build needed) and ONNX Runtime on the CPU, where it
    was never slower. Median `denoise` call on the shared 2-core dev machine, torch eager vs ORT:
    tiny test UNet, batch 8: 6.9 vs 1.7 ms (1 thread); default 11M-parameter UNet, 3x32x32 latents,
    batch 4: 176 vs 138 ms (1 thread), 2.4 s vs 0.54 s (2 threads on the busy machine, where torch's
    OpenMP workers spin against other processes and ORT's thread pool degrades far less).
    """
    choice = choose_backend(backend, device, dtype)
    if choice.backend == "onnx":
        return OnnxBackend(bundle, choice.device)
    return TorchBackend(bundle, choice.device, choice.unet_dtype)


def time_backend(backend: Backend, bundle: Bundle, batch_size: int = 8, repeats: int = 5) -> float:
    """Median seconds of one `denoise` call on random latents (for the benchmark and choosing `auto`)."""
    c, h, w = bundle.manifest.latent_shape
    x = torch.randn(batch_size, c, h, w)
    t = torch.full((batch_size,), bundle.manifest.schedule.num_train_steps // 2, dtype=torch.int64)
    y = torch.zeros(batch_size, dtype=torch.int64)
    backend.denoise(x, t, y)  # warm-up: ORT and cuDNN choose their kernels on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.denoise(x, t, y)
        if backend.tensor_device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))

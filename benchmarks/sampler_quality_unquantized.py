"""`sampler_quality.py` with the bundle's decoder skipping its vector quantizer: is snapping generated latents to
the codebook worth it?

A bundle's decoder quantizes every latent before decoding (`BundleDecoder`, as the VQ-GAN was trained), so the
diffusion model's continuous output is snapped to the nearest of its codes. This script runs the same benchmark,
with the same seeds and settings, on the torch backend with the decoder fed the unquantized latents instead; compare
its FID with a `sampler_quality.py` run of the same arguments. The arguments are `sampler_quality.py`'s; the
backend is forced to torch (the ONNX decoder graph has the quantizer built in).

    python benchmarks/sampler_quality_unquantized.py --bundle weights/pcam96 --real ../shared/data/pcam/train \
        --max-real 2000 --n 1000 --settings dpmpp2m:20:a2 --batch-size 50

Round 17 (model card): 43.73 against 41.04 with the quantizer, so bundles keep it.
"""

from __future__ import annotations

import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from histosynth.imageops import to_uint8
from histosynth.sampling.backends import TorchBackend


@contextmanager
def unquantized_decoding() -> Iterator[None]:
    """Within the block, the torch backend decodes latents as they are.

    Only `TorchBackend.decode` is replaced, never the decoder module: a bundle exported inside the block (`--tiny`
    makes one, and caches it for the process) must keep the quantizer in its ONNX graph.
    """

    @torch.inference_mode()
    def decode(self: TorchBackend, latents: torch.Tensor) -> np.ndarray:
        decoder = self.decoder  # BundleDecoder: undo the latent scale, then the decoder half without the quantizer
        z = latents.to(self.device, self.decoder_dtype) / decoder.latent_scale
        return to_uint8(decoder.latent_decoder.decoder(z).clamp(-1.0, 1.0))

    original = TorchBackend.decode
    TorchBackend.decode = decode  # type: ignore[method-assign]
    try:
        yield
    finally:
        TorchBackend.decode = original  # type: ignore[method-assign]


def _sampler_quality():
    path = Path(__file__).with_name("sampler_quality.py")
    spec = importlib.util.spec_from_file_location("benchmark_sampler_quality", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    quality = _sampler_quality()
    if quality.build_parser().parse_args(args).backend not in ("auto", "torch"):
        print("error: --backend: only torch decodes without the quantizer (allowed: torch)", file=sys.stderr)
        return 2
    with unquantized_decoding():
        return quality.main(args + ["--backend", "torch"])  # the last --backend wins


if __name__ == "__main__":
    sys.exit(main())

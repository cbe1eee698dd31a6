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

import torch

from histosynth.autoencoder.vqgan import LatentDecoder


@contextmanager
def unquantized_decoding() -> Iterator[None]:
    """Within the block, every `LatentDecoder` (the torch backend's decoder) decodes latents as they are."""

    def forward(self: LatentDecoder, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)

    original = LatentDecoder.forward
    LatentDecoder.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        LatentDecoder.forward = original  # type: ignore[method-assign]


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
    if "--backend" in args:
        i = args.index("--backend")
        if i + 1 < len(args) and args[i + 1] != "torch":
            print("error: --backend: only torch decodes without the quantizer (allowed: torch)", file=sys.stderr)
            return 2
    else:
        args += ["--backend", "torch"]
    with unquantized_decoding():
        return _sampler_quality().main(args)


if __name__ == "__main__":
    sys.exit(main())

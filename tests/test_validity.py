"""Cluster validity indices against hand-worked examples, their direction on blobs, and the choice of K."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from histosynth.clusters.select import choose_k
from histosynth.clusters.validity import (
    c_index, compute_indices, dunn, hartigan, mcclain_rao, monotone, pick_k, size_balance, subsample, within_ss,
)
from histosynth.errors import InputError

# Six points on a line: 0, 1, 3 | 10, 11, 12. The 15 pair distances, sorted:
#   1 1 1 2 2 3 7 8 9 9 10 10 11 11 12        (sum 97)
X = np.array([[0.0], [1.0], [3.0], [10.0], [11.0], [12.0]])
GOOD = np.array([0, 0, 0, 1, 1, 1])  # {0,1,3} {10,11,12}
BAD = np.array([0, 0, 1, 1, 1, 1])  # {0,1} {3,10,11,12}


def test_c_index_hand_worked() -> None:
    # GOOD: within pairs 0-1:1 0-3:3 1-3:2 | 1 2 1 -> S_w = 10, N_w = 6.
    #   S_min = 1+1+1+2+2+3 = 10, S_max = 12+11+11+10+10+9 = 63 -> C = (10-10)/(63-10) = 0.
    assert c_index(X, GOOD) == pytest.approx(0.0)
    # BAD: within 0-1:1 | 3-10:7 3-11:8 3-12:9 10-11:1 10-12:2 11-12:1 -> S_w = 29, N_w = 7.
    #   S_min = 1+1+1+2+2+3+7 = 17, S_max = 12+11+11+10+10+9+9 = 72 -> C = (29-17)/(72-17) = 12/55.
    assert c_index(X, BAD) == pytest.approx(12 / 55)


def test_dunn_hand_worked() -> None:
    # GOOD: closest pair across clusters 3-10 = 7; diameters 3 and 2 -> 7/3.
    assert dunn(X, GOOD) == pytest.approx(7 / 3)
    # BAD: closest across 1-3 = 2; diameters 1 and 9 (3-12) -> 2/9.
    assert dunn(X, BAD) == pytest.approx(2 / 9)


def test_mcclain_rao_hand_worked() -> None:
    # GOOD: mean within 10/6; between = 97 - 10 = 87 over 9 pairs -> (10/6) / (87/9) = 5/29.
    assert mcclain_rao(X, GOOD) == pytest.approx(5 / 29)
    # BAD: mean within 29/7; between = 97 - 29 = 68 over 8 pairs = 8.5 -> (29/7) / 8.5 = 58/119.
    assert mcclain_rao(X, BAD) == pytest.approx(58 / 119)


def test_within_ss_and_hartigan_hand_worked() -> None:
    # W_1: mean 37/6; total SS = 881/6.  W_2 (GOOD): {0,1,3} mean 4/3 -> 16/9+1/9+25/9 = 14/3;
    # {10,11,12} -> 2; W_2 = 20/3.  W_3 ({0,1},{3},{10,11,12}): 0.5 + 0 + 2 = 2.5.
    w1 = within_ss(X, np.zeros(6, dtype=int))
    w2 = within_ss(X, GOOD)
    w3 = within_ss(X, np.array([0, 0, 1, 2, 2, 2]))
    assert (w1, w2, w3) == (pytest.approx(881 / 6), pytest.approx(20 / 3), pytest.approx(2.5))
    # H(1) = (W1/W2 - 1)(N - 1 - 1) = (881/40 - 1) * 4 = 84.1;  H(2) = ((20/3)/2.5 - 1)(6 - 2 - 1) = 5.
    assert hartigan(w1, w2, 6, 1) == pytest.approx(84.1)
    assert hartigan(w2, w3, 6, 2) == pytest.approx(5.0)


def test_calinski_harabasz_hand_worked() -> None:
    # B = 3(4/3 - 37/6)^2 + 3(11 - 37/6)^2 = 841/6, W = 20/3 -> CH = (B/1) / (W/4) = 84.1 (= H(1) here).
    assert compute_indices(X, GOOD)["calinski_harabasz"] == pytest.approx(84.1)


def _blobs(separated: bool) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_blobs(n_samples=240, n_features=4, centers=3, cluster_std=1.0 if separated else 6.0,
                      center_box=(-10, 10), random_state=3)
    return x, y


@pytest.mark.parametrize("index,higher_better", [
    ("calinski_harabasz", True), ("c_index", False), ("dunn", True), ("mcclain_rao", False),
    ("silhouette", True), ("davies_bouldin", False),
])
def test_direction_separated_vs_mixed(index: str, higher_better: bool) -> None:
    xs, ys = _blobs(True)
    xm, ym = _blobs(False)
    separated, mixed = compute_indices(xs, ys)[index], compute_indices(xm, ym)[index]
    assert (separated > mixed) if higher_better else (separated < mixed)
    # And the true partition beats a random one on the same separated points.
    rand = np.random.default_rng(0).integers(0, 3, len(ys))
    shuffled = compute_indices(xs, rand)[index]
    assert (separated > shuffled) if higher_better else (separated < shuffled)


def test_hartigan_drop_is_largest_at_true_k() -> None:
    from sklearn.cluster import KMeans

    x, _ = _blobs(True)
    w = {k: within_ss(x, np.zeros(len(x)) if k == 1 else KMeans(k, n_init=4, random_state=0).fit(x).labels_)
         for k in range(1, 7)}
    h = {k: hartigan(w[k], w[k + 1], len(x), k) for k in range(1, 6)}
    drops = [h[k - 1] - h[k] for k in range(2, 6)]
    assert pick_k([2, 3, 4, 5], [h[k] for k in range(2, 6)], "hartigan", drops) == 3


def test_pick_k_rules_and_ties() -> None:
    ks = [2, 3, 4]
    assert pick_k(ks, [1.0, 5.0, 5.0], "calinski_harabasz") == 3  # tie at the max -> smaller K
    assert pick_k(ks, [0.3, math.nan, 0.1], "c_index") == 4  # NaN ignored
    assert pick_k(ks, [50.0, 8.0, 3.0], "hartigan_threshold") == 3  # smallest K with H(K) <= 10
    assert pick_k(ks, [50.0, 40.0, 30.0], "hartigan_threshold") == 4  # never <= 10 -> the largest K
    with pytest.raises(InputError, match="unknown"):
        pick_k(ks, [1, 2, 3], "gap")


def test_choose_k_majority_vote_and_tie_to_smaller() -> None:
    def row(k: int, ch: float, ci: float, du: float, hd: float, mr: float) -> dict:
        return {"method": "imc", "k": k, "calinski_harabasz": ch, "c_index": ci, "dunn": du,
                "hartigan": 0.0, "hartigan_drop": hd, "mcclain_rao": mr}

    # CH -> 4, C-index -> 3, Dunn -> 4, Hartigan -> 3, McClain-Rao -> 5: 2 votes each for 3 and 4 -> 3.
    table = [row(3, 1, 0.1, 1, 9, 0.5), row(4, 9, 0.2, 9, 1, 0.4), row(5, 2, 0.3, 2, 2, 0.1)]
    choice = choose_k(table)
    assert choice.k == 3 and choice.votes["mcclain_rao"] == 5
    assert "ties to the smaller K" in choice.rule
    assert choose_k(table, "dunn").k == 4
    with pytest.raises(InputError, match="rule"):
        choose_k(table, "vote")


def _row(k: int, ch: float, ci: float, du: float, hd: float, mr: float) -> dict:
    return {"method": "imc", "k": k, "calinski_harabasz": ch, "c_index": ci, "dunn": du,
            "hartigan": 0.0, "hartigan_drop": hd, "mcclain_rao": mr}


def test_monotone_detection() -> None:
    ks = [2, 3, 4, 5]
    assert monotone(ks, [0.5, 0.4, 0.3, 0.1]) == "falls"
    assert monotone(ks[::-1], [0.5, 0.4, 0.3, 0.1]) == "rises"  # sorted by K first
    assert monotone(ks, [1.0, 2.0, 2.0, 3.0]) is None  # a flat step is not strictly monotone
    assert monotone(ks, [1.0, 3.0, 2.0, 4.0]) is None
    assert monotone(ks[:3], [3.0, 2.0, 1.0]) is None  # three values: too few to tell
    assert monotone(ks + [6], [5.0, math.nan, 3.0, 2.0, 1.0]) == "falls"  # NaN ignored


def test_size_balance_hand_worked() -> None:
    # Sizes 1, 1, 2 of K = 3: ratio 1/2; p = (1/4, 1/4, 1/2), H = 1.5 ln 2, over ln 3.
    b = size_balance(np.array([0, 1, 2, 2]), 3)
    assert b["size_ratio"] == pytest.approx(0.5)
    assert b["size_entropy"] == pytest.approx(1.5 * math.log(2) / math.log(3))
    assert size_balance(np.array([0, 1, 0, 1]), 2) == {"size_ratio": 1.0, "size_entropy": pytest.approx(1.0)}
    assert size_balance(np.array([0, 0, 1]), 3)["size_ratio"] == 0.0  # cluster 2 is empty


def test_monotone_index_does_not_vote() -> None:
    # C-index and McClain-Rao fall over K = 2..6 and both pick 6; CH -> 3, Dunn -> 4, Hartigan -> 5.
    # Counting them, K = 6 would win 2 votes to 1; without them the three others tie, and 3 is the smaller.
    table = [_row(2, 5, 0.50, 1, 1, 0.9), _row(3, 9, 0.40, 2, 2, 0.8), _row(4, 7, 0.30, 5, 3, 0.7),
             _row(5, 6, 0.20, 3, 8, 0.6), _row(6, 4, 0.10, 2, 4, 0.5)]
    choice = choose_k(table)
    assert choice.k == 3
    assert choice.monotone == {"c_index": "falls", "mcclain_rao": "falls"}
    assert choice.votes["c_index"] == 6 and "c_index -> 6 (falls with K: no vote)" in choice.rule
    assert "1/3 votes for K=3" in choice.rule and choice.warnings == []


def test_edge_warnings_and_all_monotone_fallback() -> None:
    # Every index rises or falls towards K = 6: they all vote, with a warning, and K = 6 is at the range's end.
    table = [_row(k, 10 * k, 1 / k, k, k, 1 / k) for k in range(2, 7)]
    choice = choose_k(table)
    assert choice.k == 6 and len(choice.monotone) == 5
    assert any("every index rises or falls" in w for w in choice.warnings)
    assert any("largest K tried" in w for w in choice.warnings)
    # K = 2 at k_min = 2 cannot be widened below; at k_min = 3 the smallest K is an edge to warn about.
    falling = [_row(k, 10 / k, 0.5, 1.0 if k != 4 else 2.0, 1 / k, 0.5) for k in range(2, 6)]
    assert choose_k(falling, "calinski_harabasz").k == 2
    assert not any("smallest K" in w for w in choose_k(falling, "calinski_harabasz").warnings)
    assert any("falls with K over the whole range" in w for w in choose_k(falling, "calinski_harabasz").warnings)
    above = [_row(k, 10 / k, 0.5, 1.0, 1 / k, 0.5) for k in range(3, 7)]
    assert any("smallest K tried" in w for w in choose_k(above, "calinski_harabasz").warnings)


def test_subsample_is_fixed_and_bounded() -> None:
    a, b = subsample(10_000, 500, seed=1), subsample(10_000, 500, seed=1)
    assert len(a) == 500 and np.array_equal(a, b) and len(np.unique(a)) == 500
    assert np.array_equal(subsample(50, 500), np.arange(50))


def test_single_cluster_is_refused() -> None:
    with pytest.raises(InputError, match="2 non-empty clusters"):
        dunn(X, np.zeros(6, dtype=int))

"""Choosing K: cluster the tile features for every K in a range, score each partition, vote, write it all.

`search_k` fits, for each K in `k_min..k_max`, the configured clustering method (methods.py: IMC, best of
`seeds` restarts by the IM objective, or k-means) and the k-means baseline on the same standardised
features, and fills a validity table (one row per method and K, with cluster-size balance). `choose_k`
applies the rule; the default is a **majority vote of the paper's five indices** (Calinski-Harabasz max,
C-index min, Dunn max, Hartigan largest drop, McClain-Rao min): each index votes for one K, the K with the
most votes wins, ties go to the smaller K. An index that moves one way over the whole range (validity.py
`monotone`) does not vote: its pick would be an end of the range whatever the data. A K at the edge of the
range is reported as a warning. `run_cluster` is what `histosynth cluster` calls: latent cache in, the
cluster folder out (see `write_cluster_outputs` for its files); `--within-labels` runs it once per label
group (within.py).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from histosynth.clusters.feature_kinds import FeatureConfig, RawFeatures, compute_features
from histosynth.clusters.features import FeatureScaler
from histosynth.clusters.imc import IMCConfig
from histosynth.clusters.methods import BASELINE, METHODS, Fitted, get_method, method_names
from histosynth.clusters.validity import (
    ALL_INDICES, DIRECTION, HARTIGAN_THRESHOLD, PAPER_INDICES, compute_indices, hartigan, monotone, pick_k,
    size_balance, within_ss,
)
from histosynth.configio import require, to_dict
from histosynth.errors import InputError, RunError
from histosynth.io import atomic_path, write_csv, write_json

CLUSTER_FORMAT = "histosynth-clusters/1"
RULES = ("majority",) + ALL_INDICES + ("hartigan_threshold",)
BALANCE = ("size_ratio", "size_entropy")  # table columns of cluster-size balance (validity.size_balance)
Progress = Callable[[int, int, str], None]  # (done, total, what is running now)


@dataclass
class ClusterSearchConfig:
    """Settings of the search over K (`histosynth cluster`)."""

    k_min: int = 2  # smallest K tried
    k_max: int = 10  # largest K tried
    method: str = "imc"  # a name in methods.METHODS: whose partition is kept and whose table chooses K
    compare_kmeans: bool = True  # with another method, also score k-means on the same features (the baseline)
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # IMC restarts (lowest IM objective kept); k-means seeds
    rule: str = "majority"  # majority | an index name | hartigan_threshold (see validity.py)
    max_points: int = 2000  # subsample size for the O(N^2) indices (C-index, Dunn, McClain-Rao, silhouette)
    imc: IMCConfig = field(default_factory=IMCConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)  # what is clustered (feature_kinds.py)

    def validate(self, path: str) -> None:
        """Cross-field checks for configio."""
        require(self.k_min >= 2, f"{path}.k_min", f"must be at least 2, got {self.k_min}")
        require(self.k_max >= self.k_min, f"{path}.k_max", f"must be >= k_min ({self.k_min}), got {self.k_max}")
        require(self.method in METHODS, f"{path}.method", f"unknown value {self.method!r}; allowed: {method_names()}")
        require(len(self.seeds) >= 1, f"{path}.seeds", "needs at least one seed")
        require(self.rule in RULES, f"{path}.rule", f"unknown value {self.rule!r}; allowed: {', '.join(RULES)}")
        require(self.max_points >= 10, f"{path}.max_points", "must be at least 10")
        self.imc.validate(f"{path}.imc")
        self.features.validate(f"{path}.features")

    def methods(self) -> list[str]:
        """The methods fitted: the chosen one, then the k-means baseline when asked for."""
        return [self.method] + ([BASELINE] if self.compare_kmeans and self.method != BASELINE else [])


@dataclass
class KChoice:
    """The chosen K, the rule in words, each index's own pick, and what the user should know about it."""

    k: int
    rule: str
    votes: dict[str, int | None]
    monotone: dict[str, str] = field(default_factory=dict)  # index -> "rises"/"falls" over the K range: no vote
    warnings: list[str] = field(default_factory=list)  # e.g. the chosen K sits at the edge of the range


@dataclass
class ClusterSearch:
    """Everything `search_k` found: the table, the choice, and every partition it scored."""

    config: ClusterSearchConfig
    table: list[dict[str, Any]]  # rows: method, k, clusters_used, every index, wss, hartigan_drop, balance
    choice: KChoice
    fits: dict[tuple[str, int], Fitted]  # (method, K) -> the fitted partition

    @property
    def k(self) -> int:
        """The chosen K."""
        return self.choice.k

    @property
    def labels(self) -> dict[tuple[str, int], np.ndarray]:
        """(method, K) -> cluster id per tile."""
        return {key: fit.labels for key, fit in self.fits.items()}


def search_k(features: torch.Tensor | np.ndarray, config: ClusterSearchConfig | None = None,
             on_progress: Progress | None = None, views: torch.Tensor | None = None) -> ClusterSearch:
    """Cluster standardised features `(N, D)` for each K in range, score every partition, choose K.

    `views` `(V, N, D)`: standardised features of flipped/rotated copies of the tiles, for the IMC
    consistency term (k-means and the indices use `features` only).
    """
    config = config or ClusterSearchConfig()
    config.validate("cluster")
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if x.ndim != 2:
        raise InputError(f"features: expected shape (N, D), got {tuple(x.shape)}")
    n = len(x)
    # Hartigan's H(K) compares K with K+1 and its drop H(K-1) - H(K) needs K-1: fit one K more on each side.
    k_fit = list(range(max(2, config.k_min - 1), config.k_max + 2))
    if n < config.k_max + 2:
        raise InputError(f"k_max: {config.k_max} needs at least {config.k_max + 2} tiles, got {n}")
    methods = config.methods()
    xn = x.numpy().astype(np.float64)
    total, done = len(methods) * len(k_fit), 0
    fits: dict[tuple[str, int], Fitted] = {}
    for method in methods:
        fit = get_method(method).fit
        for k in k_fit:
            if on_progress:
                on_progress(done, total, f"{method} K={k}")
            fits[(method, k)] = fit(x, k, config, views)
            done += 1
    if on_progress:
        on_progress(done, total, "validity indices")
    table = []
    for method in methods:
        wss = {1: within_ss(xn, np.zeros(n, dtype=np.int64))}
        wss.update({k: within_ss(xn, fits[(method, k)].labels) for k in k_fit})
        h = {k: hartigan(wss[k], wss[k + 1], n, k) for k in wss if k + 1 in wss}
        for k in range(config.k_min, config.k_max + 1):
            lab = fits[(method, k)].labels
            used = len(np.unique(lab))
            row: dict[str, Any] = {"method": method, "k": k, "clusters_used": used}
            if used >= 2:
                row.update(compute_indices(xn, lab, config.max_points, seed=config.seeds[0]))
            else:  # a collapsed head: nothing to score
                row.update({name: math.nan for name in ALL_INDICES if name != "hartigan"} | {"wss": wss[k]})
            row["hartigan"] = h[k]
            row["hartigan_drop"] = h[k - 1] - h[k]
            row.update(size_balance(lab, k))
            table.append(row)
    choice = choose_k([r for r in table if r["method"] == config.method], config.rule)
    return ClusterSearch(config, table, choice, fits)


def index_values(rows: Sequence[dict[str, Any]], index: str) -> list[float]:
    """The values `index` picks K from, per row (sorted by K): Hartigan's drops for "hartigan"."""
    column = "hartigan_drop" if index == "hartigan" else index
    return [float(r.get(column, math.nan)) for r in sorted(rows, key=lambda r: r["k"])]


def monotone_indices(rows: Sequence[dict[str, Any]], indices: Sequence[str] = PAPER_INDICES) -> dict[str, str]:
    """index -> "rises"/"falls" for the indices that move one way over one method's rows (validity.monotone)."""
    ks = sorted(int(r["k"]) for r in rows)
    out = {}
    for index in indices:
        trend = monotone(ks, index_values(rows, index))
        if trend is not None:
            out[index] = trend
    return out


def choose_k(table: Sequence[dict[str, Any]], rule: str = "majority") -> KChoice:
    """Choose K from one method's validity rows; `rule` is "majority", an index name or "hartigan_threshold".

    majority: each of the paper's five indices votes for the K its own rule picks (validity.py); an index
    that rises or falls over the whole range does not vote (its pick is an end of the range whatever the
    data), unless every index does, when they all vote with a warning; the K with the most votes wins;
    ties go to the smaller K. A chosen K at the end of the range (or at a start above 2) is warned about.
    """
    if rule not in RULES:
        raise InputError(f"rule: unknown value {rule!r}; allowed: {', '.join(RULES)}")
    rows = sorted(table, key=lambda r: r["k"])
    if not rows:
        raise InputError("choose_k: the validity table is empty")
    ks = [int(r["k"]) for r in rows]

    def pick(index: str) -> int | None:
        if index == "hartigan_threshold":
            return pick_k(ks, [r["hartigan"] for r in rows], index)
        drops = [r["hartigan_drop"] for r in rows] if index == "hartigan" else None
        return pick_k(ks, [r.get(index, math.nan) for r in rows], index, drops)

    warnings: list[str] = []
    if rule != "majority":
        k = pick(rule)
        if k is None:
            raise RunError(f"rule {rule}: the index is undefined for every K; choose another --rule")
        trend = monotone_indices(rows, [rule]) if rule in DIRECTION else {}
        if trend:
            warnings.append(f"{rule} {trend[rule]} with K over the whole range, so its pick K = {k} is the range's "
                            "end rather than an optimum")
        return KChoice(k, f"{rule}: {_rule_text(rule)}", {rule: k}, trend, warnings + _edge_warnings(k, ks))
    votes = {index: pick(index) for index in PAPER_INDICES}
    trends = monotone_indices(rows)
    voting = {i: k for i, k in votes.items() if k is not None and i not in trends}
    if not voting and any(k is not None for k in votes.values()):
        voting = {i: k for i, k in votes.items() if k is not None}
        warnings.append("every index rises or falls over the whole K range, so each votes for an end of it; "
                        "the vote below counts them anyway (widen the range or try other --features)")
    counts: dict[int, int] = {}
    for k in voting.values():
        counts[k] = counts.get(k, 0) + 1
    if not counts:
        raise RunError("majority: every index is undefined for every K")
    best = min(counts, key=lambda k: (-counts[k], k))
    tally = ", ".join(f"{name} -> {k}" + (f" ({trends[name]} with K: no vote)" if name in trends and name not in voting
                                          else "") for name, k in votes.items())
    return KChoice(best, f"majority vote of the five paper indices, ties to the smaller K "
                         f"({counts[best]}/{len(voting)} votes for K={best}; {tally})",
                   votes, trends, warnings + _edge_warnings(best, ks))


def _edge_warnings(k: int, ks: list[int]) -> list[str]:
    # K = 2 at k_min = 2 is not an edge one can widen: the indices cannot score K = 1.
    if len(ks) >= 2 and k == max(ks):
        return [f"K = {k} is the largest K tried (--k-max): the best K may lie above the range; widen it"]
    if len(ks) >= 2 and k == min(ks) and k > 2:
        return [f"K = {k} is the smallest K tried (--k-min): the best K may lie below the range; widen it"]
    return []


def _rule_text(index: str) -> str:
    if index == "hartigan_threshold":
        return f"smallest K with H(K) <= {HARTIGAN_THRESHOLD:g}"
    if DIRECTION[index] == "drop":
        return "K with the largest drop H(K-1) - H(K)"
    return f"K with the {'maximum' if DIRECTION[index] == 'max' else 'minimum'}"


# --------------------------------------------------------------------------------------------------
# Inputs: the latent cache (or a feature matrix) and its tile index


def read_index(path: Path) -> tuple[list[str], list[str] | None]:
    """Tile key of every latent row, and its `transform` where the index has one (docs/training.md).

    CSV: the key column is the first of tile, key, path, file; an `index` column must count 0..N-1.
    JSON: a list of keys, or {"tiles": [...]}.
    """
    if not path.is_file():
        raise InputError(f"index: file not found: {path}")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON: {e}") from None
        if isinstance(data, dict):
            data = data.get("tiles", data.get("paths"))
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise InputError(f"{path}: expected a JSON list of tile paths, or {{\"tiles\": [...]}}")
        return data, None
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        column = next((c for c in ("tile", "key", "path", "file") if c in columns), None)
        if column is None:
            raise InputError(f"{path}: needs a column tile, key, path or file; has {', '.join(columns) or 'none'}")
        rows = list(reader)
    if "index" in columns and [r["index"] for r in rows] != [str(i) for i in range(len(rows))]:
        raise InputError(f"{path}: the index column must count the rows 0..{len(rows) - 1} in order")
    transforms = [r["transform"] or "identity" for r in rows] if "transform" in columns else None
    return [r[column] for r in rows], transforms


@dataclass
class ClusterInputs:
    """Rows to cluster, their tile keys, and (dihedral caches) the rows of each extra view of every tile."""

    array: np.ndarray  # (R, C, h, w) latents or (R, D) features, every row of the file (memory-mapped)
    tiles: list[str]  # key of each tile clustered
    rows: np.ndarray  # (N,) row of each tile's identity view
    view_rows: np.ndarray | None  # (V, N) rows of the other views (flips/rotations), or None


def load_inputs(latents: Path, index: Path | None = None) -> ClusterInputs:
    """Open the latent array `(R, C, h, w)` (or features `(R, D)`) and its index.

    `latents` is a `.npy` file or a latent-cache folder holding `latents.npy` and `index.csv` (or
    `index.json`); `index` overrides the index file. With a `transform` column (a `--dihedral` cache),
    the `identity` rows are the tiles and every other transform is a view used by the IMC consistency
    term; each tile must have the same set of views.
    """
    latents = Path(latents)
    if latents.is_dir():
        folder = latents
        latents = folder / "latents.npy"
        if index is None:
            index = next((folder / n for n in ("index.csv", "index.json") if (folder / n).is_file()), None)
    if not latents.is_file():
        raise InputError(f"--latents: file not found: {latents}")
    if index is None:
        raise InputError(f"--index: required (no index.csv or index.json beside {latents})")
    try:
        array = np.load(latents, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise InputError(f"--latents: {latents} is not a plain .npy array: {e}") from None
    if array.ndim not in (2, 4):
        raise InputError(f"--latents: expected latents (N, C, h, w) or features (N, D), got shape {array.shape}")
    keys, transforms = read_index(Path(index))
    if len(keys) != len(array):
        raise InputError(f"--index: {len(keys)} tiles but {len(array)} rows in {latents.name}")
    if transforms is None or set(transforms) == {"identity"}:
        if len(set(keys)) != len(keys):
            raise InputError(f"--index: tile keys repeat (e.g. {next(k for k in keys if keys.count(k) > 1)!r})")
        return ClusterInputs(array, keys, np.arange(len(keys)), None)
    by_tile: dict[str, dict[str, int]] = {}
    for row, (key, t) in enumerate(zip(keys, transforms)):
        by_tile.setdefault(key, {})[t] = row
    names = sorted(set(transforms) - {"identity"})
    for key, views in by_tile.items():
        if set(views) != set(names) | {"identity"}:
            raise InputError(f"--index: tile {key!r} has views {sorted(views)}; every tile needs identity + {names}")
    tiles = list(by_tile)
    rows = np.array([by_tile[k]["identity"] for k in tiles])
    view_rows = np.array([[by_tile[k][t] for k in tiles] for t in names])
    return ClusterInputs(array, tiles, rows, view_rows)


# --------------------------------------------------------------------------------------------------
# Outputs


TABLE_COLUMNS = ["method", "k", "clusters_used", *ALL_INDICES, "hartigan_drop", "wss", *BALANCE]


def write_cluster_outputs(out_dir: Path, search: ClusterSearch, tiles: Sequence[str], features: torch.Tensor,
                          scaler: FeatureScaler, feature_info: dict[str, Any],
                          source: dict[str, Any]) -> dict[str, Any]:
    """Write the cluster folder and return the contents of its `cluster.json`.

    Files: `assignments.csv` (tile, cluster, probability, distance to the cluster's mean feature),
    `validity.csv` / `validity.json` (the table, the choice, the rule, monotone indices and warnings),
    `validity.png` (each index and the size balance vs K), `cluster.json` (chosen K, rule, sizes, balance,
    feature kind, scaler, config), and the method's model: `imc_head.safetensors` + `.json` (the chosen
    head; with latent_features it carries the feature scaler) or `kmeans_centres.npy`. Each file is
    written under a temporary name and renamed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    k, method = search.k, search.config.method
    x = features.float()
    fit = search.fits[(method, k)]
    probs = fit.probs(x)
    labels = fit.labels
    prob = probs.gather(1, torch.from_numpy(labels).long()[:, None])[:, 0].numpy()
    head = fit.save(out_dir, search.config, scaler, str(feature_info["kind"]))
    xn = x.numpy()
    distance = np.zeros(len(xn))
    sizes = {}
    for c in range(k):
        members = labels == c
        sizes[c] = int(members.sum())
        if members.any():
            distance[members] = np.linalg.norm(xn[members] - xn[members].mean(axis=0), axis=1)
    write_csv(out_dir / "assignments.csv", ["tile", "cluster", "probability", "distance"],
              ([tile, int(c), f"{float(p):.6f}", f"{float(d):.6f}"]
               for tile, c, p, d in zip(tiles, labels, prob, distance)))
    write_csv(out_dir / "validity.csv", TABLE_COLUMNS,
              ([_fmt(row.get(c)) for c in TABLE_COLUMNS] for row in search.table))
    c = search.choice
    choice = {"k": k, "method": method, "rule": c.rule, "votes": c.votes, "monotone": c.monotone,
              "warnings": c.warnings}
    validity = {"choice": choice, "directions": DIRECTION,
                "table": [{col: row.get(col) for col in TABLE_COLUMNS} for row in search.table]}
    write_json(out_dir / "validity.json", validity)
    plot_validity(search.table, k, out_dir / "validity.png", choice=c, method=method)
    summary = {
        "format": CLUSTER_FORMAT,
        "k": k,
        "method": method,
        "rule": c.rule,
        "votes": c.votes,
        "monotone": c.monotone,
        "warnings": c.warnings,
        "num_tiles": len(tiles),
        "sizes": sizes,
        "balance": size_balance(labels, k),
        "features": feature_info,
        "scaler": to_dict(scaler),
        "head": head,
        "config": to_dict(search.config),
        "source": source,
    }
    write_json(out_dir / "cluster.json", summary)
    return summary


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else str(v)


@dataclass
class PreparedFeatures:
    """Raw features of a latent cache's rows, and which rows are tiles and which are their views."""

    raw: RawFeatures
    inputs: ClusterInputs


def prepare_features(latents: Path, config: ClusterSearchConfig, index: Path | None = None,
                     on_progress: Progress | None = None) -> PreparedFeatures:
    """Open the latents and compute the configured features of every row (tiles and their views)."""
    config.validate("cluster")
    inputs = load_inputs(latents, index)
    progress = (lambda done, total: on_progress(done, total, f"{config.features.kind} features")) \
        if on_progress else None
    raw = compute_features(inputs.array, config.features, progress)
    if not torch.isfinite(raw.features).all():
        raise InputError(f"--latents: {latents} holds NaN or infinite values")
    return PreparedFeatures(raw, inputs)


def cluster_rows(prepared: PreparedFeatures, select: np.ndarray, out_dir: Path, config: ClusterSearchConfig,
                 source: dict[str, Any], on_progress: Progress | None = None) -> dict[str, Any]:
    """Standardise the features of the tiles `select` (indices into `prepared.inputs.tiles`), search K, write.

    The scaler is fitted on the selected tiles only, so a label group is standardised by its own spread.
    """
    inputs, raw = prepared.inputs, prepared.raw
    rows = torch.from_numpy(inputs.rows[select])
    scaler = FeatureScaler.fit(raw.features[rows], blocks=raw.blocks)
    x = scaler.transform(raw.features[rows])
    views = None
    if inputs.view_rows is not None:
        views = torch.stack([scaler.transform(raw.features[torch.from_numpy(v[select])]) for v in inputs.view_rows])
    search = search_k(x, config, on_progress, views=views)
    source = dict(source, views=0 if views is None else int(views.shape[0]))
    tiles = [inputs.tiles[i] for i in select]
    summary = write_cluster_outputs(Path(out_dir), search, tiles, x, scaler, raw.info, source)
    summary["table"] = search.table
    return summary


def run_cluster(latents: Path, out_dir: Path, config: ClusterSearchConfig, index: Path | None = None,
                on_progress: Progress | None = None, tiles_root: Path | None = None,
                within_labels: Path | None = None, label_column: str = "label") -> dict[str, Any]:
    """`histosynth cluster`: features of the cached latents -> search over K -> the cluster folder.

    With `within_labels` (a CSV of tile labels), every label group is clustered on its own (within.py).
    """
    config.validate("cluster")
    if within_labels is not None:
        from histosynth.clusters.within import run_within_labels

        return run_within_labels(latents, out_dir, config, within_labels, label_column, index=index,
                                 on_progress=on_progress, tiles_root=tiles_root)
    prepared = prepare_features(latents, config, index, on_progress)
    # `tiles` is the folder the tile keys are relative to; `histosynth review` defaults to it.
    source = {"latents": str(latents), "index": str(index) if index else None,
              "tiles": str(tiles_root) if tiles_root else None}
    return cluster_rows(prepared, np.arange(len(prepared.inputs.tiles)), out_dir, config, source, on_progress)


# --------------------------------------------------------------------------------------------------
# The validity plot, drawn with PIL (matplotlib is deliberately not a dependency)

_COLOURS = {"imc": (31, 119, 180), "kmeans": (255, 127, 14)}


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = [round(start, 12)]
    while ticks[-1] < hi - 1e-12 * max(1.0, abs(hi)):  # the last tick covers the largest value
        ticks.append(round(start + len(ticks) * step, 12))
    return ticks


def plot_validity(table: Sequence[dict[str, Any]], chosen_k: int, path: Path, choice: KChoice | None = None,
                  method: str | None = None) -> None:
    """One panel per index and per balance measure against K, a line per method, the chosen K marked.

    With `choice`, the panels of indices that rise or fall over the whole range say "no vote", and the
    choice's warnings (e.g. K at the edge of the range) are printed under the title. Written as PNG.
    """
    panels = [*ALL_INDICES, *BALANCE]
    notes = list(choice.warnings) if choice else []
    cols, pw, ph = 3, 330, 250
    rows_n = math.ceil(len(panels) / cols)
    head = 40 + 16 * len(notes)
    img = Image.new("RGB", (cols * pw, rows_n * ph + head), "white")
    draw = ImageDraw.Draw(img)
    font, small = ImageFont.load_default(14), ImageFont.load_default(11)
    methods = sorted({r["method"] for r in table}, key=lambda m: (m != method, m != "imc", m))
    draw.text((10, 10), f"Cluster validity vs K (chosen K = {chosen_k}, dashed red)", fill="black", font=font)
    for i, note in enumerate(notes):
        draw.text((10, 34 + 16 * i), f"warning: {note}", fill=(214, 39, 40), font=small)
    lx = cols * pw - 200
    for i, m in enumerate(methods):  # legend
        draw.line([(lx + 90 * i, 18), (lx + 90 * i + 24, 18)], fill=_COLOURS.get(m, (0, 0, 0)), width=3)
        draw.text((lx + 90 * i + 28, 11), m, fill="black", font=small)
    ks = sorted({int(r["k"]) for r in table})
    trends = {m: monotone_indices([r for r in table if r["method"] == m], ALL_INDICES) for m in methods}
    for p, name in enumerate(panels):
        ox, oy = (p % cols) * pw, head + (p // cols) * ph
        left, right, top, bottom = ox + 62, ox + pw - 14, oy + 40, oy + ph - 40
        if name in DIRECTION:
            better = {"max": "higher is better", "min": "lower is better", "drop": "largest drop wins"}[DIRECTION[name]]
        else:
            better = "1 = equal sizes"
        draw.text((ox + 10, oy + 4), f"{name} ({better})", fill="black", font=small)
        what = "drop " if name == "hartigan" else ""  # Hartigan votes by its drop H(K-1) - H(K), plotted: H(K)
        flagged = [f"{m}: {what}{trends[m][name]} with K" for m in methods if name in trends[m]]
        if flagged:  # a monotone index: its pick is the range's end, so it does not vote
            voter = method in methods and name in trends.get(method, {}) and name in PAPER_INDICES
            text = "monotone: " + "; ".join(flagged) + (" - no vote" if voter else "")
            draw.text((ox + 10, oy + 20), text, fill=(214, 39, 40), font=small)
        column = name
        values = [float(r[column]) for r in table if r.get(column) is not None and math.isfinite(float(r[column]))]
        ticks = _nice_ticks(min(values), max(values)) if values else []
        lo, hi = (ticks[0], ticks[-1]) if len(ticks) >= 2 else (0.0, 1.0)

        def sx(k: float) -> float:
            return left + (k - ks[0]) / max(ks[-1] - ks[0], 1) * (right - left)

        def sy(v: float) -> float:
            return bottom - (v - lo) / (hi - lo) * (bottom - top)

        draw.rectangle([left, top, right, bottom], outline="black")
        for t in ticks:
            y = sy(t)
            draw.line([(left - 4, y), (left, y)], fill="black")
            draw.line([(left + 1, y), (right - 1, y)], fill=(235, 235, 235))
            draw.text((ox + 4, y - 6), f"{t:.3g}", fill="black", font=small)
        for k in ks:
            draw.line([(sx(k), bottom), (sx(k), bottom + 4)], fill="black")
            draw.text((sx(k) - 4, bottom + 6), str(k), fill="black", font=small)
        draw.text(((left + right) / 2 - 4, bottom + 22), "K", fill="black", font=small)
        if chosen_k in ks:
            x0 = sx(chosen_k)
            for y in range(int(top), int(bottom), 8):  # dashed marker of the chosen K
                draw.line([(x0, y), (x0, min(y + 4, bottom))], fill=(214, 39, 40), width=2)
        for m in methods:
            pts = [(sx(int(r["k"])), sy(float(r[column]))) for r in sorted(table, key=lambda r: r["k"])
                   if r["method"] == m and r.get(column) is not None and math.isfinite(float(r[column]))]
            colour = _COLOURS.get(m, (0, 0, 0))
            if len(pts) >= 2:
                draw.line(pts, fill=colour, width=2)
            for px, py in pts:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def read_assignments(cluster_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`cluster.json` and the rows of `assignments.csv` (tile, cluster, probability, distance) of a cluster folder."""
    cluster_dir = Path(cluster_dir)
    meta_path, csv_path = cluster_dir / "cluster.json", cluster_dir / "assignments.csv"
    for p in (meta_path, csv_path):
        if not p.is_file():
            raise InputError(f"--clusters: {p} not found; give the output folder of `histosynth cluster`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{meta_path}: not valid JSON: {e}") from None
    if meta.get("format") != CLUSTER_FORMAT:
        raise InputError(f"{meta_path}: format {meta.get('format')!r}; expected {CLUSTER_FORMAT!r}")
    rows = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                rows.append({"tile": row["tile"], "cluster": int(row["cluster"]),
                             "probability": float(row["probability"]), "distance": float(row["distance"])})
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{csv_path}:{line}: expected tile, cluster, probability, distance") from None
    return meta, rows

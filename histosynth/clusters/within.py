"""`histosynth cluster --within-labels labels.csv`: cluster every label group on its own, in one run.

A lab's partial labels (e.g. PCam's tumour flag) split the tiles into groups; each group gets its own
feature scaler, its own search over K and its own choice of K, so classes such as `tumour/lymphoid` and
`normal/adipose` come out of one run. Tiles without a label form the group `unlabelled`.

Output layout (`--out DIR`):

    DIR/assignments.csv        every tile, with a cluster id that is unique over all groups
    DIR/cluster.json           k = the total cluster count, `groups` and `cluster_groups` (below)
    DIR/groups/<label>/        a complete single-run cluster folder per group (local ids 0..K_g-1):
                               assignments.csv, validity.csv/.json/.png, cluster.json, the head

Global ids follow the groups in sorted label order (numbers numerically), then each group's local ids:
group `0` with K = 3 gets ids 0-2, group `1` with K = 4 gets 3-6. `cluster.json` records, per group, its
folder, K, global ids, tile count, rule, warnings and balance (`groups`), and the group of every global
id (`cluster_groups`), so `histosynth review sheets` / `review apply` work on DIR as on any cluster folder.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.clusters.select import (
    CLUSTER_FORMAT, ClusterSearchConfig, Progress, cluster_rows, prepare_features, read_assignments,
)
from histosynth.clusters.validity import size_balance
from histosynth.configio import to_dict
from histosynth.errors import InputError
from histosynth.io import write_csv, write_json

UNLABELLED = "unlabelled"  # the group of tiles the labels CSV has no (or an empty) label for
GROUPS_DIR = "groups"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # label values become folder names
_KEY_COLUMNS = ("tile", "key", "path", "file")
# Files of a single run that would contradict a within-labels run's cluster.json if left at the top.
_SINGLE_RUN_FILES = ("validity.csv", "validity.json", "validity.png", "imc_head.safetensors", "imc_head.json",
                     "kmeans_centres.npy")


def read_tile_labels(path: Path, column: str = "label") -> tuple[dict[str, str], dict[str, str]]:
    """(key -> label, file name -> label) from a CSV with a tile column (tile, key, path or file) and `column`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--within-labels: file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        key = next((c for c in _KEY_COLUMNS if c in columns), None)
        if key is None:
            raise InputError(f"--within-labels: {path} needs a column {', '.join(_KEY_COLUMNS[:-1])} or file; "
                             f"has {', '.join(columns) or 'none'}")
        if column not in columns:
            raise InputError(f"--label-column: {path} has no column {column!r}; columns: {', '.join(columns)}")
        by_key: dict[str, str] = {}
        for row in reader:
            value = (row[column] or "").strip()
            if row[key] and value:
                by_key[row[key]] = value
    return by_key, {Path(k).name: v for k, v in by_key.items()}


def _sort_key(label: str) -> tuple[int, float, str]:
    # Numbers numerically, then names; `unlabelled` last.
    try:
        return (1 if label == UNLABELLED else 0, float(label), label)
    except ValueError:
        return (1 if label == UNLABELLED else 0, float("inf"), label)


def group_tiles(tiles: list[str], by_key: dict[str, str], by_name: dict[str, str]) -> dict[str, np.ndarray]:
    """label -> indices of its tiles (a tile matches a label row by its exact key, else by its file name)."""
    groups: dict[str, list[int]] = {}
    for i, tile in enumerate(tiles):
        label = by_key.get(tile, by_name.get(Path(tile).name, UNLABELLED))
        groups.setdefault(label, []).append(i)
    if set(groups) == {UNLABELLED}:
        raise InputError(f"--within-labels: none of the {len(tiles)} tiles has a label (rows match a tile by its "
                         f"key, e.g. {tiles[0]!r}, or by its file name)")
    for label in groups:
        if not _SAFE.match(label):
            raise InputError(f"--within-labels: label {label!r} cannot name a folder; use letters, digits, '.', "
                             "'_' and '-' (starting with a letter or digit)")
    return {label: np.array(groups[label]) for label in sorted(groups, key=_sort_key)}


def run_within_labels(latents: Path, out_dir: Path, config: ClusterSearchConfig, labels: Path,
                      label_column: str = "label", *, index: Path | None = None, on_progress: Progress | None = None,
                      tiles_root: Path | None = None) -> dict[str, Any]:
    """Cluster each label group of the tiles separately and write the combined folder (module doc)."""

    by_key, by_name = read_tile_labels(labels, label_column)
    prepared = prepare_features(latents, config, index, on_progress)
    groups = group_tiles(prepared.inputs.tiles, by_key, by_name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = {"latents": str(latents), "index": str(index) if index else None,
              "tiles": str(tiles_root) if tiles_root else None,
              "within_labels": str(labels), "label_column": label_column}
    summaries: dict[str, dict[str, Any]] = {}
    for g, (label, select) in enumerate(groups.items()):
        def progress(done: int, total: int, what: str, g: int = g, label: str = label) -> None:
            if on_progress:
                on_progress(g * total + done, len(groups) * total, f"group {label} ({g + 1}/{len(groups)}): {what}")

        try:
            summaries[label] = cluster_rows(prepared, select, out_dir / GROUPS_DIR / label, config,
                                            dict(source, group=label), progress)
        except InputError as e:
            raise InputError(f"--within-labels: group {label!r} ({len(select)} tiles): {e}") from None

    rows: list[tuple[str, int, float, float]] = []
    info: dict[str, Any] = {}
    cluster_groups: dict[int, str] = {}
    offset = 0
    for label, summary in summaries.items():
        k = int(summary["k"])
        _, assigned = read_assignments(out_dir / GROUPS_DIR / label)
        rows += [(r["tile"], offset + r["cluster"], r["probability"], r["distance"]) for r in assigned]
        ids = list(range(offset, offset + k))
        cluster_groups.update({c: label for c in ids})
        info[label] = {"dir": f"{GROUPS_DIR}/{label}", "k": k, "clusters": ids, "tiles": int(summary["num_tiles"]),
                       "rule": summary["rule"], "votes": summary["votes"], "warnings": summary["warnings"],
                       "balance": summary["balance"]}
        offset += k
    order = {t: i for i, t in enumerate(prepared.inputs.tiles)}
    rows.sort(key=lambda r: order[r[0]])  # the cache's tile order, as a single run writes it
    labels_out = np.array([r[1] for r in rows])
    sizes = {c: int((labels_out == c).sum()) for c in range(offset)}
    warnings = [f"group {label}: {w}" for label, s in summaries.items() for w in s["warnings"]]
    first = next(iter(summaries.values()))
    summary = {
        "format": CLUSTER_FORMAT,
        "k": offset,
        "method": config.method,
        "rule": f"K chosen per label group ({labels.name}, column {label_column}): "
                + "; ".join(f"{label}: K={s['k']}" for label, s in summaries.items()),
        "votes": {label: s["votes"] for label, s in summaries.items()},
        "monotone": {label: s["monotone"] for label, s in summaries.items()},
        "warnings": warnings,
        "num_tiles": len(rows),
        "sizes": sizes,
        "balance": size_balance(labels_out, offset),
        "features": first["features"],
        "scaler": None,  # one per group, in groups/<label>/cluster.json
        "head": None,  # one per group
        "config": to_dict(config),
        "source": source,
        "groups": info,
        "cluster_groups": cluster_groups,
    }
    for name in _SINGLE_RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    write_csv(out_dir / "assignments.csv", ["tile", "cluster", "probability", "distance"],
              ([tile, c, f"{p:.6f}", f"{d:.6f}"] for tile, c, p, d in rows))
    write_json(out_dir / "cluster.json", summary)
    summary["table"] = [dict(r, group=label) for label, s in summaries.items() for r in s["table"]]
    return summary


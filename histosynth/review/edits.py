"""The expert's edits (clusters.yaml) applied to the cluster assignments: the final label map.

Rules, in order (each violation is an `InputError` naming the key path):
1. every cluster 0..K-1 has an entry under `clusters`, and no other id appears;
2. `merges`: each group has >= 2 distinct known ids; a cluster is in at most one group; a group is all
   excluded or all kept; its kept names agree, where a default name `cluster_<id>` yields to a given one;
3. `moves`: each tile is in assignments.csv and moved once, to a known, not excluded cluster;
4. final classes: no two share a name, each has at least one tile, at least one class is left.

Classes get contiguous ids 0..C-1 in the sorted order of their names (so ImageFolder indices of
generated tiles equal class ids). `write_label_map`
writes the label map YAML (`classes` as docs/bundle.md defines it, plus `clusters`: cluster id -> class
name or null for excluded, read by joint IMC training) and beside it `<stem>_tiles.csv` (tile,
class_id, class_name) for conditional training; excluded tiles are left out of the CSV.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from histosynth.configio import from_dict, load_yaml
from histosynth.errors import InputError
from histosynth.labels import LabelClass, LabelMap, write_label_map

_BAD_NAME = re.compile(r'[/\\:*?"<>|]')  # names become output folder names of `generate`


@dataclass
class ClusterEdit:
    """One cluster's review."""

    name: str  # class name; the default from the template is cluster_<id>
    exclude: bool = False  # drop the cluster (background, artefacts)


@dataclass
class TileMove:
    """Put one tile into another cluster."""

    tile: str  # the tile key as in assignments.csv
    to: int  # the target cluster id


@dataclass
class ReviewEdits:
    """The contents of clusters.yaml."""

    clusters: dict[int, ClusterEdit]
    merges: list[list[int]] = field(default_factory=list)
    moves: list[TileMove] = field(default_factory=list)


def load_edits(path: Path) -> ReviewEdits:
    """Read clusters.yaml into `ReviewEdits` (key-path errors from configio)."""
    data = load_yaml(path)
    if data is None:
        raise InputError(f"{path}: empty file; start from the clusters.yaml that `review sheets` writes")
    return from_dict(ReviewEdits, data, "clusters.yaml")


def _default(c: int) -> str:
    return f"cluster_{c}"


def apply_review(assignments: Sequence[dict[str, Any]], edits: ReviewEdits, k: int) -> LabelMap:
    """Check `edits` against `k` clusters and their assignments (rows with tile, cluster); build the label map."""
    known = set(range(k))
    for c in edits.clusters:
        if c not in known:
            raise InputError(f"clusters.{c}: unknown cluster id; the clustering has ids 0..{k - 1}")
    missing = sorted(known - set(edits.clusters))
    if missing:
        raise InputError(f"clusters.{missing[0]}: missing; every cluster needs an entry (exclude: true drops it)")
    for c, e in edits.clusters.items():
        if not e.name.strip() or _BAD_NAME.search(e.name):
            raise InputError(f"clusters.{c}.name: {e.name!r} is not a usable class name "
                             '(non-empty, none of / \\ : * ? " < > |)')

    # Merge groups: each cluster's group leader is the group's smallest id.
    leader = {c: c for c in known}
    seen: dict[int, int] = {}
    for g, group in enumerate(edits.merges):
        path = f"merges[{g}]"
        if len(set(group)) < 2 or len(set(group)) != len(group):
            raise InputError(f"{path}: needs at least two different cluster ids, got {group}")
        for c in group:
            if c not in known:
                raise InputError(f"{path}: unknown cluster id {c}; the clustering has ids 0..{k - 1}")
            if c in seen:
                raise InputError(f"{path}: cluster {c} is already in merges[{seen[c]}]; put them in one group")
            seen[c] = g
        excluded = {c for c in group if edits.clusters[c].exclude}
        if excluded and excluded != set(group):
            raise InputError(f"{path}: clusters {sorted(excluded)} are excluded but "
                             f"{sorted(set(group) - excluded)} are not; exclude all of a group or none")
        for c in group:
            leader[c] = min(group)

    members: dict[int, list[int]] = {}
    for c in sorted(known):
        members.setdefault(leader[c], []).append(c)
    names: dict[int, str] = {}
    for lead, group in members.items():
        given = {edits.clusters[c].name for c in group if edits.clusters[c].name != _default(c)}
        if len(given) > 1:
            raise InputError(f"merges[{seen[lead]}]: merged clusters {group} have conflicting names "
                             f"{sorted(given)}; give them one name")
        names[lead] = given.pop() if given else edits.clusters[lead].name

    kept = [lead for lead in sorted(members) if not edits.clusters[lead].exclude]
    if not kept:
        raise InputError("clusters: every cluster is excluded; nothing is left to train on")
    by_name: dict[str, int] = {}
    for lead in kept:
        if names[lead] in by_name:
            raise InputError(f"clusters.{lead}.name: {names[lead]!r} is also the name of cluster "
                             f"{by_name[names[lead]]}; merge them with merges: [[{by_name[names[lead]]}, {lead}]]")
        by_name[names[lead]] = lead

    cluster_of = {r["tile"]: int(r["cluster"]) for r in assignments}
    moved: dict[str, int] = {}
    for i, move in enumerate(edits.moves):
        if move.tile not in cluster_of:
            raise InputError(f"moves[{i}].tile: {move.tile!r} is not in assignments.csv")
        if move.tile in moved:
            raise InputError(f"moves[{i}].tile: {move.tile!r} is already moved by moves[{moved[move.tile]}]")
        if move.to not in known:
            raise InputError(f"moves[{i}].to: unknown cluster id {move.to}; the clustering has ids 0..{k - 1}")
        if edits.clusters[move.to].exclude:
            raise InputError(f"moves[{i}].to: cluster {move.to} is excluded; move the tile to a kept cluster")
        moved[move.tile] = i
        cluster_of[move.tile] = move.to

    # Ids follow the sorted names: generate writes a folder per class and ImageFolder numbers folders in
    # sorted order, so its indices then equal the bundle's class ids.
    kept.sort(key=lambda lead: names[lead])
    class_id = {lead: i for i, lead in enumerate(kept)}
    cluster_to_class = {c: class_id.get(leader[c]) for c in sorted(known)}
    tile_labels, counts, excluded_tiles = [], [0] * len(kept), 0
    for r in assignments:
        cls = cluster_to_class.get(cluster_of[r["tile"]])
        if cls is None:
            excluded_tiles += 1
            continue
        tile_labels.append((r["tile"], cls))
        counts[cls] += 1
    for lead in kept:
        if counts[class_id[lead]] == 0:
            raise InputError(f"clusters.{lead}: class {names[lead]!r} has no tiles; exclude it")
    classes = [LabelClass(class_id[lead], names[lead], members[lead], counts[class_id[lead]]) for lead in kept]
    return LabelMap(classes, cluster_to_class, tile_labels, excluded_tiles)


def review_apply(edits_path: Path, cluster_dir: Path, out: Path) -> tuple[LabelMap, Path]:
    """`histosynth review apply`: read clusters.yaml and the cluster folder, write the label map."""
    from histosynth.clusters.select import read_assignments

    meta, rows = read_assignments(Path(cluster_dir))
    label_map = apply_review(rows, load_edits(Path(edits_path)), int(meta["k"]))
    provenance = {"source": {"clusters": str(cluster_dir), "edits": str(edits_path)},
                  "cluster_rule": meta.get("rule"), "cluster_method": meta.get("method")}
    return label_map, write_label_map(label_map, Path(out), provenance)

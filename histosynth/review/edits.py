"""The expert's edits (clusters.yaml) applied to the cluster assignments: the final label map.

The file `histosynth review apply` reads (every key below is a dataclass of this module; unknown keys are
errors that name the key path; `review sheets` writes a template):

```yaml
clusters:                   # one entry per cluster id 0..K-1 (ClusterEdit)
  0: {name: tumour, label: "1", label_name: tumour}   # label / label_name optional: the lab's label it stands for
  1: {name: cluster_1}      # default name cluster_<id>; in a merge group it yields to a given name
  2: {name: stroma}
  3: {name: background, exclude: true}
merges: [[0, 1]]            # groups of cluster ids that become one class
moves:                      # single tiles into another cluster (TileMove), by their key in assignments.csv
  - {tile: slide1/x962_y192.png, to: 2}
splits:                     # classes cut into several (ClusterSplit); a merged cluster splits its whole group
  - cluster: 2              # stroma -> stroma_normal (label 0) and stroma_tumour (label 1)
    by: label
    labels: labels.csv      # CSV with a file column and the label column; relative to this file's folder
    column: label           # (default label); file_column: file (default)
    names: {0: normal, 1: tumour}   # value -> name; the class is <class>_<name> (default <class>_<value>)
    unlabelled: exclude     # tiles without a label: exclude (default) or keep (class <class>_unlabelled)
  - cluster: 0              # tumour -> tumour_0 (the largest part), tumour_1, tumour_2
    by: kmeans
    n: 3                    # sub-clusters: k-means on the class's latent features, seeded (seed: 0)
    class_names: {0: tumour_dense}  # part -> whole class name, instead of <class>_<name>
```

Rules, in order (each violation is an `InputError` naming the key path):
1. every cluster 0..K-1 has an entry under `clusters`, and no other id appears; names are usable folder
   names; `label_name` needs a `label`;
2. `merges`: each group has >= 2 distinct known ids; a cluster is in at most one group; a group is all
   excluded or all kept; its kept names agree, where a default name `cluster_<id>` yields to a given one;
   its given labels (and label names) agree;
3. `moves`: each tile is in assignments.csv and moved once, to a known, not excluded cluster;
4. `splits`: each names a known, kept cluster, and a class is split at most once; `by: label` needs
   `labels` (a readable CSV with the columns) and at least one labelled tile in the class, and `names` /
   `class_names` keys are values of the column; `by: kmeans` needs 2 <= n <= the class's tiles, keys 0..n-1;
5. final classes: no two share a name, each has at least one tile, at least one class is left.

A cluster without a `label` takes the label group `histosynth cluster --within-labels` recorded for it
(`cluster.json` `cluster_groups`; not the group of unlabelled tiles); a merge across label groups has no
label. A split runs after merges and moves, on the class's tiles. Each label value becomes a class with `label`
(the raw value) and `label_name` (its name from `names`, if given); k-means parts keep the class's label and
record `subcluster` (parts numbered by size, largest first; ties by first tile). Classes get contiguous ids
0..C-1 in the sorted order of their names (so ImageFolder indices of generated tiles equal class ids).
`histosynth.labels.write_label_map` writes the label map and the per-tile CSV (docs/bundle.md, docs/labels.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import numpy as np

from histosynth.configio import from_dict, load_yaml, require
from histosynth.errors import InputError
from histosynth.labels import (LabelClass, LabelMap, TileLabels, check_class_name, read_tile_labels,
                               write_label_map)

# Features of tiles (keys as in assignments.csv) -> (N, D) array, for k-means splits.
UNLABELLED_GROUP = "unlabelled"  # cluster --within-labels: the group of tiles without a label
FeatureFn = Callable[[Sequence[str]], np.ndarray]


def _text(value: Any) -> Any:
    # YAML reads `label: 1` and `{0: normal}` keys as integers; labels are the CSV's raw strings.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


@dataclass
class ClusterEdit:
    """One cluster's review."""

    name: str  # class name; the default from the template is cluster_<id>
    exclude: bool = False  # drop the cluster (background, artefacts)
    label: Optional[str | int] = None  # the lab's label value this cluster stands for, e.g. "1" (kept as a string)
    label_name: Optional[str] = None  # that value's name, e.g. "tumour"

    def __post_init__(self) -> None:
        self.label = _text(self.label)

    def validate(self, path: str) -> None:
        require(self.label is None or self.label != "", f"{path}.label", "must be a non-empty value or absent")
        require(self.label_name is None or self.label is not None, f"{path}.label_name",
                "needs a label (the raw value it names)")


@dataclass
class TileMove:
    """Put one tile into another cluster."""

    tile: str  # the tile key as in assignments.csv
    to: int  # the target cluster id


@dataclass
class ClusterSplit:
    """Cut one class (a cluster, or the merge group it is in) into several classes."""

    cluster: int  # a cluster id; when it is in a merge group, the merged class is split
    by: Literal["label", "kmeans"]  # a label column of a CSV, or k-means sub-clusters
    labels: Optional[str] = None  # by label: the CSV; relative paths: clusters.yaml's folder, then the working one
    column: str = "label"  # by label: the label column
    file_column: str = "file"  # by label: the column of tile file names (matched as in histosynth.labels)
    unlabelled: Literal["exclude", "keep"] = "exclude"  # by label: drop tiles without a label, or keep them
    n: Optional[int] = None  # by kmeans: number of sub-clusters, >= 2
    seed: int = 0  # by kmeans: the k-means seed (the result depends on nothing else)
    names: dict[str | int, str] = field(default_factory=dict)  # part -> name; class = <class>_<name>
    class_names: dict[str | int, str] = field(default_factory=dict)  # part -> the whole class name

    def __post_init__(self) -> None:
        self.names = {_text(k): v for k, v in self.names.items()}
        self.class_names = {_text(k): v for k, v in self.class_names.items()}

    def validate(self, path: str) -> None:
        if self.by == "label":
            require(self.labels is not None, f"{path}.labels", "required with by: label (a CSV with file,label)")
            require(self.n is None, f"{path}.n", "belongs to by: kmeans; a label split makes one class per value")
        else:
            require(self.n is not None and self.n >= 2, f"{path}.n", f"by: kmeans needs n >= 2, got {self.n}")
            require(self.labels is None, f"{path}.labels", "belongs to by: label; remove it or use by: label")
        for key, name in self.names.items():
            require(name.strip() != "", f"{path}.names.{key}", "must be a non-empty name")


@dataclass
class ReviewEdits:
    """The contents of clusters.yaml."""

    clusters: dict[int, ClusterEdit]
    merges: list[list[int]] = field(default_factory=list)
    moves: list[TileMove] = field(default_factory=list)
    splits: list[ClusterSplit] = field(default_factory=list)


def load_edits(path: Path) -> ReviewEdits:
    """Read clusters.yaml into `ReviewEdits` (key-path errors from configio)."""
    data = load_yaml(path)
    if data is None:
        raise InputError(f"{path}: empty file; start from the clusters.yaml that `review sheets` writes")
    return from_dict(ReviewEdits, data, "clusters.yaml")


def _default(c: int) -> str:
    return f"cluster_{c}"


@dataclass
class _Part:
    """One final class before ids are given: where it comes from (for errors) and its tiles."""

    name: str
    source: str  # key path that made it, e.g. "clusters.2" or "splits[0]"
    clusters: list[int]
    tiles: list[str]
    label: Optional[str] = None
    label_name: Optional[str] = None
    subcluster: Optional[int] = None


def apply_review(assignments: Sequence[dict[str, Any]], edits: ReviewEdits, k: int, *,
                 base: Path | None = None, features: FeatureFn | None = None,
                 cluster_labels: Mapping[int, str] | None = None) -> LabelMap:
    """Check `edits` against `k` clusters and their assignments (rows with tile, cluster); build the label map.

    `base` is the folder relative `splits[].labels` paths are read from first (clusters.yaml's folder);
    `features(tiles)` gives the tiles' features for `by: kmeans` splits. `cluster_labels` (cluster id ->
    label value, from `cluster --within-labels`) is the label of clusters whose edit gives none; a merge of
    clusters with different such labels stands for no single label and gets none.
    """
    known = set(range(k))
    for c in edits.clusters:
        if c not in known:
            raise InputError(f"clusters.{c}: unknown cluster id; the clustering has ids 0..{k - 1}")
    missing = sorted(known - set(edits.clusters))
    if missing:
        raise InputError(f"clusters.{missing[0]}: missing; every cluster needs an entry (exclude: true drops it)")
    for c, e in edits.clusters.items():
        check_class_name(e.name, f"clusters.{c}.name")

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
    labels: dict[int, tuple[Optional[str], Optional[str]]] = {}
    for lead, group in members.items():
        given = {edits.clusters[c].name for c in group if edits.clusters[c].name != _default(c)}
        if len(given) > 1:
            raise InputError(f"merges[{seen[lead]}]: merged clusters {group} have conflicting names "
                             f"{sorted(given)}; give them one name")
        names[lead] = given.pop() if given else edits.clusters[lead].name
        values = {edits.clusters[c].label for c in group} - {None}
        value_names = {edits.clusters[c].label_name for c in group} - {None}
        if len(values) > 1 or len(value_names) > 1:
            raise InputError(f"merges[{seen[lead]}]: merged clusters {group} have conflicting labels "
                             f"{sorted(values | value_names)}; give them one label")
        if not values:  # no label given: the clustering's label group, when the whole group agrees
            inherited = {(cluster_labels or {}).get(c) for c in group}
            values = inherited if len(inherited) == 1 else set()
            values.discard(None)
        labels[lead] = (next(iter(values), None), next(iter(value_names), None))

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

    tiles_of: dict[int, list[str]] = {lead: [] for lead in kept}
    for r in assignments:
        if cluster_of[r["tile"]] not in leader:
            raise InputError(f"assignments.csv: tile {r['tile']!r} has cluster {cluster_of[r['tile']]}, outside "
                             f"the clustering's 0..{k - 1}")
        lead = leader[cluster_of[r["tile"]]]
        if lead in tiles_of:
            tiles_of[lead].append(r["tile"])
    for lead in kept:
        if not tiles_of[lead]:
            raise InputError(f"clusters.{lead}: class {names[lead]!r} has no tiles; exclude it")

    split_of: dict[int, int] = {}
    for i, s in enumerate(edits.splits):
        if s.cluster not in known:
            raise InputError(f"splits[{i}].cluster: unknown cluster id {s.cluster}; the clustering has ids "
                             f"0..{k - 1}")
        lead = leader[s.cluster]
        if edits.clusters[lead].exclude:
            raise InputError(f"splits[{i}].cluster: cluster {s.cluster} is excluded; only kept classes can be split")
        if lead in split_of:
            group = f" (merged with {members[lead]})" if len(members[lead]) > 1 else ""
            raise InputError(f"splits[{i}].cluster: the class of cluster {s.cluster}{group} is already split by "
                             f"splits[{split_of[lead]}]; split a class once")
        split_of[lead] = i

    parts: list[_Part] = []
    parts_of: dict[int, list[_Part]] = {}
    csvs: dict[tuple[Path, str, str], TileLabels] = {}
    for lead in kept:
        if lead in split_of:
            i = split_of[lead]
            s = edits.splits[i]
            if s.by == "label":
                got = _split_by_label(s, f"splits[{i}]", names[lead], members[lead], tiles_of[lead],
                                      labels[lead][0], base, csvs)
            else:
                got = _split_by_kmeans(s, f"splits[{i}]", names[lead], members[lead], tiles_of[lead],
                                       labels[lead], features)
        else:
            got = [_Part(names[lead], f"clusters.{lead}", members[lead], tiles_of[lead], *labels[lead])]
        parts_of[lead] = got
        parts += got

    made_by: dict[str, str] = {}
    for part in sorted(parts, key=lambda p: p.source.startswith("splits")):  # blame the split for a clash
        if part.name in made_by:
            raise InputError(f"{part.source}: class name {part.name!r} is also made by {made_by[part.name]}; "
                             "rename one of them (a split's names or class_names)")
        made_by[part.name] = part.source

    # Ids follow the sorted names: generate writes a folder per class and ImageFolder numbers folders in
    # sorted order, so its indices then equal the bundle's class ids.
    parts.sort(key=lambda p: p.name)
    part_id = {id(p): i for i, p in enumerate(parts)}
    cluster_to_class: dict[int, int | list[int] | None] = {}
    for c in sorted(known):
        got = parts_of.get(leader[c])
        if got is None:
            cluster_to_class[c] = None
        elif leader[c] in split_of:
            cluster_to_class[c] = sorted(part_id[id(p)] for p in got)
        else:
            cluster_to_class[c] = part_id[id(got[0])]
    class_of_tile = {t: part_id[id(p)] for p in parts for t in p.tiles}
    tile_labels = [(r["tile"], class_of_tile[r["tile"]]) for r in assignments if r["tile"] in class_of_tile]
    classes = [LabelClass(i, p.name, p.clusters, len(p.tiles), p.label, p.label_name, p.subcluster)
               for i, p in enumerate(parts)]
    return LabelMap(classes, cluster_to_class, tile_labels, len(assignments) - len(tile_labels))


def _resolve_csv(value: str, base: Path | None, path: str) -> Path:
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    tried = [base / p] if base is not None else []
    tried.append(p)
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise InputError(f"{path}: file not found: {' or '.join(str(t) for t in tried)} "
                     "(a relative path is read from clusters.yaml's folder, then the working folder)")


def _split_by_label(s: ClusterSplit, path: str, class_name: str, clusters: list[int], tiles: list[str],
                    own_label: Optional[str], base: Path | None,
                    csvs: dict[tuple[Path, str, str], TileLabels]) -> list[_Part]:
    assert s.labels is not None  # ClusterSplit.validate
    csv_path = _resolve_csv(s.labels, base, f"{path}.labels")
    key = (csv_path, s.column, s.file_column)
    if key not in csvs:
        csvs[key] = read_tile_labels(csv_path, s.column, s.file_column, what=f"{path}.labels")
    table = csvs[key]
    values = table.distinct()
    for option in ("names", "class_names"):
        for v in getattr(s, option):
            if v not in values:
                raise InputError(f"{path}.{option}.{v}: {v!r} is not a value of column {s.column!r} in {csv_path} "
                                 f"(values: {', '.join(values[:20])})")
    groups: dict[str, list[str]] = {}
    unlabelled: list[str] = []
    for t in tiles:
        v = table.of(t)
        (groups.setdefault(v, []) if v is not None else unlabelled).append(t)
    if not groups:
        raise InputError(f"{path}: none of the {len(tiles)} tiles of class {class_name!r} has a label in "
                         f"{csv_path} (a row matches a tile by its key, a trailing part of its path or its file "
                         f"name; e.g. {tiles[0]!r})")
    out = []
    for v in sorted(groups):
        name = s.class_names.get(v) or f"{class_name}_{s.names.get(v, v)}"
        check_class_name(name, f"{path}.names.{v}" if v in s.names else path)
        out.append(_Part(name, path, clusters, groups[v], v, s.names.get(v)))
    if unlabelled and s.unlabelled == "keep":
        # The unlabelled rest stands for whatever the class stood for before the split.
        out.append(_Part(f"{class_name}_unlabelled", path, clusters, unlabelled, own_label))
    return out


def _split_by_kmeans(s: ClusterSplit, path: str, class_name: str, clusters: list[int], tiles: list[str],
                     label: tuple[Optional[str], Optional[str]], features: FeatureFn | None) -> list[_Part]:
    assert s.n is not None  # ClusterSplit.validate
    for option in ("names", "class_names"):
        for key in getattr(s, option):
            if key not in {str(j) for j in range(s.n)}:
                raise InputError(f"{path}.{option}.{key}: not a sub-cluster; the parts are 0..{s.n - 1}")
    if s.n > len(tiles):
        raise InputError(f"{path}.n: {s.n} sub-clusters of class {class_name!r}, which has {len(tiles)} tiles")
    if features is None:
        raise InputError(f"{path}: by: kmeans needs the tiles' latent features (give the cluster folder's latent "
                         "cache, `review apply --latents`)")
    x = np.asarray(features(tiles), dtype=np.float64)
    if x.ndim != 2 or len(x) != len(tiles) or not np.isfinite(x).all():
        raise InputError(f"{path}: the features of class {class_name!r} are not a finite (tiles, dims) array")
    from sklearn.cluster import KMeans

    assign = KMeans(n_clusters=s.n, n_init=10, random_state=s.seed).fit(x).labels_
    found = np.unique(assign)
    if len(found) < s.n:
        raise InputError(f"{path}.n: k-means found only {len(found)} distinct groups among the {len(tiles)} tiles "
                         f"of class {class_name!r}; use a smaller n")
    # Number parts by size (largest first), ties by their first tile, so the names do not depend on k-means' ids.
    order = sorted(range(s.n), key=lambda j: (-int((assign == j).sum()), int(np.argmax(assign == j))))
    out = []
    for part, j in enumerate(order):
        key = str(part)
        name = s.class_names.get(key) or f"{class_name}_{s.names.get(key, key)}"
        check_class_name(name, path)
        members = [t for t, a in zip(tiles, assign) if a == j]
        out.append(_Part(name, path, clusters, members, label[0], label[1], subcluster=part))
    return out


def latent_features_of(meta: dict[str, Any], latents: Path | None = None) -> FeatureFn:
    """Features for k-means splits: `latent_features` of the tiles' cached latents, standardised over the tiles.

    The cache is the one `histosynth cluster` read (`cluster.json` `source.latents`), or `latents`. The
    features are the clustering's fixed latent summary (colour, contrast, texture, layout), standardised
    over the class being split, so the k-means sees the variation inside that class.
    """
    def features(tiles: Sequence[str]) -> np.ndarray:
        import torch

        from histosynth.clusters.features import FeatureScaler, latent_features
        from histosynth.clusters.select import load_inputs

        source = meta.get("source") or {}
        path = latents if latents is not None else source.get("latents")
        if not path:
            raise InputError("--latents: cluster.json does not name the latent cache the clustering read; pass it")
        index = source.get("index") if latents is None else None
        if not Path(path).exists():
            raise InputError(f"--latents: the latent cache {path} that cluster.json records is not there (a relative "
                             "path is read from the working folder); pass --latents")
        inputs = load_inputs(Path(path), Path(index) if index else None)
        row_of = dict(zip(inputs.tiles, inputs.rows.tolist()))
        absent = [t for t in tiles if t not in row_of]
        if absent:
            raise InputError(f"--latents: {path} has no latent for {len(absent)} of the tiles, e.g. {absent[0]!r}")
        rows = np.array([row_of[t] for t in tiles])
        order = np.argsort(rows)
        block = np.empty((len(rows), *inputs.array.shape[1:]), dtype=np.float32)
        block[order] = np.asarray(inputs.array[rows[order]], dtype=np.float32)  # sorted reads of the memmap
        x = torch.from_numpy(block)
        channels = None
        if x.ndim == 4:
            channels = int(x.shape[1])
            x = latent_features(x)
        return FeatureScaler.fit(x, channels).transform(x.double()).numpy()

    return features


def review_apply(edits_path: Path, cluster_dir: Path, out: Path,
                 latents: Path | None = None) -> tuple[LabelMap, Path]:
    """`histosynth review apply`: read clusters.yaml and the cluster folder, write the label map.

    `latents` overrides the latent cache recorded in cluster.json (read only for `by: kmeans` splits).
    """
    from histosynth.clusters.select import read_assignments

    meta, rows = read_assignments(Path(cluster_dir))
    edits_path = Path(edits_path)
    # `cluster --within-labels` records each cluster's label group; tiles without a label form "unlabelled".
    groups = meta.get("cluster_groups") or {}
    cluster_labels = {int(c): str(v) for c, v in groups.items() if v is not None and v != UNLABELLED_GROUP}
    label_map = apply_review(rows, load_edits(edits_path), int(meta["k"]), base=edits_path.parent,
                             features=latent_features_of(meta, latents), cluster_labels=cluster_labels)
    provenance = {"source": {"clusters": str(cluster_dir), "edits": str(edits_path)},
                  "cluster_rule": meta.get("rule"), "cluster_method": meta.get("method")}
    return label_map, write_label_map(label_map, Path(out), provenance)

"""The label map: the expert's final classes. One module owns its format; every stage imports it from here.

`review apply` writes it, `train cldm` reads the class names and (joint IMC) the cluster table, `export`
copies the classes into the bundle manifest, and `evaluate control` maps clusters to classes with it. It is
a leaf (it imports nothing of histosynth above `configio`), so diffusion, bundle and evaluation can all read
it without importing one another. docs/bundle.md ("Label map") and docs/labels.md describe the file:

```yaml
classes:                   # the conditional model's classes; ids 0..n-1 follow the sorted order of the names
  - id: 0
    name: stroma_normal    # unique; `generate`'s output folder name (no / \\ : * ? " < > |)
    clusters: [1, 4]       # optional: the clustering's ids whose tiles this class holds
    tiles: 840             # optional: how many tiles
    label: "0"             # optional: the raw value of the label column this class stands for (a string)
    label_name: normal     # optional: that value's name
    subcluster: 0          # optional: which part of a k-means split
clusters: {0: tumour, 1: [stroma_normal, stroma_tumour], 3: null}   # cluster -> class, classes (split), null
K: 5
tile_labels: label_map_tiles.csv   # per-tile CSV beside it: tile,class_id,class_name
excluded_tiles: 410
# any other top-level key is provenance, kept as is (source, cluster_rule, ...)
```

JSON is accepted too (it is YAML). The per-class keys other than `id` and `name` are optional, and keys this
module does not know are kept as provenance, so hand-written maps from older versions still load.

This module also reads the partial-label CSVs a lab brings (`read_tile_labels`): a file column and one or
more label columns; a row matches a tile by its exact key, a trailing part of its path, or its file name.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Optional

import yaml

from histosynth.configio import from_dict, load_yaml, require
from histosynth.errors import InputError
from histosynth.io import write_csv, write_text

# Class names become folder names of `generate`'s output, so they must be safe path components.
FORBIDDEN_NAME_CHARS = frozenset('/\\:*?"<>|') | {chr(c) for c in range(32)}
# Per-class keys beyond id and name; written only when set, so unlabelled maps keep their old bytes.
OPTIONAL_CLASS_KEYS = ("clusters", "tiles", "label", "label_name", "subcluster")


def check_class_name(name: str, path: str) -> None:
    """Raise `InputError` at `path` unless `name` can be a class (and folder) name."""
    if (not isinstance(name, str) or not name or name.strip() != name or name in (".", "..")
            or set(name) & FORBIDDEN_NAME_CHARS):
        raise InputError(f"{path}: {name!r} is not a usable class name (non-empty, no leading or trailing "
                         'spaces, none of / \\ : * ? " < > | or control characters)')


@dataclass(frozen=True)
class LabelClass:
    """One class of the conditional model (one row of the UNet's class embedding)."""

    id: int  # embedding row, 0..n-1, in the sorted order of the names
    name: str  # unique; the output folder name of `generate`
    clusters: list[int] = field(default_factory=list)  # cluster ids whose tiles it holds (merged, or split from)
    tiles: Optional[int] = None  # tiles with this class after moves and splits
    label: Optional[str] = None  # raw value of the lab's label column this class stands for, e.g. "1"
    label_name: Optional[str] = None  # that value's name, e.g. "tumour"
    subcluster: Optional[int] = None  # part index of a k-means split (0 = largest part)

    def validate(self, path: str) -> None:
        require(self.id >= 0, f"{path}.id", f"must be >= 0, got {self.id}")
        check_class_name(self.name, f"{path}.name")
        require(self.tiles is None or self.tiles >= 0, f"{path}.tiles", f"must be >= 0, got {self.tiles}")
        require(self.label is None or self.label != "", f"{path}.label", "must be a non-empty string or absent")
        require(self.label_name is None or self.label is not None, f"{path}.label_name",
                "needs a label (the raw value it names)")

    def to_dict(self) -> dict[str, Any]:
        """`{id, name}` plus the optional keys that are set (the label map's and the manifest's class entry)."""
        out: dict[str, Any] = {"id": self.id, "name": self.name}
        for key in OPTIONAL_CLASS_KEYS:
            value = getattr(self, key)
            if value is not None and value != []:
                out[key] = list(value) if key == "clusters" else value
        return out


ClusterTarget = Optional[int | list[int]]  # one class id, the class ids of a split cluster, None: excluded


@dataclass
class LabelMap:
    """Final classes, the cluster -> class table and (in memory, from `review apply`) every kept tile's class."""

    classes: list[LabelClass]
    # cluster id -> class id; a list of class ids for a split cluster; None for an excluded cluster.
    # Empty when the file has no `clusters` table (a hand-written map).
    cluster_to_class: dict[int, ClusterTarget] = field(default_factory=dict)
    tile_labels: list[tuple[str, int]] = field(default_factory=list)  # (tile, class id); excluded tiles absent
    excluded_tiles: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # every other top-level key of the file (provenance)

    @property
    def names(self) -> list[str]:
        """Class names in id order."""
        return [c.name for c in self.classes]

    def cluster_classes(self) -> dict[int, list[int]]:
        """cluster id -> the class ids its tiles went to ([] for excluded, several for a split)."""
        return {c: ([] if t is None else [t] if isinstance(t, int) else list(t))
                for c, t in self.cluster_to_class.items()}


def _class_item(item: Any, path: str) -> LabelClass:
    if not isinstance(item, dict):
        raise InputError(f"{path}: expected a mapping with 'id' and 'name', got {item!r}")
    known = {k: item[k] for k in ("id", "name", *OPTIONAL_CLASS_KEYS) if k in item}
    label = known.get("label")
    if isinstance(label, (int, float)) and not isinstance(label, bool):
        known["label"] = str(label)  # `label: 1` in hand-written YAML means the value "1"
    return from_dict(LabelClass, known, path)


def parse_cluster_table(table: Any, path: str) -> dict[int, Optional[str | list[str]]]:
    """Check a `clusters` table: integer keys; a class name, a list of names (split) or null (excluded)."""
    if not isinstance(table, dict) or not table:
        raise InputError(f"{path}: expected a mapping of cluster id -> class name (a list for a split, "
                         "null for excluded)")
    out: dict[int, Optional[str | list[str]]] = {}
    for key, value in table.items():
        try:
            c = int(key)
        except (TypeError, ValueError):
            raise InputError(f"{path}: key {key!r} is not a cluster id") from None
        if isinstance(key, bool) or c < 0 or str(c) != str(key).strip():
            raise InputError(f"{path}: key {key!r} is not a cluster id")
        if value is None or isinstance(value, str):
            out[c] = value
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            out[c] = list(value)
        else:
            raise InputError(f"{path}.{c}: expected a class name, a list of class names or null, got {value!r}")
    return out


def read_label_map(path: str | Path) -> LabelMap:
    """Read and check a label map (YAML or JSON): ids 0..n-1, unique names, a cluster table naming classes."""
    p = Path(path)
    data = load_yaml(p)  # JSON is YAML; errors name the file
    if not isinstance(data, dict) or "classes" not in data:
        raise InputError(f"{p}: a label map needs a top-level 'classes' list of {{id, name}}")
    raw = data["classes"]
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{p}: classes: expected a non-empty list of {{id, name}}")
    classes = sorted((_class_item(item, f"{p}: classes[{i}]") for i, item in enumerate(raw)), key=lambda c: c.id)
    ids = [c.id for c in classes]
    if ids != list(range(len(ids))):
        raise InputError(f"{p}: classes: ids must be 0..{len(ids) - 1}, each once; got {sorted(ids)}")
    names = [c.name for c in classes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"{p}: classes: duplicate names {', '.join(dupes)}")
    cluster_to_class: dict[int, ClusterTarget] = {}
    if data.get("clusters") is not None:
        for c, target in parse_cluster_table(data["clusters"], f"{p}: clusters").items():
            targets = [target] if isinstance(target, str) else target or []
            for name in targets:
                if name not in names:
                    raise InputError(f"{p}: clusters.{c}: {name!r} is not a class; classes: {', '.join(names)}")
            ids_of = [names.index(n) for n in targets]
            cluster_to_class[c] = None if target is None else ids_of[0] if isinstance(target, str) else ids_of
    excluded = data.get("excluded_tiles", 0)
    extra = {k: v for k, v in data.items() if k != "classes"}
    if any(set(item) - {"id", "name"} for item in raw):
        extra["classes"] = raw  # the per-class details stay in provenance as written
    return LabelMap(classes, cluster_to_class, [], int(excluded) if isinstance(excluded, int) else 0, extra)


def write_label_map(label_map: LabelMap, out: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write the label map YAML at `out` and `<stem>_tiles.csv` beside it (atomically); returns the CSV path."""
    out = Path(out)
    tiles_csv = out.with_name(f"{out.stem}_tiles.csv")
    names = {c.id: c.name for c in label_map.classes}

    def table_entry(target: ClusterTarget) -> Optional[str | list[str]]:
        if target is None:
            return None
        return names[target] if isinstance(target, int) else [names[i] for i in target]

    data = {
        "classes": [c.to_dict() for c in label_map.classes],
        # cluster id -> class name (a list: split; null: excluded); joint IMC maps head outputs with it.
        "clusters": {c: table_entry(t) for c, t in label_map.cluster_to_class.items()},
        "K": len(label_map.cluster_to_class),
        "tile_labels": tiles_csv.name,
        "excluded_tiles": label_map.excluded_tiles,
        **(provenance or {}),
    }
    write_csv(tiles_csv, ["tile", "class_id", "class_name"],
              ([tile, cls, names[cls]] for tile, cls in label_map.tile_labels))
    write_text(out, yaml.safe_dump(data, sort_keys=False))
    return tiles_csv


# --------------------------------------------------------------------------------------------------
# A lab's partial labels: a CSV with a file column and a label column


@dataclass(frozen=True)
class TileLabels:
    """One label column of a partial-label CSV: file -> raw value (rows with an empty value are left out)."""

    path: Path
    column: str
    values: dict[str, str]  # as written in the file column -> raw label value

    def of(self, tile: str) -> Optional[str]:
        """The label of tile key `tile`: its exact key, then ever shorter trailing parts of its path."""
        if tile in self.values:
            return self.values[tile]
        parts = PurePath(tile.replace("\\", "/")).parts
        for i in range(1, len(parts)):
            value = self.values.get("/".join(parts[i:]))
            if value is not None:
                return value
        return None

    def distinct(self) -> list[str]:
        """Every label value in the file, sorted."""
        return sorted(set(self.values.values()))


def read_tile_labels(path: str | Path, column: str = "label", file_column: str = "file",
                     what: str = "labels") -> TileLabels:
    """Read one label column of a CSV (partial annotations are fine); `what` names the setting in errors."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what}: file not found: {p}")
    try:
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            for name, role in ((file_column, "file"), (column, "label")):
                if name not in columns:
                    raise InputError(f"{what}: {p} has no {role} column {name!r}; its columns: "
                                     f"{', '.join(columns) or 'none'}")
            values: dict[str, str] = {}
            for line, row in enumerate(reader, start=2):
                key, value = (row.get(file_column) or "").strip(), (row.get(column) or "").strip()
                if not key or not value:
                    continue
                key = key.replace("\\", "/")
                if values.get(key, value) != value:
                    raise InputError(f"{what}: {p}:{line}: {key!r} has two labels, {values[key]!r} and {value!r}")
                values[key] = value
    except UnicodeDecodeError:
        raise InputError(f"{what}: {p} is not a UTF-8 text file") from None
    return TileLabels(p, column, values)

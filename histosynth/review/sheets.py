"""Material for the expert's review of the clusters: contact sheets, one HTML page, a clusters.yaml to edit.

`make_review_sheets` reads a `histosynth cluster` folder and writes to `out_dir`:
- `cluster_<id>.png` per cluster: a header (size, share, label-vote suggestion), a row of the tiles nearest
  the cluster centre (smallest `distance` in assignments.csv), and a row of a random sample (fixed seed);
- `review.html`: the interactive review page (page.py): every cluster's sheet embedded as base64, its size
  and label statistics, controls to rename, merge and drop, the resulting classes updated live, and the
  clusters.yaml to save; one self-contained file (no server, no network). When `out_dir` already holds an
  edited clusters.yaml, the page starts from those edits;
- `clusters.yaml`: the template the expert edits and `histosynth review apply` reads (see edits.py);
- `suggestions.json` when `labels` are given.

With a partial annotation (`labels` CSV with columns file,label), each cluster gets the majority label of
its annotated tiles, e.g. "label 1: 34/40 (85%)" (34 of its 40 annotated tiles). A label row matches a
tile by its exact key or a trailing part of its path (as a `by: label` split does).
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from histosynth.clusters.select import read_assignments
from histosynth.errors import InputError
from histosynth.io import write_bytes, write_json, write_text
from histosynth.labels import TileLabels, read_tile_labels
from histosynth.review.edits import UNLABELLED_GROUP, ReviewEdits, load_edits
from histosynth.review.page import PageCluster, initial_state, render_review_page


@dataclass
class Suggestion:
    """The majority label of a cluster's annotated tiles."""

    label: str
    votes: int  # annotated tiles of the cluster with this label
    annotated: int  # annotated tiles of the cluster
    counts: dict[str, int] = field(default_factory=dict)  # every label's count

    def __str__(self) -> str:
        return f"label {self.label}: {self.votes}/{self.annotated} ({100 * self.votes / self.annotated:.0f}%)"


@dataclass
class ReviewSummary:
    """What `make_review_sheets` wrote."""

    k: int
    sizes: dict[int, int]
    suggestions: dict[int, Suggestion]
    files: list[Path]
    missing_tiles: int  # tiles that could not be read (drawn as grey placeholders)


def read_labels(path: Path) -> dict[str, str]:
    """`file -> label` from a CSV with columns file,label (partial annotations are fine)."""
    return dict(read_tile_labels(Path(path), what="--labels").values)


def suggest_names(assignments: Sequence[dict[str, Any]], labels: dict[str, str] | TileLabels) -> dict[int, Suggestion]:
    """Majority label per cluster among its annotated tiles; ties go to the label that sorts first.

    A label row matches a tile as in a `by: label` split of `review apply` (histosynth.labels.TileLabels):
    by its exact key, then ever shorter trailing parts of its path down to the file name.
    """
    table = labels if isinstance(labels, TileLabels) else TileLabels(Path("."), "label", dict(labels))
    by_cluster: dict[int, Counter] = {}
    for row in assignments:
        label = table.of(row["tile"])
        if label is not None:
            by_cluster.setdefault(row["cluster"], Counter())[label] += 1
    out = {}
    for cluster, counts in sorted(by_cluster.items()):
        label, votes = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        out[cluster] = Suggestion(label, votes, sum(counts.values()), dict(sorted(counts.items())))
    return out


def _resolve(tile: str, tiles_root: Path | None) -> Path:
    p = Path(tile)
    if p.is_absolute() or tiles_root is None:
        return p
    return tiles_root / p


def _thumbnail(path: Path, size: int) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            return im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def contact_sheet(title: str, rows: Sequence[tuple[str, Sequence[Path]]], thumb: int = 96,
                  columns: int = 8) -> tuple[Image.Image, int]:
    """A sheet with a title and labelled rows of thumbnails; returns the image and the unreadable count."""
    font, small = ImageFont.load_default(16), ImageFont.load_default(12)
    pad, header, row_title = 6, 34, 18
    width = pad + columns * (thumb + pad)
    height = header
    for _, paths in rows:  # an empty row is only its title ("...: none")
        height += row_title + -(-len(paths) // columns) * (thumb + pad)
    sheet = Image.new("RGB", (max(width, 400), height + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 8), title, fill="black", font=font)
    y, missing = header, 0
    for name, paths in rows:
        draw.text((pad, y + 2), name if paths else f"{name}: none", fill=(80, 80, 80), font=small)
        y += row_title
        for i, p in enumerate(paths):
            x0, y0 = pad + (i % columns) * (thumb + pad), y + (i // columns) * (thumb + pad)
            im = _thumbnail(p, thumb)
            if im is None:  # keep the sheet: an unreadable tile becomes a grey placeholder
                missing += 1
                draw.rectangle([x0, y0, x0 + thumb - 1, y0 + thumb - 1], fill=(200, 200, 200))
                draw.text((x0 + 4, y0 + thumb // 2 - 6), "unreadable", fill="black", font=small)
            else:
                sheet.paste(im, (x0, y0))
        y += -(-len(paths) // columns) * (thumb + pad)
    return sheet, missing


def template_yaml(k: int, sizes: dict[int, int], suggestions: dict[int, Suggestion]) -> str:
    """The clusters.yaml the expert edits: a name and exclude flag per cluster, merges and moves."""
    lines = [
        "# Expert review of the clusters; `histosynth review apply` reads this file.",
        "# clusters: a name per cluster (becomes the class name) and exclude: true for clusters to drop",
        "#   (background, artefacts). Empty clusters start excluded.",
        "# merges: groups of cluster ids that become one class, e.g. [[1, 4]]; give them the same name or",
        "#   name only one of them (default names cluster_<id> never conflict).",
        "# moves: single tiles to put in another cluster, e.g. [{tile: path/as/in/assignments.csv, to: 2}].",
        "# label / label_name: the lab's label a cluster stands for, e.g.",
        "#   {name: tumour, label: \"1\", label_name: tumour}.",
        "# splits: cut a class by a label column or into k-means parts, e.g.",
        "#   [{cluster: 2, by: label, labels: labels.csv}, {cluster: 0, by: kmeans, n: 3}] (docs/labels.md).",
        "# review.html makes all of these edits and saves this file.",
        "clusters:",
    ]
    for c in range(k):
        note = [f"{sizes.get(c, 0)} tiles"]
        if c in suggestions:
            note.append(f"suggestion {suggestions[c]}")
        exclude = "true" if sizes.get(c, 0) == 0 else "false"
        lines.append(f"  {c}: {{name: cluster_{c}, exclude: {exclude}}}  # " + "; ".join(note))
    lines += ["merges: []", "moves: []", ""]
    return "\n".join(lines)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _existing_edits(path: Path, k: int, sizes: dict[int, int]) -> tuple[ReviewEdits | None, str]:
    """The edits of an existing clusters.yaml for K clusters, or None and why they are not used."""
    if not path.is_file():
        return None, ""
    try:
        edits = load_edits(path)
    except InputError as e:  # the page still works: it starts from the template and says why
        return None, f"The page starts from the template: the existing {path.name} could not be read ({e})."
    if sorted(edits.clusters) != list(range(k)):
        return None, (f"The page starts from the template: the existing {path.name} has cluster ids "
                      f"{sorted(edits.clusters)}, not 0..{k - 1}.")
    if edits.merges or edits.moves or any(
            e.exclude != (sizes.get(c, 0) == 0) or e.name != f"cluster_{c}" for c, e in edits.clusters.items()):
        return edits, f"The page starts from the edits in the existing {path.name}."
    return edits, ""  # the untouched template: nothing to say


def make_review_sheets(cluster_dir: Path, out_dir: Path, tiles_root: Path | None = None,
                       labels: Path | None = None, n_centre: int = 8, n_random: int = 8,
                       seed: int = 0, thumb: int = 96) -> ReviewSummary:
    """Write contact sheets, review.html and the clusters.yaml template for a `histosynth cluster` folder.

    `tiles_root`: the folder relative tile keys are resolved against (default: the one recorded by
    `histosynth cluster --tiles`, else the working directory).
    """
    if n_centre < 0 or n_random < 0 or n_centre + n_random == 0:
        raise InputError("--n-centre/--n-random: need at least one tile per sheet")
    meta, rows = read_assignments(Path(cluster_dir))
    k = int(meta["k"])
    if tiles_root is None and (meta.get("source") or {}).get("tiles"):
        tiles_root = Path(meta["source"]["tiles"])  # the folder given to `histosynth cluster --tiles`
    if tiles_root is not None and not Path(tiles_root).is_dir():
        raise InputError(f"--tiles: not a folder: {tiles_root}")
    label_table = read_tile_labels(Path(labels), what="--labels") if labels is not None else None
    suggestions = suggest_names(rows, label_table) if label_table is not None else {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = {c: 0 for c in range(k)}
    for r in rows:
        sizes[r["cluster"]] = sizes.get(r["cluster"], 0) + 1
    files: list[Path] = []
    cards: list[PageCluster] = []
    missing, shown = 0, 0
    for c in range(k):
        members = [r for r in rows if r["cluster"] == c]
        centre = sorted(members, key=lambda r: r["distance"])[:n_centre]
        rest = [r for r in members if r not in centre] if n_random else []
        pick = rng.choice(len(rest), size=min(n_random, len(rest)), replace=False) if rest else []
        sample = [rest[i] for i in sorted(pick)]
        share = 100 * len(members) / max(len(rows), 1)
        title = f"cluster {c}: {len(members)} tiles ({share:.1f}%)"
        if c in suggestions:
            title += f"  |  {suggestions[c]}"
        sheet, miss = contact_sheet(title, [
            ("nearest the centre", [_resolve(r["tile"], tiles_root) for r in centre]),
            ("random sample", [_resolve(r["tile"], tiles_root) for r in sample]),
        ], thumb=thumb)
        missing += miss
        shown += len(centre) + len(sample)
        png = _png(sheet)
        files.append(write_bytes(out_dir / f"cluster_{c}.png", png))
        cards.append(PageCluster(c, len(members), base64.b64encode(png).decode("ascii"),
                                 dict(suggestions[c].counts) if c in suggestions else {},
                                 str(suggestions[c]) if c in suggestions else ""))
    if shown and missing == shown:
        raise InputError(f"--tiles: none of the tiles could be read (first: {_resolve(rows[0]['tile'], tiles_root)});"
                         " give the folder the tile paths in assignments.csv are relative to")
    edits, note = _existing_edits(out_dir / "clusters.yaml", k, sizes)
    state = initial_state(k, edits, {r["tile"]: r["cluster"] for r in rows})
    # The page's label splits name this CSV; absolute, so `review apply` finds it from any folder.
    labels_path = str(Path(labels).resolve()) if labels is not None else None
    groups = meta.get("cluster_groups") or {}  # `cluster --within-labels`: cluster -> label group, as apply reads it
    cluster_labels = {int(c): str(v) for c, v in groups.items() if v is not None and v != UNLABELLED_GROUP}
    page = render_review_page(k, len(rows), str(meta.get("rule", "")), cards, state, labels_path, note=note,
                              cluster_labels=cluster_labels)
    write_text(out_dir / "review.html", page)
    template = out_dir / "clusters.yaml"
    if template.exists():  # never overwrite the expert's edits: a rerun writes the fresh template beside them
        template = out_dir / "clusters.template.yaml"
    write_text(template, template_yaml(k, sizes, suggestions))
    files += [out_dir / "review.html", template]
    if suggestions:
        data = {str(c): {"suggestion": str(s), "label": s.label, "votes": s.votes, "annotated": s.annotated,
                         "counts": s.counts} for c, s in suggestions.items()}
        files.append(write_json(out_dir / "suggestions.json", data))
    return ReviewSummary(k, sizes, suggestions, files, missing)

"""The interactive `review.html`: one self-contained page where the expert edits the clusters.

The page has no server and reaches no network: CSS and JS are inline, the contact sheets are data URIs.
Python renders every cluster (sheet, size, label statistics, the edit controls) as plain HTML, so the page
still reads as a static report without JS; the script keeps the expert's edits in one state object,
recomputes the resulting classes on every change with the rules of `review apply` (review/edits.py), and
writes the clusters.yaml that `histosynth review apply` reads (a Blob download, and a textarea to copy from).

Edits: rename, drop (`exclude`), merge, the label value a cluster stands for (`label`, `label_name`), and
splits (`splits`: `by: label` with the `--labels` CSV of `review sheets`, or `by: kmeans` into n parts).
A merged group shares one name, drop flag, label and split, so the page never writes a group that breaks
rule 2 of `review apply`. Label-split classes are previewed with the clusters' label counts; k-means parts
are sized only by `review apply`.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Any

from histosynth.review.edits import ReviewEdits


@dataclass
class PageCluster:
    """One cluster as the page shows it."""

    id: int
    size: int  # tiles in assignments.csv
    sheet_png_base64: str  # the contact sheet (cluster_<id>.png)
    label_counts: dict[str, int] = field(default_factory=dict)  # annotated tiles per label value (with --labels)
    suggestion: str = ""  # e.g. "label 1: 34/40 (85%)"


def _split_state(split: Any) -> dict[str, Any]:
    """A clusters.yaml split as page state; fields the page has no control for travel along unchanged."""
    out: dict[str, Any] = {"by": split.by, "class_names": {str(k): v for k, v in split.class_names.items()}}
    if split.by == "label":
        out.update(labels=split.labels, column=split.column, file_column=split.file_column,
                   unlabelled=split.unlabelled)
    else:
        out.update(n=split.n, seed=split.seed, part_names={str(k): v for k, v in split.names.items()})
    return out


def initial_state(k: int, edits: ReviewEdits | None, cluster_of: dict[str, int]) -> dict[str, Any]:
    """The page's starting edits: the template's defaults, or those of an existing clusters.yaml.

    `cluster_of` maps tile keys to their cluster, so a kept move can shift a tile count from its source;
    as in the template, a cluster with no tiles starts excluded.
    """
    sizes = {c: 0 for c in range(k)}
    for c in cluster_of.values():
        sizes[c] = sizes.get(c, 0) + 1
    state: dict[str, Any] = {"names": [f"cluster_{c}" for c in range(k)], "exclude": [sizes[c] == 0 for c in range(k)],
                             "label": [None] * k, "merges": [], "moves": [], "split": [None] * k,
                             "value_names": {}}
    if edits is None:
        return state
    for c, e in edits.clusters.items():
        state["names"][c], state["exclude"][c] = e.name, bool(e.exclude)
        label = getattr(e, "label", None)
        state["label"][c] = None if label is None else str(label)
        if label is not None and getattr(e, "label_name", None):
            state["value_names"].setdefault(str(label), e.label_name)
    state["merges"] = [sorted(set(g)) for g in edits.merges]
    state["moves"] = [{"tile": m.tile, "to": m.to, "from": cluster_of.get(m.tile, -1)} for m in edits.moves]
    group_of = {c: g for g in state["merges"] for c in g}
    for split in getattr(edits, "splits", []):
        if not 0 <= split.cluster < k:
            continue  # `review apply` names the bad id; the page cannot show a cluster that is not there
        for c in group_of.get(split.cluster, [split.cluster]):
            state["split"][c] = _split_state(split)
        if split.by == "label":
            for value, name in split.names.items():
                state["value_names"].setdefault(str(value), name)
    return state


def _json_script(data: Any) -> str:
    # "<" escaped so that no string in the data can close the script element early.
    return json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")


def _label_table(c: PageCluster) -> str:
    if not c.label_counts:
        return ""
    annotated = sum(c.label_counts.values())
    labels = "".join(f'<th scope="col" class="num">{html.escape(label)}</th>' for label in c.label_counts)
    counts = "".join(f'<td class="num">{n} ({100 * n / annotated:.0f}%)</td>' for n in c.label_counts.values())
    return (f'<table class="labels"><thead><tr><th scope="row">label</th>{labels}</tr></thead>'
            f'<tbody><tr><th scope="row">of {annotated} annotated</th>{counts}</tr></tbody></table>')


def _card(c: PageCluster, total: int, state: dict[str, Any], values: list[str], labels_given: bool,
          group_label: str | None) -> str:
    share = 100 * c.size / max(total, 1)
    name = html.escape(state["names"][c.id], quote=True)
    checked = " checked" if state["exclude"][c.id] else ""
    suggestion = f" &middot; suggestion {html.escape(c.suggestion)}" if c.suggestion else ""
    # A cluster of a `cluster --within-labels` run stands for its label group unless the expert says otherwise.
    none = f"its label group ({html.escape(group_label)})" if group_label is not None else "none"
    label_options = "".join(f'<option value="{html.escape(v, quote=True)}">{html.escape(v)}</option>' for v in values)
    label_field = (f'<span class="field"><label for="label-{c.id}">Stands for label</label>'
                   f'<select id="label-{c.id}" data-cluster="{c.id}" class="label">'
                   f'<option value="">{none}</option>{label_options}</select></span>') if values else ""
    by_label = '<option value="label">by label, one class per value</option>' if labels_given else ""
    return f"""
<section class="cluster" id="cluster-{c.id}" aria-labelledby="title-{c.id}">
  <div class="head">
    <h2 id="title-{c.id}">Cluster {c.id} <span class="badge" id="badge-{c.id}"></span></h2>
    <p class="facts"><strong>{c.size}</strong> tiles ({share:.1f}% of all){suggestion}</p>
    {_label_table(c)}
  </div>
  <fieldset class="controls">
    <legend>Edit cluster {c.id}</legend>
    <span class="field"><label for="name-{c.id}">Class name</label>
      <input type="text" id="name-{c.id}" data-cluster="{c.id}" class="name" value="{name}" autocomplete="off"
        spellcheck="false" aria-describedby="name-help"></span>
    <span class="field"><input type="checkbox" id="drop-{c.id}" data-cluster="{c.id}" class="drop"{checked}>
      <label for="drop-{c.id}">Drop (exclude from training)</label></span>
    <span class="field"><input type="checkbox" id="select-{c.id}" data-cluster="{c.id}" class="select">
      <label for="select-{c.id}">Select for merging</label></span>
    {label_field}
    <span class="field"><label for="split-{c.id}">Split</label>
      <select id="split-{c.id}" data-cluster="{c.id}" class="split">
        <option value="">no split</option>{by_label}
        <option value="kmeans">into n sub-clusters (k-means)</option>
      </select></span>
    <span class="field" id="split-n-box-{c.id}" hidden><label for="split-n-{c.id}">Sub-clusters (n)</label>
      <input type="number" id="split-n-{c.id}" data-cluster="{c.id}" class="split-n short" min="2" step="1"
        value="2"></span>
    <span class="field" id="split-keep-box-{c.id}" hidden><input type="checkbox" id="split-keep-{c.id}"
      data-cluster="{c.id}" class="split-keep"><label for="split-keep-{c.id}">Keep unlabelled tiles as a
      class</label></span>
    <span class="split-count" id="split-count-{c.id}"></span>
    <span class="field group" id="group-{c.id}" hidden><span id="group-text-{c.id}"></span>
      <button type="button" class="secondary unmerge" id="unmerge-{c.id}" data-cluster="{c.id}">Unmerge
        cluster {c.id}</button></span>
  </fieldset>
  <img src="data:image/png;base64,{c.sheet_png_base64}" alt="Contact sheet of cluster {c.id}: the tiles nearest
    its centre, then a random sample of its tiles">
</section>"""


def _value_names(values: list[str], state: dict[str, Any]) -> str:
    if not values:
        return ""
    fields = "".join(
        f'<span class="field"><label for="value-name-{i}">Label {html.escape(v)}</label>'
        f'<input type="text" id="value-name-{i}" class="value-name"'
        f' data-value="{html.escape(v, quote=True)}"'
        f' value="{html.escape(state["value_names"].get(v, ""), quote=True)}" autocomplete="off" spellcheck="false"'
        f' placeholder="name (optional)"></span>' for i, v in enumerate(values))
    return f"""
<section id="values" aria-labelledby="values-title">
  <h2 id="values-title">Label values</h2>
  <p class="hint">Name the values of the <code>--labels</code> column (e.g. 0: normal, 1: tumour). A split by label
    makes classes <code>&lt;class&gt;_&lt;name&gt;</code>, and a cluster that stands for a label records its name.</p>
  <div class="fields">{fields}</div>
</section>"""


_CSS = """
:root{--fg:#1b1b1f;--muted:#4a4a55;--accent:#0a58a8;--bad:#a30d0d;--ok:#14622b;--card:#f6f6f8;--line:#c9c9d2}
*{box-sizing:border-box}
[hidden]{display:none!important}
body{margin:0;font:16px/1.45 system-ui,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;color:var(--fg);background:#fff}
a{color:var(--accent)}
:focus-visible{outline:3px solid #d9480f;outline-offset:2px}
.skip{position:absolute;left:-10000px;top:8px;background:#fff;padding:6px 10px;z-index:10}
.skip:focus{left:8px}
header{padding:8px 20px;border-bottom:1px solid var(--line)}
header h1{font-size:1.3rem;margin:0 0 2px}
header p,header details{margin:2px 0;color:var(--muted);font-size:.95rem}
code{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:.9em;background:#eef0f4;padding:0 3px;
  border-radius:3px}
.layout{display:grid;grid-template-columns:minmax(0,1fr) 380px;gap:18px;padding:14px 20px;align-items:start}
main h2{font-size:1.15rem;margin:0 0 4px}
.cluster{background:var(--card);border:1px solid var(--line);border-left:6px solid var(--accent);border-radius:6px;
  padding:10px 14px;margin-bottom:16px}
.cluster.dropped{border-left-color:#8a8a96;
  background:repeating-linear-gradient(135deg,#f1f1f3 0 12px,#e9e9ed 12px 24px)}
.cluster.merged{border-left-color:#7b3fb3}
.head{display:flex;flex-wrap:wrap;gap:4px 18px;align-items:baseline}
.facts{margin:2px 0}
.cluster img{max-width:100%;height:auto;display:block;border:1px solid var(--line);background:#fff;margin-top:8px}
.badge{font-size:.85rem;font-weight:600;padding:1px 8px;border-radius:10px;background:#dde8f6;color:#08386b;
  margin-left:6px;white-space:nowrap}
.badge.dropped{background:#e3e3e8;color:#33333b}
.badge.bad{background:#fbe0e0;color:var(--bad)}
fieldset.controls{border:1px solid var(--line);border-radius:4px;margin:6px 0 0;padding:6px 10px 10px;
  display:flex;flex-wrap:wrap;gap:8px 20px;align-items:center;background:#fff}
fieldset.controls legend{font-weight:600;padding:0 4px}
.field{display:inline-flex;gap:6px;align-items:center}
input[type=text],input[type=number],select{font:inherit;padding:4px 6px;border:1px solid #767680;border-radius:4px;
  background:#fff;color:var(--fg)}
input[type=text]{width:14em}
input[type=checkbox]{width:18px;height:18px;margin:0}
input[aria-invalid=true]{border-color:var(--bad);box-shadow:0 0 0 2px #f3b4b4}
button,.button{font:inherit;padding:5px 12px;border:1px solid var(--accent);background:var(--accent);color:#fff;
  border-radius:4px;cursor:pointer;text-decoration:none;display:inline-block}
button.secondary{background:#fff;color:var(--accent)}
button:disabled{background:#d5d5dc;border-color:#a5a5b0;color:#3b3b44;cursor:not-allowed}
aside{position:sticky;top:0;max-height:100vh;overflow:auto;padding:4px 2px 16px}
aside h2{font-size:1.1rem;margin:8px 0 4px}
aside section{margin-bottom:12px}
table{border-collapse:collapse;width:100%;font-size:.93rem}
caption{text-align:left;font-size:.9rem;color:var(--muted);padding-bottom:2px}
th,td{border-bottom:1px solid var(--line);padding:3px 5px;text-align:left;vertical-align:top}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.mix{font-size:.85rem}
table.labels{width:auto;background:#fff;font-size:.88rem}
table.labels th[scope=row]{font-weight:normal;color:var(--muted)}
.summary{margin:2px 0 6px;color:var(--muted)}
#problems{color:var(--bad);margin:4px 0;padding-left:1.2em}
#problems a{color:var(--bad)}
#problems:empty{display:none}
#no-problems{margin:4px 0;color:var(--ok)}
#status,#save-status{margin:6px 0;color:var(--ok)}
#status:empty,#save-status:empty{display:none}
.actions{display:flex;flex-wrap:wrap;gap:8px;align-items:center}
textarea{width:100%;height:210px;font:13px/1.35 ui-monospace,"DejaVu Sans Mono",monospace;margin-top:4px;
  white-space:pre;overflow-wrap:normal;overflow:auto}
.hint{font-size:.88rem;color:var(--muted);margin:4px 0}
.split-count{font-size:.9rem;color:var(--muted)}
input.short{width:5em}
#values{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:8px 14px;margin-bottom:16px}
#values .fields{display:flex;flex-wrap:wrap;gap:8px 24px}
td.unknown{color:var(--muted);font-style:italic}
"""

# The script. It mirrors edits.apply_review: merge groups led by their smallest id, a default name
# cluster_<id> yields to a given one, splits cut a kept class, classes get ids in the sorted order of names.
_JS = r"""
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("review-data").textContent);
  const K = data.k;
  const BAD_NAME = /[\/\\:*?"<>|]/;
  const init = data.initial;
  const state = {
    names: init.names.slice(),
    exclude: init.exclude.slice(),
    label: init.label.slice(),
    merges: init.merges.map(g => g.slice()),
    moves: init.moves.slice(),
    split: init.split.map(s => (s ? JSON.parse(JSON.stringify(s)) : null)),
    valueNames: Object.assign({}, init.value_names),
  };
  const $ = id => document.getElementById(id);
  const clusters = data.clusters;
  let blobUrl = null;

  const defaultName = c => "cluster_" + c;
  const groupOf = c => state.merges.find(g => g.includes(c)) || null;
  const membersOf = c => (groupOf(c) || [c]).slice().sort((a, b) => a - b);
  const q = s => JSON.stringify(s);  // a JSON string is a YAML double-quoted scalar
  // Python compares str by code point; JS's < compares UTF-16 units, which differ above U+FFFF.
  const byCodePoint = (a, b) => {
    const x = Array.from(a), y = Array.from(b);
    for (let i = 0; i < Math.min(x.length, y.length); i++) {
      const d = x[i].codePointAt(0) - y[i].codePointAt(0);
      if (d) return d;
    }
    return x.length - y.length;
  };
  const usable = n => n.trim() !== "" && !BAD_NAME.test(n);
  const groupLabel = c => (c in data.cluster_labels ? data.cluster_labels[c] : null);
  const valueName = v => (state.valueNames[v] || "").trim();
  // A label split is previewed from the clusters' counts only when it reads the page's own --labels CSV.
  const ownCsv = sp => sp.labels === data.labels_path && sp.column === "label" && sp.file_column === "file";

  // The classes `review apply` would make, and every rule the edits break (each with a control to focus).
  function computeClasses() {
    const problems = [];
    const problem = (focus, text) => problems.push({focus, text});
    for (let c = 0; c < K; c++) {
      const n = state.names[c];
      if (!usable(n)) problem("name-" + c, "Cluster " + c + ": " + q(n) +
        " is not a usable class name (non-empty, none of / \\ : * ? \" < > |).");
    }
    const leader = [];
    for (let c = 0; c < K; c++) leader.push(Math.min(...membersOf(c)));
    const groups = new Map();
    for (let c = 0; c < K; c++) {
      if (!groups.has(leader[c])) groups.set(leader[c], []);
      groups.get(leader[c]).push(c);
    }
    const name = new Map(), label = new Map();
    for (const [lead, group] of groups) {
      const given = [...new Set(group.filter(c => state.names[c] !== defaultName(c)).map(c => state.names[c]))];
      if (given.length > 1) problem("name-" + lead, "Merged clusters " + group.join(", ") +
        " have different names (" + given.join(", ") + "); give them one name.");
      name.set(lead, given.length ? given[0] : state.names[lead]);
      const dropped = group.filter(c => state.exclude[c]);
      if (dropped.length && dropped.length !== group.length)
        problem("drop-" + lead, "Merged clusters " + group.join(", ") + ": drop all of them or none.");
      const labels = [...new Set(group.map(c => state.label[c]).filter(v => v !== null))];
      if (labels.length > 1) problem("label-" + lead, "Merged clusters " + group.join(", ") +
        " stand for different labels (" + labels.join(", ") + "); give them one.");
      // No label given: the label group of `cluster --within-labels`, when the whole group shares one.
      const inherited = [...new Set(group.map(c => groupLabel(c)))];
      label.set(lead, labels.length ? labels[0] : inherited.length === 1 ? inherited[0] : null);
    }
    const size = clusters.map(c => c.size);
    state.moves.forEach((m, i) => {
      if (m.from < 0 || m.to < 0 || m.to >= K) {
        problem("yaml", "moves[" + i + "]: tile " + m.tile + " or cluster " + m.to + " is not in this clustering; " +
          "remove the move from clusters.yaml.");
        return;
      }
      if (state.exclude[m.to]) problem("drop-" + m.to, "moves[" + i + "] puts a tile into dropped cluster " + m.to +
        "; keep the cluster or remove the move from clusters.yaml.");
      size[m.from] -= 1;
      size[m.to] += 1;
    });
    const kept = [...groups.keys()].filter(lead => !state.exclude[lead]);
    if (!kept.length) problem("drop-0", "Every cluster is dropped; nothing is left to train on.");
    let excludedTiles = 0;
    for (let c = 0; c < K; c++) if (state.exclude[leader[c]]) excludedTiles += size[c];

    const parts = [];  // {name, focus, clusters, tiles (null: known after apply), total, counts, label, lead}
    for (const lead of kept) {
      const group = groups.get(lead);
      const base = name.get(lead);
      const tiles = group.reduce((s, c) => s + size[c], 0);
      const counts = {};
      for (const c of group) for (const [v, n] of Object.entries(clusters[c].counts)) counts[v] = (counts[v] || 0) + n;
      if (!tiles) problem("drop-" + lead, "Class " + q(base) + " has no tiles; drop it.");
      const sp = state.split[lead];
      const common = {clusters: group, lead, focus: "split-" + lead};
      if (!sp) {
        parts.push({...common, name: base, focus: "name-" + lead, tiles, counts, label: label.get(lead)});
      } else if (sp.by === "label" && ownCsv(sp)) {
        const values = Object.keys(counts).sort(byCodePoint);
        if (!values.length) problem("split-" + lead, "Cluster " + lead + ": none of its tiles has a label; " +
          "it cannot be split by label.");
        for (const v of values) {
          const n = sp.class_names[v] || base + "_" + (valueName(v) || v);
          parts.push({...common, name: n, tiles: counts[v], counts: {[v]: counts[v]}, label: v, split: true,
                      focus: valueName(v) ? "value-name-" + data.values.indexOf(v) : "split-" + lead});
        }
        const unlabelled = tiles - values.reduce((s, v) => s + counts[v], 0);
        if (unlabelled > 0 && sp.unlabelled === "keep")
          parts.push({...common, name: base + "_unlabelled", tiles: unlabelled, counts: {}, label: label.get(lead)});
        else excludedTiles += Math.max(unlabelled, 0);
      } else if (sp.by === "label") {
        parts.push({...common, name: base + "_<value>", tiles: null, total: tiles, counts: {}, label: null,
                    unknown: "split by " + sp.column + " in " + sp.labels});
      } else {
        const n = Number(sp.n);
        if (!Number.isInteger(n) || n < 2 || n > tiles) {
          problem("split-n-" + lead, "Cluster " + lead + ": n = " + sp.n + " sub-clusters; use 2.." + tiles + ".");
          continue;
        }
        for (let i = 0; i < n; i++)
          parts.push({...common, name: sp.class_names[i] || base + "_" + (sp.part_names[i] || i), tiles: null,
                      total: tiles, counts: null, label: label.get(lead), unknown: "k-means part " + i});
      }
    }
    const byName = new Map();
    for (const p of parts) {
      if (p.unknown && p.tiles === null && p.name.endsWith("_<value>")) continue;
      if (!usable(p.name)) problem(p.focus, "Class " + q(p.name) + " (from cluster " + p.lead +
        ") is not a usable class name (none of / \\ : * ? \" < > |).");
      if (byName.has(p.name)) {
        const other = byName.get(p.name);
        problem(p.focus, "Clusters " + other.lead + " and " + p.lead + " both make class " + q(p.name) + ": " +
          (other.focus.startsWith("name-") && p.focus.startsWith("name-") ?
            "select both and merge them, or rename one." : "rename one of them."));
      } else byName.set(p.name, p);
    }
    parts.sort((a, b) => byCodePoint(a.name, b.name) || a.lead - b.lead);
    parts.forEach((p, id) => { p.id = id; });
    const partsOf = {};
    for (const p of parts) for (const c of p.clusters) (partsOf[c] = partsOf[c] || []).push(p);
    return {parts, partsOf, problems, excludedTiles};
  }

  function splitYaml(lead) {
    const sp = state.split[lead];
    const items = ["cluster: " + lead, "by: " + sp.by];
    const mapping = obj => "{" + Object.entries(obj).map(([k, v]) => q(k) + ": " + q(v)).join(", ") + "}";
    if (sp.by === "label") {
      items.push("labels: " + q(sp.labels));
      if (sp.column !== "label") items.push("column: " + q(sp.column));
      if (sp.file_column !== "file") items.push("file_column: " + q(sp.file_column));
      items.push("unlabelled: " + sp.unlabelled);
      const names = {};
      const counts = {};
      for (const c of membersOf(lead)) for (const v of Object.keys(clusters[c].counts)) counts[v] = true;
      // Names for the values the page knows in this class (they are values of the CSV's column).
      for (const v of data.values) if (valueName(v) && (counts[v] || !ownCsv(sp))) names[v] = valueName(v);
      if (Object.keys(names).length) items.push("names: " + mapping(names));
    } else {
      items.push("n: " + Number(sp.n));
      if (sp.seed) items.push("seed: " + sp.seed);
      if (Object.keys(sp.part_names).length) items.push("names: " + mapping(sp.part_names));
    }
    if (Object.keys(sp.class_names).length) items.push("class_names: " + mapping(sp.class_names));
    return "  - {" + items.join(", ") + "}";
  }

  // clusters.yaml as edits.load_edits reads it.
  function toYaml(result) {
    const lines = ["# Expert review of the clusters, written by review.html; " +
      "`histosynth review apply` reads this file."];
    for (const p of result.problems) lines.push("# NOT READY: " + p.text.replace(/\n/g, " "));
    lines.push("clusters:");
    for (let c = 0; c < K; c++) {
      const got = result.partsOf[c] || [];
      let entry = "name: " + q(state.names[c]) + ", exclude: " + state.exclude[c];
      const v = state.label[c];
      if (v !== null) entry += ", label: " + q(v) + (valueName(v) ? ", label_name: " + q(valueName(v)) : "");
      const note = clusters[c].size + " tiles; " + (state.exclude[c] ? "dropped" : got.length === 1 ?
        "class " + got[0].name : "split into " + got.length + " classes");
      lines.push("  " + c + ": {" + entry + "}  # " + note.replace(/\n/g, " "));
    }
    const merges = state.merges.map(g => "[" + g.slice().sort((a, b) => a - b).join(", ") + "]");
    lines.push("merges: [" + merges.join(", ") + "]");
    if (!state.moves.length) lines.push("moves: []");
    else {
      lines.push("moves:");
      for (const m of state.moves) lines.push("  - {tile: " + q(m.tile) + ", to: " + m.to + "}");
    }
    const leads = [];
    for (let c = 0; c < K; c++) if (state.split[c] && Math.min(...membersOf(c)) === c) leads.push(c);
    if (leads.length) {  // written only when used, so a file without splits stays in the older format
      lines.push("splits:");
      for (const lead of leads) lines.push(splitYaml(lead));
    }
    return lines.join("\n") + "\n";
  }

  // "= 1 tumour" for the label a class stands for, then the label shares of its annotated tiles
  // (left out for a label-split class, where they are 100% of its own value).
  function labelMix(p) {
    const own = p.label === null || p.label === undefined ? "" :
      "= " + p.label + (valueName(p.label) ? " " + valueName(p.label) : "");
    const entries = p.counts ? Object.entries(p.counts) : [];
    const total = entries.reduce((s, [, n]) => s + n, 0);
    if (!total || (own && entries.length === 1 && entries[0][0] === p.label && p.split)) return own;
    const mix = entries.map(([l, n]) => l + ": " + Math.round(100 * n / total) + "%").join(" · ");
    return own ? own + "; " + mix : mix;
  }

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  function render() {
    const result = computeClasses();
    const body = $("classes-body");
    body.replaceChildren();
    for (const p of result.parts) {
      const tr = document.createElement("tr");
      cell(tr, String(p.id), "num");
      cell(tr, p.name);
      const td = cell(tr, "");
      p.clusters.forEach((c, i) => {
        if (i) td.append(", ");
        const a = document.createElement("a");
        a.href = "#cluster-" + c;
        a.textContent = String(c);
        td.appendChild(a);
      });
      if (p.tiles === null) {
        const u = cell(tr, "part of " + p.total, "num unknown");
        u.title = p.unknown + ": sizes are known after review apply";
      } else cell(tr, String(p.tiles), "num");
      if (data.labels_path || data.values.length) cell(tr, labelMix(p), "mix");
      body.appendChild(tr);
    }
    $("summary").textContent = result.parts.length + " classes from " + K + " clusters; " +
      result.excludedTiles + " of " + data.total + " tiles dropped" +
      (result.parts.some(p => p.tiles === null) ? " (k-means parts are sized by review apply)." : ".");
    const list = $("problems");
    list.replaceChildren();
    for (const p of result.problems) {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = "#" + p.focus;
      a.textContent = p.text;
      a.addEventListener("click", ev => { ev.preventDefault(); const el = $(p.focus); if (el) el.focus(); });
      li.appendChild(a);
      list.appendChild(li);
    }
    $("no-problems").hidden = result.problems.length > 0;
    const bad = new Set(result.problems.map(p => p.focus));
    document.querySelectorAll("input[type=text], input[type=number], select").forEach(el => {
      el.setAttribute("aria-invalid", bad.has(el.id) ? "true" : "false");
    });
    for (let c = 0; c < K; c++) {
      const input = $("name-" + c);
      if (input.value !== state.names[c]) input.value = state.names[c];
      $("drop-" + c).checked = state.exclude[c];
      if ($("label-" + c)) $("label-" + c).value = state.label[c] === null ? "" : state.label[c];
      const sp = state.split[c];
      $("split-" + c).value = sp ? sp.by : "";
      $("split-n-box-" + c).hidden = !sp || sp.by !== "kmeans";
      $("split-keep-box-" + c).hidden = !sp || sp.by !== "label";
      if (sp && sp.by === "kmeans" && String($("split-n-" + c).value) !== String(sp.n)) $("split-n-" + c).value = sp.n;
      if (sp && sp.by === "label") $("split-keep-" + c).checked = sp.unlabelled === "keep";
      const got = result.partsOf[c] || [];
      $("split-count-" + c).textContent = sp && !state.exclude[c] ? "makes " + got.length + " classes" : "";
      const badge = $("badge-" + c);
      badge.className = "badge" + (got.length ? "" : " dropped");
      badge.textContent = state.exclude[c] ? "dropped" : got.length === 1 ? "class " + got[0].id + ": " + got[0].name :
        "split into " + got.length + " classes";
      const group = groupOf(c);
      const card = $("cluster-" + c);
      card.classList.toggle("dropped", state.exclude[c]);
      card.classList.toggle("merged", !!group);
      $("group-" + c).hidden = !group;
      if (group) $("group-text-" + c).textContent = "Merged with cluster" + (group.length > 2 ? "s " : " ") +
        group.filter(x => x !== c).sort((a, b) => a - b).join(", ") + ".";
    }
    const selected = selectedClusters();
    const merge = $("merge");
    merge.disabled = selected.length < 2;
    merge.textContent = selected.length < 2 ? "Merge selected clusters" : "Merge clusters " + selected.join(", ");
    $("yaml").value = toYaml(result);
    $("save").disabled = result.problems.length > 0;
    $("save-hint").textContent = result.problems.length ?
      "Fix the problems above to save." : "Downloads clusters.yaml; the text below is the same file.";
    return result;
  }

  function selectedClusters() {
    const out = [];
    for (let c = 0; c < K; c++) if ($("select-" + c).checked) out.push(c);
    return out;
  }

  function say(text) { $("status").textContent = text; $("save-status").textContent = ""; }

  // A merged group shares one name, drop flag, label and split, so the edits never break rule 2 of review apply.
  function setAll(key, c, value) {
    for (const m of membersOf(c)) state[key][m] = value && typeof value === "object" ?
      JSON.parse(JSON.stringify(value)) : value;
  }

  function newSplit(by, c) {
    if (by === "label") return {by, labels: data.labels_path, column: "label", file_column: "file",
                                unlabelled: "exclude", class_names: {}};
    if (by === "kmeans") return {by, n: 2, seed: 0, part_names: {}, class_names: {}};
    return null;
  }

  function merge() {
    const selected = selectedClusters();
    if (selected.length < 2) return;
    const all = new Set(selected);
    for (const c of selected) for (const m of membersOf(c)) all.add(m);
    const group = [...all].sort((a, b) => a - b);
    const dropped = group.filter(c => state.exclude[c]);
    if (dropped.length && dropped.length !== group.length) {
      say("Not merged: clusters " + dropped.join(", ") + " are dropped and the others are not; " +
        "drop all of them or none first.");
      return;
    }
    const given = group.filter(c => state.names[c] !== defaultName(c)).map(c => state.names[c]);
    const name = given.length ? given[0] : defaultName(group[0]);
    const label = group.map(c => state.label[c]).find(v => v !== null);
    const split = group.map(c => state.split[c]).find(s => s);
    state.merges = state.merges.filter(g => !g.some(c => all.has(c)));
    state.merges.push(group);
    setAll("names", group[0], name);
    setAll("label", group[0], label === undefined ? null : label);
    setAll("split", group[0], split || null);
    for (let c = 0; c < K; c++) $("select-" + c).checked = false;
    render();
    say("Merged clusters " + group.join(", ") + " into class " + q(name) + ".");
  }

  function unmerge(c) {
    const group = groupOf(c);
    if (!group) return;
    const rest = group.filter(x => x !== c);
    state.merges = state.merges.filter(g => g !== group);
    if (rest.length >= 2) state.merges.push(rest);
    // The cluster leaves with its default name and no split, so it does not clash with the group it left.
    if (state.names[c] === state.names[rest[0]]) state.names[c] = defaultName(c);
    state.split[c] = null;
    render();
    $("name-" + c).focus();
    say("Cluster " + c + " is no longer merged; it is named " + state.names[c] + ".");
  }

  function save() {
    const result = render();
    if (result.problems.length) {
      say("");
      $("problems-title").focus();
      return;
    }
    if (blobUrl) URL.revokeObjectURL(blobUrl);
    blobUrl = URL.createObjectURL(new Blob([$("yaml").value], {type: "application/x-yaml"}));
    const link = $("download");
    link.href = blobUrl;
    link.hidden = false;
    link.click();
    say("");
    $("save-status").textContent = "Saved clusters.yaml (" + result.parts.length + " classes). Put it in the " +
      "review folder and run histosynth review apply.";
  }

  function copy() {
    const area = $("yaml");
    area.focus();
    area.select();
    const tell = ok => { $("save-status").textContent = ok ? "Copied clusters.yaml to the clipboard." :
      "Copy failed: the text is selected, copy it with Ctrl+C."; };
    // file:// pages are not a secure context in every browser; execCommand is the fallback there.
    if (navigator.clipboard && window.isSecureContext)
      navigator.clipboard.writeText(area.value).then(() => tell(true), () => tell(false));
    else tell(document.execCommand("copy"));
  }

  document.addEventListener("input", ev => {
    const t = ev.target, c = +t.dataset.cluster;
    if (t.classList.contains("name")) setAll("names", c, t.value);
    else if (t.classList.contains("value-name")) state.valueNames[t.dataset.value] = t.value;
    else if (t.classList.contains("split-n") && state.split[c]) {
      for (const m of membersOf(c)) state.split[m].n = t.value === "" ? "" : Number(t.value);
    } else return;
    render();
    say("");
  });
  document.addEventListener("change", ev => {
    const t = ev.target, c = +t.dataset.cluster;
    const who = () => { const m = membersOf(c); return m.length > 1 ? "Clusters " + m.join(", ") + " are " :
      "Cluster " + c + " is "; };
    if (t.classList.contains("drop")) {
      setAll("exclude", c, t.checked);
      render();
      say(who() + (t.checked ? "dropped." : "kept."));
    } else if (t.classList.contains("label")) {
      setAll("label", c, t.value === "" ? null : t.value);
      render();
    } else if (t.classList.contains("split")) {
      setAll("split", c, newSplit(t.value, c));
      render();
      const got = (computeClasses().partsOf[c] || []).length;
      say(t.value ? who().replace(/ (is|are) $/, "") + " split into " + got + " classes." : who() + "not split.");
    } else if (t.classList.contains("split-keep") && state.split[c]) {
      for (const m of membersOf(c)) state.split[m].unlabelled = t.checked ? "keep" : "exclude";
      render();
    } else if (t.classList.contains("select")) render();
  });
  document.addEventListener("click", ev => {
    const t = ev.target;
    if (t.classList && t.classList.contains("unmerge")) unmerge(+t.dataset.cluster);
  });
  $("merge").addEventListener("click", merge);
  $("save").addEventListener("click", save);
  $("copy").addEventListener("click", copy);
  render();
})();
"""


def render_review_page(k: int, total: int, rule: str, cards: list[PageCluster], state: dict[str, Any],
                       labels_path: str | None, note: str = "", cluster_labels: dict[int, str] | None = None) -> str:
    """The whole review.html: cluster cards, the live class table, and the clusters.yaml to save.

    `labels_path`: the `--labels` CSV (absolute), which label splits name; None disables them.
    `cluster_labels`: cluster id -> its label group from `cluster --within-labels` (the default label).
    """
    cluster_labels = cluster_labels or {}
    values = sorted({v for c in cards for v in c.label_counts} | {v for v in state["label"] if v is not None}
                    | set(cluster_labels.values()))
    data = {"k": k, "total": total, "labels_path": labels_path, "values": values, "initial": state,
            "cluster_labels": {str(c): v for c, v in cluster_labels.items()},
            "clusters": [{"id": c.id, "size": c.size, "counts": c.label_counts} for c in cards]}
    label_head = '<th scope="col">label</th>' if labels_path or values else ""
    note_html = f"<p>{html.escape(note)}</p>" if note else ""
    label_caption = (" label: = the value a class stands for; the label shares of its annotated tiles."
                     if label_head else "")
    cards_html = "".join(_card(c, total, state, values, labels_path is not None, cluster_labels.get(c.id))
                         for c in cards)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>histosynth cluster review (K = {k})</title>
<style>{_CSS}</style></head>
<body>
<a class="skip" href="#classes-title">Skip to the resulting classes and Save</a>
<header>
  <h1>Cluster review: K = {k}, {total} tiles</h1>
  <p>Name each cluster (the name becomes the class name), drop background and artefacts, select the clusters of
    one tissue type and merge them, split a mixed one; the classes on the right follow every edit. Save
    <code>clusters.yaml</code>, then run <code>histosynth review apply clusters.yaml --clusters DIR --out
    label_map.yaml</code>.</p>
  <details><summary>How K was chosen</summary><p>{html.escape(rule) or "not recorded"}</p></details>
  {note_html}
</header>
<div class="layout">
<main>
{_value_names(values, state)}
{cards_html}
</main>
<aside aria-label="Resulting classes and save">
  <section>
    <h2 id="classes-title" tabindex="-1">Resulting classes</h2>
    <p class="summary" id="summary" aria-live="polite"></p>
    <table>
      <caption>Class ids follow the sorted names, as review apply numbers them.{label_caption}</caption>
      <thead><tr><th scope="col" class="num">id</th><th scope="col">name</th><th scope="col">clusters</th>
        <th scope="col" class="num">tiles</th>{label_head}</tr></thead>
      <tbody id="classes-body"></tbody>
    </table>
  </section>
  <section aria-labelledby="problems-title">
    <h2 id="problems-title" tabindex="-1">Problems</h2>
    <p id="no-problems">None: ready to save.</p>
    <ul id="problems"></ul>
  </section>
  <section aria-label="Edit actions">
    <div class="actions">
      <button type="button" id="merge" disabled>Merge selected clusters</button>
    </div>
    <p id="name-help" class="hint">Names: non-empty, none of / \\ : * ? " &lt; &gt; |. Merged clusters share one
      name, label and split, and are dropped together.</p>
    <p id="status" role="status" aria-live="polite"></p>
  </section>
  <section aria-labelledby="save-title">
    <h2 id="save-title">Save</h2>
    <div class="actions">
      <button type="button" id="save">Save clusters.yaml</button>
      <a id="download" class="button" download="clusters.yaml" href="#" hidden>Download again</a>
      <button type="button" class="secondary" id="copy">Copy text</button>
    </div>
    <p id="save-hint" class="hint"></p>
    <p id="save-status" role="status" aria-live="polite"></p>
    <label for="yaml">clusters.yaml</label>
    <textarea id="yaml" readonly spellcheck="false" wrap="off"></textarea>
  </section>
</aside>
</div>
<script type="application/json" id="review-data">{_json_script(data)}</script>
<script>{_JS}</script>
</body></html>
"""

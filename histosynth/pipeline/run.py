"""`histosynth train pipeline`: every training stage in order, in one run folder, resumable.

    RUN/01-tile/      tiles cut from data.slides (only when slides are given)
    RUN/02-vqgan/     the VQ-GAN run (vqgan.safetensors)
    RUN/03-encode/    the latent cache (latents/)
    RUN/04-ldm/       the unconditional LDM (unet.safetensors); skipped when `ldm: null`
    RUN/05-cluster/   IMC clustering, validity table, chosen K (imc_head.safetensors, assignments.csv)
    RUN/06-review/    contact sheets, clusters.yaml, and the final label_map.yaml + label_map_tiles.csv
    RUN/07-cldm/      the conditional LDM, fine-tuned from 04-ldm (unet.safetensors)
    RUN/08-export/    the bundle (bundle/) that `histosynth generate` reads

A stage writes `done.json` in its folder when it has finished; a rerun skips finished stages and starts at
the first unfinished one, which itself resumes from its own checkpoints. `done.json` records a fingerprint
of the stage's config: if the config changed since, the plan says so (delete the folder to redo a stage).
The review stage stops the run, unless `review.edits` gives the edited clusters.yaml or `auto`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from histosynth.configio import to_dict
from histosynth.errors import InputError
from histosynth.io import write_json, write_text
from histosynth.pipeline.config import PipelineConfig

DONE = "done.json"
LOG = "pipeline.log"
STAGE_NAMES = ("tile", "vqgan", "encode", "ldm", "cluster", "review", "cldm", "export")


def stage_dir(run_dir: Path, name: str) -> Path:
    """RUN/<NN-name>: the number is the stage's place in the full order, so folders keep their names."""
    return Path(run_dir) / f"{STAGE_NAMES.index(name) + 1:02d}-{name}"


@dataclass
class StagePlan:
    """One row of the plan: a stage, its folder, whether it is done, and what it produces."""

    name: str
    folder: Path
    status: str  # done | pending | done (config changed) | skipped
    outputs: list[Path]
    note: str = ""


@dataclass
class PipelineResult:
    """What `run_pipeline` did: the plan as it stood before the run, the stages run now, and why it stopped."""

    plan: list[StagePlan]
    ran: list[str] = field(default_factory=list)
    stopped_at: Optional[str] = None  # the stage that needs the user (review), None when complete
    message: str = ""
    bundle: Optional[Path] = None


def _fingerprint(section: Any) -> str:
    text = json.dumps(to_dict(section), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Pipeline:
    """The stages of one config in one run folder: their paths, configs and runners."""

    def __init__(self, config: PipelineConfig, run_dir: Path, progress: bool, log: Callable[[str], None]) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.log = log
        c = config
        if c.cldm.joint_imc and c.cluster.method != "imc":
            raise InputError("pipeline.cldm.joint_imc: needs cluster.method imc (the head is trained jointly)")
        self.names = [n for n in STAGE_NAMES if not (n == "tile" and c.data.slides is None)
                      and not (n == "ldm" and c.ldm is None)]
        d = {n: stage_dir(self.run_dir, n) for n in STAGE_NAMES}
        self.dirs = d
        self.tiles = d["tile"] / "tiles" if c.data.slides is not None else Path(c.data.tiles).resolve()
        self.vqgan = d["vqgan"] / "vqgan.safetensors"
        self.latents = d["encode"] / "latents"
        self.ldm_unet = d["ldm"] / "unet.safetensors"
        self.label_map = d["review"] / "label_map.yaml"
        self.tile_labels = d["review"] / "label_map_tiles.csv"
        self.imc_head = d["cluster"] / "imc_head.safetensors"
        self.cldm_unet = d["cldm"] / "unet.safetensors"
        self.bundle = d["export"] / "bundle"

    # ---- per-stage facts

    def outputs(self, name: str) -> list[Path]:
        d = self.dirs[name]
        return {
            "tile": [self.tiles, d / "tiles" / "tiles.csv"],
            "vqgan": [self.vqgan],
            "encode": [self.latents],
            "ldm": [self.ldm_unet],
            "cluster": [d / "assignments.csv", d / "validity.csv", d / "validity.png", self.imc_head],
            "review": [d / "review.html", self.label_map, self.tile_labels],
            "cldm": [self.cldm_unet],
            "export": [self.bundle],
        }[name]

    def section(self, name: str) -> Any:
        c = self.config
        return {"tile": c.data, "vqgan": c.vqgan, "encode": c.encode, "ldm": c.ldm, "cluster": c.cluster,
                "review": c.review, "cldm": c.cldm, "export": c.export}[name]

    def status(self, name: str) -> tuple[str, str]:
        done = self.dirs[name] / DONE
        if not done.is_file():
            note = ""
            if name == "review" and self.config.review.edits is None:
                note = "stops for expert review (review.edits is null)"
            return "pending", note
        try:
            record = json.loads(done.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return "pending", f"{DONE} unreadable; the stage runs again"
        if record.get("fingerprint") != _fingerprint(self.section(name)):
            return "done", f"config changed since; delete {self.dirs[name]} to redo it"
        return "done", ""

    def plan(self) -> list[StagePlan]:
        rows = []
        for name in STAGE_NAMES:
            if name not in self.names:
                rows.append(StagePlan(name, self.dirs[name], "skipped", [],
                                      "data.tiles given" if name == "tile" else "ldm: null"))
                continue
            status, note = self.status(name)
            rows.append(StagePlan(name, self.dirs[name], status, self.outputs(name), note))
        return rows

    def mark_done(self, name: str, summary: dict[str, Any]) -> None:
        record = {
            "stage": name,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "fingerprint": _fingerprint(self.section(name)),
            "outputs": [str(p) for p in self.outputs(name)],
            "summary": summary,
        }
        path = self.dirs[name] / DONE
        write_json(path, record, default=str)

    # ---- the stages; each returns a summary for done.json, or None to stop the pipeline

    def run_tile(self) -> dict[str, Any]:
        from histosynth.tiles.tiler import tile_sources

        # A rerun after an interruption replaces the earlier partial tiles (only those its tiles.csv lists).
        tile_config = replace(self.config.data.tile, overwrite=True)
        report = tile_sources(list(self.config.data.slides or []), self.tiles, tile_config,
                              show_progress=self.progress)
        if report.tiles_written == 0:
            raise InputError("pipeline.data.slides: no tile reached the tissue threshold; nothing to train on")
        return {"tiles": report.tiles_written, "skipped_sources": [str(s.source) for s in report.skipped]}

    def run_vqgan(self) -> dict[str, Any]:
        from histosynth.autoencoder.train import train_vqgan

        result = train_vqgan(self.config.vqgan_config(self.tiles), self.dirs["vqgan"], resume=True,
                             show_progress=self.progress)
        return {"step": result.step, "val": result.val_metrics, "train_tiles": result.train_tiles}

    def run_encode(self) -> dict[str, Any]:
        from histosynth.autoencoder.latents import encode_tiles

        vq = self.config.vqgan_config(self.tiles)
        e = self.config.encode
        cache = encode_tiles(self.vqgan, self.tiles, self.latents, size_policy=vq.size_policy,
                             batch_size=e.batch_size, device=self.config.device or e.device,
                             show_progress=self.progress)
        return {"latents": len(cache), "shape": list(cache.shape), "latent_scale": cache.latent_scale}

    def _diffusion(self, cfg: Any, **paths: Any) -> Any:
        data = cfg.data or self.config.data.description or str(self.config.data.tiles or self.config.data.slides)
        return self.config.with_device(replace(cfg, latents=self.latents, vqgan=self.vqgan, data=data, **paths))

    def run_ldm(self) -> dict[str, Any]:
        from histosynth.diffusion.train import train_ldm

        result = train_ldm(self._diffusion(self.config.ldm), self.dirs["ldm"], progress=self.progress)
        self._report_verdict("ldm", result.verdict)
        return {"step": result.steps, "final_loss": result.final_loss, "verdict": result.verdict}

    def _report_verdict(self, stage: str, verdict: Optional[dict[str, Any]]) -> None:
        """Log the post-training sample check; noise gets a warning no one can miss."""
        if not verdict:
            return
        self.log(f"  {stage} sample check: {verdict['level']}: {verdict['message']}")
        if verdict["level"] == "noise":
            self.log(f"  WARNING: the {stage} model generates noise, not tissue. The pipeline goes on, but this "
                     "model is not usable: raise its steps (docs/training.md, 'Minimum training for a usable "
                     f"model') and rerun after deleting {self.dirs[stage]}.")

    def run_cluster(self) -> dict[str, Any]:
        from histosynth.clusters.select import run_cluster

        summary = run_cluster(self.latents, self.dirs["cluster"], self.config.cluster)
        return {"k": summary["k"], "rule": summary["rule"], "sizes": summary["sizes"]}

    def run_review(self) -> Optional[dict[str, Any]]:
        from histosynth.review.edits import review_apply
        from histosynth.review.sheets import make_review_sheets

        d, r = self.dirs["review"], self.config.review
        template = d / "clusters.yaml"
        if not template.exists():  # never overwrite a clusters.yaml the expert may be editing in place
            make_review_sheets(self.dirs["cluster"], d, labels=self.config.data.labels,
                               n_centre=r.n_centre, n_random=r.n_random)
        if r.edits is None:
            return None
        edits = auto_edits(self.dirs["cluster"], d / "clusters.auto.yaml", self.config) if r.edits == "auto" \
            else Path(r.edits)
        if not edits.is_file():
            raise InputError(f"pipeline.review.edits: file not found: {edits}")
        label_map, _ = review_apply(edits, self.dirs["cluster"], self.label_map)
        return {"edits": str(edits), "classes": {c.id: c.name for c in label_map.classes},
                "excluded_tiles": label_map.excluded_tiles}

    def run_cldm(self) -> dict[str, Any]:
        from histosynth.diffusion.train import train_cldm

        cfg = self.config.cldm
        paths: dict[str, Any] = {"label_map": self.label_map,
                                 "init_from": self.ldm_unet if self.config.ldm is not None else None}
        if cfg.joint_imc:
            paths["imc_head"] = self.imc_head
        else:
            paths["labels"] = self.tile_labels
        result = train_cldm(self._diffusion(cfg, **paths), self.dirs["cldm"], progress=self.progress)
        self._report_verdict("cldm", result.verdict)
        return {"step": result.steps, "final_loss": result.final_loss, "verdict": result.verdict}

    def run_export(self) -> dict[str, Any]:
        from histosynth.bundle.export import export_from_checkpoints

        e = self.config.export
        report = export_from_checkpoints(
            self.vqgan, self.cldm_unet, self.label_map, self.bundle,
            microns_per_pixel=e.microns_per_pixel, tolerance=e.tolerance, overwrite=True,
            on_stage=lambda msg: self.log(f"  export: {msg}"),
        )
        return {"bundle": str(report.path), "unet_max_abs_diff": report.unet_max_abs_diff,
                "decoder_max_abs_diff": report.decoder_max_abs_diff}


def auto_edits(cluster_dir: Path, out: Path, config: PipelineConfig) -> Path:
    """Write the clusters.yaml that `review.edits: auto` applies (see `ReviewConfig`); returns its path."""
    from histosynth.clusters.select import read_assignments
    from histosynth.review.sheets import read_labels, suggest_names

    meta, rows = read_assignments(Path(cluster_dir))
    k = int(meta["k"])
    sizes = {c: 0 for c in range(k)}
    for row in rows:
        sizes[row["cluster"]] += 1
    labels = config.data.labels
    suggestions = suggest_names(rows, read_labels(labels)) if labels is not None else {}
    r = config.review
    named = {c: r.label_names.get(s.label, s.label) for c, s in suggestions.items() if sizes[c] > 0}
    uses: dict[str, list[int]] = {}
    for c, name in sorted(named.items()):
        uses.setdefault(name, []).append(c)
    clusters, merges = {}, []
    for c in range(k):
        name = named.get(c, f"cluster_{c}")
        if c in named and len(uses[name]) > 1 and not r.merge_same_name:
            name = f"{name}_c{c}"
        clusters[c] = {"name": name, "exclude": sizes[c] == 0}
    if r.merge_same_name:
        merges = [group for group in uses.values() if len(group) > 1]
    header = ("# Written by `train pipeline` (review.edits: auto): clusters named by the majority label of their\n"
              "# annotated tiles (data.labels), else cluster_<id>; empty clusters excluded.\n")
    write_text(out, header + yaml.safe_dump({"clusters": clusters, "merges": merges, "moves": []}, sort_keys=False))
    return out


def review_message(run_dir: Path) -> str:
    """What the user does when the pipeline stops at the review stage."""
    d = stage_dir(run_dir, "review")
    return (
        f"Expert review needed. Open {d / 'review.html'}, edit {d / 'clusters.yaml'} (names, merges, exclusions, "
        f"moves), then set `review: {{edits: {d / 'clusters.yaml'}}}` in the pipeline config and rerun the same "
        "command; finished stages are not redone. (`edits: auto` accepts the clusters as they are.)"
    )


def _resume_point(folder: Path) -> str:
    """What a stage folder already holds from an interrupted run ('' when nothing)."""
    from histosynth.runtime.checkpointing import latest_checkpoint

    if not folder.is_dir():
        return ""
    ckpt = latest_checkpoint(folder / "checkpoints")
    if ckpt is not None:
        return f"from checkpoint {ckpt.name}"
    partial = folder / "latents" / "encode-progress.json"
    if partial.is_file():
        return "from a partly encoded latent cache"
    return ""


def run_pipeline(config: PipelineConfig, run_dir: str | Path, dry_run: bool = False, *, progress: bool = True,
                 log: Callable[[str], None] = lambda _msg: None) -> PipelineResult:
    """Run every unfinished stage in order (or, with `dry_run`, only return the plan and write nothing)."""
    run_dir = Path(run_dir)
    log_path = run_dir / LOG

    def log_both(message: str) -> None:
        # RUN/pipeline.log: a record of what ran, what resumed and how each stage ended, beside each stage's
        # own train.log (per-step progress) and metrics.jsonl.
        with log_path.open("a", encoding="utf-8") as f:
            f.write(f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}  {message}\n")
        log(message)

    pipe = _Pipeline(config, run_dir, progress, log)
    plan = pipe.plan()
    result = PipelineResult(plan=plan, bundle=pipe.bundle)
    if dry_run:
        return result
    run_dir.mkdir(parents=True, exist_ok=True)
    pipe.log = log_both
    write_text(run_dir / "pipeline.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    done = [row.folder.name for row in plan if row.status.startswith("done")]
    log_both(f"pipeline {run_dir}: " + (f"resuming; finished stages skipped: {', '.join(done)}" if done
                                       else "starting"))
    for row in plan:
        if row.status != "pending":
            continue
        resumed = _resume_point(row.folder)
        log_both(f"stage {row.folder.name}: " + (f"resuming ({resumed})" if resumed else "starting")
                 + (f"; per-step progress in {row.folder / 'train.log'}" if row.name in ("vqgan", "ldm", "cldm")
                    else ""))
        row.folder.mkdir(parents=True, exist_ok=True)
        started = _dt.datetime.now()
        summary = getattr(pipe, f"run_{row.name}")()
        if summary is not None:
            seconds = (_dt.datetime.now() - started).total_seconds()
            log_both(f"stage {row.folder.name}: done in {seconds / 60:.1f} min")
        if summary is None:
            result.stopped_at = row.name
            result.message = review_message(run_dir)
            return result
        pipe.mark_done(row.name, summary)
        result.ran.append(row.name)
    return result

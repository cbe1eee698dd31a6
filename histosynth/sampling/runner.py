"""`generate`: turn a recipe into tiles on disk, resumably, shardably, streaming.

Output layout (torchvision ImageFolder):
    DIR/<class_name>/<index>.<ext>            (or DIR/{train,val}/<class_name>/... with a split)
    DIR/manifest.csv                          one row per image (manifest.shard-i-of-n.csv per shard)
    DIR/classes.json, DIR/recipe.yaml         the bundle's classes and the resolved recipe
    DIR/.histosynth/run.json                  the plan's fingerprint: a different recipe is refused
    DIR/.histosynth/journal-<shard>.jsonl     images finished, appended after each batch's files are renamed

An image counts as done when the journal lists it and its file exists. Killing the process at any moment and
running the same command again completes the set, with no duplicate and no torn file.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import yaml

from histosynth.configio import to_dict
from histosynth.diffusion.samplers import get_sampler, guided_denoiser, noise_level_interval, sample
from histosynth.diffusion.schedule import NoiseSchedule
from histosynth.errors import InputError, RunError
from histosynth.sampling.plan import ImageNoise, Item, Plan, Shard
from histosynth.sampling.recipe import Recipe, interval_text, load_recipe
from histosynth.imageops import encode_image
from histosynth.io import check_writable, stale_temporaries, write_bytes, write_csv, write_json, write_text

META = ".histosynth"
MANIFEST_COLUMNS = ("path", "class_name", "class_id", "index", "seed", "sampler", "steps", "eta", "guidance",
                    "autoguidance", "guidance_interval", "autoguidance_interval", "bundle_hash", "backend", "device")
# Columns added later, with the value a shard manifest written before them means: merged, such a shard reads as
# "off" (autoguidance 1, each guidance at every step).
_LATER_COLUMNS = {"autoguidance": "1.0", "guidance_interval": "", "autoguidance_interval": ""}


@dataclass(frozen=True)
class GenerateOptions:
    """Run-time choices that do not change which images are made."""

    backend: str = "auto"  # auto | onnx | torch
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # UNet precision on CUDA: auto | fp32 | fp16 | bf16
    shard: Shard = Shard()
    overwrite: bool = False
    batch_size: Optional[int] = None  # overrides the recipe's; images are the same either way
    bundle: Optional[Path] = None  # overrides the recipe's bundle


@dataclass
class ClassSummary:
    name: str
    class_id: int
    planned: int = 0  # images of this class in this shard
    made: int = 0  # made by this run
    skipped: int = 0  # already done by an earlier run


@dataclass
class GenerateResult:
    out_dir: Path
    manifest: Optional[Path]
    classes: list[ClassSummary] = field(default_factory=list)
    seconds: float = 0.0
    backend: str = ""
    device: str = ""

    @property
    def made(self) -> int:
        return sum(c.made for c in self.classes)


def load_plan(recipe_path: Path, bundle_override: Optional[Path] = None, verify: bool = True):
    """Read the recipe and its bundle and resolve the plan; all input errors surface here, before any work."""
    from histosynth.bundle.store import load_bundle  # the bundle stage sits before sampling

    recipe, bundle_path = load_recipe(recipe_path)
    bundle = load_bundle(bundle_override or bundle_path, verify=verify)
    T = bundle.manifest.schedule.num_train_steps
    plan = Plan(recipe, bundle.class_names, bundle.manifest_sha256, base_dir=Path(recipe_path).parent)
    for c in plan.classes:
        if c.sampler.steps > T:
            raise InputError(f"recipe: {c.name} asks for {c.sampler.steps} steps; allowed: 1..{T} for this bundle")
        if c.sampler.autoguidance != 1.0 and not bundle.has_guide:
            raise InputError(f"recipe: {c.name} asks for autoguidance {c.sampler.autoguidance:g}, but bundle "
                             f"{bundle.path} ships no guide network; allowed: 1 (off) with this bundle")
    return recipe, bundle, plan


def describe_plan(plan: Plan, shard: Shard = Shard()) -> list[dict]:
    """Per-class rows of what a run would make (for --dry-run and the summary).

    Counted from the shard's range, never by listing images, so a plan of 10^9 tiles costs what one of 10 does.
    """
    counts = plan.shard_counts(shard)
    rows = []
    for c in plan.classes:
        s = c.sampler
        rows.append({"class_id": c.class_id, "name": c.name, "count": counts[c.class_id], "sampler": s.name,
                     "steps": s.steps, "guidance": s.guidance, "autoguidance": s.autoguidance,
                     "guidance_interval": interval_text(s.guidance_interval),
                     "autoguidance_interval": interval_text(s.autoguidance_interval), "train": c.n_train,
                     "val": c.count - c.n_train})
    return rows


@dataclass
class PlanSummary:
    """What `generate --dry-run` shows: the plan per class, where files go, and the checked backend choice."""

    recipe: Recipe
    bundle: Any  # histosynth.bundle.store.Bundle
    rows: list[dict]
    layout: list[str]  # one example path per class and split, relative to --out
    backend: Any  # histosynth.sampling.backends.BackendChoice

    @property
    def total(self) -> int:
        return sum(r["count"] for r in self.rows)


def summarize_plan(recipe_path: Path, options: GenerateOptions = GenerateOptions()) -> PlanSummary:
    """Everything `generate` would check and make, without loading a model or writing a file.

    Costs the same for 10 tiles as for 10^9: nothing here lists the images.
    """
    from histosynth.sampling.backends import choose_backend

    recipe, bundle, plan = load_plan(recipe_path, options.bundle)
    choice = choose_backend(options.backend, options.device, options.dtype)
    layout = []
    for c in plan.classes:
        layout.append(plan.relpath(c, 0))
        if c.n_train < c.count:
            layout.append(plan.relpath(c, c.count - 1))  # the first val/ file
    return PlanSummary(recipe, bundle, describe_plan(plan, options.shard), layout, choice)


# --- the output folder's state ---------------------------------------------------------------------------------


def _journal_name(shard: Shard) -> str:
    return f"journal-{shard.tag or 'main'}.jsonl"


def _read_journals(out: Path, plan: Plan) -> tuple[dict[int, bytearray], list[tuple[str, str]]]:
    """Which images earlier runs finished: per class a byte per index (0 = not done, k = session k)."""
    done = {c.class_id: bytearray(c.count) for c in plan.classes}
    sessions: list[tuple[str, str]] = []
    session_ids: dict[tuple[str, str], int] = {}
    for journal in sorted((out / META).glob("journal-*.jsonl")):
        for line in journal.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                key = (str(entry["backend"]), str(entry["device"]))
                class_id, indices = int(entry["class_id"]), [int(i) for i in entry["indices"]]
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a kill: its images are made again
            if class_id not in done:
                continue
            if key not in session_ids:
                sessions.append(key)
                session_ids[key] = min(len(sessions), 255)
            for i in indices:
                if 0 <= i < len(done[class_id]):
                    done[class_id][i] = session_ids[key]
    return done, sessions


def _check_folder(out: Path, plan: Plan, overwrite: bool) -> bool:
    """Refuse a folder holding something else, changing nothing; True if an earlier set must be removed first."""
    run_file = out / META / "run.json"
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            previous = {}
        if not isinstance(previous, dict):
            previous = {}
        if previous.get("fingerprint") == plan.fingerprint():
            return False  # the same plan: resume
        if not overwrite:
            changes = plan_differences(previous.get("plan"), plan.describe())
            what = f" ({'; '.join(changes)})" if changes else ""
            raise InputError(f"--out {out}: holds tiles of a different recipe or bundle{what}; "
                             "use another folder, or --overwrite to replace them")
        return True
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out {out}: folder is not empty and was not written by histosynth generate; "
                         "use an empty folder, or --overwrite to write into it anyway")
    return False


def _flatten(value: object, prefix: str, into: dict[str, object]) -> dict[str, object]:
    """Nested plan data as {"a.b.c": leaf}; the class list becomes a mapping by class name."""
    if prefix == "classes" and isinstance(value, list):
        value = {str(c.get("name")): {k: v for k, v in c.items() if k != "name"} for c in value if isinstance(c, dict)}
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), into)
    else:
        into[prefix] = value
    return into


def plan_differences(before: object, after: dict, limit: int = 6) -> list[str]:
    """The settings that differ between two `Plan.describe()` dicts, as `key: old -> new` lines.

    Classes are matched by name, so a changed count reads `classes.tumour.count: 100 -> 200`. Returns [] when
    `before` is not a plan description (an unreadable run.json).
    """
    if not isinstance(before, dict):
        return []
    old, new = _flatten(before, "", {}), _flatten(after, "", {})
    changes = []
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key, "(none)") != new.get(key, "(none)"):
            a, b = old.get(key, "(none)"), new.get(key, "(none)")
            if key == "bundle_hash":
                a, b = str(a)[:12], str(b)[:12]  # a readable prefix is enough to tell bundles apart
            changes.append(f"{key}: {a} -> {b}")
    if len(changes) > limit:
        changes = changes[:limit] + [f"and {len(changes) - limit} more"]
    return changes


def _remove_previous_set(out: Path) -> None:
    """Delete what an earlier `generate` wrote (its journaled images and metadata), leaving other files alone."""
    for journal in (out / META).glob("journal-*.jsonl"):
        for line in journal.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                for rel in json.loads(line).get("paths", []):
                    (out / rel).unlink(missing_ok=True)
            except (ValueError, AttributeError):
                continue
    for name in ("classes.json", "recipe.yaml"):
        (out / name).unlink(missing_ok=True)
    for manifest in out.glob("manifest*.csv"):
        manifest.unlink()
    shutil.rmtree(out / META, ignore_errors=True)
    for folder in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(folder.iterdir()):
            folder.rmdir()


def _remove_stale_temporaries(out: Path, plan: Plan, shard: Shard) -> None:
    """Temporary files of this shard left by a killed run (other shards may be writing theirs right now)."""
    tag = shard.tag or "main"
    for c in plan.classes:
        for folder in {(out / plan.relpath(c, i)).parent for i in (0, c.count - 1)}:
            if folder.is_dir():
                for tmp in stale_temporaries(folder, tag):
                    tmp.unlink(missing_ok=True)


def _write_metadata(out: Path, plan: Plan, recipe: Recipe, bundle) -> None:
    (out / META).mkdir(parents=True, exist_ok=True)
    run = {"fingerprint": plan.fingerprint(), "plan": plan.describe()}
    write_json(out / META / "run.json", run, fsync=True)
    classes = [{"id": c.id, "name": c.name} for c in bundle.manifest.classes]
    counts = {c.name: c.count for c in plan.classes}
    for entry in classes:
        entry["count"] = counts.get(entry["name"], 0)
    write_json(out / "classes.json", {"classes": classes, "null_id": bundle.null_id, "bundle": str(bundle.path),
                                      "bundle_hash": bundle.manifest_sha256}, fsync=True)
    resolved = to_dict(recipe)
    resolved["bundle"] = str(bundle.path)
    resolved["resolved_counts"] = counts
    write_text(out / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False), fsync=True)


def _manifest_rows(out: Path, plan: Plan, shard: Shard, done: dict[int, bytearray],
                   sessions: list[tuple[str, str]]) -> Iterator[list]:
    for item in plan.items(shard):
        session = done[item.class_id][item.index]
        if session == 0 or not (out / item.relpath).is_file():
            continue
        backend, device = sessions[session - 1]
        s = item.sampler
        yield [item.relpath, item.name, item.class_id, item.index, item.seed, s.name, s.steps, s.eta, s.guidance,
               s.autoguidance, interval_text(s.guidance_interval), interval_text(s.autoguidance_interval),
               plan.bundle_hash, backend, device]



def _write_manifest(path: Path, rows: Iterator[list]) -> None:
    write_csv(path, MANIFEST_COLUMNS, rows, line_end="\n", fsync=True)


# --- the run ---------------------------------------------------------------------------------------------------


def _call_key(item: Item) -> tuple:
    """What the items of one sampler call share; guidance scales may differ per item."""
    s = item.sampler
    return s.name, s.steps, s.eta, s.guidance_interval, s.autoguidance_interval


def _batches(items: Iterator[Item], batch_size: int) -> Iterator[list[Item]]:
    """Consecutive items with the same `_call_key` (one sampler call), at most `batch_size` of them."""
    batch: list[Item] = []
    for item in items:
        if batch and (len(batch) == batch_size or _call_key(item) != _call_key(batch[0])):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def generate_batch(backend, schedule: NoiseSchedule, items: list[Item], latent_shape: tuple[int, ...],
                   null_id: int, on_step: Optional[Callable[[int], None]] = None):
    """Sample and decode one batch of items with the same sampler; returns uint8 (N, H, W, 3)."""
    device = torch.device(backend.tensor_device)  # the CPU when ONNX Runtime runs CUDA for a CPU build of torch
    noise = ImageNoise(items, latent_shape, device)
    x_T = noise.draw()
    class_ids = torch.tensor([it.class_id for it in items], dtype=torch.long, device=device)
    s = items[0].sampler
    guidance = torch.tensor([it.sampler.guidance for it in items], dtype=torch.float32)
    auto = torch.tensor([it.sampler.autoguidance for it in items], dtype=torch.float32)
    autoguided = bool((auto != 1.0).any())  # only then is the guide network loaded (`denoise_guide`)
    active = None if s.guidance_interval is None else noise_level_interval(schedule, *s.guidance_interval)
    auto_active = (None if s.autoguidance_interval is None
                   else noise_level_interval(schedule, *s.autoguidance_interval))
    denoise = guided_denoiser(backend.denoise, guidance, null_id, guidance_active=active,
                              autoguidance=auto if autoguided else None,
                              guide=backend.denoise_guide if autoguided else None, autoguidance_active=auto_active)
    stochastic = get_sampler(s.name).stochastic(s.eta)
    latents = sample(denoise, schedule, x_T, class_ids, sampler=s.name, steps=s.steps, eta=s.eta,
                     randn=(lambda i: noise.draw()) if stochastic else None, on_step=on_step)
    return backend.decode(latents)


def generate(recipe_path: Path, out_dir: Path, options: GenerateOptions = GenerateOptions(),
             on_progress: Optional[Callable[[int, int], None]] = None) -> GenerateResult:
    """Make the recipe's tiles (this shard's share) in `out_dir`, skipping those already made.

    `on_progress(done, total)` is called after each batch. Raises `InputError` for bad input before anything is
    written, `RunError` for failures while running.
    """
    from histosynth.sampling.backends import choose_backend, make_backend

    # Every check comes before anything is created: a refused run leaves no folder behind.
    recipe, bundle, plan = load_plan(recipe_path, options.bundle)
    choose_backend(options.backend, options.device, options.dtype)
    out = Path(out_dir)
    shard = options.shard
    check_writable(out)
    replace = _check_folder(out, plan, options.overwrite)
    backend = make_backend(bundle, backend=options.backend, device=options.device, dtype=options.dtype)
    if replace:
        _remove_previous_set(out)
    _write_metadata(out, plan, recipe, bundle)
    _remove_stale_temporaries(out, plan, shard)
    done, sessions = _read_journals(out, plan)

    summary = {c.class_id: ClassSummary(c.name, c.class_id) for c in plan.classes}
    todo_total = 0
    for item in plan.items(shard):
        summary[item.class_id].planned += 1
        if done[item.class_id][item.index] and (out / item.relpath).is_file():
            summary[item.class_id].skipped += 1
        else:
            todo_total += 1
    session_key = (backend.name, backend.device)
    if session_key not in sessions:
        sessions.append(session_key)
    session_id = sessions.index(session_key) + 1

    schedule = NoiseSchedule(bundle.manifest.schedule)
    latent_shape = tuple(bundle.manifest.latent_shape)
    fmt, quality, mpp = recipe.output.format, recipe.output.quality, bundle.manifest.microns_per_pixel
    tag = shard.tag or "main"
    pending = (it for it in plan.items(shard)
               if not (done[it.class_id][it.index] and (out / it.relpath).is_file()))
    batch_size = options.batch_size or recipe.batch_size
    start = time.perf_counter()
    made = 0
    if on_progress:
        on_progress(0, todo_total)
    journal_path = out / META / _journal_name(shard)
    if journal_path.is_file() and journal_path.stat().st_size:
        with open(journal_path, "rb+") as f:  # a kill can leave a torn last line: end it so new lines parse
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    with open(journal_path, "a", encoding="utf-8") as journal:
        for batch in _batches(pending, batch_size):
            try:
                pixels = generate_batch(backend, schedule, batch, latent_shape, null_id=bundle.null_id)
            except (RuntimeError, MemoryError) as e:
                raise RunError(f"sampling failed on {backend.name}/{backend.device}: {e}") from e
            for item, image in zip(batch, pixels):
                write_bytes(out / item.relpath, encode_image(image, fmt, quality, mpp), tag=tag, fsync=True)
            # Journal after the renames: a listed image is always complete on disk.
            by_class: dict[int, list[Item]] = {}
            for item in batch:
                by_class.setdefault(item.class_id, []).append(item)
            for class_id, items in by_class.items():
                journal.write(json.dumps({"class_id": class_id, "indices": [i.index for i in items],
                                          "paths": [i.relpath for i in items], "backend": backend.name,
                                          "device": backend.device}) + "\n")
                for i in items:
                    done[class_id][i.index] = session_id
                summary[class_id].made += len(items)
            journal.flush()
            os.fsync(journal.fileno())
            made += len(batch)
            if on_progress:
                on_progress(made, todo_total)

    manifest_path = out / (f"manifest.{shard.tag}.csv" if shard.tag else "manifest.csv")
    _write_manifest(manifest_path, _manifest_rows(out, plan, shard, done, sessions))
    return GenerateResult(out, manifest_path, list(summary.values()), time.perf_counter() - start,
                          backend.name, backend.device)


def merge_shards(out_dir: Path) -> tuple[Path, int]:
    """Merge `manifest.shard-*.csv` files of one plan into `manifest.csv`, checking that nothing is missing or
    duplicated. Returns the manifest path and the number of rows."""
    out = Path(out_dir)
    run_file = out / META / "run.json"
    if not run_file.is_file():
        raise InputError(f"{out}: no histosynth generate output here (missing {META}/run.json)")
    plan = json.loads(run_file.read_text(encoding="utf-8"))["plan"]
    parts = sorted(out.glob("manifest.shard-*.csv"))
    if not parts:
        raise InputError(f"{out}: no manifest.shard-*.csv files to merge")
    rows: dict[str, list[str]] = {}
    for part in parts:
        with open(part, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = tuple(next(reader, None) or ())
            missing = [c for c in MANIFEST_COLUMNS if c not in header]
            in_order = tuple(c for c in MANIFEST_COLUMNS if c not in missing) == header
            if not in_order or not set(missing) <= set(_LATER_COLUMNS):
                raise InputError(f"{part}: not a histosynth manifest (unexpected header)")
            for row in reader:
                if missing:  # a shard finished by an older histosynth: its missing columns read as "off"
                    by_name = dict(zip(header, row))
                    row = [by_name[c] if c in by_name else _LATER_COLUMNS[c] for c in MANIFEST_COLUMNS]
                if row[0] in rows:
                    raise RunError(f"{part}: {row[0]} is listed by two shards")
                rows[row[0]] = row
    expected = sum(c["count"] for c in plan["classes"])
    if len(rows) != expected:
        raise RunError(f"{out}: the shards list {len(rows)} of {expected} images; rerun the missing shards first")
    ordered = sorted(rows.values(), key=lambda r: (int(r[2]), int(r[3])))
    path = out / "manifest.csv"
    _write_manifest(path, iter(ordered))
    return path, len(ordered)

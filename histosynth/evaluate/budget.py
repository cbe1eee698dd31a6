"""The error budget: how much of the distance between generated and real tiles each stage costs.

Against one set of held-out real tiles (e.g. `pcam/valid`), at equal n on every side:

- **floor**: real training tiles vs the held-out tiles: what real tissue scores (FID is biased by n, so the floor
  is the yardstick, not 0);
- **reconstruction**: the autoencoder's reconstructions of the held-out tiles: what the autoencoder alone costs;
- **generated**: tiles the diffusion model made.

Each row reports FID, KID, precision/recall and density/coverage (Inception features, `evaluate.fid`) and the
colour, contrast and flat-tile statistics of `metrics.tilestats` relative to the held-out tiles. A row whose
FID is k times the floor costs k floors; the generated row can be no better than the reconstruction row, since
every generated tile passes through the same decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from histosynth.errors import InputError
from histosynth.evaluate.features import list_images, read_rgb, select_files
from histosynth.metrics.tilestats import compare, tile_stats

ROWS = ("floor", "reconstruction", "generated")


@dataclass
class BudgetRow:
    """One compared set: distribution metrics and tile statistics against the held-out real tiles."""

    name: str
    folder: str
    n: int
    fid: float
    kid: float
    precision: float
    recall: float
    density: float
    coverage: float
    stats: dict[str, Any]
    stats_vs_real: dict[str, float]
    warnings: list[str] = field(default_factory=list)


@dataclass
class ErrorBudget:
    """The rows of the budget and the held-out real tiles' own statistics."""

    real: str
    n: int
    real_stats: dict[str, Any]
    rows: list[BudgetRow]

    def fid_of(self, name: str) -> float | None:
        row = next((r for r in self.rows if r.name == name), None)
        return row.fid if row is not None else None

    def to_json(self) -> dict[str, Any]:
        """The JSON object documented in docs/evaluation.md (``metric: "budget"``)."""
        floor = self.fid_of("floor")
        rows = []
        for r in self.rows:
            d = {k: v for k, v in r.__dict__.items()}
            d["x_floor"] = (r.fid / floor) if floor else None
            rows.append(d)
        return {"metric": "budget", "real": self.real, "n": self.n, "real_stats": self.real_stats, "rows": rows}


def _read_all(files: list[Path]) -> np.ndarray:
    return np.stack([read_rgb(p) for p in files])


def error_budget(
    real: str | Path,
    *,
    train: str | Path | None = None,
    reconstructions: str | Path | None = None,
    generated: str | Path | None = None,
    n: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 32,
    inception: str | Path | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> ErrorBudget:
    """Compare each given folder (training tiles for the floor, reconstructions, generated tiles) with `real`.

    All sides use the same n: `n`, or the smallest folder's size; each folder is subsampled with `seed`.
    ``progress(what, done, total)`` reports the Inception passes.
    """
    from histosynth.evaluate.features import folder_features, load_inception
    from histosynth.evaluate.fid import compare_features
    from histosynth.runtime.devices import resolve_device

    sides = {name: folder for name, folder in zip(ROWS, (train, reconstructions, generated)) if folder is not None}
    if not sides:
        raise InputError("evaluate budget: give at least one of --train, --reconstructions, --generated")
    sizes = {"real": len(list_images(real)), **{k: len(list_images(v)) for k, v in sides.items()}}
    n_eff = min(sizes.values()) if n is None else n
    if n is not None and n > min(sizes.values()):
        small = min(sizes, key=sizes.get)  # type: ignore[arg-type]
        raise InputError(f"--n: {n} is more than the {sizes[small]} tiles of the {small} folder; "
                         f"allowed: at most {min(sizes.values())}")
    network = load_inception(inception, resolve_device(device))

    def features(what: str, folder: str | Path) -> tuple[np.ndarray, list[Path]]:
        report = (lambda done, total: progress(what, done, total)) if progress else None
        fs = folder_features(folder, network, max_images=n_eff, seed=seed, batch_size=batch_size,
                             cache_dir=cache_dir, use_cache=use_cache, progress=report)
        return fs.features, list(fs.files)

    real_features, real_files = features("real", real)
    real_stats = tile_stats(_read_all(real_files))
    rows = []
    for name, folder in sides.items():
        feats, files = features(name, folder)
        m = compare_features(real_features, feats, seed=seed)
        stats = tile_stats(_read_all(files))
        rows.append(BudgetRow(name=name, folder=str(folder), n=len(files), fid=m.fid, kid=m.kid_mean,
                              precision=m.precision, recall=m.recall, density=m.density, coverage=m.coverage,
                              stats=stats.to_dict(), stats_vs_real=compare(stats, real_stats),
                              warnings=list(m.warnings)))
    return ErrorBudget(real=str(real), n=n_eff, real_stats=real_stats.to_dict(), rows=rows)


def budget_markdown(d: dict[str, Any]) -> list[str]:
    """Markdown lines of a budget JSON (`ErrorBudget.to_json`): the table the model card and report show."""

    def f(v: Any, digits: int = 3) -> str:
        return "-" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))

    def pct(v: Any) -> str:
        return "-" if v is None else f"{v:+.1%}"

    lines = [f"Against {d['n']} held-out real tiles ({d['real']}); every row at the same n.", "",
             "| set | FID | x floor | KID | precision | recall | coverage | contrast (grey std) | mean R/G/B | "
             "eosin OD | haematoxylin OD | flat tiles |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rs = d["real_stats"]
    lines.append(f"| held-out real | - | - | - | - | - | - | {rs['grey_std']:.1f} | "
                 f"{'/'.join(f'{v:.0f}' for v in rs['mean_rgb'])} | {rs['eosin_od']:.3f} | "
                 f"{rs['haematoxylin_od']:.3f} | {rs['flat_fraction']:.1%} |")
    for r in d["rows"]:
        s, c = r["stats"], r["stats_vs_real"]
        rgb = "/".join(pct(c[f"mean_{k}"]) for k in "rgb")
        lines.append(f"| {r['name']} | {f(r['fid'])} | {f(r.get('x_floor'))} | {f(r['kid'])} | "
                     f"{r['precision']:.2f} | {r['recall']:.2f} | {r['coverage']:.2f} | "
                     f"{s['grey_std']:.1f} ({pct(c['grey_std'])}) | {rgb} | {pct(c['eosin_od'])} | "
                     f"{pct(c['haematoxylin_od'])} | {s['flat_fraction']:.1%} |")
    return lines

"""Recipes (typed loading, errors naming the key path) and the plan (counts, seeds, shards)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from histosynth.configio import from_dict
from histosynth.errors import InputError
from histosynth.sampling.plan import Plan, Shard, image_seed
from histosynth.sampling.recipe import Recipe, load_recipe, resolve_counts

CLASSES = ["adipose", "lymphocytes", "stroma", "tumour"]


def recipe(**data) -> Recipe:
    return from_dict(Recipe, {"bundle": "b", **data}, "recipe")


def test_balanced_total_splits_evenly_and_exactly():
    counts = resolve_counts(recipe(balanced={"total": 10}), CLASSES)
    assert counts == {"adipose": 3, "lymphocytes": 3, "stroma": 2, "tumour": 2}
    assert resolve_counts(recipe(balanced={"per_class": 5}), CLASSES) == dict.fromkeys(CLASSES, 5)
    assert resolve_counts(recipe(balanced={"per_class": 5}, classes=["tumour", "adipose"]), CLASSES) == {
        "adipose": 5, "tumour": 5}


def test_proportions_and_counts():
    counts = resolve_counts(recipe(proportions={"total": 100, "weights": {"tumour": 3, "stroma": 1}}), CLASSES)
    assert counts == {"stroma": 25, "tumour": 75}
    assert resolve_counts(recipe(counts={"tumour": 7}), CLASSES) == {"tumour": 7}


def test_top_up_fills_minorities(tmp_path: Path):
    real = tmp_path / "real"
    for name, n in {"adipose": 8, "tumour": 2}.items():
        (real / name).mkdir(parents=True)
        for i in range(n):
            (real / name / f"{i}.png").write_bytes(b"x")
    r = recipe(top_up={"target": 6, "have_from": str(real), "have": {"stroma": 10}})
    assert resolve_counts(r, CLASSES, tmp_path) == {"lymphocytes": 6, "tumour": 4}


@pytest.mark.parametrize(
    "data,message",
    [
        ({"counts": {"tumor": 3}}, "recipe.counts.tumor: no class 'tumor' in the bundle; valid names: adipose, "),
        ({"counts": {"tumour": 0}}, "recipe.counts.tumour: must be a positive count, got 0"),
        ({"counts": {"tumour": -2}}, "recipe.counts.tumour: must be a positive count"),
        ({"balanced": {"per_class": 2}, "sampler": {"name": "euler"}},
         "recipe.sampler.name: unknown value 'euler'; allowed: ddpm, ddim, dpmpp2m"),
        ({"balanced": {"per_class": 2}, "sampler": {"steps": 0}}, "recipe.sampler.steps: 0 is out of range"),
        ({"balanced": {"per_class": 2}, "sampler": {"steps": 5000}}, "allowed: 1..1000"),
        ({"balanced": {"per_class": 2}, "colour": "red"}, "recipe: unknown key 'colour'; allowed: bundle, seed"),
        ({"balanced": {"per_class": 2, "total": 4}}, "recipe.balanced: give exactly one of per_class, total"),
        ({"balanced": {"per_class": 2}, "counts": {"tumour": 1}}, "give exactly one of counts, balanced"),
        ({"balanced": {"per_class": 2}, "overrides": {"tumour": {"steps": -1}}},
         "recipe.overrides.tumour.steps: -1 is out of range"),
        ({"balanced": {"per_class": 2}, "overrides": {"nope": {"steps": 3}}}, "recipe.overrides.nope: no class"),
        ({"balanced": {"per_class": 2}, "output": {"format": "bmp"}},
         "recipe.output.format: unknown value 'bmp'; allowed: png, jpeg, tiff"),
        ({"balanced": {"per_class": "many"}}, "recipe.balanced.per_class"),
        ({"balanced": {"per_class": 2}, "sampler": {"autoguidance": 0.5}},
         "recipe.sampler.autoguidance: 0.5 is out of range; allowed: 1..30 (1 = off)"),
        ({"balanced": {"per_class": 2}, "sampler": {"guidance": 2.0, "guidance_interval": [10, 0.5]}},
         "recipe.sampler.guidance_interval: [10.0, 0.5] is not [low, high] with 0 <= low < high"),
        ({"balanced": {"per_class": 2}, "sampler": {"guidance_interval": [0.5]}}, "recipe.sampler.guidance_interval"),
        ({"balanced": {"per_class": 2}, "overrides": {"tumour": {"guidance_interval": [-1, 2]}}},
         "recipe.overrides.tumour.guidance_interval: [-1.0, 2.0] is not [low, high]"),
        ({"balanced": {"per_class": 2}, "sampler": {"autoguidance": 2.0, "autoguidance_interval": [3, 3]}},
         "recipe.sampler.autoguidance_interval: [3.0, 3.0] is not [low, high] with 0 <= low < high"),
        ({"balanced": {"per_class": 2}, "overrides": {"tumour": {"autoguidance_interval": [0.5, "inf"]}}},
         "recipe.overrides.tumour.autoguidance_interval"),
    ],
)
def test_bad_recipes_name_the_key_and_allowed_values(data, message):
    with pytest.raises(InputError) as info:
        resolve_counts(recipe(**data), CLASSES)
    assert message in str(info.value)


def test_load_recipe_resolves_bundle_relative_to_file(tmp_path: Path):
    path = tmp_path / "r" / "x.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"bundle": "../weights/m", "balanced": {"total": 3}}))
    r, bundle = load_recipe(path)
    assert bundle == (tmp_path / "weights" / "m").resolve()
    path.write_text("bundle: [unclosed")
    with pytest.raises(InputError, match="not valid YAML"):
        load_recipe(path)
    with pytest.raises(InputError, match="file not found"):
        load_recipe(tmp_path / "missing.yaml")


REPO = Path(__file__).resolve().parents[1]
SHIPPED_BUNDLE = REPO / "weights" / "pcam96"


def test_shipped_recipes_load_and_resolve_against_the_shipped_bundle(tmp_path: Path):
    paths = sorted((REPO / "recipes").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"balanced", "smoke", "topup", "reference"}, paths
    manifest = json.loads((SHIPPED_BUNDLE / "manifest.json").read_text(encoding="utf-8"))
    names = [c["name"] for c in manifest["classes"]]
    for path in paths:
        recipe, bundle = load_recipe(path)
        assert bundle == SHIPPED_BUNDLE.resolve(), f"{path.name}: points at {bundle}, not the shipped bundle"
        if recipe.top_up is not None and recipe.top_up.have_from is not None:
            (tmp_path / "real" / names[0]).mkdir(parents=True, exist_ok=True)  # the real folder is the user's
            recipe = dataclasses.replace(recipe, top_up=dataclasses.replace(recipe.top_up,
                                                                            have_from=str(tmp_path / "real")))
        plan = Plan(recipe, names, "hash", base_dir=path.parent)  # class names, counts and overrides all valid
        assert plan.total > 0 and {c.name for c in plan.classes} <= set(names)


def _uncommented(text: str) -> str:
    """The reference recipe with its commented-out alternatives (`# key: value` lines) switched on."""
    return "\n".join(re.sub(r"^(\s*)# (\s*[A-Za-z_]\w*:.*)$", r"\1\2", line) for line in text.splitlines())


def _key_lines(text: str) -> dict[str, str]:
    """{dotted key path: its trailing comment} of every `key:` line, nesting read from the indentation."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        m = re.match(r"^(\s*)([A-Za-z_]\w*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        found[".".join(k for _, k in stack)] = rest.split("#", 1)[1].strip() if "#" in rest else ""
    return found


def test_reference_recipe_shows_every_key_with_its_real_default():
    from histosynth.configio import describe_keys

    text = (REPO / "recipes" / "reference.yaml").read_text(encoding="utf-8")
    schema = {k.path: k for k in describe_keys(Recipe)}
    patterns = {path: re.compile("^" + re.escape(path).replace(re.escape("<name>"), "[^.]+") + "$") for path in schema}
    shown = _key_lines(_uncommented(text))
    assert yaml.safe_load(_uncommented(text))  # the alternatives are YAML too
    for path in schema:
        assert any(patterns[path].match(s) for s in shown), f"recipes/reference.yaml does not show `{path}`"
    user_keyed = [p for p, k in schema.items() if k.type.startswith("{name:")]
    for s in shown:
        known = any(patterns[p].match(s) for p in schema) or any(s.rsplit(".", 1)[0] == p or
                                                                 patterns[p].match(s.rsplit(".", 1)[0])
                                                                 for p in user_keyed)
        assert known, f"recipes/reference.yaml shows `{s}`, which is no recipe key"
    for s, comment in shown.items():
        m = re.match(r"(?:required|default ([^;(]+))", comment)
        match = next((schema[p] for p in schema if patterns[p].match(s)), None)
        if not m or match is None:
            continue
        said = "required" if m.group(0) == "required" else m.group(1).strip()
        real = match.default
        if said in ("none", "all"):
            assert real in ("null", "{}"), f"{s}: says default {said}, is {real}"
        elif re.fullmatch(r"[-\d.]+", said):
            assert float(said) == float(real), f"{s}: says default {said}, is {real}"
        else:
            assert said == real, f"{s}: says {said}, is {real}"


def test_explain_prints_every_key_and_sampler():
    from typer.testing import CliRunner

    from histosynth.cli.app import app
    from histosynth.configio import describe_keys
    from histosynth.diffusion.samplers import SAMPLERS

    result = CliRunner().invoke(app, ["generate", "--explain"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output  # no --recipe/--out needed
    for key in describe_keys(Recipe):
        row = next((line for line in result.output.splitlines()
                    if line.count("│") > 2 and line.split("│")[1].strip() == key.path), None)
        assert row is not None, f"--explain does not list {key.path}"
        assert key.meaning, f"{key.path} has no meaning: document its field in histosynth/sampling/recipe.py"
        assert key.type in row and key.default in row and key.meaning[:40] in row, row
    for name, info in SAMPLERS.items():
        assert name in result.output and info.summary[:40] in result.output
    assert "[string] or null" in result.output  # types are not eaten as console markup


@dataclasses.dataclass
class _Documented:
    trailing: int = 1  # said on its line
    # said above it,
    # on two lines
    above: int = 2
    # a section comment, then a blank line: not a field's

    loose: int = 3
    both: int = 4  # its own line wins


def test_field_comments_read_trailing_comments_and_the_block_above():
    from histosynth.configio import field_comments

    assert field_comments(_Documented) == {"trailing": "said on its line", "above": "said above it, on two lines",
                                           "both": "its own line wins"}


def test_seeds_depend_on_seed_class_index_only():
    seeds = {image_seed(0, c, i) for c in range(4) for i in range(500)}
    assert len(seeds) == 2000
    assert image_seed(0, 1, 7) == image_seed(0, 1, 7) != image_seed(1, 1, 7)


def test_shards_are_disjoint_and_cover_the_plan():
    plan = Plan(recipe(counts={"adipose": 5, "stroma": 6, "tumour": 3}, split={"val_fraction": 0.2}), CLASSES, "h")
    everything = [it.relpath for it in plan.items()]
    assert len(everything) == len(set(everything)) == 14
    assert everything[0] == "train/adipose/00000.png" and everything[4] == "val/adipose/00004.png"
    for n in (1, 2, 3, 5, 14, 20):
        parts = [[it.relpath for it in plan.items(Shard(i, n))] for i in range(n)]
        assert sorted(sum(parts, [])) == sorted(everything)
    # An image's seed does not depend on the shard that makes it.
    by_path = {it.relpath: it.seed for it in plan.items()}
    assert all(by_path[it.relpath] == it.seed for it in plan.items(Shard(1, 3)))


def test_fingerprint_ignores_batch_size_but_not_counts():
    a = Plan(recipe(balanced={"total": 8}, batch_size=2), CLASSES, "h")
    b = Plan(recipe(balanced={"total": 8}, batch_size=7), CLASSES, "h")
    c = Plan(recipe(balanced={"total": 9}), CLASSES, "h")
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert Plan(recipe(balanced={"total": 8}), CLASSES, "other-bundle").fingerprint() != a.fingerprint()


def test_fingerprint_of_plans_without_autoguidance_or_interval_is_unchanged_by_the_new_keys():
    """Folders made before autoguidance and guidance intervals existed must still resume: each key is left out of
    the plan when off, so the plan holds exactly the sampler keys it held before them."""
    plain = Plan(recipe(balanced={"total": 8}), CLASSES, "h")
    explicit = Plan(recipe(balanced={"total": 8}, sampler={"autoguidance": 1.0, "guidance_interval": None}),
                    CLASSES, "h")
    guided = Plan(recipe(balanced={"total": 8}, sampler={"autoguidance": 2.0}), CLASSES, "h")
    limited = Plan(recipe(balanced={"total": 8}, sampler={"guidance": 2.0, "guidance_interval": [0.5, 10]}),
                   CLASSES, "h")
    everywhere = Plan(recipe(balanced={"total": 8}, sampler={"guidance": 2.0}), CLASSES, "h")
    assert all(set(c["sampler"]) == {"name", "steps", "eta", "guidance"} for c in plain.describe()["classes"])
    auto_limited = Plan(recipe(balanced={"total": 8}, sampler={"autoguidance": 2.0, "autoguidance_interval": [0, 10]}),
                        CLASSES, "h")
    explicit_auto = Plan(recipe(balanced={"total": 8}, sampler={"autoguidance": 2.0, "autoguidance_interval": None}),
                         CLASSES, "h")
    assert all(set(c["sampler"]) == {"name", "steps", "eta", "guidance"} for c in plain.describe()["classes"])
    assert plain.fingerprint() == explicit.fingerprint() != guided.fingerprint()
    assert limited.fingerprint() != everywhere.fingerprint()
    assert guided.fingerprint() == explicit_auto.fingerprint() != auto_limited.fingerprint()


def test_guidance_and_autoguidance_together_with_a_per_class_interval():
    r = recipe(balanced={"total": 8}, sampler={"guidance": 2.0, "autoguidance": 2.0, "guidance_interval": [0.5, 10]},
               overrides={"tumour": {"guidance_interval": [1, 5]}})
    plan = Plan(r, CLASSES, "h")
    specs = {c.name: c.sampler for c in plan.classes}
    assert specs["tumour"].guidance_interval == (1.0, 5.0) and specs["tumour"].autoguidance == 2.0
    assert all(s.guidance_interval == (0.5, 10.0) for name, s in specs.items() if name != "tumour")


def test_a_per_class_autoguidance_interval_overrides_the_recipes():
    r = recipe(balanced={"total": 8}, sampler={"autoguidance": 2.0, "autoguidance_interval": [0, 10]},
               overrides={"tumour": {"autoguidance_interval": [1, 5], "autoguidance": 3.0}})
    specs = {c.name: c.sampler for c in Plan(r, CLASSES, "h").classes}
    assert (specs["tumour"].autoguidance, specs["tumour"].autoguidance_interval) == (3.0, (1.0, 5.0))
    assert all((s.autoguidance, s.autoguidance_interval) == (2.0, (0.0, 10.0))
               for name, s in specs.items() if name != "tumour")
    assert all(s.guidance_interval is None for s in specs.values())


@pytest.mark.parametrize("text", ["1", "2/2", "a/b", "-1/3", "0/0"])
def test_bad_shard_specs(text):
    with pytest.raises(InputError, match="--shard"):
        Shard.parse(text)

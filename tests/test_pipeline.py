"""The whole training pipeline end to end on 32 real PCam tiles with tiny models (well under 2 minutes on 2 cores).

tile folder -> train vqgan -> encode -> ldm -> cluster -> review (stop, then auto) -> cldm -> export ->
generate from the exported bundle; then a rerun does nothing and the dry run lists every stage done.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from histosynth.cli.app import app
from histosynth.errors import InputError
from histosynth.pipeline.config import load_pipeline_config
from histosynth.pipeline.run import DONE, run_pipeline, stage_dir

TINY_UNET = {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
             "num_heads": 2, "norm_groups": 8}
DIFFUSION = {"model": TINY_UNET, "steps": 6, "batch_size": 8, "log_every": 3, "checkpoint_every": 6,
             "sample_count": 4, "sample_steps": 2, "device": "cpu"}


def _pipeline_yaml(folder: Path, tiles: Path, labels: Path, edits) -> Path:
    data = {
        "data": {"tiles": str(tiles), "labels": str(labels), "description": "32 PCam tiles (test)"},
        "vqgan": {
            "tile_size": 32, "size_policy": "resize", "val_fraction": 0.1,
            "model": {"base_channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "norm_groups": 4,
                      "codebook_size": 32},
            "loss": {"ms_ssim_weight": 0.0, "discriminator": {"base_channels": 8, "num_layers": 2, "norm_groups": 4}},
            "batch_size": 8, "steps": 6, "disc_start": 3, "log_every": 3, "val_every": 6, "sample_every": 6,
            "ckpt_every": 6, "sample_count": 4, "device": "cpu",
        },
        "encode": {"batch_size": 16, "device": "cpu"},
        "ldm": DIFFUSION,
        "cluster": {"k_min": 2, "k_max": 3, "seeds": [0], "imc": {"steps": 30, "batch_size": 16}},
        "review": {"edits": edits, "label_names": {"0": "normal", "1": "tumour"}},
        "cldm": DIFFUSION,
        "export": {"microns_per_pixel": 0.97},
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_pipeline_end_to_end_resume_and_generate(tmp_path, pcam_tiles, shared_data):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for p in pcam_tiles[:32]:
        shutil.copy(p, tiles / p.name)
    run = tmp_path / "run"

    # 1. No edits: the pipeline stops at review with sheets and a clusters.yaml to edit.
    config = load_pipeline_config(_pipeline_yaml(tmp_path, tiles, shared_data / "pcam" / "train_labels.csv", None))
    result = run_pipeline(config, run, progress=False)
    assert result.ran == ["vqgan", "encode", "ldm", "cluster"]
    assert result.stopped_at == "review" and "clusters.yaml" in result.message
    review = stage_dir(run, "review")
    assert (review / "review.html").is_file() and not (review / DONE).exists()
    template = (review / "clusters.yaml").read_text()

    # 2. `auto`: resumes at review, names clusters by majority label, trains the cLDM, exports.
    config = load_pipeline_config(_pipeline_yaml(tmp_path, tiles, shared_data / "pcam" / "train_labels.csv", "auto"))
    result = run_pipeline(config, run, progress=False)
    assert result.ran == ["review", "cldm", "export"] and result.stopped_at is None
    assert (review / "clusters.yaml").read_text() == template  # the expert's file is never overwritten
    label_map = yaml.safe_load((review / "label_map.yaml").read_text())
    names = [c["name"] for c in label_map["classes"]]
    assert names and all(n.split("_c")[0] in ("normal", "tumour") for n in names)
    with open(review / "label_map_tiles.csv") as f:
        assert len(list(csv.DictReader(f))) == 32
    for name in ("vqgan", "encode", "ldm", "cluster", "review", "cldm", "export"):
        assert json.loads((stage_dir(run, name) / DONE).read_text())["stage"] == name
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    assert [c["name"] for c in manifest["classes"]] == names

    # 3. A rerun does nothing; the dry run lists every stage done and writes nothing.
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    again = run_pipeline(config, run, progress=False)
    assert again.ran == []
    dry = CliRunner().invoke(app, ["train", "pipeline", "--config", str(tmp_path / "pipeline.yaml"),
                                   "--run-dir", str(run), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    plan = {row.name: row.status for row in again.plan}
    assert plan == {"tile": "skipped", **{n: "done" for n in
                                         ("vqgan", "encode", "ldm", "cluster", "review", "cldm", "export")}}
    assert "pending" not in dry.output and dry.output.count("done") >= 7
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before

    # 4. Generate from the exported bundle, as `histosynth generate` does.
    from histosynth.sampling.runner import generate
    from histosynth.sampling.runner import GenerateOptions

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"bundle": str(result.bundle), "seed": 0, "batch_size": 4,
                                      "balanced": {"per_class": 2}, "sampler": {"name": "ddim", "steps": 3}}))
    out = generate(recipe, tmp_path / "generated", GenerateOptions(backend="torch"))
    images = sorted((tmp_path / "generated").glob("*/*.png"))
    assert len(images) == 2 * len(names) and out.made == len(images)
    assert {p.parent.name for p in images} == set(names)
    pixels = np.asarray(Image.open(images[0]))
    assert pixels.shape == (32, 32, 3) and pixels.std() > 0


def test_pipeline_config_refuses_wired_paths(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"data": {"tiles": "t"}, "cldm": {"labels": "x.csv"}}))
    with pytest.raises(InputError, match="pipeline.cldm.labels: is set by the pipeline"):
        load_pipeline_config(path)
    path.write_text(yaml.safe_dump({"data": {"tiles": "t", "slides": ["s.svs"]}}))
    with pytest.raises(InputError, match="pipeline.data.tiles"):
        load_pipeline_config(path)
    path.write_text(yaml.safe_dump({"data": {"tiles": "t"}, "vqgan": {"tile_size": 30}}))
    with pytest.raises(InputError, match="pipeline.vqgan.tile_size"):
        load_pipeline_config(path)

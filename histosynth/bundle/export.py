"""Writing a bundle: ONNX + safetensors for the UNet and the decoder half of the VQ-GAN, then the manifest.

The files are built in a staging folder and moved into place at the end, the manifest last; a failed export
leaves the target as it was. A new (or empty) target is the staging folder renamed, so even a crash leaves
no bundle or a complete one. Replacing a bundle (`overwrite`) swaps only the files the bundle owns
(`manifest.json` and the files the old and the new manifest list), so anything else a user keeps in the
folder (a model card, training configs, evaluation reports) stays. Before anything is moved, ONNX Runtime is
checked against torch on random inputs and the export fails above a tolerance.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

import histosynth
from histosynth.autoencoder.vqgan import VQGAN, LatentDecoder, VQGANConfig
from histosynth.bundle.manifest import (
    DECODER_INPUT,
    DECODER_ONNX,
    DECODER_OUTPUT,
    DECODER_WEIGHTS,
    FORMAT_VERSION,
    GUIDE_UNET_ONNX,
    GUIDE_UNET_WEIGHTS,
    MANIFEST_NAME,
    REQUIRED_FILES,
    UNET_INPUTS,
    UNET_ONNX,
    UNET_OUTPUT,
    UNET_WEIGHTS,
    ClassEntry,
    Manifest,
    Provenance,
    expert_files,
    manifest_from_dict,
    write_manifest,
)
from histosynth.bundle.modules import BundleDecoder
from histosynth.bundle.store import sha256_file
from histosynth.configio import from_dict, to_dict
from histosynth.diffusion.schedule import ScheduleConfig
from histosynth.diffusion.unet import UNet, UNetConfig
from histosynth.errors import InputError, RunError
from histosynth.labels import read_label_map
from histosynth.runtime.weights import load_checkpoint, load_state_dict, save_checkpoint

ONNX_OPSET = 17


@dataclass(frozen=True)
class ExportReport:
    """What `export_bundle` wrote and how closely ONNX Runtime matched torch."""

    path: Path
    manifest: Manifest
    unet_max_abs_diff: float  # ONNX Runtime vs torch, random inputs, batch 2
    decoder_max_abs_diff: float
    tolerance: float
    file_sizes: dict[str, int]  # bytes per file, manifest included
    seconds: float
    guide_max_abs_diff: Optional[float] = None  # the guide UNet's, where the bundle has one
    experts_max_abs_diff: Optional[float] = None  # the largest of the noise-range experts', where it has them


def _cpu_copy(module: torch.nn.Module) -> torch.nn.Module:
    # Export works on a float32 CPU copy in eval mode, so the caller's (maybe training, maybe CUDA) model is untouched.
    return copy.deepcopy(module).to(device="cpu", dtype=torch.float32).eval()


def _export_onnx(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path,
                 input_names: tuple[str, ...], output_name: str) -> None:
    dynamic_axes = {name: {0: "batch"} for name in (*input_names, output_name)}
    with warnings.catch_warnings():
        # The legacy exporter is deprecated in favour of dynamo; it is still the one that handles these
        # networks' data-dependent argmin and dynamic batch reliably, so its deprecation notice is noise here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=ONNX_OPSET, input_names=list(input_names),
            output_names=[output_name], dynamic_axes=dynamic_axes, do_constant_folding=True,
        )


def _ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _max_abs_diff(a: np.ndarray, b: torch.Tensor) -> float:
    diff = np.abs(a.astype(np.float64) - b.numpy().astype(np.float64))
    return float(diff.max()) if diff.size else 0.0


def _is_plain_name(name: object) -> bool:
    # Only plain names directly inside the bundle folder may be moved or deleted: a hand-edited manifest
    # listing "../x" or "sub/y" must never make the exporter touch files outside what it wrote.
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name


def bundle_owned_files(bundle_dir: str | Path) -> set[str]:
    """Names of the files in `bundle_dir` that belong to the bundle there: its manifest and every file it lists.

    The manifest is read as plain JSON, so a damaged or newer-format manifest still names what it owns; the
    fixed files of this format are always included. Only plain names (no folders) are returned.
    """
    owned = {MANIFEST_NAME, *REQUIRED_FILES}
    try:
        listed = json.loads((Path(bundle_dir) / MANIFEST_NAME).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, or not a JSON object
        listed = None
    if isinstance(listed, dict):
        owned.update(name for name in listed if _is_plain_name(name))
    return owned


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` folder to `out`, which does not exist or is an empty folder."""
    if out.exists():
        out.rmdir()  # empty (checked by _check_target); fails loudly if a file appeared since
    os.replace(tmp, out)


def _replace_bundle_files(stage_dir: Path, out: Path, old_owned: set[str]) -> None:
    """Move the finished bundle files from `stage_dir` (inside `out`) into `out`, replacing the old bundle.

    Only files the old bundle owns (`old_owned`) are moved away; every other entry of `out` is left alone.
    The old manifest stays until the new one replaces it in a single rename, so at every moment the folder
    is either the old bundle, the new one, or (after a hard crash) the old manifest beside files that fail
    its hashes: loading refuses that, and `export --overwrite` can run again. On an exception everything is
    moved back; should that fail too, the old files stay in `.export-old-<pid>` inside `out`.
    """
    new_names = sorted(p.name for p in stage_dir.iterdir() if p.name != MANIFEST_NAME)
    backup = out / f".export-old-{os.getpid()}"
    backup.mkdir()
    moved_away: list[str] = []  # old bundle files now in `backup`
    placed: list[str] = []  # new files now in `out`
    try:
        for name in sorted(old_owned - {MANIFEST_NAME}):
            path = out / name
            if path.is_file() or path.is_symlink():  # never a folder: the exporter writes none
                os.replace(path, backup / name)
                moved_away.append(name)
        for name in new_names:
            os.replace(stage_dir / name, out / name)
            placed.append(name)
        os.replace(stage_dir / MANIFEST_NAME, out / MANIFEST_NAME)  # last: the new bundle is complete
    except BaseException:
        for name in reversed(placed):
            os.replace(out / name, stage_dir / name)
        for name in reversed(moved_away):
            os.replace(backup / name, out / name)
        backup.rmdir()  # empty again; if the rollback failed this line is not reached and the old files stay
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _check_target(out: Path, overwrite: bool) -> set[str] | None:
    """Refuse a target that is not a folder, not empty without `overwrite`, or not a bundle.

    Returns the names the bundle in `out` owns when it is to be replaced, None for a new or empty folder.
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if not (out.is_dir() and any(out.iterdir())):
        return None
    if not overwrite:
        raise InputError(f"--out {out}: folder is not empty; pass --overwrite to replace a bundle there")
    if not (out / MANIFEST_NAME).is_file():
        # Never touch a folder of unknown files, even when asked to overwrite.
        raise InputError(f"--out {out}: not empty and not a bundle (no {MANIFEST_NAME}); refusing to replace it")
    blocked = [name for name in (MANIFEST_NAME, *REQUIRED_FILES) if (out / name).is_dir()]
    if blocked:
        raise InputError(f"--out {out}: {', '.join(blocked)} is a folder, where the bundle writes a file; "
                         "move it away first")
    return bundle_owned_files(out)


def _facts(step: Optional[int], samples_seen: Optional[int]) -> dict[str, int]:
    """`step` and `samples_seen` for a weights file's metadata, where known."""
    facts = {"step": step, "samples_seen": samples_seen}
    return {k: int(v) for k, v in facts.items() if v is not None}


def export_bundle(
    vqgan: VQGAN | LatentDecoder,
    unet: UNet,
    out_dir: str | Path,
    *,
    class_names: list[str],
    class_labels: Sequence[Optional[str]] | None = None,
    class_label_names: Sequence[Optional[str]] | None = None,
    schedule_config: ScheduleConfig,
    latent_scale: float,
    tile_size: int,
    microns_per_pixel: float,
    provenance: Provenance | Mapping[str, Any] | None = None,
    tolerance: float = 1e-3,
    overwrite: bool = False,
    seed: int = 0,
    on_stage: Callable[[str], None] | None = None,
    guide_unet: Optional[UNet] = None,
    guide_facts: Optional[Mapping[str, int]] = None,
    unet_experts: Sequence[tuple[int, UNet]] = (),
    expert_facts: Optional[Mapping[int, Mapping[str, Any]]] = None,
) -> ExportReport:
    """Write a complete, verified bundle to `out_dir` and return an `ExportReport`.

    `vqgan` may be the full autoencoder or just its `LatentDecoder`; only the decoder half is written.
    `class_names[i]` names UNet class id `i`; `class_labels[i]` / `class_label_names[i]` (optional) record the
    lab's label value and its name that class `i` stands for (the label map's `label`, `label_name`). Raises `InputError` for inconsistent arguments and `RunError`
    when ONNX Runtime disagrees with torch by more than `tolerance` (nothing is written then). `guide_unet`
    (optional) is a weaker UNet of the same latents and classes, shipped for autoguidance with its
    `guide_facts` (`step`, `samples_seen`) in its weights file. `unet_experts` (optional) are (t_min, UNet) of
    noise-range experts with the UNet's config, ascending: each runs from its t_min to the next one's (or T),
    `unet` below the first (diffusion.experts); `expert_facts[t_min]` go in each one's weights file.
    """
    start = time.perf_counter()
    stage = on_stage or (lambda _msg: None)
    out = Path(out_dir).resolve()  # absolute, so the temporary sibling folder is well defined even for "."
    old_owned = _check_target(out, overwrite)  # None: a new or empty folder

    latent_decoder = vqgan.latent_decoder() if isinstance(vqgan, VQGAN) else vqgan
    vq_config: VQGANConfig = latent_decoder.config
    unet_config: UNetConfig = unet.config
    if len(class_names) != unet_config.num_classes:
        raise InputError(
            f"labels: {len(class_names)} class names for a UNet trained on {unet_config.num_classes} classes"
        )
    labels_of = list(class_labels) if class_labels is not None else [None] * len(class_names)
    label_names_of = list(class_label_names) if class_label_names is not None else [None] * len(class_names)
    if len(labels_of) != len(class_names) or len(label_names_of) != len(class_names):
        raise InputError(f"labels: {len(labels_of)} labels and {len(label_names_of)} label names for "
                         f"{len(class_names)} classes; give one (or None) per class")
    if list(class_names) != sorted(class_names):
        raise InputError(
            f"labels: class ids must follow the sorted order of names (got {', '.join(class_names)}), so that "
            "generate's class folders sort in id order; `histosynth review apply` numbers classes this way"
        )
    # That a guide sees the UNet's latents and classes is the manifest's rule, checked in the round trip below.
    guide_config: Optional[UNetConfig] = None if guide_unet is None else guide_unet.config
    expert_starts = [t_min for t_min, _ in unet_experts]
    for t_min, expert in unet_experts:
        if to_dict(expert.config) != to_dict(unet_config):
            raise InputError(f"unet_experts: the expert from t = {t_min} is not built like the UNet (config "
                             f"{to_dict(expert.config)} against {to_dict(unet_config)}); experts share its config")
    if unet_config.in_channels != vq_config.latent_channels:
        raise InputError(
            f"unet.in_channels ({unet_config.in_channels}) != vqgan.latent_channels ({vq_config.latent_channels}):"
            " the two checkpoints do not belong together"
        )
    f = vq_config.downsample_factor
    if tile_size <= 0 or tile_size % f:
        raise InputError(f"tile_size: {tile_size} must be a positive multiple of the VQ-GAN's factor f={f}")
    if not (latent_scale > 0 and np.isfinite(latent_scale)):
        raise InputError(f"latent_scale: must be a positive number, got {latent_scale}")
    if tolerance <= 0:
        raise InputError(f"tolerance: must be > 0, got {tolerance}")
    if provenance is None:
        provenance = Provenance()
    elif not isinstance(provenance, Provenance):
        provenance = from_dict(Provenance, dict(provenance), "provenance")
    if not provenance.date:
        provenance = Provenance(provenance.data, provenance.steps,
                                _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), provenance.extra)

    latent_shape = (vq_config.latent_channels, tile_size // f, tile_size // f)
    file_names = [UNET_ONNX, UNET_WEIGHTS, DECODER_ONNX, DECODER_WEIGHTS]
    if guide_unet is not None:
        file_names += [GUIDE_UNET_ONNX, GUIDE_UNET_WEIGHTS]
    for t_min in expert_starts:
        file_names += list(expert_files(t_min))
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        tile_size=tile_size,
        microns_per_pixel=float(microns_per_pixel),
        latent_shape=latent_shape,
        latent_scale=float(latent_scale),
        schedule=schedule_config,
        classes=[ClassEntry(i, name, label, label_name)
                 for i, (name, label, label_name) in enumerate(zip(class_names, labels_of, label_names_of))],
        null_id=unet_config.num_classes,
        files={name: "0" * 64 for name in file_names},
        provenance=provenance,
        unet=to_dict(unet_config),
        vqgan=to_dict(vq_config),
        created_with=histosynth.__version__,
        guide_unet={} if guide_config is None else to_dict(guide_config),
        unet_experts=expert_starts,
    )
    # Round trip through the parser: every nested check (class names, shapes) runs before any slow work.
    manifest = manifest_from_dict(to_dict(manifest))

    unet_cpu = _cpu_copy(unet)
    guide_cpu = None if guide_unet is None else _cpu_copy(guide_unet)
    experts_cpu = [(t_min, _cpu_copy(expert)) for t_min, expert in unet_experts]
    decoder_cpu = BundleDecoder(_cpu_copy(latent_decoder), latent_scale).eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    # A new folder is staged beside `out` and renamed as a whole. A bundle being replaced is staged inside
    # `out`, so the per-file renames stay on one file system and the files around it are never moved.
    if old_owned is None:
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    else:
        tmp = out / f".export-partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        stage("saving weights")
        # Each weights file keeps its training count, so that a later round that continues from the bundle
        # (`init_from: weights/.../unet.safetensors`) carries the compute ledger on.
        seen = provenance.extra.get("samples_seen") or {}
        save_checkpoint(unet_cpu, tmp / UNET_WEIGHTS, manifest.unet,
                        {"kind": "unet", **_facts(provenance.steps.get("ldm"), seen.get("ldm"))})
        if guide_cpu is not None:
            facts = dict(guide_facts or {})
            save_checkpoint(guide_cpu, tmp / GUIDE_UNET_WEIGHTS, manifest.guide_unet,
                            {"kind": "unet", "role": "guide", **_facts(facts.get("step"), facts.get("samples_seen"))})
        ranges = dict(zip(expert_starts, [*expert_starts[1:], schedule_config.num_train_steps]))
        for t_min, expert in experts_cpu:
            facts = dict((expert_facts or {}).get(t_min, {}))
            save_checkpoint(expert, tmp / expert_files(t_min)[1], manifest.unet,
                            {"kind": "unet", "role": "expert", "t_range": [t_min, ranges[t_min]],
                             **_facts(facts.get("step"), facts.get("samples_seen"))})
        save_checkpoint(decoder_cpu.latent_decoder, tmp / DECODER_WEIGHTS, manifest.vqgan,
                        {"kind": "decoder", "latent_scale": float(latent_scale),
                         **_facts(provenance.steps.get("vqgan"), seen.get("vqgan"))})

        # Random inputs for export tracing and the parity check (batch 2, the null class included).
        gen = torch.Generator().manual_seed(seed)
        n = 2
        x = torch.randn((n, *latent_shape), generator=gen)
        t = torch.randint(0, schedule_config.num_train_steps, (n,), generator=gen).float()
        class_ids = torch.tensor([0, unet_config.num_classes], dtype=torch.int64)
        # Decoder inputs are codebook vectors (in diffusion space): random latents could sit almost halfway
        # between two codes, where float rounding lets torch and ONNX Runtime pick different codes and the
        # check would fail for a reason that is not a bug.
        codebook = decoder_cpu.latent_decoder.quantizer.embedding.weight.detach()  # (K, C)
        picks = torch.randint(0, codebook.shape[0], (n, latent_shape[1], latent_shape[2]), generator=gen)
        latents = codebook[picks].permute(0, 3, 1, 2).contiguous() * latent_scale  # (N, C, h, w)

        stage("exporting unet.onnx")
        _export_onnx(unet_cpu, (x, t, class_ids), tmp / UNET_ONNX, UNET_INPUTS, UNET_OUTPUT)
        if guide_cpu is not None:
            stage("exporting guide_unet.onnx")
            _export_onnx(guide_cpu, (x, t, class_ids), tmp / GUIDE_UNET_ONNX, UNET_INPUTS, UNET_OUTPUT)
        for t_min, expert in experts_cpu:
            stage(f"exporting {expert_files(t_min)[0]}")
            _export_onnx(expert, (x, t, class_ids), tmp / expert_files(t_min)[0], UNET_INPUTS, UNET_OUTPUT)
        stage("exporting decoder.onnx")
        _export_onnx(decoder_cpu, (latents,), tmp / DECODER_ONNX, (DECODER_INPUT,), DECODER_OUTPUT)

        stage("checking ONNX Runtime against torch")
        unet_inputs = {"x": x.numpy(), "t": t.numpy(), "class_ids": class_ids.numpy()}
        diffs: dict[str, float] = {}
        try:
            unets = [("unet", unet_cpu, UNET_ONNX), ("guide unet", guide_cpu, GUIDE_UNET_ONNX),
                     *((f"expert from t = {t_min}", expert, expert_files(t_min)[0]) for t_min, expert in experts_cpu)]
            for name, module, onnx_file in unets:
                if module is not None:
                    with torch.inference_mode():
                        ref = module(x, t, class_ids)
                    diffs[name] = _max_abs_diff(_ort_session(tmp / onnx_file).run([UNET_OUTPUT], unet_inputs)[0], ref)
            with torch.inference_mode():
                ref_images = decoder_cpu(latents)
            images_ort = _ort_session(tmp / DECODER_ONNX).run([DECODER_OUTPUT], {DECODER_INPUT: latents.numpy()})[0]
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise RunError(f"ONNX Runtime cannot run the exported model: {e}") from None
        diffs["decoder"] = _max_abs_diff(images_ort, ref_images)
        unet_diff, decoder_diff = diffs["unet"], diffs["decoder"]
        for name, diff in diffs.items():
            if not diff <= tolerance:  # also catches NaN
                raise RunError(
                    f"export: ONNX Runtime differs from torch on the {name} by {diff:.3g} (tolerance {tolerance:g})"
                )

        stage("writing manifest")
        manifest = manifest.replace(files={name: sha256_file(tmp / name) for name in file_names})
        write_manifest(manifest, tmp / MANIFEST_NAME)  # last: a folder without it is not a bundle
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        if old_owned is None:
            _replace_dir(tmp, out)
        else:
            _replace_bundle_files(tmp, out, old_owned)
    finally:
        # Empty or gone after a successful move; the partial export after a failure.
        shutil.rmtree(tmp, ignore_errors=True)
    expert_diffs = [d for name, d in diffs.items() if name.startswith("expert")]
    return ExportReport(out, manifest, unet_diff, decoder_diff, tolerance, sizes, time.perf_counter() - start,
                        diffs.get("guide unet"), max(expert_diffs) if expert_diffs else None)


# --------------------------------------------------------------------------------------------------
# From training checkpoints


def _pick(key: str, override: Any, *sources: Mapping[str, Any]) -> Any:
    if override is not None:
        return override
    for source in sources:
        if key in source:
            return source[key]
    return None


def export_from_checkpoints(
    vqgan_ckpt: str | Path,
    unet_ckpt: str | Path,
    label_map: str | Path,
    out_dir: str | Path,
    *,
    tile_size: int | None = None,
    microns_per_pixel: float | None = None,
    latent_scale: float | None = None,
    data: str | None = None,
    tolerance: float = 1e-3,
    overwrite: bool = False,
    on_stage: Callable[[str], None] | None = None,
    guide_unet_ckpt: str | Path | None = None,
    unet_expert_ckpts: Sequence[str | Path] = (),
) -> ExportReport:
    """`histosynth export`: rebuild both networks from their checkpoints and write a bundle.

    Facts not given as arguments come from the checkpoints' `extra` metadata (UNet first, then VQ-GAN;
    keys in docs/bundle.md). A missing required fact is an `InputError` naming the option to pass.
    `guide_unet_ckpt` adds a weaker UNet checkpoint of the same latents and classes for autoguidance.
    `unet_expert_ckpts` add noise-range experts (`train cldm` with `t_min`/`t_max`; each records its `t_range`):
    their ranges must follow each other up to T, and `unet_ckpt` runs the timesteps below the first.
    """
    stage = on_stage or (lambda _msg: None)
    stage("reading checkpoints")
    vq_state, vq_config, vq_extra = load_checkpoint(vqgan_ckpt)
    unet_state, unet_config, unet_extra = load_checkpoint(unet_ckpt)
    for path, extra, kinds in ((vqgan_ckpt, vq_extra, ("vqgan",)), (unet_ckpt, unet_extra, ("unet", "ldm", "cldm"))):
        kind = extra.get("kind")
        if kind is not None and kind not in kinds:
            raise InputError(f"{path}: is a {kind!r} checkpoint, expected {' or '.join(kinds)}")
    labels = read_label_map(label_map)
    trained_names = unet_extra.get("class_names")
    label_names = [c.name for c in labels.classes]
    if trained_names and list(trained_names) != label_names:
        # The UNet learned class i from the label map it was trained with; another map would mislabel outputs.
        raise InputError(f"{label_map}: classes {label_names} differ from those {unet_ckpt} was trained on "
                         f"({list(trained_names)}); export with the label map used for `train cldm`")

    vqgan = VQGAN(from_dict(VQGANConfig, vq_config, f"{vqgan_ckpt}: config"))
    # Only the decoder half is exported; a checkpoint holding only that half loads too.
    if any(k.startswith("encoder.") for k in vq_state):
        load_state_dict(vqgan, vq_state, vqgan_ckpt)
        decoder: VQGAN | LatentDecoder = vqgan
    else:
        decoder = vqgan.latent_decoder()
        load_state_dict(decoder, vq_state, vqgan_ckpt)
    unet = UNet(from_dict(UNetConfig, unet_config, f"{unet_ckpt}: config"))
    load_state_dict(unet, unet_state, unet_ckpt)
    guide = None
    guide_facts: dict[str, int] = {}
    if guide_unet_ckpt is not None:
        guide_state, guide_config, guide_extra = load_checkpoint(guide_unet_ckpt)
        if guide_extra.get("kind") not in (None, "unet", "ldm", "cldm"):
            raise InputError(f"{guide_unet_ckpt}: is a {guide_extra.get('kind')!r} checkpoint, expected a UNet")
        guide_names = guide_extra.get("class_names")
        if guide_names and list(guide_names) != label_names:
            raise InputError(f"{guide_unet_ckpt}: trained on classes {list(guide_names)}, the label map has "
                             f"{label_names}; a guide must share the UNet's classes")
        guide = UNet(from_dict(UNetConfig, guide_config, f"{guide_unet_ckpt}: config"))
        load_state_dict(guide, guide_state, guide_unet_ckpt)
        guide_facts = {k: int(guide_extra[k]) for k in ("step", "samples_seen") if isinstance(guide_extra.get(k), int)}

    experts, expert_facts = _read_experts(unet_expert_ckpts, unet_ckpt, unet_extra, label_names)

    tile = _pick("tile_size", tile_size, unet_extra, vq_extra)
    if tile is None:
        raise InputError("--tile-size: not recorded in either checkpoint; pass it")
    scale = _pick("latent_scale", latent_scale, unet_extra, vq_extra)
    if scale is None:
        raise InputError(f"--latent-scale: not recorded in {unet_ckpt}; pass it")
    mpp = _pick("microns_per_pixel", microns_per_pixel, unet_extra, vq_extra)
    schedule = from_dict(ScheduleConfig, unet_extra.get("schedule", {}), f"{unet_ckpt}: extra.schedule")
    stages = (("vqgan", vq_extra), ("ldm", unet_extra))
    steps = {name: int(extra["step"]) for name, extra in stages if isinstance(extra.get("step"), int)}
    seen = {name: int(extra["samples_seen"]) for name, extra in stages if isinstance(extra.get("samples_seen"), int)}
    checkpoints = {"vqgan": Path(vqgan_ckpt).name, "unet": Path(unet_ckpt).name}
    if guide_unet_ckpt is not None:
        checkpoints["guide_unet"] = Path(guide_unet_ckpt).name
    provenance = Provenance(
        data=str(_pick("data", data, unet_extra, vq_extra) or ""),
        steps=steps,
        extra={**labels.extra, "checkpoints": checkpoints, **({"samples_seen": seen} if seen else {}),
               **({"guide_unet": guide_facts} if guide is not None else {}),
               **({"unet_experts": [{"t_min": t_min, **expert_facts[t_min]} for t_min, _ in experts]}
                  if experts else {})},
    )
    return export_bundle(
        decoder, unet, out_dir,
        class_names=[c.name for c in labels.classes],
        class_labels=[c.label for c in labels.classes],
        class_label_names=[c.label_name for c in labels.classes],
        schedule_config=schedule,
        latent_scale=float(scale),
        tile_size=int(tile),
        microns_per_pixel=float(mpp if mpp is not None else 0.5),
        provenance=provenance,
        tolerance=tolerance,
        overwrite=overwrite,
        on_stage=on_stage,
        guide_unet=guide,
        guide_facts=guide_facts,
        unet_experts=experts,
        expert_facts=expert_facts,
    )


def _read_experts(paths: Sequence[str | Path], unet_ckpt: str | Path, unet_extra: Mapping[str, Any],
                  label_names: list[str]) -> tuple[list[tuple[int, UNet]], dict[int, dict[str, Any]]]:
    """The expert UNets by t_min, with their facts (checkpoint name, step, samples seen); `InputError` unless
    their ranges follow each other up to T. Each checkpoint is read once."""
    if not paths:
        return [], {}
    top = int((unet_extra.get("schedule") or {}).get("num_train_steps", 1000))
    loaded = []
    for path in paths:
        state, config, extra = load_checkpoint(path)
        value = extra.get("t_range")
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and int(value[0]) > 0):
            raise InputError(f"--unet-expert {path}: records no noisier timestep range (t_range); an expert is a "
                             "`train cldm` run with t_min > 0 (docs/training.md)")
        loaded.append(((int(value[0]), int(value[1])), path, state, config, extra))
    experts: list[tuple[int, UNet]] = []
    facts: dict[int, dict[str, Any]] = {}
    end = None
    for (t_min, t_max), path, state, config, extra in sorted(loaded, key=lambda item: item[0]):
        if end is not None and t_min != end:
            raise InputError(f"--unet-expert {path}: starts at t = {t_min}, the previous range ends at {end}; "
                             "the experts' ranges must follow each other")
        names = extra.get("class_names")
        if names and list(names) != label_names:
            raise InputError(f"--unet-expert {path}: trained on classes {list(names)}, the label map has {label_names}")
        if extra.get("schedule") != unet_extra.get("schedule"):
            raise InputError(f"--unet-expert {path}: trained with schedule {extra.get('schedule')}, the UNet with "
                             f"{unet_extra.get('schedule')}; experts share one noise schedule")
        expert = UNet(from_dict(UNetConfig, config, f"{path}: config"))
        load_state_dict(expert, state, path)
        experts.append((t_min, expert))
        facts[t_min] = {"checkpoint": Path(path).name,
                        **{k: int(extra[k]) for k in ("step", "samples_seen") if isinstance(extra.get(k), int)}}
        end = t_max
    if end != top:
        raise InputError(f"--unet-expert: the last range ends at t = {end}, not at T = {top}; the experts must cover "
                         "every timestep from the first one's t_min on")
    base_range = unet_extra.get("t_range")
    if isinstance(base_range, (list, tuple)) and list(base_range) != [0, experts[0][0]]:
        raise InputError(f"{unet_ckpt}: an expert of t in {list(base_range)}, but as the bundle's UNet it runs "
                         f"t < {experts[0][0]} (below the first --unet-expert)")
    return experts, facts

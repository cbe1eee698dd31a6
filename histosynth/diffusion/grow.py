"""Grow a trained UNet into a deeper one that computes the same function (function-preserving warm start).

A UNet trained for millions of samples on a lent GPU cannot be retrained from scratch at a larger size on a 2-core
CPU, and `copy_matching_weights` copies nothing useful when the block layout changes. Growing keeps every trained
weight and adds blocks that start as the identity, so training continues from the trained model's quality with
more capacity (Net2DeeperNet, Chen et al. 2016, in the zero-initialised form of ADM's residual blocks):

- more residual blocks per level (`num_res_blocks`): a new encoder block is a fresh `ResBlock` whose last conv is
  zero (ADM initialises it so), i.e. the identity; it repeats the previous block's output as an extra skip. The
  decoder gains as many blocks, placed after each level's first block; they take `cat([h, skip])`, so their 1x1
  skip convolution is set to pass `h` and drop the skip, and their last conv is zero: the identity on `h`;
- self-attention at more levels (`attention_levels`): a fresh `AttentionBlock` has a zero output projection and
  is the identity.

Everything else (widths, heads, groups, the conditioning, the schedule) must stay as it was.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any

import torch

from histosynth.configio import from_dict
from histosynth.diffusion.unet import UNet, UNetConfig
from histosynth.errors import InputError

# The fields a deeper UNet may change; all others must match the source.
GROWABLE = ("num_res_blocks", "attention_levels", "dropout")
_STAGE = re.compile(r"^(down|up)\.(\d+)\.(\d+)\.(.+)$")


def check_growable(source: UNetConfig, target: UNetConfig) -> None:
    """Raise `InputError` naming every field that stops `source` from growing into `target`."""
    problems = [f"{f.name}: {getattr(source, f.name)!r} -> {getattr(target, f.name)!r}"
                for f in fields(UNetConfig)
                if f.name not in GROWABLE and getattr(source, f.name) != getattr(target, f.name)]
    if target.num_res_blocks < source.num_res_blocks:
        problems.append(f"num_res_blocks: {source.num_res_blocks} -> {target.num_res_blocks} (can only grow)")
    dropped = sorted(set(source.attention_levels) - set(target.attention_levels))
    if dropped:
        problems.append(f"attention_levels: {list(source.attention_levels)} -> {list(target.attention_levels)} "
                        f"drops level(s) {dropped} (can only add)")
    if problems:
        raise InputError("grow: the UNet cannot grow into this config; it may only add residual blocks "
                         f"(num_res_blocks) and attention levels, but: {'; '.join(problems)}")


def grown_from(stored: dict[str, Any] | None, target: UNetConfig) -> UNetConfig | None:
    """The config of a checkpoint that `target` deepens, or None when `target` is not a deeper copy of it.

    `stored` is the model config saved beside the weights. None means "not a growth" (equal configs, or a
    fine-tuning that `copy_matching_weights` handles, e.g. an LDM into a cLDM); a config that adds blocks or
    attention levels but also changes something else is an error, since nothing useful would be copied.
    """
    if not stored:
        return None
    try:
        source = from_dict(UNetConfig, stored, "init_from.config")
    except InputError:
        return None
    deeper = (target.num_res_blocks > source.num_res_blocks
              or bool(set(target.attention_levels) - set(source.attention_levels)))
    if not deeper:
        return None
    check_growable(source, target)
    return source


def _up_source_index(j: int, grown: int, blocks: int) -> int | None:
    """Which source decoder block the grown level's block `j` copies; None for a new identity block.

    A level of the source decoder has `blocks` + 1 blocks, the grown one `blocks + grown` + 1. Block 0 eats the
    last encoder output (unchanged, because the new encoder blocks repeat it); the `grown` new blocks follow it
    and eat the repeated skips; the source's remaining blocks keep their skips.
    """
    if j == 0:
        return 0
    if j <= grown:
        return None
    return j - grown


def deepen(state: dict[str, torch.Tensor], source: UNetConfig, target: UNetConfig) -> dict[str, torch.Tensor]:
    """Map the weights `state` of a UNet built from `source` onto a deeper `target` UNet with the same output.

    Returns a complete state dict for `UNet(target)`: trained tensors where they exist, identity blocks where
    the target adds them. New blocks' other weights come from `UNet(target)`'s initialisation under the current
    torch RNG (seed it first for a reproducible result); they do not change the output until trained.
    """
    check_growable(source, target)
    fresh = UNet(target).state_dict()
    grown = target.num_res_blocks - source.num_res_blocks
    out: dict[str, torch.Tensor] = {}
    for key, value in fresh.items():
        m = _STAGE.match(key)
        if m is None:
            src_key = key  # embeddings, conv_in/out, resampling, middle, output norm: unchanged layout
        else:
            side, level, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            if side == "down":
                src_j = j if j < source.num_res_blocks else None
            else:
                src_j = _up_source_index(j, grown, source.num_res_blocks)
            src_key = None if src_j is None else f"{side}.{level}.{src_j}.{rest}"
        if src_key is not None and src_key in state:
            src = state[src_key]
            if src.shape != value.shape:
                raise InputError(f"grow: {src_key} has shape {tuple(src.shape)}, the grown UNet's {key} "
                                 f"{tuple(value.shape)}: the checkpoint does not match its config")
            out[key] = src.to(value.dtype).clone()
        elif src_key is not None and ".attn." not in key:
            raise InputError(f"grow: the checkpoint lacks {src_key} (not a UNet built from its stored config?)")
        else:
            out[key] = value  # a new block (or a new attention block): fresh, identity by construction
    for level in range(len(target.channel_mult)):
        for j in range(1, grown + 1):
            _pass_h(out, f"up.{level}.{j}.res")
    return out


def _pass_h(state: dict[str, torch.Tensor], block: str) -> None:
    """Make the decoder block `block` the identity on `h` of its input `cat([h, skip])`: skip conv = [I | 0]."""
    conv2 = state[f"{block}.conv2.weight"]
    if conv2.abs().sum() != 0:  # fresh ResBlocks zero it; anything else would not be the identity
        raise InputError(f"grow: {block}.conv2 is not zero-initialised")
    weight = state[f"{block}.skip.weight"]  # (C_out, C_h + C_skip, 1, 1)
    width = weight.shape[0]
    identity = torch.zeros_like(weight)
    identity[:, :width, 0, 0] = torch.eye(width, dtype=weight.dtype)
    state[f"{block}.skip.weight"] = identity
    state[f"{block}.skip.bias"] = torch.zeros_like(state[f"{block}.skip.bias"])
    state[f"{block}.conv2.bias"] = torch.zeros_like(state[f"{block}.conv2.bias"])

"""Transformer key names: diffusers <-> BFL (the original flux / flux2 code), as data.

diffusers converts BFL checkpoints to its own names (loaders.single_file_utils); it has no way back. We need
both directions: to write checkpoints and LoRAs that BFL-based tools (ComfyUI, flux2, ai-toolkit for FLUX.2)
read, and to check diffusers' converter against an independent table. Each row maps one diffusers module
path to a BFL module path; fused BFL projections are listed as several diffusers modules concatenated along
the output dimension, in order.
"""

from __future__ import annotations

import re

# (diffusers pattern, BFL pattern); {i} is the block index. Modules, not parameters: ".weight"/".bias" follow.
FLUX2_MODULES: list[tuple[str, str]] = [
    ("x_embedder", "img_in"),
    ("context_embedder", "txt_in"),
    ("time_guidance_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_guidance_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_guidance_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_guidance_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("double_stream_modulation_img.linear", "double_stream_modulation_img.lin"),
    ("double_stream_modulation_txt.linear", "double_stream_modulation_txt.lin"),
    ("single_stream_modulation.linear", "single_stream_modulation.lin"),
    ("proj_out", "final_layer.linear"),
    ("norm_out.linear", "final_layer.adaLN_modulation.1"),  # halves swapped: diffusers (scale, shift)
    ("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn.proj"),
    ("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn.proj"),
    ("transformer_blocks.{i}.ff.linear_in", "double_blocks.{i}.img_mlp.0"),
    ("transformer_blocks.{i}.ff.linear_out", "double_blocks.{i}.img_mlp.2"),
    ("transformer_blocks.{i}.ff_context.linear_in", "double_blocks.{i}.txt_mlp.0"),
    ("transformer_blocks.{i}.ff_context.linear_out", "double_blocks.{i}.txt_mlp.2"),
    ("single_transformer_blocks.{i}.attn.to_qkv_mlp_proj", "single_blocks.{i}.linear1"),
    ("single_transformer_blocks.{i}.attn.to_out", "single_blocks.{i}.linear2"),
]
# RMSNorm scales: diffusers "<module>.weight" <-> BFL "<module>.scale".
FLUX2_NORMS: list[tuple[str, str]] = [
    ("transformer_blocks.{i}.attn.norm_q", "double_blocks.{i}.img_attn.norm.query_norm"),
    ("transformer_blocks.{i}.attn.norm_k", "double_blocks.{i}.img_attn.norm.key_norm"),
    ("transformer_blocks.{i}.attn.norm_added_q", "double_blocks.{i}.txt_attn.norm.query_norm"),
    ("transformer_blocks.{i}.attn.norm_added_k", "double_blocks.{i}.txt_attn.norm.key_norm"),
    ("single_transformer_blocks.{i}.attn.norm_q", "single_blocks.{i}.norm.query_norm"),
    ("single_transformer_blocks.{i}.attn.norm_k", "single_blocks.{i}.norm.key_norm"),
]
# BFL fused projections = diffusers modules concatenated on the output dimension.
FLUX2_FUSED: list[tuple[tuple[str, ...], str]] = [
    (tuple(f"transformer_blocks.{{i}}.attn.to_{x}" for x in "qkv"), "double_blocks.{i}.img_attn.qkv"),
    (tuple(f"transformer_blocks.{{i}}.attn.add_{x}_proj" for x in "qkv"), "double_blocks.{i}.txt_attn.qkv"),
]
SWAPPED = {"norm_out.linear"}

FLUX1_MODULES: list[tuple[str, str]] = [
    ("x_embedder", "img_in"),
    ("context_embedder", "txt_in"),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("proj_out", "final_layer.linear"),
    ("norm_out.linear", "final_layer.adaLN_modulation.1"),  # halves swapped, as for FLUX.2
    ("transformer_blocks.{i}.norm1.linear", "double_blocks.{i}.img_mod.lin"),
    ("transformer_blocks.{i}.norm1_context.linear", "double_blocks.{i}.txt_mod.lin"),
    ("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn.proj"),
    ("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn.proj"),
    ("transformer_blocks.{i}.ff.net.0.proj", "double_blocks.{i}.img_mlp.0"),
    ("transformer_blocks.{i}.ff.net.2", "double_blocks.{i}.img_mlp.2"),
    ("transformer_blocks.{i}.ff_context.net.0.proj", "double_blocks.{i}.txt_mlp.0"),
    ("transformer_blocks.{i}.ff_context.net.2", "double_blocks.{i}.txt_mlp.2"),
    ("single_transformer_blocks.{i}.norm.linear", "single_blocks.{i}.modulation.lin"),
    ("single_transformer_blocks.{i}.proj_out", "single_blocks.{i}.linear2"),
]
FLUX1_FUSED: list[tuple[tuple[str, ...], str]] = [
    (tuple(f"transformer_blocks.{{i}}.attn.to_{x}" for x in "qkv"), "double_blocks.{i}.img_attn.qkv"),
    (tuple(f"transformer_blocks.{{i}}.attn.add_{x}_proj" for x in "qkv"), "double_blocks.{i}.txt_attn.qkv"),
    ((*(f"single_transformer_blocks.{{i}}.attn.to_{x}" for x in "qkv"), "single_transformer_blocks.{i}.proj_mlp"),
     "single_blocks.{i}.linear1"),
]
FLUX1_NORMS = FLUX2_NORMS  # the same q/k RMSNorm places and names in both generations
TABLES = {"flux1": (FLUX1_MODULES, FLUX1_FUSED), "flux2": (FLUX2_MODULES, FLUX2_FUSED)}
NORMS = {"flux1": FLUX1_NORMS, "flux2": FLUX2_NORMS}


def bfl_module(module: str, family: str) -> tuple[str, int, int] | None:
    """Where a diffusers module lives in BFL naming: (BFL module, part index, parts) - parts > 1 when BFL fuses
    several diffusers projections into one Linear (qkv; FLUX.1's linear1 = q, k, v, mlp). None if unknown."""
    modules, fused = TABLES[family]
    for parts, bfl in fused:
        for n, part in enumerate(parts):
            m = _regex(part).match(module)
            if m:
                return bfl.replace("{i}", m.groupdict().get("i", "")), n, len(parts)
    for dif, bfl in modules:
        m = _regex(dif).match(module)
        if m:
            return bfl.replace("{i}", m.groupdict().get("i", "")), 0, 1
    return None


def _regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def bfl_recipe(keys, family: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """How each BFL tensor of a FLUX.1/FLUX.2 transformer is made from diffusers-named ones, reading no
    values: BFL name -> (how, diffusers keys), how being "cat" (fused along dim 0: qkv, FLUX.1's linear1),
    "swap" (the two halves exchanged: the final modulation) or "same". Raises ValueError for a key with no
    BFL name."""
    keys = list(keys)
    modules, fused = TABLES[family]
    out, used = {}, set()
    for parts, bfl in fused:
        rx = _regex(parts[0])
        for key in keys:
            module, _, param = key.rpartition(".")
            m = rx.match(module)
            if m:
                i = m.group("i")
                names = tuple(p.replace("{i}", i) + "." + param for p in parts)
                out[bfl.replace("{i}", i) + "." + param] = ("cat", names)
                used.update(names)
    for table, norm in ((modules, False), (NORMS[family], True)):
        for dif, bfl in table:
            rx = _regex(dif)
            for key in keys:
                module, _, param = key.rpartition(".")
                m = rx.match(module)
                if not m or key in used:
                    continue
                i = m.groupdict().get("i", "")
                new_param = "scale" if norm and param == "weight" else param
                out[bfl.replace("{i}", i) + "." + new_param] = ("swap" if dif in SWAPPED else "same", (key,))
                used.add(key)
    left = sorted(set(keys) - used)
    if left:
        raise ValueError(f"no BFL name for {len(left)} key(s), e.g. {left[0]}")
    return out


def bfl_shape(how: str, shapes: list[tuple]) -> tuple:
    """The shape a recipe entry makes from its parts' shapes."""
    if how == "cat":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return tuple(shapes[0])


def bfl_tensor(how: str, parts: list):
    """Make one BFL tensor from its diffusers parts (bfl_recipe)."""
    import torch

    if how == "cat":
        return torch.cat(parts, dim=0)
    if how == "swap":
        scale_half, shift_half = parts[0].chunk(2, dim=0)
        return torch.cat([shift_half, scale_half], dim=0)
    return parts[0]


def transformer_to_bfl(sd: dict, family: str) -> dict:
    """A diffusers-named FLUX.1/FLUX.2 transformer state dict in BFL names (weights shared, fused where BFL
    fuses): the layout of BFL's checkpoints, ComfyUI and community GGUF files."""
    return {name: bfl_tensor(how, [sd[k] for k in keys]) for name, (how, keys) in bfl_recipe(sd, family).items()}

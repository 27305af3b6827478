"""A Stable Diffusion 1.x pipeline written as one checkpoint file in the original (LDM)
layout, the format of `v1-5-pruned-emaonly.safetensors` and most community fine-tunes.

The inverse of diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and
`convert_ldm_clip_checkpoint`, for any block count and layers per block, so a tiny random
pipeline can be loaded back through `from_single_file` offline: the real conversion code
then runs on it.
"""

from __future__ import annotations

import re

import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _rename(rest: str, names: dict[str, str]) -> str:
    for new, old in names.items():
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    with_attention = {
        int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.attentions", k)
    }
    out = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + block * (layers + 1) + j
            rest = _rename(rest, RESNET) if kind == "resnets" else rest
            out[f"input_blocks.{index}.{0 if kind == 'resnets' else 1}.{rest}"] = value
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            out[f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"] = value
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            out[f"middle_block.{2 * int(m[1])}.{_rename(m[2], RESNET)}"] = value
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            out[f"middle_block.1.{m[1]}"] = value
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            rest = _rename(rest, RESNET) if kind == "resnets" else rest
            out[
                f"output_blocks.{block * (layers + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
            ] = value
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            block = int(m[1])
            slot = 2 if block in with_attention else 1
            out[f"output_blocks.{block * (layers + 1) + layers}.{slot}.conv.{m[2]}"] = value
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["vae"])
    out = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
        elif m := re.match(
            r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key
        ):
            part, way, block, j, rest = m[1], m[2], int(m[3]), m[4], m[5]
            block = block if way == "down" else num_blocks - 1 - block
            rest = rest.replace("conv_shortcut", "nin_shortcut")
            out[f"{part}.{way}.{block}.block.{j}.{rest}"] = value
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            out[f"encoder.down.{m[1]}.downsample.conv.{m[2]}"] = value
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            out[f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"] = value
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            rest = m[3].replace("conv_shortcut", "nin_shortcut")
            out[f"{m[1]}.mid.block_{int(m[2]) + 1}.{rest}"] = value
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            rest = _rename(m[2], VAE_ATTENTION)
            conv = value.dim() == 2  # the original attention is 1×1 convolutions
            out[f"{m[1]}.mid.attn_1.{rest}"] = value[:, :, None, None] if conv else value
        else:
            raise KeyError(f"no LDM name for VAE key {key}")
    return out


def sd_single_file(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder under the original checkpoint's prefixes."""
    unet = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block)
    vae = vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.down_block_types))
    # The original CLIP keys start with text_model. (transformers 5 drops it in state_dict).
    text = {
        k if k.startswith("text_model.") else f"text_model.{k}": v
        for k, v in pipe.text_encoder.state_dict().items()
    }
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    checkpoint |= {f"first_stage_model.{k}": v for k, v in vae.items()}
    checkpoint |= {f"cond_stage_model.transformer.{k}": v for k, v in text.items()}
    return {k: v.contiguous() for k, v in checkpoint.items()}

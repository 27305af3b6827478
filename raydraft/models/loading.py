"""Loading a diffusers pipeline for an adapter: local files only, one clear error each for
a missing path, a missing weight and a directory of another model family."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.single_file_utils import LDM_VAE_KEYS, load_single_file_checkpoint
from safetensors import safe_open

from raydraft.config import ModelConfig
from raydraft.local_weights import not_loadable
from raydraft.models.trainable import TrainableDenoiser

# model_index.json's `_class_name` → the model.family whose adapter loads it.
FAMILY_OF_PIPELINE = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}


def load_pipeline(
    pipeline_class: type[DiffusionPipeline], cfg: ModelConfig, denoiser_name: str, **kwargs
) -> DiffusionPipeline:
    """The pipeline of model.path; or, with a single-file model.path, the whole pipeline
    from the file when it holds one (original layout, converted by diffusers), else its
    denoiser from the file (original or diffusers layout) and the rest from
    model.pipeline_path, which also gives every component's config."""
    if not cfg.path:
        raise ValueError(
            f"model.path is required for family {cfg.family!r} (a diffusers directory)"
        )
    directory = cfg.pipeline_path or cfg.path
    _check_family(pipeline_class, cfg, directory)
    dtype = getattr(torch, cfg.dtype)
    if cfg.pipeline_path:
        if not Path(cfg.path).is_file():
            raise FileNotFoundError(f"model.path {cfg.path!r}: no such checkpoint file")
        if _holds_a_vae(cfg.path):  # a whole pipeline in one file (SD 1.5, SDXL, SD3.5)
            try:
                return pipeline_class.from_single_file(
                    cfg.path, config=directory, torch_dtype=dtype, local_files_only=True, **kwargs
                )
            except (OSError, ValueError) as err:
                raise not_loadable(cfg.path, pipeline_class, err, "model.path") from None
        denoiser_class = pipeline_class._get_signature_types()[denoiser_name][0]
        try:
            kwargs[denoiser_name] = denoiser_class.from_single_file(
                cfg.path,
                config=directory,
                subfolder=denoiser_name,
                torch_dtype=dtype,
                local_files_only=True,
            )
        except (OSError, ValueError) as err:
            raise not_loadable(cfg.path, denoiser_class, err, "model.path") from None
    try:
        return pipeline_class.from_pretrained(
            directory, torch_dtype=dtype, local_files_only=True, **kwargs
        )
    except (OSError, ValueError) as err:
        key = "model.pipeline_path" if cfg.pipeline_path else "model.path"
        raise not_loadable(directory, pipeline_class, err, key) from None


def _holds_a_vae(path: str) -> bool:
    """Whether a checkpoint file is a whole pipeline: its VAE is in it (under the original
    layouts' prefixes); safetensors headers are read without loading the weights."""
    if path.endswith((".safetensors", ".sft")):
        with safe_open(path, "pt") as checkpoint:
            keys = list(checkpoint.keys())
    else:
        keys = list(load_single_file_checkpoint(path, local_files_only=True))
    return any(key.startswith(tuple(LDM_VAE_KEYS)) for key in keys)


def _check_family(pipeline_class: type[DiffusionPipeline], cfg: ModelConfig, directory: str):
    index = Path(directory) / "model_index.json"
    if index.is_file():
        found = json.loads(index.read_text()).get("_class_name")
        family = FAMILY_OF_PIPELINE.get(found)
        if found != pipeline_class.__name__:
            hint = f": set model.family={family}" if family else ""
            key = "model.pipeline_path" if cfg.pipeline_path else "model.path"
            raise ValueError(
                f"{key} {directory!r} holds a {found}, and model.family={cfg.family!r} "
                f"loads a {pipeline_class.__name__}{hint}"
            )


def export_pipeline(
    pipe: DiffusionPipeline, trainable: TrainableDenoiser, denoiser: str, out_dir: str | Path
) -> None:
    """A LoRA in diffusers' format (`pipe.load_lora_weights(out_dir)` loads it unchanged), or
    with full fine-tuning the whole pipeline as a diffusers directory."""
    if not trainable.uses_lora:
        pipe.save_pretrained(out_dir)
        return
    type(pipe).save_lora_weights(
        out_dir,
        **{
            f"{denoiser}_lora_layers": trainable.state(),
            f"{denoiser}_lora_adapter_metadata": trainable.lora_metadata(),
        },
    )

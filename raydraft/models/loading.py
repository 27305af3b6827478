"""Loading a diffusers pipeline for an adapter: local files only, one clear error each for
a missing path, a missing weight and a directory of another model family."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from raydraft.config import ModelConfig
from raydraft.models.trainable import TrainableDenoiser

# model_index.json's `_class_name` → the model.family whose adapter loads it.
FAMILY_OF_PIPELINE = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}


def load_pipeline(pipeline_class: type[DiffusionPipeline], cfg: ModelConfig, **kwargs):
    if not cfg.path:
        raise ValueError(
            f"model.path is required for family {cfg.family!r} (a diffusers directory)"
        )
    index = Path(cfg.path) / "model_index.json"
    if index.is_file():
        found = json.loads(index.read_text()).get("_class_name")
        family = FAMILY_OF_PIPELINE.get(found)
        if found != pipeline_class.__name__:
            hint = f": set model.family={family}" if family else ""
            raise ValueError(
                f"model.path {cfg.path!r} holds a {found}, and model.family={cfg.family!r} "
                f"loads a {pipeline_class.__name__}{hint}"
            )
    try:
        return pipeline_class.from_pretrained(
            cfg.path, torch_dtype=getattr(torch, cfg.dtype), local_files_only=True, **kwargs
        )
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"model.path {cfg.path!r}: cannot load a {pipeline_class.__name__} from it "
            f"({reason}). The weights must be present locally (a diffusers directory or a "
            f"hub id already in the cache): raydraft never downloads them. {_fetch_hint(cfg.path)}"
        ) from None


def _fetch_hint(path: str) -> str:
    if Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        return f"Fetch one into that directory with `hf download REPO_ID --local-dir {path}`."
    return (
        f"Fetch it into the hub cache with `hf download {path}` where the hub is reachable "
        "(the same HF_HUB_CACHE, or copy the cache over), or set model.path to a directory."
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

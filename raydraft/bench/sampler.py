"""`raydraft bench sampler`: our rollout sampler against the plain diffusers pipeline call.

Same model, steps, batch, guidance and seeds; the ratio is our images/s over the
pipeline's, measured side by side (median of `repeats`, after a warm-up of each). Ours:
encode + the sampling loop over `policy.predict` + decode, deterministic and stochastic
with per-step log-probs (what a Flow-GRPO/DDPO rollout records): DDIM eta 0 / eta 1 for
`family=sd`, the flow ODE / SDE for `family=flux`. The model is built from configs with
random weights (no download), saved and loaded through the adapter. `size=small` fits a
CPU; `size=full` is the real architecture (SD 1.5's, FLUX.1-dev's), for a GPU.
"""

from __future__ import annotations

import tempfile

import torch

from raydraft.bench.machine import describe
from raydraft.bench.options import parse_options
from raydraft.bench.timing import median_seconds

# guidance 0 and dtype "": the family's default guidance, bfloat16 on a GPU (else float32).
DEFAULTS = {"family": "sd", "size": "small", "batch": 4, "steps": 10, "repeats": 3,
            "guidance": 0.0, "dtype": ""}  # fmt: skip
GUIDANCE = {"sd": 7.5, "flux": 3.5}  # the pipelines' defaults (FLUX: the embedded guidance)
T5_TOKENS = {"small": 128, "full": 512}  # FLUX prompt length
SIDES = {("sd", "small"): 32, ("sd", "full"): 512, ("flux", "small"): 64, ("flux", "full"): 1024}


def build_sd_pipeline(size: str):
    """A StableDiffusionPipeline: `full` is SD 1.5's UNet, VAE and CLIP-L (diffusers is
    imported here, not when `raydraft bench` loads the list of benchmarks)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from raydraft.models.tokenizers import byte_clip_tokenizer

    full = size == "full"
    channels = (320, 640, 1280, 1280) if full else (32, 64)
    width, n = 768 if full else 64, len(channels)
    unet = UNet2DConditionModel(
        sample_size=64 if full else 16,
        block_out_channels=channels,
        layers_per_block=2 if full else 1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=width,
        attention_head_dim=8,
    )
    tokenizer = byte_clip_tokenizer(max_length=77)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    return StableDiffusionPipeline(
        unet=unet, vae=_vae(size, latent_channels=4, scaling_factor=0.18215),
        text_encoder=CLIPTextModel(_clip_config(size, width, tokenizer)),
        tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def build_flux_pipeline(size: str):
    """A FluxPipeline: `full` is FLUX.1-dev's transformer (19 double + 38 single blocks),
    VAE, CLIP-L and T5-XXL, about 17B weights (bf16 on a GPU)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from raydraft.models.tokenizers import byte_clip_tokenizer, char_t5_tokenizer

    full = size == "full"
    t5_width = 4096 if full else 128
    transformer = FluxTransformer2DModel(
        in_channels=64,
        num_layers=19 if full else 2,
        num_single_layers=38 if full else 4,
        attention_head_dim=128 if full else 32,
        num_attention_heads=24 if full else 4,
        joint_attention_dim=t5_width,
        pooled_projection_dim=768 if full else 64,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56) if full else (8, 12, 12),
    )
    tokenizer, tokenizer_2 = byte_clip_tokenizer(max_length=77), char_t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(size, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModel(_clip_config(size, 768 if full else 64, tokenizer)),
        tokenizer=tokenizer, text_encoder_2=T5EncoderModel(_t5_config(size, tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )  # fmt: skip


def build_sd3_pipeline(size: str):
    """A StableDiffusion3Pipeline: `full` is SD3.5 Medium's MM-DiT (24 blocks, dual
    attention in the first 13, RMS qk-norm), its 16-channel VAE, CLIP-L, CLIP-G and
    T5-XXL, about 8B weights."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from raydraft.models.tokenizers import byte_clip_tokenizer, char_t5_tokenizer

    full = size == "full"
    heads, head_dim = (24, 64) if full else (4, 32)
    clip_l, clip_g = (768, 1280) if full else (64, 64)
    transformer = SD3Transformer2DModel(
        sample_size=128 if full else 16, patch_size=2, in_channels=16, out_channels=16,
        num_layers=24 if full else 2, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=4096 if full else 128, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=clip_l + clip_g, pos_embed_max_size=384 if full else 32,
        dual_attention_layers=tuple(range(13)) if full else (0,), qk_norm="rms_norm",
    )  # fmt: skip
    tokenizer, tokenizer_3 = byte_clip_tokenizer(max_length=77), char_t5_tokenizer()
    encoders = {
        name: CLIPTextModelWithProjection(
            _clip_config(size, width, tokenizer, layers, heads, projection_dim=width)
        )
        for name, width, layers, heads in (
            ("text_encoder", clip_l, 12, 12), ("text_encoder_2", clip_g, 32, 20)
        )
    }  # fmt: skip
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(size, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                 use_quant_conv=False, use_post_quant_conv=False),
        tokenizer=tokenizer, tokenizer_2=tokenizer, **encoders,
        text_encoder_3=T5EncoderModel(_t5_config(size, tokenizer_3)), tokenizer_3=tokenizer_3,
    )  # fmt: skip


def _vae(size: str, **config):
    from diffusers import AutoencoderKL

    full = size == "full"
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512) if full else (32, 64),
        down_block_types=("DownEncoderBlock2D",) * (4 if full else 2),
        up_block_types=("UpDecoderBlock2D",) * (4 if full else 2),
        layers_per_block=2 if full else 1,
        **config,
    )


def _clip_config(size: str, width: int, tokenizer, layers: int = 12, heads: int = 12, **extra):
    """CLIP-L's text tower at `full` (or CLIP-G's with 32 layers and 20 heads)."""
    from transformers import CLIPTextConfig

    full = size == "full"
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=layers if full else 2, num_attention_heads=heads if full else 2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra,
    )  # fmt: skip


def _t5_config(size: str, tokenizer):
    """T5-XXL's encoder at `full` (FLUX.1's and SD3's third text encoder)."""
    from transformers import T5Config

    full = size == "full"
    return T5Config(
        vocab_size=len(tokenizer), d_model=4096 if full else 128, d_kv=64 if full else 32,
        d_ff=10240 if full else 256, num_layers=24 if full else 2,
        num_heads=64 if full else 4, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip


def run(options: list[str]) -> None:
    from raydraft.build import build_policy
    from raydraft.config import LoraConfig, ModelConfig, SamplerConfig
    from raydraft.sampling.loop import StepNoise, denoise
    from raydraft.sampling.samplers import build_sampler
    from raydraft.seeds import SDE_NOISE

    opts = parse_options("sampler", options, DEFAULTS)
    family, size = opts["family"], opts["size"]
    batch, steps, repeats = opts["batch"], opts["steps"], opts["repeats"]
    guidance = opts["guidance"] or GUIDANCE[family]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = opts["dtype"] or ("bfloat16" if device == "cuda" else "float32")
    prompts = [f"a photo of thing {i}" for i in range(batch)]
    seeds = list(range(batch))
    samplers = {  # label: sampler config (the stochastic one records log-probs)
        "sd": {
            "ours, DDIM eta 0": SamplerConfig(kind="ddim", noise_level=0.0),
            "ours, DDIM eta 1 + log-probs": SamplerConfig(kind="ddim", noise_level=1.0),
        },
        "flux": {
            "ours, flow ODE": SamplerConfig(kind="ode"),
            "ours, flow SDE + log-probs": SamplerConfig(kind="sde", noise_level=0.7),
        },
    }[family]
    side = SIDES[family, size]  # pixels
    extra = {"max_sequence_length": T5_TOKENS[size]} if family == "flux" else {}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        build = build_sd_pipeline if family == "sd" else build_flux_pipeline
        build(size).to(dtype=getattr(torch, dtype)).save_pretrained(directory)
        cfg = ModelConfig(
            family=family, path=directory, dtype=dtype, device=device, resolution=side,
            lora=LoraConfig(enabled=False), **extra,
        )  # fmt: skip
        policy = build_policy(cfg)
        pipe = policy.pipe
        pipe.set_progress_bar_config(disable=True)

        def pipeline_call() -> None:
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                 generator=generators, output_type="pt", height=side, width=side,
                 **extra)  # fmt: skip

        def ours(sampler_cfg: SamplerConfig) -> None:
            sampler = build_sampler(sampler_cfg, policy, steps)
            stochastic = sampler_cfg.noise_level > 0
            x = denoise(
                policy, policy.encode(prompts), policy.initial_noise(seeds), sampler,
                range(steps), guidance, StepNoise(seeds, SDE_NOISE),
                torch.full((steps,), stochastic), record=stochastic,
            ).x  # fmt: skip
            policy.decode(x)

        with torch.no_grad():
            cells = {"pipeline": median_seconds(pipeline_call, repeats, warm_up=True)}
            for label, sampler_cfg in samplers.items():
                cells[label] = median_seconds(lambda c=sampler_cfg: ours(c), repeats, warm_up=True)
    print(f"# raydraft bench sampler: {describe(device)}, "
          f"{size} {family} pipeline ({side}x{side} px), {dtype}, batch {batch}, "
          f"{steps} steps, guidance {guidance}")  # fmt: skip
    print("| sampler | s per batch | images/s | vs pipeline |\n|---|---|---|---|")
    for label, seconds in cells.items():
        ratio = cells["pipeline"] / seconds
        print(f"| {label} | {seconds:.3f} | {batch / seconds:.2f} | {ratio:.3f} |")

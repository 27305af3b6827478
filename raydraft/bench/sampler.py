"""`raydraft bench sampler`: our rollout sampler against the plain diffusers pipeline call.

Same model, steps, batch, guidance and seeds; the ratio is our images/s over the
pipeline's, measured side by side (median of `repeats`, after a warm-up of each). Ours:
encode + DDIM loop over `policy.predict` + decode, deterministic (eta 0) and stochastic
with per-step log-probs (eta 1, what a Flow-GRPO/DDPO rollout records). The model is an
SD 1.x-shaped pipeline built from configs with random weights (no download), saved and
loaded through the adapter; `size=small` fits a CPU, `size=sd15` is SD 1.5's UNet, VAE and
text encoder (for a GPU).
"""

from __future__ import annotations

import platform
import tempfile

import torch

from raydraft.bench.timing import median_seconds

DEFAULTS = {"size": "small", "batch": 4, "steps": 10, "guidance": 7.5, "repeats": 3}
SIZES = {  # UNet channels, layers per block, cross-attention width, latent side
    "small": ((32, 64), 1, 64, 16),
    "sd15": ((320, 640, 1280, 1280), 2, 768, 64),
}


def build_pipeline(size: str):
    """A StableDiffusionPipeline of `size` with random weights (diffusers is imported here,
    not when `raydraft bench` loads the list of benchmarks)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    channels, layers, width, side = SIZES[size]
    n = len(channels)
    unet = UNet2DConditionModel(
        sample_size=side,
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=width,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512) if size == "sd15" else (32, 64),
        down_block_types=("DownEncoderBlock2D",) * (4 if size == "sd15" else 2),
        up_block_types=("UpDecoderBlock2D",) * (4 if size == "sd15" else 2),
        latent_channels=4,
        layers_per_block=2 if size == "sd15" else 1,
        sample_size=side * (8 if size == "sd15" else 2),
    )
    vocab = {chr(c): i for i, c in enumerate(range(33, 127))}
    vocab |= {f"{c}</w>": i + len(vocab) for c, i in list(vocab.items())}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=12 if size == "sd15" else 2,
            num_attention_heads=12 if size == "sd15" else 2,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


def run(options: list[str]) -> None:
    from raydraft.config import LoraConfig, ModelConfig
    from raydraft.models.sd import SDPolicy
    from raydraft.sampling.loop import StepNoise, denoise
    from raydraft.sampling.samplers import DDIMSampler

    opts = dict(DEFAULTS) | dict(o.split("=", 1) for o in options)
    size, batch, steps = opts["size"], int(opts["batch"]), int(opts["steps"])
    guidance, repeats = float(opts["guidance"]), int(opts["repeats"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = opts.get("dtype", "bfloat16" if device == "cuda" else "float32")
    prompts = [f"a photo of thing {i}" for i in range(batch)]
    seeds = list(range(batch))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        build_pipeline(size).save_pretrained(directory)
        cfg = ModelConfig(
            family="sd", path=directory, dtype=dtype, device=device,
            lora=LoraConfig(enabled=False),
        )  # fmt: skip
        policy = SDPolicy.from_pretrained(cfg)
        pipe = policy.pipe
        pipe.set_progress_bar_config(disable=True)
        side = policy.latent_shape[1] * pipe.vae_scale_factor

        def pipeline_call() -> None:
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                 generator=generators, output_type="pt", height=side, width=side)  # fmt: skip

        def ours(eta: float) -> None:
            sampler = DDIMSampler.from_scheduler(policy.scheduler, steps, eta)
            mask = torch.full((steps,), eta > 0)
            x = policy.initial_noise(seeds)
            x = denoise(
                policy, policy.encode(prompts), x, sampler, range(steps), guidance,
                StepNoise(seeds), mask, record=eta > 0,
            ).x  # fmt: skip
            policy.decode(x)

        with torch.no_grad():
            cells = {
                "pipeline": median_seconds(pipeline_call, repeats, warm_up=True),
                "ours, DDIM eta 0": median_seconds(lambda: ours(0.0), repeats, warm_up=True),
                "ours, DDIM eta 1 + log-probs": median_seconds(
                    lambda: ours(1.0), repeats, warm_up=True
                ),
            }
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor()
    print(f"# raydraft bench sampler: {name or platform.machine()}, torch {torch.__version__}, "
          f"{size} SD pipeline ({side}x{side} px), {dtype}, batch {batch}, {steps} steps, "
          f"CFG {guidance}")  # fmt: skip
    print("| sampler | s per batch | images/s | vs pipeline |\n|---|---|---|---|")
    for label, seconds in cells.items():
        ratio = cells["pipeline"] / seconds
        print(f"| {label} | {seconds:.3f} | {batch / seconds:.2f} | {ratio:.3f} |")

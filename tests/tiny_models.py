"""Tiny random-weight models of the real diffusers/transformers classes, for offline tests.

No download anywhere: tokenizers are built in memory, weights are random but seeded, so a
build is the same every time and a save/load round trip is exact.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from raydraft.bench.reward_models import save_clip
from raydraft.models.tokenizers import byte_clip_tokenizer, char_t5_tokenizer

CLIP_MAX_TOKENS = 16
LATENT_CHANNELS = 16  # SD3's VAE
SAMPLE_SIZE = 8  # latent side; the VAE halves the pixels, so 16×16 images
JOINT_ATTENTION_DIM = 32  # T5 width; the two CLIP widths (8 + 16) are zero-padded up to it
POOLED_DIM = 64  # CLIP-L projection 32 + CLIP-G projection 32


def clip_tokenizer() -> CLIPTokenizer:
    return byte_clip_tokenizer(max_length=CLIP_MAX_TOKENS)


def _clip(
    vocab_size: int,
    hidden: int,
    tokenizer: CLIPTokenizer,
    model_class: type = CLIPTextModelWithProjection,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=POOLED_DIM // 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_TOKENS,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model_class(config).eval()


def build_tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """An SD3.5-shaped pipeline (dual attention in block 0, RMS qk-norm) in about 200k weights."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_3 = clip_tokenizer(), char_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=SAMPLE_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=JOINT_ATTENTION_DIM,
        caption_projection_dim=32,  # must equal heads × head_dim
        pooled_projection_dim=POOLED_DIM,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = _vae(
        LATENT_CHANNELS,
        scaling_factor=1.5305,  # SD3's
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    text_encoder = _clip(len(tokenizer), 8, tokenizer)
    text_encoder_2 = _clip(len(tokenizer), 16, tokenizer)
    text_encoder_3 = _t5(tokenizer_3)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def save_tiny_sd3(dirpath: str | Path, seed: int = 0) -> Path:
    """A diffusers directory (model_index.json and one folder per component)."""
    path = Path(dirpath)
    build_tiny_sd3_pipeline(seed).save_pretrained(path)
    return path


def _t5(tokenizer: T5Tokenizer) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=JOINT_ATTENTION_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    ).eval()


def build_tiny_flux_pipeline(variant: str = "dev", seed: int = 0) -> FluxPipeline:
    """A FLUX.1-shaped pipeline: one double-stream and one single-stream block over 2×2
    packed latents with 3-axis RoPE, CLIP pooled + T5 conditioning. "dev" has the guidance
    embedding and dev's resolution-dependent shift; "schnell" neither (shift 1)."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizer(), char_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # packed 2×2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=JOINT_ATTENTION_DIM,
        pooled_projection_dim=16,  # CLIP-L's pooled output (its hidden size)
        guidance_embeds=variant == "dev",
        axes_dims_rope=(2, 2, 4),  # sums to the head dim
    )
    schedules = {  # the released checkpoints' scheduler configs
        "dev": {"shift": 3.0, "use_dynamic_shifting": True},
        "schnell": {"shift": 1.0, "use_dynamic_shifting": False},
    }
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
        **schedules[variant],
    )
    vae = _vae(
        LATENT_CHANNELS,
        scaling_factor=0.3611,  # FLUX.1's
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=_clip(len(tokenizer), 16, tokenizer, CLIPTextModel),
        tokenizer=tokenizer,
        text_encoder_2=_t5(tokenizer_2),
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )


def save_tiny_flux(dirpath: str | Path, variant: str = "dev", seed: int = 0) -> Path:
    path = Path(dirpath)
    build_tiny_flux_pipeline(variant, seed).save_pretrained(path)
    return path


def _sd_unet(cross_attention_dim: int, **sdxl) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
        **sdxl,
    )


def _vae(latent_channels: int, **config) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=2 * SAMPLE_SIZE,
        **config,
    )


def _sd_scheduler(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(  # SD 1.5's and SDXL's schedule
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_sd_pipeline(
    prediction_type: str = "epsilon", seed: int = 0
) -> StableDiffusionPipeline:
    """An SD 1.x-shaped pipeline (cross-attention UNet, 4-channel VAE, CLIP-L) in ~100k weights."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    unet = _sd_unet(cross_attention_dim=16)
    vae = _vae(4, scaling_factor=0.18215)  # SD 1.x's
    text_encoder = _clip(len(tokenizer), 16, tokenizer, CLIPTextModel)
    return StableDiffusionPipeline(
        unet=unet.eval(),
        scheduler=_sd_scheduler(prediction_type),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_sd(dirpath: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    path = Path(dirpath)
    build_tiny_sd_pipeline(prediction_type, seed).save_pretrained(path)
    return path


def build_tiny_sdxl_pipeline(
    prediction_type: str = "epsilon", seed: int = 0
) -> StableDiffusionXLPipeline:
    """An SDXL-shaped pipeline: two CLIP encoders (penultimate states concatenated, pooled
    projection of the second), text-time added conditioning."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_encoder = _clip(len(tokenizer), 8, tokenizer, CLIPTextModel)
    text_encoder_2 = _clip(len(tokenizer), 16, tokenizer)  # projection_dim POOLED_DIM // 2
    unet = _sd_unet(
        cross_attention_dim=8 + 16,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + POOLED_DIM // 2,
    )
    return StableDiffusionXLPipeline(
        unet=unet.eval(),
        scheduler=_sd_scheduler(prediction_type),
        vae=_vae(4, scaling_factor=0.13025).eval(),  # SDXL's
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=clip_tokenizer(),
        add_watermarker=False,
    )


def save_tiny_sdxl(dirpath: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    path = Path(dirpath)
    build_tiny_sdxl_pipeline(prediction_type, seed).save_pretrained(path)
    return path


PROMPTS = ["a red cat", "the blue dog"]  # what the parity tests draw
SEEDS = [3, 11]


def pipeline_images(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float):
    """What `pipe(...)` returns for 16x16 images, one generator per seed: the reference."""
    return pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="pt",
        height=16,
        width=16,
    ).images


def check_lora_export(policy, pipe, out_dir: Path, our_images, steps: int, guidance: float):
    """Train-like changes to the policy's LoRA, exported and loaded into `pipe` with
    `load_lora_weights`: the pipeline's images change, and equal `our_images(steps, guidance)`."""
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.export(out_dir)
    base = pipeline_images(pipe, PROMPTS, SEEDS, steps, guidance)
    pipe.load_lora_weights(out_dir)
    expected = pipeline_images(pipe, PROMPTS, SEEDS, steps, guidance)
    assert (expected - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(our_images(steps, guidance), expected, rtol=0, atol=1e-5)


def save_tiny_clip(dirpath: str | Path, seed: int = 0) -> str:
    """A reward-sized CLIPModel (224-pixel ViT, 77-token text) with its PIL image processor
    and tokenizer in one directory, as `CLIPProcessor.save_pretrained` leaves them."""
    return save_clip(dirpath, "small", seed)

"""Typed, validated experiment config: YAML with `extends:`, dotted CLI overrides.

Every section forbids unknown keys, so a typo fails with its full path
(`learner.lrr: Extra inputs are not permitted`) before any model is loaded.
"""

from __future__ import annotations

import importlib
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
UnitInterval = Annotated[float, Field(gt=0, le=1)]

PACKAGE_CONFIGS = Path(__file__).parent / "configs"
DEFAULT_CONFIG = "toy-nft"


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    enabled: bool = True
    rank: PositiveInt = 16
    alpha: PositiveFloat = 32.0
    target_modules: list[str] | None = None  # None: the family's default set
    init: Literal["gaussian", "default"] = "gaussian"
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0


SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")


def is_single_file(path: str | None) -> bool:
    return bool(path) and path.endswith(SINGLE_FILE_SUFFIXES)


DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ModelConfig(Section):
    family: Literal["toy", "sd", "sdxl", "sd3", "flux"] = "toy"  # sd: SD 1.x / 2.x
    path: str | None = None  # diffusers directory or hub id; None = the shipped toy model
    # With model.path a single checkpoint file (a whole SD/SDXL pipeline, or a denoiser alone
    # such as flux1-dev.safetensors): the diffusers directory or hub id giving the configs
    # and whatever the file lacks.
    pipeline_path: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # or fp32, bf16, fp16
    device: str = "cpu"
    resolution: PositiveInt | None = None  # pixels; None = the model's native size
    negative_prompt: str = ""
    max_sequence_length: PositiveInt | None = None  # T5 tokens (sd3, flux); None: the pipeline's
    true_cfg_scale: Annotated[float, Field(ge=1)] = 1.0  # flux: CFG with the negative prompt
    lora: LoraConfig = LoraConfig()
    # Memory switches for large models:
    gradient_checkpointing: bool = False  # inside the denoiser, per block (any algorithm)
    vae_slicing: bool = False  # decode one image at a time
    vae_tiling: bool = False  # decode overlapping tiles (large resolutions; blends seams)
    offload_text_encoders: bool = False  # frozen text encoders stay in host memory
    text_embedding_cache: NonNegativeInt = 0  # prompts whose embeddings are kept; 0: off

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        return DTYPE_ALIASES.get(value, value)

    @model_validator(mode="after")
    def _family_options(self) -> ModelConfig:
        if self.true_cfg_scale > 1 and self.family != "flux":
            raise ValueError(
                "true_cfg_scale is FLUX's true classifier-free guidance; other families "
                "use sampler.guidance_scale"
            )
        if self.max_sequence_length is not None and self.family not in ("sd3", "flux"):
            raise ValueError("max_sequence_length sets the T5 prompt length of sd3 and flux")
        single_file = is_single_file(self.path)
        if single_file and not self.pipeline_path:
            raise ValueError(
                f"model.path {self.path!r} is a single-file checkpoint: set model.pipeline_path "
                "to the diffusers directory or hub id it belongs to (configs, text encoders, VAE)"
            )
        if self.pipeline_path and not single_file:
            raise ValueError(
                "model.pipeline_path completes a single-file model.path (ending in "
                f"{', '.join(SINGLE_FILE_SUFFIXES)}); model.path is {self.path!r}"
            )
        switches = ("vae_slicing", "vae_tiling", "offload_text_encoders", "text_embedding_cache")
        if self.family == "toy" and any(getattr(self, name) for name in switches):
            raise ValueError(
                f"{', '.join(switches)} are for diffusers pipelines, not the toy model"
            )
        return self


class SamplerConfig(Section):
    kind: Literal["ode", "sde", "cps", "ddim"] = "sde"
    num_steps: PositiveInt = 10
    eval_num_steps: PositiveInt = 20
    noise_level: NonNegativeFloat = 0.7  # SDE/CPS `a`, DDIM eta
    shift: PositiveFloat | None = None  # None: the model's own flow schedule; else s·t/(1+(s-1)·t)
    guidance_scale: NonNegativeFloat = 1.0  # 1 = no classifier-free guidance
    sde_window_size: PositiveInt | None = None  # Flow-GRPO-Fast: SDE only inside a window
    sde_window_range: tuple[NonNegativeInt, PositiveInt] | None = None  # window start in [lo, hi)

    def window_starts(self) -> tuple[int, int]:
        """[lo, hi) for the SDE window's first step. The window never covers the last
        step: it is deterministic for CPS (t_next = 0) and its tiny σ overflows the SDE's
        log-prob (flow_grpo's timestep_fraction drops it too)."""
        assert self.sde_window_size is not None
        return self.sde_window_range or (0, self.num_steps - self.sde_window_size)

    @model_validator(mode="after")
    def _window(self) -> SamplerConfig:
        if self.sde_window_size is not None:
            lo, hi = self.window_starts()
            if not lo < hi or hi - 1 + self.sde_window_size > self.num_steps - 1:
                raise ValueError(
                    f"sde_window_range {(lo, hi)} with sde_window_size {self.sde_window_size} "
                    f"does not fit in the first num_steps - 1 = {self.num_steps - 1} steps"
                )
        return self


class AlgorithmSection(Section):
    """The base of every algorithm's config. Each answers, besides its `name: Literal[...]`
    tag, `group_size` (samples per prompt) and `needs_reference` (whether the loss
    evaluates the frozen base model), as fields, properties or class variables, and says
    whether the sampler suits it."""

    def check_run(self, run: ExperimentConfig) -> None:
        """Raise ValueError, naming the keys, where the rest of the run's config (its
        sampler, its rollouts) cannot serve this algorithm."""


class DraftConfig(AlgorithmSection):
    """DRaFT family. Settings: full DRaFT (no truncation), DRaFT-K (`truncation_steps`),
    DRaFT-LV (`truncation_steps: 1`, `lv_samples: n`), AlignProp (`truncation_range`),
    ReFL (`refl_stop_range`: stop at a random step and predict x0 in one step)."""

    name: Literal["draft"]
    truncation_steps: PositiveInt | None = None
    truncation_range: tuple[PositiveInt, PositiveInt] | None = None
    lv_samples: NonNegativeInt = 0
    refl_stop_range: tuple[NonNegativeInt, PositiveInt] | None = None
    # Activation checkpointing per model call (DRaFT's setting): memory flat in K.
    checkpoint_each_step: bool = False

    group_size: ClassVar[int] = 1  # one sample per prompt
    needs_reference: ClassVar[bool] = False

    @model_validator(mode="after")
    def _one_setting(self) -> DraftConfig:
        chosen = [
            k
            for k in ("truncation_steps", "truncation_range", "refl_stop_range")
            if getattr(self, k) is not None
        ]
        if len(chosen) > 1:
            raise ValueError(f"choose one of {chosen}, not several")
        if self.lv_samples and self.truncation_steps != 1:
            raise ValueError("lv_samples (DRaFT-LV) needs truncation_steps: 1")
        for key in ("truncation_range", "refl_stop_range"):
            rng = getattr(self, key)
            if rng is not None and rng[0] > rng[1]:
                raise ValueError(f"{key} {rng}: low end above high end")
        return self

    def check_run(self, run: ExperimentConfig) -> None:
        if run.rollout.precision != "full" and run.rollout.explore is None:
            raise ValueError(
                "rollout.precision: DRaFT backpropagates through the sampler from the "
                "rollout's state, which must come from the full-precision policy: use full, "
                "or rollout.explore (best-of-N seeds explored in low precision)"
            )
        if run.rollout.explore is not None and run.rollout.explore.select != "top_k":
            raise ValueError("rollout.explore.select: DRaFT keeps one seed per prompt: top_k")
        steps = run.sampler.num_steps
        if self.truncation_steps is not None and self.truncation_steps > steps:
            raise ValueError(
                f"algorithm.truncation_steps={self.truncation_steps} exceeds "
                f"sampler.num_steps={steps}"
            )
        if self.truncation_range is not None and self.truncation_range[1] > steps:
            raise ValueError(
                f"algorithm.truncation_range={self.truncation_range} exceeds "
                f"sampler.num_steps={steps}"
            )
        if self.refl_stop_range is not None and self.refl_stop_range[1] >= steps:
            raise ValueError(
                f"algorithm.refl_stop_range={self.refl_stop_range}: step indices run "
                f"0..{steps - 1} (sampler.num_steps={steps})"
            )


class GroupRelativeConfig(AlgorithmSection):
    """What Flow-GRPO and DiffusionNFT share: groups of samples per prompt whose rewards,
    centred and scaled within the group, become advantages, and an optional KL-like anchor
    to the frozen base model."""

    group_size: Annotated[int, Field(ge=2)] = 8
    adv_clip_max: PositiveFloat = 5.0  # advantages clipped to ±this
    kl_beta: NonNegativeFloat = 0.0  # weight of the divergence from the frozen base
    global_std: bool = False  # scale by the batch's reward std instead of each group's
    timestep_fraction: UnitInterval = 0.99  # of the sampler's steps trained on
    num_inner_epochs: PositiveInt = 1

    @property
    def needs_reference(self) -> bool:
        """Whether the loss evaluates the frozen base model."""
        return self.kl_beta > 0


class FlowGRPOConfig(GroupRelativeConfig):
    name: Literal["flow_grpo"]
    clip_range: PositiveFloat = 1e-3
    # A group starts from one initial noise and differs only by its SDE noise (flow_grpo's
    # same_latent): with an SDE window, the group then branches where the window starts.
    same_initial_noise: bool = False

    def check_run(self, run: ExperimentConfig) -> None:
        if run.sampler.kind == "ode" or run.sampler.noise_level == 0:
            raise ValueError(
                "flow_grpo needs a stochastic sampler: sampler.kind sde/cps/ddim "
                "with sampler.noise_level > 0"
            )


class DiffusionNFTConfig(GroupRelativeConfig):
    """DiffusionNFT: reward-weighted flow matching on the rollouts' final images, contrasting
    an implicit positive and negative policy around the one that sampled them. Its advantages
    are then mapped to [0, 1]; `kl_beta` weighs ‖v_θ - v_ref‖²."""

    name: Literal["diffusion_nft"]
    # β: how far the implicit positive/negative policies sit from the sampling policy
    # (the step size of the improvement; the paper's GenEval runs use 1).
    beta: PositiveFloat = 1.0
    timestep_fraction: UnitInterval = 0.5  # of the sampler's times, drawn per sample
    # Groups whose rewards all tie (r = 1/2) have no gradient at the sampling policy; the
    # paper trains on them anyway. False skips their forward and backward passes.
    train_tied_groups: bool = True


# algorithm.name → its config class and "module:Class" of the algorithm, which follows
# `raydraft.algorithms.base.Algorithm`. `register_algorithm` adds one from another package.
ALGORITHMS: dict[str, tuple[type[AlgorithmSection], str]] = {
    "draft": (DraftConfig, "raydraft.algorithms.draft:DRaFT"),
    "flow_grpo": (FlowGRPOConfig, "raydraft.algorithms.flow_grpo:FlowGRPO"),
    "diffusion_nft": (DiffusionNFTConfig, "raydraft.algorithms.diffusion_nft:DiffusionNFT"),
}


def _algorithm_union() -> Any:
    """One of the registered configs, chosen by its `name`."""
    return Union[tuple(config for config, _ in ALGORITHMS.values())]  # noqa: UP007


def register_algorithm(config_class: type[AlgorithmSection], algorithm: str) -> None:
    """Make `algorithm.name: <config_class's name>` run `algorithm` ("module:Class"). A
    plugin module (the config's `plugins`) calls this when imported."""
    name = typing.get_args(config_class.model_fields["name"].annotation)[0]
    ALGORITHMS[name] = (config_class, algorithm)
    ExperimentConfig.model_fields["algorithm"].annotation = _algorithm_union()
    ExperimentConfig.model_rebuild(force=True)


AlgorithmConfig = _algorithm_union()


class RewardSpec(Section):
    name: str
    weight: float = 1.0
    options: dict[str, Any] = {}
    # Through Ray: this component's Serve deployment settings over `ray.reward_serving`
    # (its keys: num_gpus, max_batch_size, min/max_replicas, ...), and its replicas' own
    # Ray runtime_env (`pip`, `uv`, `py_executable`, `env_vars`, ...) for dependencies
    # that must stay out of the trainer's environment.
    serving: dict[str, Any] = {}
    runtime_env: dict[str, Any] | None = None


class RewardsConfig(Section):
    components: list[RewardSpec] = Field(min_length=1)
    on_bad_reward: Literal["error", "drop"] = "error"


class DataConfig(Section):
    prompts: str = "toy-colors"  # a registered prompt set, or a .txt file (one per line)
    prompts_per_step: PositiveInt = 8
    shuffle: bool = True
    # A curriculum toward weak categories: each prompt of a category named here appears
    # this many times per epoch (others once). Categories are GenEval metadata's "tag" or
    # the shapes world's own.
    category_repeats: dict[str, PositiveInt] = {}


class LearnerConfig(Section):
    lr: PositiveFloat = 3e-4
    # cosine: lr · ½(1 + cos(π · iteration / max_steps)), set per iteration from its number
    # alone (nothing to checkpoint), reaching 0 at max_steps.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: NonNegativeFloat = 1e-4
    betas: tuple[UnitInterval, UnitInterval] = (0.9, 0.999)
    max_grad_norm: PositiveFloat | None = 1.0
    minibatch_size: PositiveInt = 8
    grad_accum_steps: PositiveInt = 1
    ema_decay: Annotated[float, Field(gt=0, lt=1)] | None = None
    # Rollouts sample a trailing "old" policy rather than the trained weights (DiffusionNFT's
    # soft update): after the update that makes version v it becomes η·old + (1 - η)·θ,
    # η = min(old_policy_decay_rate · v, old_policy_decay_max). 0: the trained weights.
    old_policy_decay_rate: NonNegativeFloat = 0.0
    old_policy_decay_max: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # FSDP2: shard weights, gradients and optimizer state across the ray.learners ranks
    # (full fine-tuning of models that do not fit one device; one rank: nothing to shard).
    fsdp: bool = False

    @model_validator(mode="after")
    def _old_policy_both_or_neither(self) -> LearnerConfig:
        if (self.old_policy_decay_rate > 0) != (self.old_policy_decay_max > 0):
            raise ValueError(
                "learner.old_policy_decay_rate and learner.old_policy_decay_max: set both "
                "above 0 for a trailing old policy, or neither"
            )
        return self

    @property
    def trails_old_policy(self) -> bool:
        return self.old_policy_decay_max > 0

    def old_policy_decay(self, version: int) -> float:
        """η of the soft update that follows the update making `version`."""
        return min(self.old_policy_decay_rate * version, self.old_policy_decay_max)


class CheckpointConfig(Section):
    every: NonNegativeInt = 50  # 0: only at the end
    keep: PositiveInt = 2


class LoggingConfig(Section):
    sample_every: NonNegativeInt = 25  # 0: no sample grids
    progress_bar: bool = True
    # Shapes world only: GenEval-style evaluation of the base and the final model,
    # this many held-out samples per category (0: off).
    eval_per_category: NonNegativeInt = 0
    # Prometheus /metrics of the driving process on this port (0: any free one; None: off).
    metrics_port: NonNegativeInt | None = None
    metrics_host: str = "127.0.0.1"
    # Experiment trackers, fed every metrics row and sample grid (`raydraft.trackers`;
    # pip install 'raydraft[trackers]'). Weights & Biases runs in RUN_DIR/wandb; its mode
    # None follows WANDB_MODE (offline: no login, `wandb sync` later).
    wandb: bool = False
    wandb_project: str = "raydraft"
    wandb_entity: str | None = None
    wandb_mode: Literal["online", "offline"] | None = None
    tensorboard: bool = False  # event files in RUN_DIR/tensorboard


class RewardServingConfig(Section):
    """Ray Serve settings shared by every reward deployment (black-box rewards)."""

    min_replicas: PositiveInt = 1  # pin to the reward budget: upscaling lags a step's burst
    max_replicas: PositiveInt = 1
    target_ongoing_requests: PositiveFloat = 32
    max_ongoing_requests: PositiveInt = 128  # >= max_batch_size, or batches stay small
    upscale_delay_s: NonNegativeFloat = 1.0
    downscale_delay_s: NonNegativeFloat = 30.0
    look_back_period_s: PositiveFloat = 30.0  # load averaged over this window
    num_cpus: NonNegativeFloat = 0.25  # fractional: whole CPUs starve the other roles
    num_gpus: NonNegativeFloat = 0.0
    max_batch_size: PositiveInt = 8  # requests (chunks) joined into one model call
    images_per_request: PositiveInt = 16  # a chunk: fewer handle calls, still batchable
    batch_wait_timeout_s: NonNegativeFloat = 0.005
    # DRaFT: serve the differentiable reward too (it answers d score / d image) instead of
    # running it inside each learner; for reward models too large to sit beside the policy.
    serve_draft_rewards: bool = False
    max_retries: NonNegativeInt = 3  # per request, when a replica dies under it

    @model_validator(mode="after")
    def _replicas(self) -> RewardServingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} > max_replicas={self.max_replicas}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be >= max_batch_size")
        return self


class RewardHttpConfig(Section):
    """`raydraft serve-rewards`: the rewards as an HTTP endpoint for trainers outside this
    cluster (raydraft/rewards/http_reward.py has the wire format)."""

    host: str = "127.0.0.1"  # wider (0.0.0.0, an interface) only with a token
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    # The environment variable holding the bearer token (never the token in a file).
    # Required when `host` is not loopback; optional, and then enforced, on loopback.
    token_env: str = "RAYDRAFT_REWARD_TOKEN"
    max_request_mb: PositiveFloat = 64.0  # larger bodies: 413 before they are read
    max_images: PositiveInt = 256  # per request
    max_image_side: PositiveInt = 2048  # pixels, each side; larger: 413


def reward_serving_for(base: RewardServingConfig, spec: RewardSpec) -> RewardServingConfig:
    """One reward component's Serve settings: `ray.reward_serving` with its own `serving`."""
    return RewardServingConfig.model_validate(base.model_dump() | spec.serving)


class ExploreConfig(Section):
    """Explore, select, regenerate (Sol-RL): `candidates` samples per prompt from the
    rollout copy (low precision, if set) with a deterministic preview sampler, scored;
    `select` keeps the group's seeds (`best_worst`: the top half and the bottom half, as
    Sol-RL; `top_k`: the best); those seeds are regenerated in full precision with the
    training sampler and only they reach the learner."""

    candidates: Annotated[int, Field(ge=2)]
    select: Literal["best_worst", "top_k"] = "best_worst"
    preview_steps: PositiveInt | None = None  # ODE steps of the preview; None: sampler's


class RolloutConfig(Section):
    """How rollouts are sampled: in full precision, or by a low-precision copy of the
    denoiser that is rebuilt from the full-precision weights whenever they change (each
    weight sync). The learner then corrects for the difference (`is_truncation`)."""

    precision: Literal["full", "fp8", "nvfp4", "mxfp4"] = "full"
    quantize_activations: bool = True  # W8A8 / W4A4 in Linear layers; false: weights only
    # With a LoRA adapter: `side` quantizes the frozen base once and runs the adapter in
    # full precision beside it; `merge` quantizes W + s·BA at each sync (Sol-RL), where
    # small adapter updates drown in the rounding.
    lora: Literal["side", "merge"] = "side"
    # Layers kept in full precision: regular expressions over the denoiser's layer names,
    # and a width (a layer whose larger side is at most this); None: the family's defaults
    # (`raydraft.precision.rollout_copy`).
    keep_full_precision: list[str] | None = None
    min_dim: NonNegativeInt | None = None
    # auto: FP8 tensor cores where the GPU has them (compute capability 8.9+), the exact
    # emulation elsewhere; emulate: the emulation everywhere (same numbers, no speed-up).
    kernels: Literal["auto", "emulate"] = "auto"
    # The learner's importance weight between the full-precision and the low-precision
    # behaviour policy is truncated at this (Flow-GRPO; per step, per-dimension mean log-probs).
    is_truncation: Annotated[float, Field(ge=1)] = 2.0
    # Every this many iterations (0: never) a rollout batch is also sampled in full
    # precision from the same seeds, both are scored, and the agreement of the two
    # within-group rankings is logged (Kendall τ, Spearman ρ, top/bottom-k hit rates);
    # a warning when the mean Spearman ρ falls below `fidelity_floor`.
    fidelity_every: NonNegativeInt = 10
    fidelity_k: PositiveInt = 2
    fidelity_floor: Annotated[float, Field(ge=-1, le=1)] = 0.7
    explore: ExploreConfig | None = None


class RayConfig(Section):
    """The Ray runtime: roles, their resources, and the rollout schedule."""

    address: str | None = None  # None: RAY_ADDRESS if set, else a local instance on loopback
    mode: Literal["sync", "async"] = "sync"
    max_staleness: NonNegativeInt = 1  # async: rollouts at most this many versions old
    rollout_workers: PositiveInt = 1
    learners: PositiveInt = 1
    # disaggregated: each role on resources of its own; colocated: rollout worker i
    # shares learner rank i's placement bundle (device), for clusters where both fit one.
    placement: Literal["disaggregated", "colocated"] = "disaggregated"
    # colocated: the roles take turns, each in host memory while the other runs (off: both
    # stay on the device, for models small enough to fit twice).
    colocated_swap: bool = True
    worker_cpus: PositiveFloat = 1.0
    worker_gpus: NonNegativeFloat = 0.0
    learner_cpus: PositiveFloat = 1.0
    learner_gpus: NonNegativeFloat = 0.0
    worker_max_restarts: NonNegativeInt = 3
    # How new weights reach the rollout workers: the object store (LoRA; any state on one
    # CPU node, where it measured fastest), or a gloo/NCCL broadcast group in buckets (full
    # weights across GPU nodes; its NCCL path is not yet measured: docs/benchmarks.md).
    weight_sync: Literal["object_store", "collective"] = "object_store"
    weight_bucket_mb: PositiveFloat = 256.0
    weight_sync_timeout_s: PositiveFloat = 120.0  # a broadcast peer silent this long: failed
    startup_timeout_s: PositiveFloat = 300.0  # roles not placed by then: an error, not a hang
    reward_serving: RewardServingConfig = RewardServingConfig()
    reward_http: RewardHttpConfig = RewardHttpConfig()

    @model_validator(mode="after")
    def _colocation(self) -> RayConfig:
        if self.placement != "colocated":
            return self
        if self.rollout_workers != self.learners:
            raise ValueError(
                f"ray.placement=colocated puts one rollout worker beside each learner rank: "
                f"ray.rollout_workers={self.rollout_workers} must equal "
                f"ray.learners={self.learners}"
            )
        if self.weight_sync == "collective" and self.worker_gpus and self.learner_gpus:
            raise ValueError(
                "ray.placement=colocated puts a worker on its learner's GPU, and NCCL takes "
                "one rank per GPU: use ray.weight_sync=object_store"
            )
        if self.mode == "async" and self.colocated_swap:
            raise ValueError(
                "ray.placement=colocated with ray.colocated_swap takes turns on the device: "
                "use ray.mode=sync (or colocated_swap=false if both roles fit at once)"
            )
        return self


class ExperimentConfig(Section):
    name: str = "raydraft"
    seed: int = 0
    max_steps: PositiveInt = 100
    runtime: Literal["ray", "local"] = "ray"  # local: the single-process trainer
    # torch threads of each process that computes (the --local trainer, each Ray role); None:
    # the cores that other work leaves free, measured as the run goes (raydraft.threads).
    torch_threads: PositiveInt | None = None
    model: ModelConfig = ModelConfig()
    sampler: SamplerConfig = SamplerConfig()
    # Modules imported before the rest is validated: they register algorithms (and rewards)
    # of their own. Ray's workers import them too, so they must be importable there.
    plugins: list[str] = []
    algorithm: AlgorithmConfig = Field(discriminator="name")
    rewards: RewardsConfig
    rollout: RolloutConfig = RolloutConfig()
    data: DataConfig = DataConfig()
    learner: LearnerConfig = LearnerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _cross_section(self) -> ExperimentConfig:
        for i, spec in enumerate(self.rewards.components):
            try:
                reward_serving_for(self.ray.reward_serving, spec)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                key = f"rewards.components[{i}].serving" + (f".{where}" if where else "")
                raise ValueError(f"{key}: {first['msg']}") from None
        if self.logging.eval_per_category and not self.data.prompts.startswith("shapes"):
            raise ValueError(
                "logging.eval_per_category evaluates on the shapes world: "
                f"data.prompts must be a shapes-* set, not {self.data.prompts!r}"
            )
        if self.learner.fsdp and self.model.lora.enabled:
            raise ValueError(
                "learner.fsdp shards full fine-tuning: set model.lora.enabled=false "
                "(a LoRA run keeps its frozen base whole on every rank)"
            )
        self.algorithm.check_run(self)
        explore, group = self.rollout.explore, self.algorithm.group_size
        if explore is not None and explore.candidates <= group:
            raise ValueError(
                f"rollout.explore.candidates ({explore.candidates}) must exceed the group "
                f"it selects (algorithm.group_size {group})"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge; a section whose `name` changes (another algorithm) replaces the old one."""
    out = dict(base)
    for key, value in override.items():
        old = out.get(key)
        if (
            isinstance(value, dict)
            and isinstance(old, dict)
            and value.get("name", old.get("name")) == old.get("name")
        ):
            out[key] = _merge(old, value)
        else:
            out[key] = value
    return out


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a config shipped with the package (`toy-nft`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = PACKAGE_CONFIGS / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in PACKAGE_CONFIGS.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r}: no such file and no shipped config {names}")


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, merging the chain of `extends:` (relative to the file, or shipped)."""
    path = resolve_config_path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: `extends` cycle through {[str(p) for p in _seen]}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = path.parent / parent
    base = load_yaml_tree(parent_path if parent_path.is_file() else parent, (*_seen, path))
    return _merge(base, data)


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides in order, merged as a file's keys are (so
    `algorithm.name=flow_grpo` starts a fresh algorithm section); the value is parsed as
    YAML (`1e-4`, `[1, 3]`, `null`)."""
    tree = _merge({}, tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        nested = yaml.safe_load(raw) if raw else ""
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.get(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        for part in reversed(parts):
            nested = {part: nested}
        tree = _merge(tree, nested)
    return tree


def _error_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    # Pydantic puts the discriminator tag into the location of a union member's errors.
    if len(parts) > 1 and parts[0] == "algorithm" and parts[1] in ALGORITHMS:
        del parts[1]
    return ".".join(parts) or "<config>"


def import_plugins(tree: dict[str, Any], source: str = "config") -> None:
    """Import the modules a config's `plugins` names (what they register must exist before
    the config is validated)."""
    plugins = tree.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"invalid {source}:\n  plugins: a list of module names")
    for module in plugins:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(
                f"invalid {source}:\n  plugins: cannot import {module!r} ({err}); it must be "
                "importable here and on every Ray worker (PYTHONPATH or the runtime_env)"
            ) from None


def build_config(tree: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """The validated config of a tree (a file's, or one that a Ray actor was sent)."""
    import_plugins(tree, source)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        lines = [f"{_error_path(e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(lines)) from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """The config that `raydraft train` runs: a file (or the shipped default) plus overrides."""
    source = str(path or DEFAULT_CONFIG)
    tree = apply_overrides(load_yaml_tree(source), overrides or [])
    return build_config(tree, source)

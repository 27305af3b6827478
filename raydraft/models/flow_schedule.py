"""The time schedule a flow-matching pipeline steps through, taken from its own scheduler.

SD3 / SD3.5 and FLUX.1 ship a `FlowMatchEulerDiscreteScheduler` whose config decides the
schedule: a fixed shift (SD3: 3.0) or a shift that grows with the image's token count
(FLUX.1-dev: `use_dynamic_shifting`, mu from `calculate_shift`). Asking that scheduler,
configured as the pipeline configures it, keeps our sampler on the pipeline's times
whatever the checkpoint's config says (the parity tests check this per family).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift


def pipeline_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler,
    num_steps: int,
    image_seq_len: int,
    sigmas: Sequence[float] | None = None,
) -> torch.Tensor:
    """num_steps + 1 times from noise to 0, as the pipeline's `retrieve_timesteps` sets
    them: `sigmas` before shifting (None: the scheduler's own spacing) and, for a dynamic
    shift, mu from the number of image tokens."""
    config = scheduler.config
    mu = None
    if config.get("use_dynamic_shifting"):
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
    own = FlowMatchEulerDiscreteScheduler.from_config(config)  # set_timesteps mutates
    own.set_timesteps(None if sigmas is not None else num_steps, sigmas=sigmas, mu=mu)
    return own.sigmas.float().cpu()

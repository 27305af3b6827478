"""Time schedules of flow models: the plain shifted grid (`flow_sigmas`, the toy model's and
`sampler.shift`'s), and the schedule a pipeline steps through, taken from its own scheduler.

SD3 / SD3.5 and FLUX.1 ship a `FlowMatchEulerDiscreteScheduler` whose config decides the
schedule: a fixed shift (SD3: 3.0) or a shift that grows with the image's token count
(FLUX.1-dev: `use_dynamic_shifting`, mu from `calculate_shift`). Asking that scheduler,
configured as the pipeline configures it, keeps our sampler on the pipeline's times
whatever the checkpoint's config says (the parity tests check this per family).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # diffusers' pipelines take seconds to import; the toy model needs none
    from diffusers import FlowMatchEulerDiscreteScheduler


def flow_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """num_steps + 1 times from 1 to 0, shifted toward noise: s·t / (1 + (s - 1)·t) (SD3)."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def pipeline_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler,
    num_steps: int,
    image_seq_len: int,
    sigmas: Sequence[float] | None = None,
) -> torch.Tensor:
    """num_steps + 1 times from noise to 0, as the pipeline's `retrieve_timesteps` sets
    them: `sigmas` before shifting (None: the scheduler's own spacing) and, for a dynamic
    shift, mu from the number of image tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

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

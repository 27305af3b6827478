"""Exponential moving average of the trainable weights: the evaluated weights (fixed decay)
and the trailing old policy that rollouts sample (`Learner`, scheduled decay)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, parameters: list[torch.nn.Parameter], decay: float) -> None:
        self.parameters = parameters
        self.decay = decay
        self.shadow = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """shadow ← d·shadow + (1 - d)·live, d = `decay` or the fixed one."""
        d = self.decay if decay is None else decay
        for shadow, p in zip(self.shadow, self.parameters, strict=True):
            shadow.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        for p, shadow in zip(self.parameters, self.shadow, strict=True):
            p.copy_(shadow)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in place of the live ones, restored on exit."""
        live = [p.detach().clone() for p in self.parameters]
        self.copy_to_parameters()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.parameters, live, strict=True):
                    p.copy_(value)

    def to(self, device: torch.device | str) -> None:
        self.shadow = [s.to(device) for s in self.shadow]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, shadow in enumerate(self.shadow):
            shadow.copy_(state[str(i)])

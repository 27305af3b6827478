"""Prompt embeddings kept in host memory, so repeated prompts skip the text encoders.

Training revisits the same prompts every epoch, and T5-XXL (SD3, FLUX) costs as much per
prompt as several denoiser steps; the encoders are frozen, so an embedding never goes
stale. Rows are stored one prompt each (a batch's encoding is split with
`Conditioning.select`) and the least recently used go first once `capacity` is passed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from raydraft.models.base import Conditioning

Encoder = Callable[[list[str], list[str] | None], Conditioning]


class TextEmbeddingCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: OrderedDict[tuple[str, str | None], Conditioning] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def encode(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None, encoder: Encoder
    ) -> Conditioning:
        """`encoder(prompts, negatives)` for the rows not cached, the cache for the rest;
        with capacity 0, `encoder` for everything."""
        prompts = list(prompts)
        negatives = list(negative_prompts) if negative_prompts else None
        if not self.capacity:
            return encoder(prompts, negatives)
        keys = list(zip(prompts, negatives or [None] * len(prompts), strict=True))
        missing = [key for key in dict.fromkeys(keys) if key not in self.rows]
        self.misses += len(missing)  # rows encoded; every other row of the batch is a hit
        self.hits += len(keys) - len(missing)
        if missing:
            fresh = encoder(
                [prompt for prompt, _ in missing],
                [negative for _, negative in missing] if negatives else None,
            )
            for i, key in enumerate(missing):
                self.rows[key] = fresh.select([i]).to("cpu")
        for key in keys:
            self.rows.move_to_end(key)
        batch = Conditioning.concat([self.rows[key] for key in keys])
        while len(self.rows) > self.capacity:  # after the batch: one larger than it still works
            self.rows.popitem(last=False)
        return batch

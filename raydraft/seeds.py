"""Every random draw of a run and where its seed comes from: one table, so a run repeats
exactly wherever its parts execute (this process, a rollout worker, a learner rank, a
resumed run) and a new draw takes a stream of its own.

- sample seeds of an iteration's rows: SeedSequence([data seed, iteration])
  (`sample_seeds`, data/prompts.py); an epoch's prompt order: data seed + epoch;
- explore-then-regenerate's candidate seeds of a group: SeedSequence([the group's first
  sample seed, EXPLORE_CANDIDATES]) (`candidate_seeds`, explore.py);
- a sample's initial noise x_T: its sample seed, diffusers' convention (models/base.py);
- iteration streams, `iteration_generator(run seed, iteration, stream)`:
  ROLLOUT (0), the rollout's choices (SDE window, DRaFT's truncation step);
  UPDATE (1), the learner's minibatch shuffling;
- sample streams, `sample_generator(sample seed, stream)`:
  SDE_NOISE (1), the noise of each stochastic sampler step;
  NFT_TRAIN_POINTS (2), DiffusionNFT's training times of a sample and their noise;
  DRAFT_LV_NOISE (2), DRaFT-LV's re-noising of the last step.

DiffusionNFT and DRaFT never run together, so their streams share the number 2. The numbers
are part of every run's results: changing one changes what a seed trains on.
"""

from __future__ import annotations

import numpy as np
import torch

# Streams of one iteration: iteration_generator(run seed, iteration, stream)
ROLLOUT = 0
UPDATE = 1
# Streams of one sample: sample_generator(sample seed, stream)
SDE_NOISE = 1
NFT_TRAIN_POINTS = 2
DRAFT_LV_NOISE = 2
# Seeds derived from a sample seed for another purpose: candidate_seeds
EXPLORE_CANDIDATES = 3


def iteration_generator(seed: int, iteration: int, stream: int) -> torch.Generator:
    """The generator of one stream of one iteration: the same numbers wherever it runs."""
    state = np.random.SeedSequence([int(seed) % 2**63, iteration, stream]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def derive_seed(seed: int, stream: int) -> int:
    """An independent 63-bit seed for stream `stream` of sample seed `seed`."""
    return int(
        np.random.SeedSequence([int(seed) % 2**63, stream]).generate_state(2, np.uint64)[0] >> 1
    )


def sample_generator(seed: int, stream: int) -> torch.Generator:
    """The CPU generator of one stream of one sample."""
    return torch.Generator("cpu").manual_seed(derive_seed(seed, stream))


def sample_seeds(data_seed: int, iteration: int, rows: int) -> torch.Tensor:
    """The (rows,) sample seeds of an iteration, 63-bit."""
    state = np.random.SeedSequence([data_seed, iteration]).generate_state(rows)
    return torch.tensor(state.astype(np.int64) >> 1, dtype=torch.long)


def candidate_seeds(group_seed: int, count: int) -> torch.Tensor:
    """The (count,) candidate sample seeds of a group whose first sample seed is
    `group_seed`, 63-bit: the same however the batch is split among workers."""
    state = np.random.SeedSequence([int(group_seed) % 2**63, EXPLORE_CANDIDATES])
    return torch.tensor((state.generate_state(count, np.uint64) >> 1).astype(np.int64))

"""How faithfully a low-precision copy ranks a group's samples: the same seeds scored
after sampling at both precisions, compared within each prompt's group (the ranking is
what group-relative advantages and explore-then-regenerate selection use)."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr


def ranking_fidelity(
    low: torch.Tensor, full: torch.Tensor, groups: torch.Tensor, k: int
) -> dict[str, float]:
    """Means over the groups of Kendall τ-b and Spearman ρ between the two precisions'
    rewards, and of the fraction of the full-precision top-k (bottom-k) that the
    low-precision top-k (bottom-k) recovers. Ranks sort by reward, ties by row order
    (stable). Groups whose rewards tie at either precision have no ranking and are left
    out of τ and ρ."""
    taus, rhos, tops, bottoms = [], [], [], []
    for group in groups.unique():
        rows = (groups == group).nonzero().flatten()
        a, b = low[rows].double().numpy(), full[rows].double().numpy()
        if np.ptp(a) > 0 and np.ptp(b) > 0:
            taus.append(kendalltau(a, b).statistic)
            rhos.append(spearmanr(a, b).statistic)
        kk = min(k, len(rows))
        tops.append(_overlap(_ranked(a)[-kk:], _ranked(b)[-kk:]) / kk)
        bottoms.append(_overlap(_ranked(a)[:kk], _ranked(b)[:kk]) / kk)
    return {
        "fidelity_kendall_tau": float(np.mean(taus)) if taus else math.nan,
        "fidelity_spearman_rho": float(np.mean(rhos)) if rhos else math.nan,
        "fidelity_top_k_hit": float(np.mean(tops)),
        "fidelity_bottom_k_hit": float(np.mean(bottoms)),
    }


def _ranked(values: np.ndarray) -> np.ndarray:
    return np.argsort(values, kind="stable")


def _overlap(a: np.ndarray, b: np.ndarray) -> int:
    return len(set(a.tolist()) & set(b.tolist()))

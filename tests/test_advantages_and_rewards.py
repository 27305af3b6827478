"""Group-relative advantages and reward validation."""

import pytest
import torch

from raydraft.algorithms.group_relative import group_advantages
from raydraft.config import RewardsConfig
from raydraft.rewards.base import BadRewardError, CompositeReward, checked_score, score_or_drop
from raydraft.rewards.registry import build_reward, make_reward

GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])


def rewards() -> torch.Tensor:
    r = torch.randn(12, generator=torch.Generator().manual_seed(0))
    r[8:] = 0.25  # group 2 is constant
    return r


def test_group_advantages_sum_to_zero_and_constant_groups_are_zero_and_flagged():
    adv, zero_std = group_advantages(rewards(), GROUPS)
    for g in (0, 1):
        assert abs(float(adv[g == GROUPS].sum())) < 1e-5
        assert abs(float(adv[g == GROUPS].std(correction=0)) - 1) < 1e-3
    assert torch.equal(adv[8:], torch.zeros(4))
    assert zero_std.tolist() == [False] * 8 + [True] * 4


@pytest.mark.parametrize("global_std", [False, True])
def test_group_advantages_are_invariant_to_positive_affine_maps(global_std):
    base, _ = group_advantages(rewards(), GROUPS, global_std)
    mapped, _ = group_advantages(3.0 * rewards() - 7.0, GROUPS, global_std)
    torch.testing.assert_close(mapped, base, rtol=1e-3, atol=1e-3)


def test_group_advantages_are_clipped():
    r = torch.tensor([0.0] * 99 + [1.0])
    adv, _ = group_advantages(r, torch.zeros(100, dtype=torch.long), clip=5.0)
    assert float(adv.max()) == 5.0


class Broken:
    differentiable = False

    def __init__(self, name, values):
        self.name, self.values = name, values

    def score(self, images, prompts, metadata):
        return self.values


def test_nan_reward_is_an_error_naming_the_reward_and_sample():
    bad = Broken("judge", torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(BadRewardError, match=r"'judge'.*#1 'b'") as info:
        checked_score(bad, torch.zeros(3, 3, 4, 4), ["a", "b", "c"])
    assert info.value.bad_indices == [1]


def test_wrong_shape_is_an_error_even_when_dropping():
    bad = Broken("judge", torch.zeros(3, 1))
    with pytest.raises(BadRewardError, match=r"shape \(3,\)"):
        score_or_drop(bad, torch.zeros(3, 3, 4, 4), ["a", "b", "c"], None, drop_bad=True)


def test_drop_masks_bad_samples_and_composite_names_the_culprit():
    composite = CompositeReward(
        [
            (Broken("good", torch.ones(3)), 1.0),
            (Broken("judge", torch.tensor([0, float("inf"), 0])), 2.0),
        ]
    )
    scores, valid = score_or_drop(composite, torch.zeros(3, 3, 4, 4), ["a", "b", "c"], None, True)
    assert valid.tolist() == [True, False, True] and scores.tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(BadRewardError, match="'judge'"):
        checked_score(composite, torch.zeros(3, 3, 4, 4), ["a", "b", "c"])
    assert set(composite.last_components) == {"good", "judge"}


def test_registry_builds_weighted_composites_and_rejects_unknown_names():
    reward = build_reward(
        RewardsConfig(
            components=[{"name": "toy-color", "weight": 2.0}, {"name": "jpeg-compressibility"}]
        )
    )
    images = torch.rand(2, 3, 16, 16)
    total = checked_score(reward, images, ["x", "y"])
    parts = reward.last_components
    torch.testing.assert_close(total, 2 * parts["toy-color"] + parts["jpeg-compressibility"])
    assert not reward.differentiable
    with pytest.raises(KeyError, match="unknown reward 'aesthetics'"):
        make_reward("aesthetics")
    with pytest.raises(TypeError, match="toy-color"):
        make_reward("toy-color", {"colour": 1})


def test_color_reward_is_differentiable_and_peaks_at_the_target():
    reward = make_reward("toy-color", {"target": [1.0, 0.0, 0.0]})
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    reward.score(images, ["a", "b"], [{}, {}]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    assert float(reward.score(red, ["a"], [{}])) == 0.0

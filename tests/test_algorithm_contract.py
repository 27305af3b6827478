"""Every algorithm in `build.ALGORITHMS` follows the one contract, and the table and the
config union name the same algorithms."""

import inspect
import typing

import pytest

from raydraft.algorithms.base import Algorithm
from raydraft.build import ALGORITHMS, algorithm_class
from raydraft.config import AlgorithmConfig, load_config

CONFIGS = {"draft": "toy-draft-lv", "flow_grpo": "toy-flowgrpo", "diffusion_nft": "toy-nft"}
CONTRACT = ["build", "rollout", "plan_updates", "loss"]


def test_the_table_and_the_config_union_name_the_same_algorithms():
    union = typing.get_args(typing.get_args(AlgorithmConfig)[0])
    names = {typing.get_args(c.model_fields["name"].annotation)[0] for c in union}
    assert names == set(ALGORITHMS) == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_each_algorithm_follows_the_contract(name):
    cfg = load_config(CONFIGS[name])
    cls = algorithm_class(cfg)
    assert isinstance(cls.scores_rollouts, bool)
    for method in CONTRACT:
        expected = list(inspect.signature(getattr(Algorithm, method)).parameters)
        assert list(inspect.signature(getattr(cls, method)).parameters) == expected, method
    assert isinstance(cfg.algorithm.group_size, int)
    assert isinstance(cfg.algorithm.needs_reference, bool)

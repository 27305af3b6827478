"""Every algorithm in `config.ALGORITHMS`, the plugin of the tests too, follows the one
contract, and the table and the config's union name the same algorithms."""

import inspect
import typing

import pytest

from raydraft.algorithms.base import Algorithm
from raydraft.build import algorithm_class
from raydraft.config import ALGORITHMS, AlgorithmSection, ExperimentConfig, load_config

CONFIGS = {
    "draft": ("toy-draft-lv", []),
    "flow_grpo": ("toy-flowgrpo", []),
    "diffusion_nft": ("toy-nft", []),
    "reward_weighted": (
        "toy-nft",
        ["plugins=[algorithm_plugin]", "algorithm.name=reward_weighted"],
    ),
}
CONTRACT = ["build", "rollout", "recompute_behaviour", "plan_updates", "loss"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_algorithm_follows_the_contract(name):
    path, overrides = CONFIGS[name]
    cfg = load_config(path, overrides)
    assert isinstance(cfg.algorithm, AlgorithmSection)
    cls = algorithm_class(cfg)
    assert isinstance(cls.scores_rollouts, bool)
    for method in CONTRACT:
        expected = list(inspect.signature(getattr(Algorithm, method)).parameters)
        assert list(inspect.signature(getattr(cls, method)).parameters) == expected, method
    assert isinstance(cfg.algorithm.group_size, int)
    assert isinstance(cfg.algorithm.needs_reference, bool)


def test_the_table_and_the_config_union_name_the_same_algorithms():
    load_config(*CONFIGS["reward_weighted"])  # registers the plugin
    union = typing.get_args(ExperimentConfig.model_fields["algorithm"].annotation)
    names = {typing.get_args(c.model_fields["name"].annotation)[0] for c in union}
    assert names == set(ALGORITHMS) == set(CONFIGS)

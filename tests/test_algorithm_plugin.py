"""Adding an algorithm from outside the package: `tests/algorithm_plugin.py` registers
one when the config's `plugins` imports it, and it trains through both engines, Ray's
workers and learner importing it on their side, with the same numbers."""

import os
from pathlib import Path

import pytest
import torch
from both_engines import train_both_engines
from overrides import RAY_SMALL
from ray import serve

from raydraft.config import ALGORITHMS, ConfigError, load_config

PLUGIN = ["plugins=[algorithm_plugin]", "algorithm.name=reward_weighted"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance whose workers can import the plugin (their PYTHONPATH)."""
    import ray

    from raydraft_ray.cluster import connect

    tests = str(Path(__file__).parent)
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, previous]))
    started = connect(None, num_cpus=4)
    yield
    if started:
        serve.shutdown()
        ray.shutdown()
    if previous is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = previous


def test_an_unimportable_plugin_is_named():
    with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_plugin'"):
        load_config("toy-nft", ["plugins=[no_such_plugin]"])


def test_the_plugin_registers_its_algorithm():
    cfg = load_config("toy-nft", PLUGIN)
    assert type(cfg.algorithm).__name__ == "RewardWeightedConfig"
    assert ALGORITHMS["reward_weighted"][1] == "algorithm_plugin:RewardWeighted"
    with pytest.raises(ConfigError, match=r"algorithm\.temperature: Input should be greater"):
        load_config("toy-nft", [*PLUGIN, "algorithm.temperature=0"])


def test_the_plugin_trains_through_both_engines_with_the_same_numbers(tmp_path, cluster):
    torch.set_num_threads(1)
    cfg = load_config(
        "toy-nft", [*RAY_SMALL, *PLUGIN, "ray.rollout_workers=2", "learner.ema_decay=null"]
    )
    runs = train_both_engines(cfg, tmp_path)
    expected, got = runs.expected, runs.got
    for key in ("policy_loss", "reward_mean", "grad_norm", "weight_max"):
        assert [m[key] for m in got] == [m[key] for m in expected], key
    assert all(torch.isfinite(torch.tensor(m["policy_loss"])) for m in got)
    assert expected[0]["weight_max"] > 1  # the rewards differ, so some sample outweighs

"""The shipped embedded model: loads through the real adapter and reproduces its recorded
base accuracy on a fixed subset of held-out prompts."""

import json

import pytest
import torch

from raydraft.config import ModelConfig
from raydraft.evaluation import evaluate
from raydraft.models.flow_schedule import flow_sigmas
from raydraft.models.toy import SHIPPED_MODEL, ToyPolicy
from raydraft.sampling.samplers import FlowSampler


def test_shipped_model_loads_through_the_adapter_with_word_tokens():
    policy = ToyPolicy.from_pretrained(ModelConfig())
    ids = policy.tokenizer(["a red circle left of a blue square"]).input_ids[0]
    assert len(ids) == 10  # <bos> + 8 words + <eos>: each word of the world is one token
    assert sum(p.numel() for p in policy.unet.parameters()) > 2_000_000


def test_shipped_model_reproduces_its_recorded_base_accuracy():
    record = json.loads((SHIPPED_MODEL / "base_eval.json").read_text())
    policy = ToyPolicy.from_pretrained(ModelConfig())
    torch.set_num_threads(2)
    sampler = FlowSampler(flow_sigmas(record["steps"]), "ode")
    table = evaluate(policy, sampler, record["guidance"], record["per_category"])
    assert table["overall"]["strict"] == pytest.approx(
        record["table"]["overall"]["strict"], abs=0.05
    )
    assert table["overall"]["clauses"] == pytest.approx(
        record["table"]["overall"]["clauses"], abs=0.03
    )


def test_a_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no toy model there"):
        ToyPolicy.from_pretrained(ModelConfig(path=str(tmp_path / "nothing")))

"""The shipped embedded model: loads through the real adapter and reproduces its recorded
base accuracy on a fixed subset of held-out prompts, and the default config's shipped base
table (reused by every run of it) is current and reproduces."""

import json

import pytest
import torch

from raydraft.config import ModelConfig, load_config
from raydraft.embedded.pretrain import base_evaluation
from raydraft.evaluation import EVAL_BATCH, evaluate
from raydraft.evaluation_cache import SHIPPED, cached_table, evaluation_key, store_table
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


def test_the_default_configs_base_table_ships_for_this_code_and_reproduces():
    """`raydraft train` starts from the shipped table of its base model instead of
    evaluating it: the table must be there for the current code, weights and settings
    (else regenerate it, as the message says), and equal a fresh evaluation here up to
    kernels that round differently on another CPU (a sample or two per category)."""
    key, evaluation = base_evaluation(None)
    found = cached_table(key)
    assert found is not None and found[1] == "shipped", (
        "no shipped base table for the default config under the current code: run "
        "`python -m raydraft.embedded.pretrain --ship-base-table toy-nft`, delete the stale "
        "file in raydraft/assets/evaluations/, and commit the new one"
    )
    assert len(list(SHIPPED.glob("*.json"))) == 1  # no stale tables left behind
    fresh = evaluation()
    per_category = load_config(None, []).logging.eval_per_category
    for category, row in found[0].items():
        tolerance = 0.01 if category == "overall" else 2 / per_category
        assert row["strict"] == pytest.approx(fresh[category]["strict"], abs=tolerance)


def test_a_base_table_is_reused_only_for_the_same_weights_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = load_config(None, []).model  # all weights trained: no randomly drawn adapter
    policy = ToyPolicy.from_pretrained(model)
    sampler = FlowSampler(flow_sigmas(10), "ode")
    key = evaluation_key(policy, sampler, 1.0, 48, EVAL_BATCH)
    assert evaluation_key(policy, FlowSampler(flow_sigmas(8), "ode"), 1.0, 48, EVAL_BATCH) != key
    assert evaluation_key(policy, sampler, 3.0, 48, EVAL_BATCH) != key
    assert evaluation_key(policy, sampler, 1.0, 4, EVAL_BATCH) != key
    store_table(key, {"overall": {"strict": 0.5}})
    assert cached_table(key) == ({"overall": {"strict": 0.5}}, "cached")
    assert (tmp_path / "raydraft" / "evaluations" / f"{key}.json").is_file()
    with torch.no_grad():
        next(policy.unet.parameters()).add_(1e-3)
    assert evaluation_key(policy, sampler, 1.0, 48, EVAL_BATCH) != key
    with_reference = ToyPolicy.from_pretrained(model, keep_reference=True)
    assert evaluation_key(with_reference, sampler, 1.0, 48, EVAL_BATCH) == key  # base = ref

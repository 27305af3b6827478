"""The rollouts' low-precision copy (`raydraft.precision.rollout_copy`) on the shipped toy
model: which layers it swaps, that its weights are exactly the quantized weights of the
policy's current version (full fine-tuning, LoRA beside a quantized base, LoRA merged),
and that the model is whole again outside a rollout."""

import pytest
import torch
from peft.tuners.lora import LoraLayer

from raydraft.build import build_policy
from raydraft.config import RolloutConfig, load_config
from raydraft.precision import FakeQuantized
from raydraft.precision.layers import quantizable, quantize_weight
from raydraft.precision.rollout_copy import RolloutCopy


def toy(*overrides):
    return build_policy(load_config("toy-nft", list(overrides)).model)


def predict(policy):
    cond = policy.encode(["a red circle", "two blue squares"])
    x = policy.initial_noise([0, 1])
    with torch.no_grad():
        return policy.predict(x, torch.full((2,), 0.6), cond, 1.0)


def test_stand_ins_are_the_quantized_weights_of_the_current_version():
    policy = toy()
    module = policy.trainable.module
    layers_before = dict(module.named_modules())
    copy = RolloutCopy(RolloutConfig(precision="fp8"), "toy")
    full = predict(policy)
    with copy.sampling(policy):
        low = predict(policy)
        swapped = {name: m for name, m in module.named_modules() if isinstance(m, FakeQuantized)}
        # conv_in's 12 input channels do not fill a block; the rest of the kept layers
        # are the family's list.
        assert not any(n.startswith(("conv_in", "conv_out", "time_embedding")) for n in swapped)
        assert len(swapped) == len(copy.swaps) == 129
        for stand_in in swapped.values():
            assert torch.equal(stand_in.weight, quantize_weight(stand_in.layer.weight, "fp8"))
    assert dict(module.named_modules()) == layers_before  # the same objects, back in place
    assert torch.equal(predict(policy), full)
    error = ((low - full).norm() / full.norm()).item()
    assert 0 < error < 0.1

    layer = copy.swaps[0].stand_in.layer
    with torch.no_grad():
        layer.weight.mul_(1.5)
    with copy.sampling(policy):  # same version: the copy is not rebuilt
        assert not torch.equal(copy.swaps[0].stand_in.weight, quantize_weight(layer.weight, "fp8"))
    policy.version += 1  # a weight sync
    with copy.sampling(policy):
        assert copy.refresh_seconds > 0
        assert torch.equal(copy.swaps[0].stand_in.weight, quantize_weight(layer.weight, "fp8"))


def test_lora_side_keeps_the_adapter_in_full_precision_beside_a_frozen_quantized_base():
    policy = toy("model.lora.enabled=true")
    copy = RolloutCopy(RolloutConfig(precision="nvfp4", lora="side"), "toy")
    with copy.sampling(policy):
        wrappers = [m for m in policy.trainable.module.modules() if isinstance(m, LoraLayer)]
        assert wrappers and all(isinstance(w.base_layer, FakeQuantized) for w in wrappers)
        before = predict(policy)
    state = {k: v + 0.05 for k, v in policy.trainable_state().items()}
    policy.load_trainable(state, version=policy.version + 1)
    with copy.sampling(policy):
        assert copy.refresh_seconds == 0  # the base did not change: nothing to re-quantize
        assert not torch.equal(predict(policy), before)  # the adapter did


def test_lora_merge_quantizes_base_plus_adapter_at_each_version():
    policy = toy("model.lora.enabled=true")
    copy = RolloutCopy(RolloutConfig(precision="fp8", lora="merge"), "toy")
    module = policy.trainable.module

    def merged(swap):
        wrapper = swap.original
        return wrapper.base_layer.weight + wrapper.get_delta_weight("default")

    for version in (0, 1):
        with copy.sampling(policy):
            merges = [s for s in copy.swaps if isinstance(s.original, LoraLayer)]
            assert merges and not any(isinstance(m, LoraLayer) for m in module.modules())
            for swap in merges:
                assert torch.equal(swap.stand_in.weight, quantize_weight(merged(swap), "fp8"))
        state = {k: v + 0.05 for k, v in policy.trainable_state().items()}
        policy.load_trainable(state, version=version + 1)
    assert any(isinstance(m, LoraLayer) for m in module.modules())


def test_which_layers_are_quantizable():
    linear, conv = torch.nn.Linear(64, 256), torch.nn.Conv2d(48, 64, 3)
    assert quantizable("block.ff", linear, (), 0)
    assert not quantizable("block.ff", linear, (), 256)  # min_dim: larger side ≤ 256 stays
    assert not quantizable("block.norm1.linear", linear, (r".*\.norm1\.linear",), 0)
    assert not quantizable("attn.lora_A.default", linear, (), 0)
    assert not quantizable("odd", torch.nn.Linear(64, 100), (), 0)
    assert quantizable("down.conv", conv, (), 0, "nvfp4")
    assert not quantizable("down.conv", conv, (), 0, "mxfp4")  # 48 channels: 1.5 blocks


def test_a_full_precision_config_has_no_copy():
    with pytest.raises(ValueError, match="other than full"):
        RolloutCopy(RolloutConfig(), "toy")

"""FP8 formats and linear layers (`raydraft.precision`): the definitions on hand-built
cases, the emulation against torch's own FP8 product, and the module swap's rules."""

import pytest
import torch

from raydraft.precision import Float8Linear, fake_quantize, quantize_linears
from raydraft.precision.formats import E4M3, quantize_fp8


def test_fp8_values_on_the_e4m3_grid_come_back_exactly():
    # With one scale per tensor of amax / 448 = 1, E4M3 values are their own quantization.
    grid = torch.tensor([448.0, 0.0, -1.0, 0.5, 1.125, 240.0, -448.0, 2.0**-9])
    assert torch.equal(fake_quantize(grid, "fp8-tensor"), grid)
    # Between two grid points (1.0 and 1.125) the cast rounds to the nearest, ties to even.
    assert fake_quantize(torch.tensor([448.0, 1.0625, 1.07]), "fp8-tensor").tolist() == [
        448.0,
        1.0,
        1.125,
    ]


def test_fp8_rows_have_their_own_scales_and_zero_rows_stay_zero():
    x = torch.tensor([[896.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-4.48, 1.0, 0.01]])
    values, scale = quantize_fp8(x, rowwise=True)
    assert values.dtype == E4M3
    assert scale.squeeze(1).tolist() == pytest.approx([2.0, 1.0, 0.01])
    out = fake_quantize(x, "fp8")
    assert out[0, 0] == 896.0 and out[2, 0] == pytest.approx(-4.48)  # each row's max is exact
    assert torch.equal(out[1], torch.zeros(3))


def test_the_cast_never_saturates_silently():
    # The scale is computed in bf16 (as torchao does), where 3 / 448 rounds down, so
    # 3 / scale lands at 448.9: it must come out as 448 whatever a torch version's cast
    # does with out-of-range values (this one saturates, others give NaN).
    x = torch.tensor([[3.0, 1.0]], dtype=torch.bfloat16)
    values, scale = quantize_fp8(x, rowwise=True)
    assert (x.float() / scale).max() > 448
    assert values.float().abs().max() == 448


@pytest.mark.parametrize("fmt", ["fp8", "fp8-tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_dequantize_is_idempotent(fmt, dtype):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(dtype) * 3
    once = fake_quantize(x, fmt)
    assert once.dtype == dtype
    assert torch.equal(fake_quantize(once, fmt), once)
    assert not torch.equal(once, x)


def test_unknown_format_is_named():
    with pytest.raises(ValueError, match="unknown precision format 'fp6'"):
        fake_quantize(torch.ones(2), "fp6")


def test_emulated_w8a8_equals_torch_scaled_mm():
    """The CPU path of Float8Linear is the FP8 product itself, not an approximation."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(5, 7, 64)
    layer = Float8Linear(linear)
    rows, scale = quantize_fp8(x.reshape(-1, 64), rowwise=True)
    product = torch._scaled_mm(
        rows,
        layer.weight_fp8.t(),
        scale_a=scale,
        scale_b=layer.weight_scale.t(),
        out_dtype=torch.float32,
    )
    assert torch.equal(layer(x), (product + linear.bias).reshape(5, 7, 48))
    error = (layer(x) - linear(x)).norm() / linear(x).norm()
    assert 0 < error < 0.1


def test_refresh_requantizes_from_the_master_and_moves_with_the_module():
    layer = Float8Linear(torch.nn.Linear(32, 16))
    before = layer.weight_fp8.clone()
    with torch.no_grad():
        layer.master.weight.mul_(2)
    assert torch.equal(layer.weight_fp8, before)  # a copy until the sync re-quantizes
    layer.refresh()
    assert torch.equal(layer.weight_fp8.float() * layer.weight_scale, fake_quantize(
        layer.master.weight, "fp8"
    ))  # fmt: skip
    assert {name for name, _ in layer.named_buffers()} == {"weight_fp8", "weight_scale"}
    assert layer.state_dict().keys() == {"master.weight", "master.bias"}


def test_quantize_linears_follows_skip_min_dim_and_lora_rules():
    from peft import LoraConfig, inject_adapter_in_model

    block = {
        "wide": torch.nn.Linear(64, 256),
        "narrow": torch.nn.Linear(32, 32),
        "odd": torch.nn.Linear(64, 100),
        "norm1": torch.nn.Linear(64, 64),
    }
    model = torch.nn.ModuleDict(
        {
            "embed": torch.nn.Linear(64, 64),
            "block": torch.nn.ModuleDict(block),
            "attn": torch.nn.ModuleDict({"to_q": torch.nn.Linear(64, 64)}),
        }
    )
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q"]), model)
    swapped = quantize_linears(model, skip=("embed", r".*\.norm1"), min_dim=32)
    # LoRA factors stay, the base under them is swapped; 100 is not a multiple of 16.
    assert swapped == ["block.wide", "attn.to_q.base_layer"]
    assert isinstance(model["block"]["wide"], Float8Linear)
    assert type(model["attn"]["to_q"].lora_A["default"]) is torch.nn.Linear
    assert type(model["embed"]) is torch.nn.Linear

"""FP8 formats and linear layers (`raydraft.precision`): the definitions on hand-built
cases, the emulation against torch's own FP8 product, and the module swap's rules."""

import pytest
import torch

from raydraft.precision import Float8Linear, fake_quantize
from raydraft.precision.formats import E4M3, quantize_fp8, round_e2m1


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


@pytest.mark.parametrize("fmt", ["fp8", "fp8-tensor", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_dequantize_is_idempotent(fmt, dtype):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(dtype) * 3
    once = fake_quantize(x, fmt)
    assert once.dtype == dtype
    assert torch.equal(fake_quantize(once, fmt), once)
    assert not torch.equal(once, x)


def test_e2m1_rounds_to_nearest_with_ties_to_even():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5, -0.75])
    assert round_e2m1(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -2.0, -1.0]
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert torch.equal(round_e2m1(grid), grid) and torch.equal(round_e2m1(-grid), -grid)
    assert round_e2m1(torch.tensor([0.2, 0.3, 5.1, 7.0, 100.0])).tolist() == [0, 0.5, 6, 6, 6]


def test_block_formats_have_one_scale_per_block():
    # Two NVFP4 blocks of 16, the second's values 10× the first's. The tensor's maximum
    # comes back exactly (6 × 448 × the tensor scale); the small block has a scale of its
    # own, so its values keep a resolution that one scale for the row (2: steps of 1 up
    # to 4) would round to 0 or 1.
    row = torch.cat([torch.linspace(0.1, 1.2, 16), torch.linspace(1, 12, 16)])
    out = fake_quantize(row[None], "nvfp4")[0]
    assert out[31] == 12
    one_scale = round_e2m1(row[:16] / 2) * 2
    assert (out[:16] - row[:16]).abs().max() < 0.2 < 0.4 < (one_scale - row[:16]).abs().max()
    # MXFP4 (OCP spec): a block with amax 7 gets scale 2^(floor(log2 7) - 2) = 1, so 7
    # saturates at 6, 3 is on the grid and 0.7 rounds to 0.5; a power-of-two scale
    # (here 2^-4) changes none of that.
    block = torch.zeros(32)
    block[:3] = torch.tensor([7.0, 3.0, 0.7])
    assert fake_quantize(block[None], "mxfp4")[0, :3].tolist() == [6.0, 3.0, 0.5]
    scaled = fake_quantize(block[None] * 2**-4, "mxfp4")[0, :3] * 2**4
    assert scaled.tolist() == [6.0, 3.0, 0.5]
    with pytest.raises(ValueError, match="multiple of 16"):
        fake_quantize(torch.ones(2, 24), "nvfp4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_formats_equal_torchao_bit_for_bit(dtype):
    """torchao 0.18's own quantizers (fp8 per-row weight-only, NVFP4 with a tensor scale,
    MXFP4) give the same dequantized values on random weights of varied row scales."""
    torchao = pytest.importorskip("torchao")
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    assert torchao.__version__ == "0.18.0"
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        w = (torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g) * 3).to(dtype)
        nvfp4 = NVFP4Tensor.to_nvfp4(w, per_tensor_scale=w.float().abs().amax() / (448 * 6))
        assert torch.equal(fake_quantize(w, "nvfp4"), nvfp4.dequantize(dtype))
        mxfp4 = MXTensor.to_mx(w, torch.float4_e2m1fn_x2, 32)
        assert torch.equal(fake_quantize(w, "mxfp4"), mxfp4.dequantize(dtype))
        linear = torch.nn.Linear(256, 64).to(dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
        quantize_(linear, Float8WeightOnlyConfig())
        assert torch.equal(fake_quantize(w, "fp8"), linear.weight.dequantize())


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


def test_refresh_requantizes_from_the_full_precision_weight_and_moves_with_the_module():
    linear = torch.nn.Linear(32, 16)
    layer = Float8Linear(linear)
    before = layer.weight_fp8.clone()
    with torch.no_grad():
        linear.weight.mul_(2)
    assert torch.equal(layer.weight_fp8, before)  # a copy until the sync re-quantizes
    layer.refresh()
    assert torch.equal(
        layer.weight_fp8.float() * layer.weight_scale, fake_quantize(linear.weight, "fp8")
    )
    assert {name for name, _ in layer.named_buffers()} == {"weight_fp8", "weight_scale"}
    moved = layer.to("meta")  # the full-precision layer moves with its stand-in
    assert moved.layer.weight.is_meta and moved.weight_fp8.is_meta

"""Low-precision copies of a model for rollout workers: the formats' exact quantize-dequantize
(`formats`) and linear layers that run them (`linear`)."""

from raydraft.precision.formats import FORMATS, fake_quantize
from raydraft.precision.linear import Float8Linear, quantize_linears

__all__ = ["FORMATS", "Float8Linear", "fake_quantize", "quantize_linears"]

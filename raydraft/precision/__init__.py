"""Low-precision copies of a model for rollout workers: the formats' exact quantize-dequantize
(`formats`), layers that compute in them (`layers`), and the rollout's quantized copy of a
denoiser (`rollout_copy`)."""

from raydraft.precision.formats import FORMATS, fake_quantize
from raydraft.precision.layers import FakeQuantized, Float8Linear

__all__ = ["FORMATS", "FakeQuantized", "Float8Linear", "fake_quantize"]

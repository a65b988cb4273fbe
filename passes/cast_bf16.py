"""Run the encoder's matmuls in bf16, keeping LayerNorm, softmax and residual sums in fp32 (lossy).

What: the same regions as cast_fp16 (vitopt/ir/precision.py): linears, GELU and the attention
matmuls of every attention and MLP stage in bf16; LayerNorm statistics, softmax, residual
stream, layer scale, stem, token reduction and head in fp32. bf16 has fp32's exponent range,
so nothing overflows; the fp32 regions are there for precision (8-bit mantissa: LayerNorm
statistics and softmax sums over hundreds of tokens lose too much in bf16). The lowered ONNX
carries explicit Cast nodes to/from bfloat16. ONNX Runtime's CPU EP has almost no bf16 kernels
(the graph does not load there: use the OpenVINO backend); OpenVINO runs bf16 natively where
the CPU has AVX512_BF16/AMX (with the bf16 hint), else in f32. `skip` names stages to keep fp32.
Preconditions, order and declines: as cast_fp16 (exclusive with cast_fp16 and quantize_int8).
Cost: bf16 rounding of linear inputs/weights: on the digits proxy within 0.5 top-1 points of
fp32 (tests/test_pass_cast_precision.py); engine outputs within the bf16 row of the tolerances.
Background: Kalamkar et al. 2019, "A Study of BFLOAT16 for Deep Learning Training".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from vitopt.ir.precision import run_cast_pass
from vitopt.pipeline import PassConfig, PassResult, register_pass


@dataclass(frozen=True)
class CastBf16Config(PassConfig):
    skip: Tuple[str, ...] = ()
    attention: bool = True


@register_pass("cast_bf16", config=CastBf16Config, exact=False)
def cast_bf16(ir, config: CastBf16Config) -> PassResult:
    return run_cast_pass(ir, "bf16", config.skip, config.attention)

"""Run the encoder's matmuls in fp16, keeping LayerNorm, softmax and residual sums in fp32 (lossy).

What: in every attention and MLP stage, the linears (qkv or q/k/v, proj, fc1, fc2) hold fp16
weights and run in fp16, GELU runs in fp16 between fc1 and fc2, and the attention matmuls
(q.K^T, P.V) run in fp16 with the softmax in fp32 (`attention=false` keeps the attention core
fp32). LayerNorm statistics, softmax, the residual stream, layer scale, the stem, token
reduction stages and the head stay fp32: large trained ViTs carry residual activations above
fp16's maximum 65504 in a few channels, which breaks a whole-model `.half()` (and TensorRT fp16
builds of ViTs) with inf/NaN. The casts are explicit ops in the IR (vitopt/ir/precision.py), so
the lowered ONNX carries Cast nodes (TensorRT's strongly typed mode needs them; ONNX Runtime's CPU
EP inserts its own fp32 casts around fp16 ops it has no kernel for; OpenVINO's CPU plugin runs
f16 ops in f32 on CPUs without native fp16). `skip` names stages to keep fp32 ("attn0,mlp11").
Preconditions: Attention/Mlp stages with plain nn.Linear layers (other stages are kept fp32 with
a note); declines on an IR that is already cast or quantized (precision passes are exclusive).
Order: last, after the exact rewrites and token reduction (merge_tokens / prune_tokens may also
run after it: its casts sit inside attention and MLP stages). Not with quantize_int8.
Cost: numerics only, fp16 rounding of linear inputs/weights (11-bit mantissa, fp32 accumulation
where the engine has it): on the digits proxy within 0.5 top-1 points of fp32
(tests/test_pass_cast_precision.py), engine outputs within the fp16 row of vitopt/tolerances.py.
Background: Micikevicius et al. 2018, "Mixed Precision Training" (keep reductions and
softmax in fp32); the fp16 overflow of ViT residual streams in TensorRT builds (NVIDIA
TensorRT issue tracker, ViT/DINOv2 fp16 NaNs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from vitopt.ir.precision import run_cast_pass
from vitopt.pipeline import PassConfig, PassResult, register_pass


@dataclass(frozen=True)
class CastFp16Config(PassConfig):
    skip: Tuple[str, ...] = ()
    attention: bool = True


@register_pass("cast_fp16", config=CastFp16Config, exact=False)
def cast_fp16(ir, config: CastFp16Config) -> PassResult:
    return run_cast_pass(ir, "fp16", config.skip, config.attention)

"""Explicit fp16/bf16 regions in the encoder IR (shared by the cast_fp16 and cast_bf16 passes).

The matmul-heavy parts of a block run in the low precision; what overflows or loses too much in
it stays fp32. In one attention stage (linears and attention matmuls low, the rest fp32):

  LayerNorm (fp32) -> Cast -> MatMul qkv (low, bias added in low) -> Cast(fp32)
    -> q * scale, k, v -> Cast(low) -> MatMul q.K^T (low) -> Cast(fp32) [+ log size]
    -> Softmax (fp32) -> Cast(low) -> MatMul P.V (low) -> MatMul proj (low) -> Cast(fp32)
    -> [x layer scale] -> residual Add (fp32)

and in one MLP stage: LayerNorm (fp32) -> Cast -> fc1 -> GELU -> fc2 (low) -> Cast(fp32) ->
residual Add (fp32). The residual stream, LayerNorm statistics and softmax never see fp16:
trained ViTs carry residual activations above fp16's 65504 in a few channels (the known
TensorRT fp16 ViT failure), and attention logits lose the precision softmax needs.
The casts are real ops in the IR, so torch.onnx.export writes them as ONNX Cast nodes: the
lowered graph states every precision explicitly (what TensorRT's strongly typed mode wants).
The qkv projection casts its output back to fp32 on purpose: attention stages may record
class-token attention or mean keys for token reduction from q and k, and those side outputs
feed fp32 ranking and averaging (the extra Cast pair is elementwise and cheap).

* `CastLinear`     drop-in for nn.Linear (same in/out features; `.weight`/`.bias` give fp32
                   views for passes and FLOP counts) holding its parameters in the low dtype.
* `CastAttention`  the attention matmuls in the low dtype with softmax in fp32, installed in
                   the stage's attention-core slot (`Attention.attn_quant`, called as
                   `core(q, k, v, mask, scale)`).
* `cast_stage`     applies both to one Attention/Mlp stage, or says why it cannot.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vitopt.ir.stages import Attention, Mlp

LOW_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LINEAR_ATTRS = ("qkv", "q", "k", "v", "proj", "fc1", "fc2")


class CastLinear(nn.Module):
    """A Linear run in `dtype`: Cast(x) -> MatMul(x, W^T) -> Add(b) in `dtype` -> Cast(fp32)
    unless `keep_low` (then the output stays in `dtype` for a consumer in the same region)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, keep_low: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype, self.keep_low = dtype, bool(keep_low)
        # [in, out]: MatMul reads the initializer directly (no Transpose in the graph).
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous().to(dtype),
                                     requires_grad=False)
        self.bias_low = (nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
                         if linear.bias is not None else None)

    @property
    def weight(self) -> torch.Tensor:
        """The weight [out, in] in fp32, like nn.Linear.weight (values rounded to `dtype`)."""
        return self.weight_t.t().float()

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.bias_low.float() if self.bias_low is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(x.to(self.dtype), self.weight_t)
        if self.bias_low is not None:
            out = out + self.bias_low
        return out if self.keep_low else out.float()

    def extra_repr(self) -> str:
        out = str(self.dtype).replace("torch.", "") if self.keep_low else "float32"
        return f"{self.in_features}->{self.out_features}, {self.dtype} -> out {out}"


class CastAttention(nn.Module):
    """softmax(q k^T * scale + mask) v with both matmuls in `dtype` and the softmax (and mask
    add) in fp32. q is scaled before the cast, so the logits stay in the range of q.K^T/sqrt(d).
    The output stays in `dtype`: the projection after it is a CastLinear of the same dtype.
    Explicit matmuls with Converts around the softmax: OpenVINO 2026.4 (f32 hint, which keeps
    the graph's precisions) runs them as two bf16 MatMuls and an f32 Softmax, not as its fused
    attention Subgraph; ONNX Runtime's CPU EP runs them in fp32 (no fp16 MatMul kernel, it
    inserts its own casts). Both still match the IR (tests/test_pass_cast_precision.py)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, q, k, v, mask, scale: float) -> torch.Tensor:
        low = self.dtype
        logits = ((q * scale).to(low) @ k.to(low).transpose(-2, -1)).float()
        if mask is not None:
            logits = logits + mask.float()
        return logits.softmax(dim=-1).to(low) @ v.to(low)

    def extra_repr(self) -> str:
        return f"matmuls {self.dtype}, softmax float32"


def stage_refusal(stage) -> Optional[str]:
    """Why `stage` cannot be cast (None: it can). Only Attention/Mlp stages whose linears are
    plain nn.Linear and whose attention core is the default one are cast."""
    if not isinstance(stage, (Attention, Mlp)):
        return f"{stage.kind} stages stay fp32"
    odd = [a for a in LINEAR_ATTRS if getattr(stage, a, None) is not None
           and type(getattr(stage, a)) is not nn.Linear]
    if odd:
        kinds = ", ".join(f"{a} is {type(getattr(stage, a)).__name__}" for a in odd)
        return f"{kinds}, not nn.Linear"
    if isinstance(stage, Attention) and stage.attn_quant is not None:
        return f"attention core is already {type(stage.attn_quant).__name__}"
    return None


def cast_stage(stage, dtype: torch.dtype, attention: bool = True) -> None:
    """Run `stage`'s linears (and, with `attention`, its attention matmuls) in `dtype`."""
    if isinstance(stage, Mlp):
        stage.fc1 = CastLinear(stage.fc1, dtype, keep_low=True)  # GELU and fc2 in the same region
        stage.fc2 = CastLinear(stage.fc2, dtype)
        return
    for attr in ("qkv", "q", "k", "v"):
        if getattr(stage, attr) is not None:
            setattr(stage, attr, CastLinear(getattr(stage, attr), dtype))
    stage.proj = CastLinear(stage.proj, dtype)
    if attention:
        stage.attn_quant = CastAttention(dtype)


def cast_layers(ir) -> dict:
    """{"attn3.qkv": CastLinear, ...} over the IR's stages."""
    found = {}
    for stage in ir.stages:
        for name, module in stage.named_children():
            if isinstance(module, CastLinear):
                found[f"{stage.kind}{getattr(stage, 'block', '')}.{name}"] = module
    return found


def cast_dtype(ir) -> Optional[str]:
    """"fp16" or "bf16" when a precision pass already cast the IR, else None."""
    names = {v: k for k, v in LOW_DTYPES.items()}
    return next((names[m.dtype] for m in cast_layers(ir).values()), None)


def apply_cast(ir, precision: str, skip=(), attention: bool = True):
    """Cast every Attention/Mlp stage of `ir` (in place) to `precision` ("fp16" | "bf16"),
    except those named in `skip` ("attn0", "mlp11") or refused by `stage_refusal`.
    Returns (names of the cast stages, {stage name: why kept fp32})."""
    dtype = LOW_DTYPES[precision]
    cast, kept = [], {}
    for stage in ir.stages:
        if not isinstance(stage, (Attention, Mlp)):
            continue
        name = f"{stage.kind}{stage.block}"
        why = "named in skip" if name in skip else stage_refusal(stage)
        if why:
            kept[name] = why
            continue
        cast_stage(stage, dtype, attention)
        stage.precision = precision
        cast.append(name)
    return cast, kept


def stage_names(ir) -> list:
    return [f"{s.kind}{s.block}" for s in ir.stages if isinstance(s, (Attention, Mlp))]


def run_cast_pass(ir, precision: str, skip=(), attention: bool = True):
    """The body of cast_fp16 / cast_bf16: declines on a quantized or already cast IR, or when
    no stage can be cast; otherwise casts and says what stayed fp32 and why."""
    from vitopt.errors import ConfigError
    from vitopt.ir.quant import quant_layers
    from vitopt.pipeline import PassResult

    unknown = sorted(set(skip) - set(stage_names(ir)))
    if unknown:
        raise ConfigError(f"cast_{precision}: skip names {unknown} are not stages of this model; "
                          f"stages: {', '.join(stage_names(ir))}")
    done = cast_dtype(ir)
    if done:
        return PassResult(ir, False, {}, [f"the IR is already cast to {done}; run one precision "
                                          f"pass (cast_fp16 or cast_bf16), once"])
    if quant_layers(ir):
        return PassResult(ir, False, {}, [
            "the IR is already quantized (int8); casting after quantize_int8 is not supported: "
            f"the engine runs the float rest of an int8 graph in bf16 where the CPU has it. "
            f"Use cast_{precision} or quantize_int8, not both"])
    cast, kept = apply_cast(ir, precision, skip, attention)
    if not cast:
        reasons = "; ".join(f"{n}: {why}" for n, why in kept.items()) or "no attention/MLP stages"
        return PassResult(ir, False, {"kept": kept}, [f"nothing to cast to {precision}: {reasons}"])
    notes = [f"{precision}: {len(cast)} of {len(cast) + len(kept)} attention/MLP stages run their "
             f"linears{' and attention matmuls' if attention else ''} in {precision}; LayerNorm, "
             f"softmax, residual sums, stem, token reduction and head stay fp32"]
    if kept:
        notes.append("kept in fp32: " + ", ".join(f"{n} ({why})" for n, why in kept.items()))
    stats = {"precision": precision, "cast_stages": cast, "kept": kept,
             "attention_matmuls": precision if attention else "fp32"}
    return PassResult(ir, True, stats, notes)

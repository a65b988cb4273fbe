"""Explicit int8 quantization in the encoder IR: fake-quant modules the reference executor runs.

The IR's output with these modules in place IS the quantized model's reference: every value
that the engine will see as int8 is quantized and dequantized here with the same scale and
zero point, using torch's `quantized_decomposed` ops. The ONNX exporter turns those ops into
QuantizeLinear/DequantizeLinear nodes, so the lowering carries the precision explicitly:

  activation (fp32) -> Q(u8, per tensor) -> DQ -> MatMul(x, DQ(int8 weight [in, out], per
  output channel, axis 1)) -> Add(bias)

The weight is stored transposed ([in, out]) so MatMul reads the DequantizeLinear output
directly (a Transpose between them hides the int8 weight from the engines' pattern matchers),
and the bias is added after the MatMul, outside the Q/DQ pair.

* `ActQuant`   per-tensor affine activation quantizer (u8, scale, zero point, how chosen).
* `QuantLinear` drop-in for nn.Linear inside Attention/Mlp stages (same in/out features,
  `.weight`/`.bias` give the dequantized float weights), with an optional input ActQuant;
  with `input_quantized_early` its producer applies that quantizer before a layout op (the
  attention's head merge, Attention.project_heads; the stem's patchify), so engines fuse it
  into the producing kernel and move int8 through the transpose.
* `SymQuant`   per-tensor symmetric int8 activation quantizer (zero point 0).
* `QKInt8Attention` explicit attention core for q and k quantized symmetric int8 (q at its
  projection, `QuantLinear.output_quant`; k at the core's input, `k_quant`), softmax and P.V in
  float (the scheme OpenVINO fuses into its int8 attention kernel), installed as
  `Attention.attn_quant`.
* `AttentionQuant` fake quantization of q, k, v in u8 (and, for the naive baseline only, the
  softmax output), installed as `Attention.attn_quant`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed
import torch.nn.functional as F
from torch import nn

_qd = torch.ops.quantized_decomposed
WEIGHT_QMAX = 127  # symmetric int8 weights use [-127, 127] (no -128: VNNI-safe, symmetric)
#: Weight ranges quantize_int8 writes: full 8-bit, or 7-bit ([-63, 63], still stored as int8)
#: for CPUs whose int8 GEMMs saturate (see passes/quantize_int8.py, overflow_fix).
WEIGHT_BITS = (8, 7)


def weight_qmax(bits: int) -> int:
    """The largest |q| of symmetric `bits`-bit weights: 127 for 8 bits, 63 for 7."""
    if bits not in WEIGHT_BITS:
        raise ValueError(f"weight bits {bits} is not one of {WEIGHT_BITS}")
    return 2 ** (bits - 1) - 1


def affine_params(lo: float, hi: float) -> tuple:
    """(scale, zero_point) of a u8 affine quantizer covering [lo, hi] (which must hold 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0
    if not scale > 0:
        raise ValueError(f"activation range [{lo}, {hi}] is empty; the calibration data gives this "
                         f"tensor a constant value")
    zero_point = int(min(255, max(0, round(-lo / scale))))
    return scale, zero_point


def fake_quant_u8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    q = _qd.quantize_per_tensor(x, scale, zero_point, 0, 255, torch.uint8)
    return _qd.dequantize_per_tensor(q, scale, zero_point, 0, 255, torch.uint8)


def fake_quant_i8(x: torch.Tensor, scale: float) -> torch.Tensor:
    q = _qd.quantize_per_tensor(x, scale, 0, -128, 127, torch.int8)
    return _qd.dequantize_per_tensor(q, scale, 0, -128, 127, torch.int8)


class SymQuant(nn.Module):
    """Per-tensor symmetric int8 fake quantization of values in [-bound, bound]."""

    def __init__(self, bound: float, method: str = "minmax"):
        super().__init__()
        if not bound > 0:
            raise ValueError(f"activation bound {bound} is not positive; the calibration data "
                             f"gives this tensor the constant value 0")
        self.bound, self.method = float(bound), method
        self.scale = self.bound / 127.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_i8(x, self.scale)

    def to_dict(self) -> dict:
        return {"bound": self.bound, "scale": self.scale, "zero_point": 0, "method": self.method}


class ActQuant(nn.Module):
    """Per-tensor u8 fake quantization with a calibrated range."""

    def __init__(self, lo: float, hi: float, method: str = "minmax"):
        super().__init__()
        self.scale, self.zero_point = affine_params(lo, hi)
        self.lo, self.hi, self.method = float(lo), float(hi), method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_u8(x, self.scale, self.zero_point)

    def to_dict(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "scale": self.scale, "zero_point": self.zero_point,
                "method": self.method}


def quantize_weight(weight: torch.Tensor, bits: int = 8) -> tuple:
    """Per-output-channel symmetric int8 (values within `bits` bits): (q [out, in] int8,
    scale [out])."""
    qmax = weight_qmax(bits)
    absmax = weight.detach().abs().amax(dim=1).clamp_min(1e-12)
    scale = (absmax / qmax).float()
    q = torch.round(weight.detach() / scale[:, None]).clamp(-qmax, qmax)
    return q.to(torch.int8), scale


class QuantLinear(nn.Module):
    """int8 per-channel weights (8-bit or 7-bit range), u8 per-tensor input, fp32 bias and
    accumulation output."""

    def __init__(self, linear: nn.Linear, input_quant: ActQuant, weight_bits: int = 8):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_bits = int(weight_bits)
        q, scale = quantize_weight(linear.weight, self.weight_bits)
        self.register_buffer("weight_q", q.t().contiguous())  # [in, out]
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero", torch.zeros(self.out_features, dtype=torch.int64))
        self.bias = (nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None
                     else None)
        self.input_quant = input_quant
        # True when the producer applies input_quant, before a layout-only op between them (the
        # attention's head merge, the stem's patchify): per-tensor quantization commutes with
        # a transpose or reshape, and the engines then fuse the quantizer into the producing
        # kernel and move int8 through the layout op (see `early_input_quant`).
        self.input_quantized_early = False
        # Optional symmetric int8 quantizer of the output (quantize_int8 attention=qk puts one on
        # the q and k projections: the engines fuse it into the GEMM as an int8 output stage).
        self.output_quant: Optional[SymQuant] = None
        self.sqnr_db: Optional[float] = None  # filled in by the pass (layer-local, calibration)

    def dequantized_weight_t(self) -> torch.Tensor:
        return _qd.dequantize_per_channel(self.weight_q, self.weight_scale, self.weight_zero, 1,
                                          -128, 127, torch.int8)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in], like nn.Linear.weight (for passes and FLOP counts)."""
        return self.dequantized_weight_t().t()

    @property
    def early_input_quant(self) -> Optional[ActQuant]:
        """The input quantizer when the producer must apply it (`input_quantized_early`), else
        None: the layer then receives values already on its u8 grid and does not quantize
        them again."""
        return self.input_quant if self.input_quantized_early else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.input_quantized_early else self.input_quant(x)
        out = torch.matmul(x, self.dequantized_weight_t())
        out = out + self.bias if self.bias is not None else out
        return self.output_quant(out) if self.output_quant is not None else out

    def to_linear(self) -> nn.Linear:
        """The float Linear with the dequantized weights (a fallback keeps the rounding-free
        original; see quantize_int8)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        q = self.input_quant
        out = f", out i8 bound {self.output_quant.bound:.3g}" if self.output_quant is not None else ""
        where = " at the producer" if self.input_quantized_early else ""
        bits = "" if self.weight_bits == 8 else f" ({self.weight_bits}-bit range)"
        return (f"{self.in_features}->{self.out_features}, w int8/ch{bits}, x u8 scale {q.scale:.3g} "
                f"zp {q.zero_point} ({q.method}){where}{out}")


def int8_key_projection(stage, input_quant: ActQuant, weight_bits: int = 8) -> QuantLinear:
    """The head-averaged key projection of a merging Attention `stage` as an int8 layer
    (`Attention.merge_key_proj`) reading the u8 input `input_quant` (the qkv's or k's), built
    from the stage's current key weights (float, or dequantized when already int8), with the
    same weight range as the layer whose input it shares.

    Why its own layer: derived on the fly from an int8 qkv, the projection runs as a float GEMM
    whose input is also the qkv's; OpenVINO 2026.4 then cannot fold the u8 FakeQuantize into
    the LayerNorm before them (a separate Reorder + FakeQuantize), and a second
    DequantizeLinear on the same int8 initializer made it fold the qkv weight to float and run
    that GEMM in bf16. As a QuantLinear with the qkv's input quantizer it is one more small int8
    GEMM on the same u8 input (DeiT-S/16 balanced, batch 8: about 0.5 ms per merging block).
    Averaging k's rows over the heads instead (a ReduceMean over [B, N, heads, Dh] of the k
    GEMM's output) was slower in OpenVINO 2026.4 dynamic-shape engines: 0.24 ms per merging
    block at batch 8, and k's second reader kept its quantizer out of the attention kernel
    (standalone FakeQuantize with reorders, balanced DeiT-S +10 %). Merging only ranks tokens
    by these keys: int8 rounding can change which pairs merge, which the fake-quant reference
    (the IR) reproduces exactly."""
    weight, bias = stage.mean_key_projection()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return QuantLinear(linear, input_quant, weight_bits)


class QKInt8Attention(nn.Module):
    """softmax(q . k^T * scale + mask) . v as explicit matmuls, with q and k int8: quantize_int8
    attention=qk splits the qkv GEMM into q, k and v GEMMs, folds the attention scale into q's
    weights (scale 1 here), quantizes q symmetric int8 per tensor at its projection
    (`QuantLinear.output_quant`) and k the same way here, after the head split (`k_quant`); the
    softmax and P.V stay float.

    quantize_int8's default. OpenVINO 2026.4 runs this as one int8 attention kernel per block
    (NNCF's transformer scheme also quantizes exactly the two q.K^T inputs). Where each
    quantizer sits decides what OpenVINO fuses (DeiT-S/16, PERF_COUNT):
    * q's, at the GEMM, becomes the GEMM's int8 output stage, and q's head-split transpose
      ([0,2,1,3]) is absorbed by the attention kernel.
    * k's, between the head split and K^T, keeps the two transposes apart: OpenVINO turns K^T
      into the matmul's transpose_b, folds the quantizer into the k GEMM (per tensor, it
      commutes with the transpose) and runs the head split as a [0,2,1,3] transpose of whole
      64-value rows on int8 k, 0.06 ms per block at batch 8. At the GEMM instead, the two
      transposes fused into one [0,2,3,1] on int8 k, which moves single values (about 0.25 ms
      per block: 1.8 ms of a 66 ms balanced engine).
    * Both after the head split (an earlier version) left standalone FakeQuantize nodes with
      bf16/f32/i8 reorders in dynamic-shape engines.
    u8 q/k/v with zero points (AttentionQuant) fused 2 of 12 DeiT-S blocks. Explicit matmuls,
    not scaled_dot_product_attention: its ONNX form multiplies q and k by sqrt(scale) between
    the quantizers and the MatMul."""

    def __init__(self, k_quant: Optional[SymQuant] = None):
        super().__init__()
        self.k_quant = k_quant

    def forward(self, q, k, v, mask, scale: float) -> torch.Tensor:
        if self.k_quant is not None:
            k = self.k_quant(k)
        logits = (q * scale if scale != 1.0 else q) @ k.transpose(-2, -1)
        if mask is not None:
            logits = logits + mask
        return logits.softmax(dim=-1) @ v

    def extra_repr(self) -> str:
        k = f"k int8 bound {self.k_quant.bound:.3g} here" if self.k_quant is not None else "k float"
        return f"q.K^T on int8 q (quantized at its projection) and {k}; P.V float"


class AttentionQuant(nn.Module):
    """Fake-quantized attention matmul inputs: q, k, v per tensor (u8); softmax output only when
    `softmax` holds a quantizer (the naive baseline: min/max u8 on probabilities, which rounds
    most small probabilities to zero). Explicit matmuls: engines cannot fuse this attention."""

    def __init__(self, q: ActQuant, k: ActQuant, v: ActQuant, softmax: Optional[ActQuant] = None):
        super().__init__()
        self.q, self.k, self.v, self.softmax = q, k, v, softmax

    def forward(self, q, k, v, mask, scale: float) -> torch.Tensor:
        q, k, v = self.q(q), self.k(k), self.v(v)
        if self.softmax is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        logits = (q @ k.transpose(-2, -1)) * scale
        if mask is not None:
            logits = logits + mask
        return self.softmax(logits.softmax(dim=-1)) @ v


def quant_layers(ir) -> dict:
    """{"stem.patch": ..., "attn3.qkv": QuantLinear, ...} over the IR's stages (the stem's
    patch convolution as an int8 GEMM: vitopt.ir.quant_stem)."""
    found = {}
    for stage in ir.stages:
        prefix = f"{stage.kind}{getattr(stage, 'block', '')}"
        if stage.kind == "stem":
            found.update({f"{prefix}.patch": m for m in stage.modules() if isinstance(m, QuantLinear)})
            continue
        for name, module in stage.named_children():
            if isinstance(module, QuantLinear):
                found[f"{prefix}.{name}"] = module
    return found

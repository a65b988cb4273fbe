"""ShiftLinear: a linear layer with power-of-two weights, run as shifts and adds.

`ShiftLinear` is the IR node that `reparam_shiftadd` puts where a Linear was. Weights are
stored packed, one int8 code per weight (sign and shift, see vitopt.kernels.shiftadd_reference
for the exact meaning) plus one float32 scale per output channel:
    w[n, k] = scale[n] * sign * 2^-p,  p in [0, max_shift]   (DeepShift-PS; ShiftAddViT)
Its forward calls the torch custom op `vitopt::shift_linear` (registered here with
torch.library): the CPU/CUDA implementation is the integer reference, and a fake (meta)
implementation lets torch.export keep the op as one node, which the TVM importer turns into
the shift-add kernel (vitopt.lower.shift_ops) and the ONNX lowering into int8 DequantizeLinear
weights (vitopt.lower.onnx_export).

`encode_weight` fits codes and scales to a float weight (alternating: codes for the scale,
then the least-squares scale for the codes).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vitopt.kernels.shiftadd_reference import (ACT_BITS, MAX_SUPPORTED_SHIFT, quantize_rows,
                                               shift_linear_ref)

OP_NAME = "vitopt::shift_linear"
FIT_ITERS = 4


@torch.library.custom_op(OP_NAME, mutates_args=())
def shift_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 bias: Optional[torch.Tensor], act_bits: int, max_shift: int) -> torch.Tensor:
    """x [..., K] float32, codes int8 [N, K], scale float32 [N], bias float32 [N] or None.
    `max_shift` bounds |code| - 1 (the lowerings size their weight types by it)."""
    return shift_linear_ref(x.cpu(), codes.cpu(), scale.cpu(),
                            None if bias is None else bias.cpu(), act_bits, max_shift).to(x.device)


@shift_linear.register_fake
def _shift_linear_fake(x, codes, scale, bias, act_bits, max_shift):
    return x.new_empty((*x.shape[:-1], codes.shape[0]), dtype=torch.float32)


def codes_to_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float weight [N, K] of packed codes: scale[n] * sign * 2^-(|c| - 1), 0 for code 0."""
    c = codes.to(torch.int32)
    mag = torch.where(c == 0, torch.zeros((), dtype=torch.float32),
                      torch.exp2(-(c.abs() - 1).clamp_min(0).to(torch.float32)))
    return torch.sign(c).to(torch.float32) * mag * scale.to(torch.float32)[:, None]


def codes_for_scale(weight: torch.Tensor, scale: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Nearest code of weight / scale (nearest in value, not in log2: 2^-p covers
    [0.75, 1.5) * 2^-p); zero below half the smallest power."""
    ratio = weight.detach().abs() / scale[:, None]
    p = (-torch.floor(torch.log2(ratio.clamp_min(1e-30) / 0.75))).clamp(0, max_shift)
    zero = ratio < 2.0 ** (-max_shift - 1)
    code = torch.sign(weight.detach()) * (p + 1)
    return torch.where(zero, torch.zeros_like(code), code).to(torch.int8)


def encode_weight(weight: torch.Tensor, max_shift: int) -> tuple:
    """(codes int8 [N, K], scale float32 [N]) approximating `weight` [N, K]."""
    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=1).clamp_min(1e-12)
    best = None
    for _ in range(FIT_ITERS):
        codes = codes_for_scale(w, scale, max_shift)
        unit = codes_to_weight(codes, torch.ones_like(scale))
        err = (unit * scale[:, None] - w).pow(2).sum(dim=1)
        if best is None:
            best = (codes, scale, err)
        else:  # keep, per channel, whichever fit is better
            better = err < best[2]
            best = (torch.where(better[:, None], codes, best[0]),
                    torch.where(better, scale, best[1]), torch.minimum(err, best[2]))
        denom = unit.pow(2).sum(dim=1)
        fitted = (unit * w).sum(dim=1) / denom.clamp_min(1e-30)
        scale = torch.where(denom > 0, fitted, scale).abs().clamp_min(1e-12)
    return best[0].contiguous(), best[1].contiguous()


class ShiftLinear(nn.Module):
    """Drop-in for nn.Linear with shift-add weights (packed int8 codes + per-channel scale)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                 max_shift: int, act_bits: int = 16):
        super().__init__()
        if act_bits not in ACT_BITS:
            raise ValueError(f"act_bits {act_bits} is not supported; use one of {ACT_BITS}")
        if not 0 <= max_shift <= MAX_SUPPORTED_SHIFT:
            raise ValueError(f"max_shift {max_shift} must be in [0, {MAX_SUPPORTED_SHIFT}]")
        self.out_features, self.in_features = codes.shape
        # Named like QuantLinear's int8 weights so parameter counts include it (count_params).
        self.register_buffer("weight_q", codes.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", scale.to(torch.float32).contiguous())
        self.bias = nn.Parameter(bias.detach().clone().float()) if bias is not None else None
        self.max_shift, self.act_bits = int(max_shift), int(act_bits)

    @classmethod
    def from_linear(cls, linear: nn.Linear, max_shift: int, act_bits: int = 16) -> "ShiftLinear":
        codes, scale = encode_weight(linear.weight, max_shift)
        return cls(codes, scale, linear.bias, max_shift, act_bits)

    @property
    def weight(self) -> torch.Tensor:
        """The float weight [out, in] the codes stand for (like nn.Linear.weight)."""
        return codes_to_weight(self.weight_q, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.vitopt.shift_linear(x, self.weight_q, self.weight_scale, self.bias,
                                             self.act_bits, self.max_shift)

    def extra_repr(self) -> str:
        return (f"{self.in_features}->{self.out_features}, w sign*2^-p (p<={self.max_shift}) "
                f"x per-channel scale, x int{self.act_bits} per row")


def fake_shift_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      act_bits: int) -> torch.Tensor:
    """Float stand-in with the same activation rounding (straight-through, for fine-tuning):
    forward equals the integer op up to float summation order."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    xq, sx = quantize_rows(x2.detach(), act_bits)
    x_hat = x2 + (xq.to(x2.dtype) * sx[:, None] - x2).detach()
    return nn.functional.linear(x_hat, weight, bias).reshape(*lead, weight.shape[0])


def shift_layers(ir) -> dict:
    """{"mlp3.fc1": ShiftLinear, ...} over the IR's stages."""
    found = {}
    for stage in ir.stages:
        prefix = f"{stage.kind}{getattr(stage, 'block', '')}"
        for name, module in stage.named_children():
            if isinstance(module, ShiftLinear):
                found[f"{prefix}.{name}"] = module
    return found

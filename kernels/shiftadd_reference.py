"""Reference semantics of the shift-add linear: weight codes, activation fixed point, integer sum.

This file defines what every shift-add implementation must compute, bit for bit (the TVM
kernel in kernels/shiftadd_tir.py, the torch custom op `vitopt::shift_linear`):

Weights (DeepShift-PS, Elhoushi et al. 2021, "DeepShift: Towards Multiplication-Less Neural
Networks"; per-channel scale as in ShiftAddViT, You et al. 2023): w[n, k] ~ scale[n] * sign *
2^-p with p in [0, max_shift], stored as one int8 code per weight:
    code 0  -> weight 0
    code c > 0 -> +2^-(c - 1)        code c < 0 -> -2^-(-c - 1)
so |code| <= max_shift + 1 (max_shift <= 14 keeps every code in int8 with room to spare; with
max_shift <= 6 two codes would fit one byte, which this storage does not do yet).

Activations: each row of x (one token) is quantized symmetrically to `act_bits` fixed point
with its own scale, sx[m] = max|x[m, :]| / qmax (1.0 for an all-zero row), qmax =
2^(act_bits-1) - 1, xq = clamp(floor(x / sx + 0.5), -qmax, qmax). Per row, not per tensor,
so one image's output never depends on the other images of its batch.

Integer shift-add: with u = sign * 2^(max_shift - p) (an integer: |u| <= 2^max_shift; for
max_shift <= 6 an int8), acc[m, n] = sum_k sign(c) * (xq[m, k] << (max_shift - p)) = sum_k
xq * u: the exact integer product, only shifts and adds. Partial sums run in int32 over chunks
of `chunk_size(act_bits, max_shift)` terms (no chunk can overflow), chunks add up in int64.

Rescale (the one float multiply per output): out = (float32(acc) * sx[m]) * (scale[n] *
2^-max_shift) + bias[n], in that order, in float32. Because the integer part is the exact
product, an engine that multiplies the rounded activations by the float weights (the ONNX
lowering) differs from this only by float summation order.
"""
from __future__ import annotations

import numpy as np
import torch

MAX_SUPPORTED_SHIFT = 14
ACT_BITS = (8, 16)


def act_qmax(act_bits: int) -> int:
    return (1 << (act_bits - 1)) - 1


def quantize_rows(x2d: torch.Tensor, act_bits: int) -> tuple:
    """(xq int32 [M, K], sx float32 [M]): per-row symmetric fixed point, round half up."""
    qmax = act_qmax(act_bits)
    x2d = x2d.to(torch.float32)
    amax = x2d.abs().amax(dim=1)
    sx = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    xq = torch.floor(x2d / sx[:, None] + 0.5).clamp(-qmax, qmax).to(torch.int32)
    return xq, sx


def chunk_size(act_bits: int, max_shift: int) -> int:
    """Terms per int32 partial sum: |xq << s| < 2^(act_bits - 1 + max_shift), so 2^(32 -
    act_bits - max_shift) of them stay below 2^31."""
    return 1 << (32 - act_bits - max_shift)


def unit_weight(codes: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Integer weights sign * 2^(max_shift - p) (0 for code 0), int32 [N, K]."""
    c = codes.to(torch.int32)
    return torch.sign(c) * (1 << (max_shift + 1 - c.abs().clamp_min(1)))


def shift_accumulate(xq: torch.Tensor, codes: torch.Tensor, max_shift: int) -> torch.Tensor:
    """acc int64 [M, N] = sum_k xq << (max_shift - p) with signs, computed as one float64
    matmul: every product and partial sum is an integer below 2^53, so it is exact."""
    unit = unit_weight(codes, max_shift).to(torch.float64)
    return (xq.to(torch.float64) @ unit.t()).to(torch.int64)


def shift_linear_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                     bias, act_bits: int, max_shift: int) -> torch.Tensor:
    """The reference shift-add linear: x [..., K] float -> [..., N] float32."""
    if codes.numel() and int(codes.abs().max()) > max_shift + 1:
        raise ValueError(f"a weight code exceeds max_shift + 1 = {max_shift + 1}; the codes were "
                         f"made for a larger max_shift")
    lead, k = x.shape[:-1], x.shape[-1]
    xq, sx = quantize_rows(x.reshape(-1, k), act_bits)
    acc = shift_accumulate(xq, codes, max_shift)
    scale = scale.to(torch.float32) * 2.0 ** -max_shift
    out = acc.to(torch.float32) * sx[:, None] * scale[None, :]
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.reshape(*lead, codes.shape[0])


def shift_linear_naive_np(x: np.ndarray, codes: np.ndarray, scale: np.ndarray, bias,
                          act_bits: int, max_shift: int) -> np.ndarray:
    """The same function written literally in numpy (per-term left shifts, int64 sums): the
    test oracle for shift_linear_ref and the kernels. Slow; for small shapes."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).astype(np.float32)
    qmax = np.float32(act_qmax(act_bits))
    amax = np.abs(x2).max(axis=1) if k else np.zeros(x2.shape[0], np.float32)
    sx = np.where(amax > 0, amax / qmax, np.float32(1.0)).astype(np.float32)
    xq = np.clip(np.floor(x2 / sx[:, None] + np.float32(0.5)), -qmax, qmax).astype(np.int64)
    c = codes.astype(np.int64)
    p = np.maximum(np.abs(c) - 1, 0)
    terms = xq[:, None, :] << (max_shift - p)[None]  # [M, N, K]
    acc = (np.sign(c)[None] * terms).sum(axis=2)
    scale = scale.astype(np.float32) * np.float32(2.0 ** -max_shift)
    out = acc.astype(np.float32) * sx[:, None] * scale[None]
    if bias is not None:
        out = out + bias.astype(np.float32)
    return out.reshape(*lead, codes.shape[0]).astype(np.float32)

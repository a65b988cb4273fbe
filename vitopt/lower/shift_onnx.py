"""ONNX lowering of the shift-add linear (`vitopt::shift_linear`) as int8 Q/DQ weights.

A power-of-two weight scale[n] * sign * 2^-p (p <= max_shift <= 6) is exactly the int8 value
sign * 2^(max_shift - p) (at most 64) times the per-channel scale scale[n] * 2^-max_shift, so
the same reparameterized model deploys on ONNX Runtime, OpenVINO and TensorRT as
    MatMul(x, DequantizeLinear(int8 weight [K, N], per-channel scale, axis 1)) + bias
(the QuantLinear layout of vitopt.ir.quant: no Transpose between DequantizeLinear and MatMul).
The int8 weight is computed in the graph from the stored codes by ops on constants only
(Sign, Abs, Pow, Cast, Transpose), which the engines fold at load time. With max_shift > 6 the
weights do not fit int8 and stay float constants (still exact).

The activations are rounded per row to act_bits fixed point in the graph, as the reference
does (ReduceMax, Div, Floor, Clip, Mul: float ops, exact for these integers). The integer
shift-add sum is the exact product of those rounded activations with the int8 weights, so the
engines' float MatMul differs from the reference only by float summation order (checked on
ONNX Runtime and OpenVINO by tests/test_pass_reparam_shiftadd.py, fp32 tolerances).
"""
from __future__ import annotations

INT8_MAX_SHIFT = 6


def translation_table() -> dict:
    """{torch op overload: onnxscript function} for torch.onnx.export(custom_translation_table)."""
    import torch
    from onnxscript import opset18 as op

    import vitopt.ir.shift  # noqa: F401  registers torch.ops.vitopt.shift_linear

    def shift_linear(x, codes, scale, bias, act_bits: int, max_shift: int):
        c = op.Cast(codes, to=1)  # float
        mag = op.Pow(op.Constant(value_float=2.0), op.Sub(op.Constant(value_float=float(
            max_shift + 1)), op.Abs(c)))
        unit = op.Mul(op.Sign(c), mag)  # sign * 2^(max_shift - p); 0 for code 0
        w_scale = op.Mul(scale, op.Constant(value_float=2.0 ** -max_shift))
        if max_shift <= INT8_MAX_SHIFT:
            weight = op.DequantizeLinear(op.Transpose(op.Cast(unit, to=3), perm=[1, 0]),
                                         w_scale, axis=1)  # int8 [K, N] -> float
        else:
            weight = op.Transpose(op.Mul(unit, op.Unsqueeze(w_scale, op.Constant(
                value_ints=[1]))), perm=[1, 0])
        x = _round_rows(op, x, float((1 << (act_bits - 1)) - 1))
        out = op.MatMul(x, weight)
        return out if bias is None else op.Add(out, bias)

    return {torch.ops.vitopt.shift_linear.default: shift_linear}


def _round_rows(op, x, qmax: float):
    """x rounded per row to fixed point with qmax levels, as the reference does (float ops)."""
    amax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
    positive = op.Greater(amax, op.Constant(value_float=0.0))
    sx = op.Where(positive, op.Div(amax, op.Constant(value_float=qmax)),
                  op.Constant(value_float=1.0))
    q = op.Floor(op.Add(op.Div(x, sx), op.Constant(value_float=0.5)))
    q = op.Clip(q, op.Constant(value_float=-qmax), op.Constant(value_float=qmax))
    return op.Mul(q, sx)

"""int8 patch embedding: the stem's patchify convolution as an int8 GEMM.

The stem is an opaque slice of the traced graph (vitopt.ir.stages.Stem); its one patch
convolution (aten.conv2d with constant weights, kernel = stride, no padding: the ViT patch
embedding) is its only GEMM. `insert_quant_conv` swaps that node for a `QuantPatchConv`
submodule that computes the same convolution as patches @ weight, and quantize_int8 makes
that linear a QuantLinear, so the IR fake-quantizes exactly what the engines run:

  images -> Q(u8, per tensor) -> DQ -> patches [B, N, C*kh*kw] -> MatMul(DQ(int8 weight
  [C*kh*kw, O], per output channel)) -> Add(bias) -> [B, O, H/kh, W/kw]

The images are quantized before the patchify (a reshape and a 6-D transpose, which per-tensor
quantization commutes with), so the engines move u8 pixels through the transpose, not bf16
ones (OpenVINO 2026.4, DeiT-S/16 at batch 8: 2.6 -> 1.9 ms from the images to the first GEMM).

OpenVINO and ONNX Runtime run that as an int8 GEMM, as OpenVINO + NNCF int8 runs its stem.
The input range is min/max over the calibration images: pixels are bounded and every value
is signal, so nothing is clipped; 255 steps over a normalised 8-bit image lose little (each
channel had 256 levels to begin with). Other stems (overlapping or padded convolutions, or
several) stay in float.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import nn

from vitopt.ir.quant import ActQuant, QuantLinear

SUBMODULE = "patch_conv_int8"
_CONV = torch.ops.aten.conv2d.default
# conv2d with a string padding ("valid" / "same"): nn.Conv2d(padding="valid"), as Hugging Face's
# SigLIP patch embedding has.
_CONV_STRING_PADDING = torch.ops.aten.conv2d.padding


class QuantPatchConv(nn.Module):
    """A patchify convolution (kernel = stride, no padding) as patches @ int8 weight.

    The patches [B, N, C*kh*kw] go through a QuantLinear (u8 per-tensor input, int8
    per-output-channel weights, fp32 bias), and the result is laid out as the convolution's
    output [B, O, H/kh, W/kw]. The matmul form, not an int8 Conv: OpenVINO 2026.4 kept a
    Q/DQ'd 3-channel 16x16 Conv in bf16 (its dequantization Subtract stayed outside the
    kernel) and ONNX Runtime has no int8 Conv with a float output, while both run Q/DQ'd
    MatMuls as int8 GEMMs, as they do for every other linear of the model.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], kernel):
        super().__init__()
        out_channels = weight.shape[0]
        self.kernel = tuple(int(k) for k in kernel)
        linear = nn.Linear(weight[0].numel(), out_channels, bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight.detach().reshape(out_channels, -1))
            if bias is not None:
                linear.bias.copy_(bias.detach())
        self.linear = linear  # a float Linear while calibrating; quantize() makes it QuantLinear

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/kh)*(W/kw), C*kh*kw], patches in row-major order, each
        flattened (C, kh, kw) like the convolution weight."""
        b, c, h, w = x.shape
        kh, kw = self.kernel
        x = x.reshape(b, c, h // kh, kh, w // kw, kw).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // kh) * (w // kw), c * kh * kw)

    def quantize(self, input_quant: ActQuant, weight_bits: int = 8) -> None:
        self.linear = QuantLinear(self.linear, input_quant, weight_bits)
        self.linear.input_quantized_early = True  # on the images, before the patchify

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        kh, kw = self.kernel
        early = getattr(self.linear, "early_input_quant", None)
        if early is not None:
            x = early(x)
        out = self.linear(self.patches(x))  # [B, N, O]
        return out.transpose(1, 2).reshape(b, out.shape[-1], h // kh, w // kw)

    def extra_repr(self) -> str:
        return f"patch {self.kernel[0]}x{self.kernel[1]}"


def patch_conv_node(stem) -> tuple:
    """(the stem's conv2d node, None) or (None, why it cannot be quantized)."""
    body = getattr(stem, "body", None)
    if body is None or not hasattr(body, "graph"):
        return None, "the stem has no traced graph"
    convs = [n for n in body.graph.nodes if n.op == "call_function"
             and n.target in (_CONV, _CONV_STRING_PADDING)]
    if len(convs) != 1:
        return None, f"the stem has {len(convs)} convolutions, not one patch convolution"
    node = convs[0]
    args = list(node.args) + [None] * (7 - len(node.args))
    _, weight, bias, stride, padding, dilation, groups = args
    if node.target is _CONV_STRING_PADDING:
        if padding not in (None, "valid"):  # "same" pads: not a patchify
            return None, f"the stem convolution pads ({padding!r}), so it is not a patchify"
        padding = 0
    if getattr(weight, "op", None) != "get_attr" or (bias is not None and bias.op != "get_attr"):
        return None, "the stem convolution's weight is computed, not a constant"
    kernel = tuple(_attr(body, weight.target).shape[-2:])
    if (_pair(stride, 1) != kernel or _pair(padding, 0) != (0, 0) or _pair(dilation, 1) != (1, 1)
            or (groups or 1) != 1):
        return None, (f"the stem convolution is not a patchify convolution (kernel {kernel}, "
                      f"stride {stride}, padding {padding}, dilation {dilation}, groups {groups})")
    return node, None


def _pair(value, default) -> tuple:
    """A conv2d stride/padding/dilation argument (None, an int, or one or two ints) as a pair."""
    value = default if value is None else value
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value) * (2 // len(value))
    return (int(value),) * 2


def _attr(module: nn.Module, target: str) -> torch.Tensor:
    return operator.attrgetter(target)(module)


def _drop_attr(module: nn.Module, target: str) -> None:
    path, _, name = target.rpartition(".")
    delattr(module.get_submodule(path), name)


def insert_quant_conv(stem) -> QuantPatchConv:
    """Replace the stem's patch convolution by a QuantPatchConv whose linear is still float:
    calibrate its input (a forward pre-hook on `.linear` sees the patches), then call
    `.quantize(range)`. Raises ValueError with patch_conv_node's reason where there is none."""
    node, why = patch_conv_node(stem)
    if node is None:
        raise ValueError(why)
    body = stem.body
    x, weight_node = node.args[0], node.args[1]
    bias_node = node.args[2] if len(node.args) > 2 else None
    weight = _attr(body, weight_node.target)
    module = QuantPatchConv(weight, _attr(body, bias_node.target) if bias_node is not None else None,
                            weight.shape[-2:])
    body.add_submodule(SUBMODULE, module)
    with body.graph.inserting_before(node):
        call = body.graph.call_module(SUBMODULE, (x,))
    node.replace_all_uses_with(call)
    body.graph.erase_node(node)
    for const in (weight_node, bias_node):
        if const is not None and not const.users:
            body.graph.erase_node(const)
            _drop_attr(body, const.target)
    body.recompile()
    return module


def quant_conv(stem) -> Optional[QuantPatchConv]:
    """The stem's QuantPatchConv, if quantize_int8 installed one."""
    body = getattr(stem, "body", None)
    return getattr(body, SUBMODULE, None) if body is not None else None

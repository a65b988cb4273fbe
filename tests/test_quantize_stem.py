"""quantize_int8 on the stem: the patchify convolution becomes an int8 GEMM over the patches.

Structure (QuantPatchConv with a QuantLinear, no Conv left in the ONNX), the float patch form
equals the convolution, the engines run the stem's GEMM in int8 and match the fake-quant IR,
and stems that are not one patchify convolution stay in float with a note."""
import types

import pytest
import torch
from torch import nn

from vitopt.ir.quant import QuantLinear, quant_layers
from vitopt.ir.quant_stem import QuantPatchConv, insert_quant_conv, patch_conv_node, quant_conv
from vitopt.pipeline import PassContext, PassSpec, Pipeline


def quantize(ir, **options):
    h, w = ir.meta.image_size
    calib = torch.randn(16, ir.meta.in_chans, h, w, generator=torch.Generator().manual_seed(5))
    return Pipeline([PassSpec("quantize_int8", options)]).run(
        ir, context=PassContext(calib=calib, calib_source="test"))


def test_patch_form_equals_the_convolution(traced_family):
    _, example, ir = traced_family("timm_vit")
    stem = ir.clone().stages[0]
    with torch.no_grad():
        reference = stem.body(example)
        module = insert_quant_conv(stem)  # float linear until quantize()
        assert isinstance(module, QuantPatchConv) and type(module.linear) is nn.Linear
        assert torch.allclose(stem.body(example), reference, atol=1e-5, rtol=1e-5)
    assert not any(n.op == "call_function" and "conv" in str(n.target) for n in stem.body.graph.nodes)


def test_stem_is_quantized_and_runs_int8_on_the_engines(traced_family, tmp_path):
    from vitopt.backends.onnxruntime import int8_summary as ort_summary
    from vitopt.backends.openvino import int8_summary as ov_summary
    from vitopt.lower.onnx_export import export_onnx, onnx_op_counts
    from pass_checks import check_engines_match
    _, example, ir = traced_family("timm_vit")
    result = quantize(ir)
    quantized = result.ir
    conv = quant_conv(quantized.stages[0])
    assert conv is not None and isinstance(conv.linear, QuantLinear)
    assert quantized.stages[0].precision == "int8"
    assert "stem.patch" in quant_layers(quantized)
    stats = result.records[-1].stats["stem"]
    assert stats["precision"] == "int8" and stats["range"]["method"] == "minmax"
    # min/max over the calibration images (standard normal here): nothing clipped
    assert stats["range"]["lo"] < -2 and stats["range"]["hi"] > 2
    ops = onnx_op_counts(export_onnx(quantized, example, tmp_path / "probe.onnx"))
    assert ops["Conv"] == 0
    engines = check_engines_match(quantized, example, tmp_path, precision="int8")
    expected = len(quant_layers(quantized))
    assert ort_summary(engines["onnxruntime"][1])["int8_linears"] >= expected
    assert ov_summary(engines["openvino"][0])["int8_linears"] >= expected


def test_quantize_stem_false_keeps_the_float_convolution(traced_family):
    _, _, ir = traced_family("timm_vit")
    result = quantize(ir, quantize_stem=False)
    assert quant_conv(result.ir.stages[0]) is None
    assert "stem.patch" not in quant_layers(result.ir)
    assert result.records[-1].stats["stem"] == {"precision": "fp32"}


class _OverlappingStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, kernel_size=7, stride=4, padding=3)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def test_a_stem_that_is_not_a_patchify_convolution_stays_float(traced_family):
    body = torch.export.export(_OverlappingStem().eval(), (torch.randn(1, 3, 32, 32),)).module()
    node, why = patch_conv_node(types.SimpleNamespace(body=body))
    assert node is None and "not a patchify convolution" in why
    with pytest.raises(ValueError, match="patchify"):
        insert_quant_conv(types.SimpleNamespace(body=body))
    node, why = patch_conv_node(types.SimpleNamespace(body=None))
    assert node is None and "no traced graph" in why


def test_string_padding_stem_is_quantized(traced_family, tmp_path):
    """Hugging Face SigLIP's patch embedding is nn.Conv2d(padding="valid"), traced as
    aten.conv2d.padding: a patchify all the same, quantized like the others."""
    _, example, ir = traced_family("hf_siglip_vision")
    assert any(n.target is torch.ops.aten.conv2d.padding for n in ir.stages[0].body.graph.nodes
               if n.op == "call_function")
    float_stem = ir.clone().stages[0]
    with torch.no_grad():
        reference = float_stem.body(example)
        insert_quant_conv(float_stem)
        assert torch.allclose(float_stem.body(example), reference, atol=1e-5, rtol=1e-5)
    result = quantize(ir)
    assert isinstance(quant_conv(result.ir.stages[0]).linear, QuantLinear)
    assert result.records[-1].stats["stem"]["precision"] == "int8"
    from pass_checks import check_engines_match
    check_engines_match(result.ir, example, tmp_path, precision="int8")


class _SamePaddingStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, kernel_size=3, padding="same")

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def test_same_padding_stem_stays_float():
    body = torch.export.export(_SamePaddingStem().eval(), (torch.randn(1, 3, 16, 16),)).module()
    node, why = patch_conv_node(types.SimpleNamespace(body=body))
    assert node is None and "pads" in why

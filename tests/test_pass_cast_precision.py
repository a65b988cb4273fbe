"""cast_fp16 / cast_bf16: which stages run in which dtype, Cast nodes in the ONNX, numerics vs
eager (tiny models and the digits proxy), engines (ORT, OpenVINO) vs the IR, the fp16 overflow
that a whole-model .half() hits, declines, and composition with token merging and int8."""
import copy
import warnings

import pytest
import torch
from torch import nn

from pass_checks import check_declines, check_lossy_pass, run_pass
from vitopt.errors import ConfigError
from vitopt.ir.precision import CastAttention, CastLinear, cast_layers
from vitopt.pipeline import PassContext, PassSpec, Pipeline
from vitopt.tolerances import compare

PRECISIONS = ["fp16", "bf16"]
ONNX_TYPE = {"fp16": 10, "bf16": 16}  # onnx.TensorProto.FLOAT16 / BFLOAT16
MAX_LOSS_POINTS = 0.5  # digits proxy, held-out split


def cast(ir, precision, **options):
    return run_pass(ir, f"cast_{precision}", **options)


def onnx_types(path):
    """{tensor name: ONNX elem type} of an exported model (shape inference for inner values)."""
    import onnx
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(model.graph.value_info) + list(model.graph.input)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return model, types


@pytest.mark.parametrize("precision,family", [("fp16", "timm_vit"), ("bf16", "hf_vit")])
def test_structure_and_numerics_vs_eager(precision, family, traced_family):
    _, example, ir = traced_family(family)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]

    def structure(new):
        for stage in new.blocks():
            assert stage.precision == precision
            assert type(stage.norm) is nn.LayerNorm and stage.norm.weight.dtype == torch.float32
        for layer in cast_layers(new).values():
            assert isinstance(layer, CastLinear) and layer.weight_t.dtype == dtype
        assert all(isinstance(s.attn_quant, CastAttention) for s in new.attention_stages())
        others = [s for s in new.stages if s not in new.blocks()]
        assert all(s.precision == "fp32" for s in others)
        assert all(p.dtype == torch.float32 for s in others for p in s.parameters())

    result = check_lossy_pass(ir, f"cast_{precision}", structure, example)
    with torch.no_grad():
        cmp = compare(result.ir(example), ir(example), precision, "torch")
    assert cmp.ok, cmp
    from vitopt.ir.printer import format_ir
    rows = [line.split() for line in format_ir(result.ir).splitlines() if " attn0 " in f" {line} "]
    assert rows and precision in rows[0]  # the inspect table shows the stage's precision


@pytest.mark.parametrize("precision", PRECISIONS)
def test_onnx_has_casts_and_keeps_norm_softmax_residual_fp32(precision, traced_family, tmp_path):
    from vitopt.lower.onnx_export import export_onnx
    _, example, ir = traced_family("timm_vit")
    path = export_onnx(cast(ir, precision).ir, example, tmp_path / "m.onnx")
    model, types = onnx_types(path)
    low, f32 = ONNX_TYPE[precision], 1
    nodes = model.graph.node
    casts = [n for n in nodes if n.op_type == "Cast"]
    to = [a.i for n in casts for a in n.attribute if a.name == "to"]
    assert to.count(low) >= 2 * ir.num_blocks and to.count(f32) >= 2 * ir.num_blocks
    matmul_types = [types.get(n.input[0]) for n in nodes if n.op_type == "MatMul"]
    # qkv, proj, q.K^T, P.V, fc1, fc2 per block, all in the low type
    assert matmul_types.count(low) == 6 * ir.num_blocks, matmul_types
    for op in ("LayerNormalization", "Softmax"):
        assert {types.get(n.input[0]) for n in nodes if n.op_type == op} == {f32}, op


def engine_outputs(ir, images, tmp_path, backends):
    """Build `ir` on each backend; the graph carries its precision, so ORT gets no precision and
    OpenVINO the f32 hint (its bf16 hint would also push LayerNorm and residual adds to bf16)."""
    from vitopt.backends import get_backend
    from vitopt.lower.onnx_export import export_onnx
    path = export_onnx(ir, images, tmp_path / "model.onnx")
    outputs = {}
    for name in backends:
        backend = get_backend(name)
        files = backend.build(path, tmp_path / name, precision="fp32", max_batch=images.shape[0])
        outputs[name] = backend.load(tmp_path / name, files, precision="fp32").run(images.numpy())
    return outputs


@pytest.mark.parametrize("precision,backends", [("fp16", ("onnxruntime", "openvino")),
                                                ("bf16", ("openvino",))])
def test_engines_match_the_ir(precision, backends, traced_family, tmp_path):
    _, example, ir = traced_family("timm_vit")
    casted = cast(ir, precision).ir
    images = torch.cat([example, example.flip(0)])[:3]
    with torch.no_grad():
        expected = casted(images)
    for name, out in engine_outputs(casted, images, tmp_path, backends).items():
        result = compare(out, expected, precision, name)
        assert result.ok, f"{name}: {result}"


def test_onnxruntime_cpu_has_no_bf16_matmul(traced_family, tmp_path):
    """Documented limitation: ORT's CPU EP cannot load the bf16 graph (no bf16 MatMul kernel,
    and its automatic fp32 casts cover fp16 only); a clear LoweringError, not a crash."""
    from vitopt.errors import LoweringError
    _, example, ir = traced_family("timm_vit")
    with pytest.raises(LoweringError, match="MatMul"):
        engine_outputs(cast(ir, "bf16").ir, example, tmp_path, ("onnxruntime",))


def test_fp16_overflow_breaks_half_but_not_the_pass(traced_family):
    """Residual activations above 65504 (one channel, as in large trained ViTs): a whole-model
    .half() gives inf/NaN; cast_fp16 keeps the residual stream and LayerNorm in fp32."""
    from vitopt.frontend.trace import trace
    model, example, _ = traced_family("timm_vit")
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.pos_embed[..., 0] += 2e5  # the residual stream carries 2e5 in channel 0
        residual = model.pos_drop(model._pos_embed(model.patch_embed(example)))
    assert residual.abs().max() > 65504
    ir = trace(model, example)
    with torch.no_grad():
        reference = ir(example)
        naive = copy.deepcopy(model).half()(example.half()).float()
        casted = cast(ir, "fp16").ir(example)
    assert torch.isfinite(reference).all()
    assert not torch.isfinite(naive).all()
    result = compare(casted, reference, "fp16", "torch")
    assert result.ok, result


@pytest.fixture(scope="module")
def proxy(digits_proxy):
    return digits_proxy.ir, digits_proxy.top1, digits_proxy.base


@pytest.mark.parametrize("precision", PRECISIONS)
def test_digits_proxy_loses_at_most_half_a_point(precision, proxy):
    ir, top1, base = proxy
    assert 100 * (base - top1(cast(ir, precision).ir)) <= MAX_LOSS_POINTS


class OddLinear(nn.Linear):
    """Stands for a layer type another pass put in (not a plain nn.Linear)."""


def test_declines(traced_family):
    _, example, ir = traced_family("timm_vit")
    casted = cast(ir, "fp16").ir
    check_declines(casted, "cast_fp16", "already cast to fp16")
    check_declines(casted, "cast_bf16", "already cast to fp16")
    # unsupported stages: a linear that is not a plain nn.Linear (another pass's layer type)
    # keeps its stage fp32 ...
    odd = ir.clone()
    odd.mlp_stages()[0].fc1.__class__ = OddLinear
    result = cast(odd, "bf16")
    assert result.records[0].modified
    kept = result.records[0].stats["kept"]
    assert list(kept) == ["mlp0"] and "OddLinear" in kept["mlp0"]
    assert result.ir.mlp_stages()[0].precision == "fp32"
    # ... and when no stage can be cast, the pass declines and says why
    for stage in odd.blocks():
        (stage.proj if hasattr(stage, "proj") else stage.fc2).__class__ = OddLinear
    check_declines(odd, "cast_fp16", "nothing to cast to fp16")
    with pytest.raises(ConfigError, match="attn9"):
        cast(ir, "fp16", skip="attn9")
    skipped = cast(ir, "fp16", skip="attn0,mlp1").ir
    assert [s.precision for s in skipped.blocks()] == ["fp32", "fp16", "fp16", "fp32"]


def test_composes_with_merging_and_declines_with_int8(traced_family, tmp_path):
    _, example, ir = traced_family("timm_vit")
    images = torch.cat([example, example.flip(0)])[:3]
    merged = run_pass(ir, "merge_tokens", r=3).ir
    with torch.no_grad():
        reference = merged(images)
    for order in (["merge_tokens", "cast_fp16"], ["cast_fp16", "merge_tokens"]):
        specs = [PassSpec(n, {"r": 3} if n == "merge_tokens" else {}) for n in order]
        result = Pipeline(specs).run(ir)
        assert all(r.modified for r in result.records), [r.notes for r in result.records]
        assert [s.kind for s in result.ir.stages].count("merge") == ir.num_blocks
        with torch.no_grad():
            assert compare(result.ir(images), reference, "fp16", "torch").ok
    out = engine_outputs(result.ir, images, tmp_path, ("onnxruntime",))["onnxruntime"]
    with torch.no_grad():
        assert compare(out, result.ir(images), "fp16", "onnxruntime").ok
    calib = torch.randn(8, *images.shape[1:], generator=torch.Generator().manual_seed(0))
    context = PassContext(calib=calib, calib_source="test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after = Pipeline([PassSpec("cast_fp16"), PassSpec("quantize_int8")]).run(ir, context=context)
        before = Pipeline([PassSpec("quantize_int8"), PassSpec("cast_bf16")]).run(ir, context=context)
    assert not after.records[1].modified and "already cast to fp16" in after.records[1].notes[0]
    assert not before.records[1].modified and "already quantized" in before.records[1].notes[0]

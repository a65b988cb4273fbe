"""quantize_int8: structure, exact LayerNorm balancing, numerics vs eager, engines vs the IR's
fake-quant reference (ORT and OpenVINO, real int8 kernels), declines, bad config and bad
calibration data, composition after token merging, compile with --precision int8."""
import warnings

import pytest
import torch
from torch import nn

from pass_checks import (check_declines, check_engines_match, check_lossy_pass,
                         openvino_fuses_attention, run_pass)
from vitopt.errors import ConfigError
from vitopt.ir.quant import QKInt8Attention, QuantLinear, quant_layers
from vitopt.pipeline import PassContext, PassSpec, Pipeline, resolve_pipeline
from vitopt.tolerances import compare

FAMILIES = ["timm_vit", "hf_vit", "timm_vit_mean_pool"]


def calib_for(ir, count=24, seed=3):
    h, w = ir.meta.image_size
    return torch.randn(count, ir.meta.in_chans, h, w, generator=torch.Generator().manual_seed(seed))


def quantize(ir, images=None, **options):
    context = PassContext(calib=images if images is not None else calib_for(ir), calib_source="test")
    return Pipeline([PassSpec("quantize_int8", options)]).run(ir, context=context)


@pytest.mark.parametrize("family", FAMILIES)
def test_structure_and_numerics_vs_eager(family, traced_family):
    _, example, ir = traced_family(family)

    def structure(new):
        layers = quant_layers(new)
        assert layers and all(isinstance(m, QuantLinear) for m in layers.values())
        for stage in new.blocks():
            assert stage.precision == "int8"
            assert type(stage.norm) is nn.LayerNorm  # LayerNorm stays float
        # default attention=qk: int8 q and k from their own GEMMs, explicit float softmax / P.V
        assert all(isinstance(s.attn_quant, QKInt8Attention) and s.qkv is None
                   for s in new.attention_stages())
        for layer in layers.values():
            assert layer.weight_q.dtype == torch.int8 and layer.weight_q.abs().max() <= 127

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # synthetic calibration warns; tested below
        result = check_lossy_pass(ir, "quantize_int8", structure, example)
    with torch.no_grad():
        cmp = compare(result.ir(example), ir(example), "int8", "torch")
    assert cmp.ok, cmp


def test_layer_norm_balancing_alone_is_exact(traced_family):
    from vitopt.passes.quantize_int8 import smooth_layer_norms
    _, example, ir = traced_family("hf_vit")  # separate q/k/v: one scale for three consumers
    smoothed = ir.clone()
    with torch.no_grad():
        for stage in smoothed.blocks():  # give the LayerNorm outputs outlier channels
            stage.norm.weight[::5] *= 30.0
        reference = smoothed(example)
        assert len(smooth_layer_norms(smoothed, calib_for(ir), alpha=0.5)) == 2 * ir.num_blocks
        diff = (smoothed(example) - reference).abs().max().item()
    assert diff <= 1e-4 * max(1.0, reference.abs().max().item()), diff


@pytest.mark.parametrize("family,options", [("timm_vit", {}), ("hf_vit", {"method": "percentile"}),
                                            ("timm_vit", {"attention": "float"}),
                                            ("timm_vit", {"attention": "qkv", "method": "minmax"})])
def test_engines_match_the_fake_quant_reference(family, options, traced_family, tmp_path):
    from vitopt.backends.onnxruntime import int8_summary as ort_summary
    from vitopt.backends.openvino import int8_summary as ov_summary
    from vitopt.lower.onnx_export import export_onnx, onnx_op_counts
    _, example, ir = traced_family(family)
    quantized = quantize(ir, **options).ir
    expected = len(quant_layers(quantized))
    ops = onnx_op_counts(export_onnx(quantized, example, tmp_path / "probe.onnx"))
    scheme = options.get("attention", "qk")
    attention_q = {"qk": 2, "qkv": 3}.get(scheme, 0) * ir.num_blocks
    # one DQ per int8 weight, one Q->DQ pair per activation: q/k/v of one input share theirs
    # (attention=qk splits timm's qkv into q, k and v GEMMs: 3 layers, one shared input Q)
    shared = 2 * ir.num_blocks if scheme == "qk" else 0
    assert ops["DequantizeLinear"] - ops["QuantizeLinear"] == expected
    if family != "hf_vit":
        assert ops["QuantizeLinear"] == expected - shared + attention_q
    engines = check_engines_match(quantized, example, tmp_path, precision="int8")
    assert ort_summary(engines["onnxruntime"][1])["int8_linears"] >= expected
    summary = ov_summary(engines["openvino"][0])
    assert summary["int8_linears"] >= expected, summary
    if not openvino_fuses_attention():  # AVX2: unfused, q.K^T its own int8 MatMul per block
        if scheme == "qk":
            assert summary["linears_by_precision"].get("i8") == ir.num_blocks, summary
        return
    if scheme != "qkv":
        assert summary["fused_attention"], summary  # attention still fused
    if scheme == "qk":  # ... as one int8 kernel per block
        assert summary["fused_attention"].get("i8") == ir.num_blocks, summary


def test_composes_after_token_merging(traced_family):
    _, example, ir = traced_family("timm_vit")
    specs = resolve_pipeline("none", ["merge_tokens:r=2", "quantize_int8"])
    result = Pipeline(specs).run(ir, context=PassContext(calib=calib_for(ir)))
    assert [r.modified for r in result.records] == [True, True]
    assert result.ir.token_counts() == Pipeline(specs[:1]).run(ir).ir.token_counts()
    with torch.no_grad():
        assert torch.isfinite(result.ir(example)).all()


@pytest.mark.parametrize("family", ["timm_vit", "hf_vit"])  # fused qkv; separate q/k/v
def test_merging_keys_are_an_int8_layer_that_follows_its_source(family, traced_family):
    """A merging block's averaged keys: an int8 GEMM on the qkv's (or k's) u8 input, equal to
    the head-averaged key weights; back in float when its source falls back; built by
    merge_tokens too when it runs after quantize_int8."""
    _, example, ir = traced_family(family)
    merged = Pipeline(resolve_pipeline("none", ["merge_tokens:r=2"])).run(ir).ir
    quantized = quantize(merged).ir
    for stage in quantized.attention_stages():
        source = stage.qkv if stage.qkv is not None else stage.k
        assert isinstance(stage.merge_key_proj, QuantLinear)
        assert stage.merge_key_proj.input_quant is source.input_quant
        weight, _ = stage.mean_key_projection()
        assert torch.allclose(stage.merge_key_proj.weight, weight, atol=2e-2 * weight.abs().max())
    assert "attn0.merge_key_proj" in quant_layers(quantized)
    source = "qkv" if quantized.attention_stages()[0].qkv is not None else "k"
    kept = quantize(merged, skip=(f"attn0.{source}",)).ir
    assert kept.attention_stages()[0].merge_key_proj is None  # float source, float keys
    assert isinstance(kept.attention_stages()[1].merge_key_proj, QuantLinear)
    late = Pipeline(resolve_pipeline("none", ["merge_tokens:r=2"])).run(quantize(ir).ir).ir
    assert all(isinstance(s.merge_key_proj, QuantLinear) for s in late.attention_stages())
    with torch.no_grad():
        assert torch.isfinite(late(example)).all()


def test_merged_int8_keeps_every_linear_int8_on_openvino(traced_family, tmp_path):
    """Every int8 layer of a merged model, the averaged-key projections included, runs int8 in
    OpenVINO, each int8 weight read by one DequantizeLinear feeding one MatMul (a shared one made
    OpenVINO fold the qkv weight to float and run that GEMM in bf16)."""
    import onnx
    from vitopt.backends.openvino import int8_summary
    from vitopt.lower.onnx_export import export_onnx
    _, example, ir = traced_family("timm_vit")
    specs = resolve_pipeline("none", ["merge_tokens:r=2", "quantize_int8"])
    merged = Pipeline(specs).run(ir, context=PassContext(calib=calib_for(ir))).ir
    model = onnx.load(str(export_onnx(merged, example, tmp_path / "m.onnx")))
    weights = {i.name for i in model.graph.initializer if i.name.endswith("weight_q")}
    assert len(weights) == len(quant_layers(merged))
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    readers = [n.op_type for n in model.graph.node for d in dq if d.output[0] in n.input]
    assert len(dq) == len(weights) and readers == ["MatMul"] * len(weights), readers
    engines = check_engines_match(merged, example, tmp_path, backends=("openvino",),
                                  batches=(3,), precision="int8")
    # without a fused attention kernel (AVX2), each block's int8 q.K^T is one more int8 MatMul
    unfused = 0 if openvino_fuses_attention() else merged.num_blocks
    assert int8_summary(engines["openvino"][0])["int8_linears"] == len(quant_layers(merged)) + unfused


def test_declines_cleanly(traced_family):
    _, _, ir = traced_family("timm_vit")
    once = quantize(ir).ir
    check_declines(once, "quantize_int8", "already quantized")
    from vitopt.ir.encoder import EncoderIR
    clone = ir.clone()
    no_blocks = EncoderIR([s for s in clone.stages if s not in clone.blocks()], ir.meta)
    check_declines(no_blocks, "quantize_int8", "nothing to quantize")


@pytest.mark.parametrize("options,match", [
    ({"method": "entropy"}, "method"), ({"percentile": 30}, "percentile"),
    ({"alpha": 1.5}, "alpha"), ({"quantize_softmax": True}, "attention=qkv"),
    ({"attention": "int4"}, "attention"),
    ({"keep_sensitive": -1}, "keep_sensitive"), ({"calib_limit": 1}, "calib_limit"),
])
def test_bad_config_is_a_config_error(options, match):
    with pytest.raises(ConfigError, match=match):
        PassSpec("quantize_int8", options).config()


def test_skip_and_keep_sensitive_fall_back_to_fp32(traced_family):
    _, _, ir = traced_family("timm_vit")
    result = quantize(ir, skip=("attn0.qkv",), keep_sensitive=1, attention="float")
    stats = result.records[0].stats
    assert len(stats["fallback"]) == 2 and "attn0.qkv" in stats["fallback"]
    kept = [n for n, row in stats["layers"].items() if row["precision"] == "fp32"]
    assert sorted(kept) == sorted(stats["fallback"])
    assert type(result.ir.stages[1].qkv) is nn.Linear and result.ir.stages[1].precision == "int8+fp32"
    with pytest.raises(ConfigError, match="not layers of this model"):
        quantize(ir, skip=("attn99.qkv",))
    # attention=qk (default) splits qkv into q, k, v: skipping "qkv" keeps all three in fp32,
    # and a float q or k carries no output quantizer
    split = quantize(ir, skip=("attn0.qkv",))
    assert {"attn0.q", "attn0.k", "attn0.v"} <= set(split.records[0].stats["fallback"])
    stage = split.ir.attention_stages()[0]
    assert all(type(getattr(stage, p)) is nn.Linear for p in "qkv")


def test_bad_calibration_data_is_refused(traced_family):
    _, _, ir = traced_family("timm_vit")
    h, w = ir.meta.image_size
    with pytest.raises(ConfigError, match="at least 2 images"):
        quantize(ir, calib_for(ir, count=1))
    with pytest.raises(ConfigError, match="channel"):
        quantize(ir, torch.randn(8, 1, h, w))
    with pytest.raises(ConfigError, match="constant"):
        quantize(ir, torch.zeros(8, 3, h, w))
    with pytest.raises(ConfigError, match="NaN"):
        quantize(ir, torch.full((8, 3, h, w), float("nan")))
    with pytest.warns(UserWarning, match="only 4 images"):
        quantize(ir, calib_for(ir, count=4))
    with pytest.warns(UserWarning, match="synthetic random"):
        result = run_pass(ir, "quantize_int8")
    assert any("SYNTHETIC" in n for n in result.records[0].notes)


def test_calibration_folder_errors(tmp_path):
    from vitopt.data.calib import calibration_context
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty"):
        calibration_context(str(tmp_path / "empty"), (32, 32), 3, None, None)
    context = calibration_context("builtin:digits", (32, 32), 3, None, None, limit=20)
    assert context.calib.shape == (20, 3, 32, 32) and context.calib_source == "builtin:digits"


def test_compile_int8_checks_kernels_and_records_ranges(traced_family, tmp_path):
    from vitopt.compiler import compile_model
    _, _, ir = traced_family("timm_vit")
    report = compile_model(ir, tmp_path / "art", backend="openvino", precision="int8",
                           measure=False, passes=("quantize_int8:calib_limit=8",))
    quant = report.manifest["quantization"]
    assert report.manifest["precision"] == "int8"
    assert quant["engine"]["int8_linears"] >= quant["quantized"] > 0
    assert quant["method"] == "mse" and all("range" in row for row in quant["layers"].values())
    assert {row["precision"] for row in report.manifest["stages"] if row["kind"] == "mlp"} == {"int8"}
    with pytest.raises(ConfigError, match="precision int8"):
        compile_model(ir, tmp_path / "bad", precision="fp32", measure=False,
                      passes=("quantize_int8",))


def test_compile_max_accuracy_drop_needs_eval():
    from vitopt.compiler import CompileOptions
    with pytest.raises(ConfigError, match="needs --eval"):
        CompileOptions(max_accuracy_drop=0.5)


def test_accuracy_budget_without_labels_warns(traced_family):
    _, _, ir = traced_family("timm_vit")
    with pytest.warns(UserWarning, match="needs labelled --eval"):
        quantize(ir, max_accuracy_drop=1.0)
    with pytest.raises(ConfigError, match="max_accuracy_drop"):
        PassSpec("quantize_int8", {"max_accuracy_drop": -1}).config()


def test_stage_table_counts_int8_weights(traced_family):
    _, _, ir = traced_family("timm_vit")
    quantized = quantize(ir).ir
    assert [r["params"] for r in quantized.table()] == [r["params"] for r in ir.table()]


def test_int8_attention_calibration_and_add_attention(traced_family):
    """attention=qk: symmetric int8 bounds from each calibration method, recorded in the stats;
    a zero bound is an error; add-attention stages (+-1 hash codes) keep float q and k under qk
    and get u8 q, k, v under qkv."""
    from vitopt.ir.add_attention import AddAttention
    from vitopt.ir.quant import QKInt8Attention, SymQuant
    _, example, ir = traced_family("timm_vit")
    for method in ("minmax", "percentile", "mse"):
        result = quantize(ir, attention="qk", method=method)
        for stage in result.ir.attention_stages():  # q, k, v GEMMs; scale folded into q
            assert isinstance(stage.attn_quant, QKInt8Attention) and stage.qkv is None
            assert stage.scale == 1.0 and stage.v.output_quant is None
            # q quantized at its GEMM, k in the core after the head split (QKInt8Attention)
            assert isinstance(stage.q.output_quant, SymQuant) and stage.k.output_quant is None
            assert isinstance(stage.attn_quant.k_quant, SymQuant)
        ranges = result.records[0].stats["attention"]["ranges"]
        assert set(ranges) == {f"attn{i}" for i in range(ir.num_blocks)}
        assert all(r["q"]["zero_point"] == 0 and r["k"]["bound"] > 0 for r in ranges.values())
        with torch.no_grad():
            assert torch.isfinite(result.ir(example)).all()
    with pytest.raises(ValueError, match="not positive"):
        SymQuant(0.0)
    context = PassContext(calib=calib_for(ir, 8), calib_source="test")
    hashed = Pipeline([PassSpec("reparam_shiftadd", {"attention": "add", "layers": "none",
                                                     "allow_untrained_add_attention": True})]).run(
        ir, context=context).ir
    assert all(isinstance(s, AddAttention) for s in hashed.attention_stages())
    assert all(s.attn_quant is None for s in quantize(hashed, attention="qk").ir.attention_stages())
    qkv = quantize(hashed, attention="qkv").ir
    assert all(s.attn_quant is not None for s in qkv.attention_stages())


def test_layout_ops_run_on_quantized_values(traced_family, tmp_path):
    """The output projection's input quantizer runs on the attention output before the head
    merge, and the stem's on the images before the patchify: the same function (per-tensor
    quantization commutes with transposes and reshapes), with QuantizeLinear before each
    Transpose in the ONNX graph and those Transposes run on int8 values in OpenVINO."""
    import onnx
    from vitopt.backends.openvino import runtime_precisions
    from vitopt.ir.quant_stem import quant_conv
    from vitopt.lower.onnx_export import export_onnx
    _, example, ir = traced_family("timm_vit")
    new = quantize(ir).ir
    stages = new.attention_stages()
    assert all(s.proj.input_quantized_early for s in stages)
    stem = quant_conv(new.stages[0]).linear
    assert stem.input_quantized_early
    with torch.no_grad():
        early = new(example)
        for layer in [stem] + [s.proj for s in stages]:
            layer.input_quantized_early = False  # each layer quantizes its own input again
        assert torch.equal(new(example), early)
        for layer in [stem] + [s.proj for s in stages]:
            layer.input_quantized_early = True

    graph = onnx.load(str(export_onnx(new, example, tmp_path / "q.onnx"))).graph
    producer = {out: node for node in graph.node for out in node.output}
    quantized_transposes = [n for n in graph.node if n.op_type == "Transpose"
                            and _upstream_op(producer, n.input[0]) == "DequantizeLinear"]
    # per block: k's head split, and the head merge before proj; plus the stem's patchify
    assert len(quantized_transposes) >= 2 * len(stages) + 1
    first_q = next(n for n in graph.node if n.op_type == "QuantizeLinear")
    assert first_q.input[0] == graph.input[0].name  # the images themselves

    engines = check_engines_match(new, example, tmp_path, backends=("openvino",), batches=(3,),
                                  precision="int8")
    counts = runtime_precisions(engines["openvino"][0])
    float_transposes = sum(n for (t, p), n in counts.items() if t == "Transpose"
                           and p.lower() not in ("u8", "i8"))
    # unfused attention (AVX2): v's head split stays float (attention=qk keeps P.V float)
    assert float_transposes == (0 if openvino_fuses_attention() else len(stages)), counts


def _upstream_op(producer, name):
    """The first op above `name` that is not a Reshape."""
    node = producer[name]
    while node.op_type == "Reshape":
        node = producer[node.input[0]]
    return node.op_type

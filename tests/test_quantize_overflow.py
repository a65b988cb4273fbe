"""quantize_int8's overflow fix: 7-bit weights where the CPU's int8 GEMMs add u8 x s8 products in
pairs into a saturating int16 (x86 without VNNI/AMX), full 8-bit where they cannot saturate."""
import platform

import pytest
import torch

from pass_checks import check_engines_match
from vitopt.artifact import hardware_info
from vitopt.errors import ConfigError
from vitopt.ir.quant import QuantLinear, quant_layers, weight_qmax
from vitopt.passes import quantize_int8 as q8
from vitopt.pipeline import PassContext, PassSpec, Pipeline

INT8_DOT = any(f in q8.INT8_DOT_FLAGS for f in hardware_info()["flags"])


def quantize(ir, **options):
    h, w = ir.meta.image_size
    calib = torch.randn(24, ir.meta.in_chans, h, w, generator=torch.Generator().manual_seed(3))
    return Pipeline([PassSpec("quantize_int8", options)]).run(
        ir, context=PassContext(calib=calib, calib_source="test"))


def _with_flags(monkeypatch, flags):
    import vitopt.artifact as artifact
    monkeypatch.setattr(artifact, "hardware_info",
                        lambda: {"cpu": "test CPU", "flags": list(flags), "cores": 2})


def test_auto_follows_the_cpu_and_device(monkeypatch):
    _with_flags(monkeypatch, ["avx2", "avx512f", "avx512_vnni"])
    assert q8.overflow_fix_for("auto") == ("none", "this CPU has avx512_vnni: int8 products "
                                                   "accumulate in int32")
    _with_flags(monkeypatch, ["asimd", "asimddp"])
    assert q8.overflow_fix_for("auto")[0] == "none"
    _with_flags(monkeypatch, ["avx2"])
    fix, why = q8.overflow_fix_for("auto")
    assert fix == "all" and "test CPU" in why and "saturates" in why
    assert q8.overflow_fix_for("auto", device="cuda")[0] == "none"
    assert q8.overflow_fix_for("first_layer") == ("first_layer", "overflow_fix=first_layer")
    assert q8.weight_bits_for("all") == (7, 7)
    assert q8.weight_bits_for("first_layer") == (8, 7)
    assert q8.weight_bits_for("none") == (8, 8)


@pytest.mark.parametrize("fix,block_qmax,stem_qmax", [("all", 63, 63), ("first_layer", 127, 63),
                                                      ("none", 127, 127)])
def test_weight_ranges_and_report(fix, block_qmax, stem_qmax, traced_family):
    _, _, ir = traced_family("timm_vit")
    result = quantize(ir, overflow_fix=fix)
    layers = quant_layers(result.ir)
    for name, layer in layers.items():
        qmax = stem_qmax if name.startswith("stem") else block_qmax
        assert isinstance(layer, QuantLinear) and layer.weight_q.abs().max().item() == qmax, name
        assert layer.weight_bits == (7 if qmax == 63 else 8)
    stats = result.records[0].stats["overflow_fix"]
    assert stats["fix"] == fix and stats["weight_bits"] == (7 if block_qmax == 63 else 8)
    notes = " ".join(result.records[0].notes)
    assert ("overflow fix" in notes) == (fix != "none")


def test_seven_bit_engines_compute_what_the_graph_says(traced_family, tmp_path):
    """With 7-bit weights no pair of u8 x s8 products leaves int16: the engines agree with the
    fake-quant reference to rounding, on any x86 CPU."""
    _, example, ir = traced_family("hf_siglip_vision")  # its int8 stem saturates first
    quantized = quantize(ir, overflow_fix="all").ir
    engines = check_engines_match(quantized, example, tmp_path, precision="int8")
    for name, (engine, _) in engines.items():
        with torch.no_grad():
            expected = quantized(example)
        got = torch.from_numpy(engine.run(example.numpy()))
        assert (got - expected).abs().max().item() <= 0.02 * expected.abs().max().item(), name


@pytest.mark.skipif(INT8_DOT or platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="needs an x86 CPU without VNNI/AMX (the VPMADDUBSW int16 pair sums); "
                           "this one has int8 dot products or is not x86")
def test_full_range_weights_saturate_on_this_cpu(traced_family, tmp_path):
    """Why the fix exists, shown on this machine: without it the engines' output leaves the
    reference (both engines alike: it is the CPU's int16 pair sums, not one engine's bug)."""
    from vitopt.backends import get_backend
    from vitopt.lower.onnx_export import export_onnx
    _, example, ir = traced_family("hf_siglip_vision")
    quantized = quantize(ir, overflow_fix="none").ir
    onnx_path = export_onnx(quantized, example, tmp_path / "m.onnx")
    backend = get_backend("onnxruntime")
    files = backend.build(onnx_path, tmp_path / "ort", precision="int8", max_batch=3)
    engine = backend.load(tmp_path / "ort", files, precision="int8")
    with torch.no_grad():
        expected = quantized(example)
    got = torch.from_numpy(engine.run(example.numpy()))
    assert (got - expected).abs().max().item() > 0.05 * expected.abs().max().item()


def test_bad_overflow_fix_is_a_clear_error():
    with pytest.raises(ConfigError, match="overflow_fix 'half' is unknown; use one of auto, none, "
                                          "first_layer, all"):
        q8.QuantizeInt8Config(overflow_fix="half").validate()
    assert weight_qmax(7) == 63 and weight_qmax(8) == 127
    with pytest.raises(ValueError, match="weight bits 6"):
        weight_qmax(6)


def test_full_range_int8_artifacts_require_int8_dot_products(monkeypatch):
    """An artifact whose int8 weights use the full range computes its graph only where int8
    products accumulate in int32: its manifest names the flag, and loading refuses elsewhere
    (vitopt.runtime: 'lacks avx512_vnni ... Recompile on this machine')."""
    from vitopt.compiler import _hardware_requiring, full_range_int8
    assert full_range_int8({"quantization": {"overflow_fix": {"fix": "none"}}})
    assert not full_range_int8({"quantization": {"overflow_fix": {"fix": "all"}}})
    assert not full_range_int8({"precision": "fp32"})
    _with_flags(monkeypatch, ["avx2", "avx512_vnni"])
    assert _hardware_requiring(q8.INT8_DOT_FLAGS)["requires"] == ["avx512_vnni"]

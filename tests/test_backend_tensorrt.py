"""The TensorRT backend without TensorRT: the build plan per version, the ONNX checks on real
vitopt exports and on small hand-made graphs, profile shapes, the timing cache, engine records
refused on mismatch, the inspector summary, available() saying why, and build() driving a fake
`tensorrt` module (which checks vitopt's orchestration, not TensorRT: flags, profile, workspace,
cache file, files written). The real engine test needs TensorRT and a GPU."""
import json
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from vitopt import targets
from vitopt.backends import get_backend
from vitopt.backends.tensorrt import (TensorRTBackend, build_settings, check_record,
                                      engine_record, load_timing_cache, save_timing_cache,
                                      timing_cache_path, typed_module)
from vitopt.backends.tensorrt_checks import (UNSUPPORTED_OPS, onnx_problems, plan_build,
                                             precision_warnings, profile_shapes, require_fit,
                                             summarize_layers, trt_major)
from vitopt.errors import ArtifactError, BackendUnavailableError, ConfigError, LoweringError
from vitopt.lower.onnx_export import export_onnx
from vitopt.targets import GpuInfo

H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 79.1)


# --- the plan -----------------------------------------------------------------------------
@pytest.mark.parametrize("major, precision, flags, clear, onnx_float, qdq, typed", [
    (11, "fp32", (), ("TF32",), "fp32", False, True),
    (11, "fp16", (), (), "fp16", False, True),
    (11, "bf16", (), (), "bf16", False, True),
    (11, "int8", (), (), "fp32", True, True),
    (10, "fp32", (), ("TF32",), "fp32", False, False),
    (10, "fp16", ("FP16",), (), "fp32", False, False),
    (10, "bf16", ("BF16",), (), "fp32", False, False),
    (10, "int8", ("INT8", "FP16"), (), "fp32", True, False),
])
def test_plan_per_version(major, precision, flags, clear, onnx_float, qdq, typed):
    plan = plan_build(major, precision, (9, 0))
    assert (plan.builder_flags, plan.clear_flags, plan.onnx_float, plan.qdq, plan.strongly_typed) == \
        (flags, clear, onnx_float, qdq, typed)


def test_plan_refusals():
    with pytest.raises(BackendUnavailableError, match="TensorRT 8 is too old"):
        plan_build(8, "fp16")
    with pytest.raises(ConfigError, match="FP8"):
        plan_build(11, "fp8")
    with pytest.raises(ConfigError, match="bf16 needs .* 8.0"):
        plan_build(10, "bf16", (7, 5))
    assert trt_major("10.3.0.26") == 10 and trt_major("11.0.0") == 11
    with pytest.raises(BackendUnavailableError):
        trt_major("unknown")


def test_profile_shapes():
    assert profile_shapes((3, 20, 20), 8) == ((1, 3, 20, 20), (8, 3, 20, 20), (8, 3, 20, 20))
    assert profile_shapes([3, 224, 224], 256, 64)[1] == (64, 3, 224, 224)
    for bad in ((8, 9), (8, 0), (0, None)):
        with pytest.raises(ConfigError):
            profile_shapes((3, 20, 20), *bad)


def test_build_settings_follow_the_gpu_profile():
    settings = build_settings(H100, 256)
    assert settings == {"profile": "h100", "workspace": targets.TARGETS["h100"].workspace,
                        "opt_level": 4, "opt_batch": 64}
    assert build_settings(H100, 8)["opt_batch"] == 8
    assert build_settings(GpuInfo("Unknown", (8, 6), 24), 8)["profile"] == "cuda"


# --- the ONNX checks on real exports --------------------------------------------------------
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from conftest import traced
    _, example, ir = traced("timm_vit")
    root = tmp_path_factory.mktemp("trt-onnx")
    return ir, example, {
        "fp32": export_onnx(typed_module(ir, "fp32"), example, root / "fp32.onnx"),
        "fp16": export_onnx(typed_module(ir, "fp16"), example, root / "fp16.onnx"),
    }


def test_typed_module_keeps_float32_io_and_the_model(exports):
    ir, example, _ = exports
    typed = typed_module(ir, "fp16")
    with torch.no_grad():
        out, ref = typed(example), ir(example)
    assert out.dtype == torch.float32 and next(typed.parameters()).dtype == torch.float16
    assert next(ir.parameters()).dtype == torch.float32  # the IR itself is untouched
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


def test_explicit_precision_is_required_by_strong_typing(exports):
    _, _, paths = exports
    assert onnx_problems(paths["fp16"], plan_build(11, "fp16"), max_batch=8) == []
    assert onnx_problems(paths["fp32"], plan_build(11, "fp32"), max_batch=8) == []
    assert onnx_problems(paths["fp32"], plan_build(10, "fp16"), max_batch=8) == []  # flags lower it
    problems = onnx_problems(paths["fp32"], plan_build(11, "fp16"), max_batch=8)
    assert len(problems) == 1 and "strongly typed" in problems[0] and "in float32" in problems[0]
    problems = onnx_problems(paths["fp16"], plan_build(11, "fp32"))
    assert len(problems) == 1 and "in float16" in problems[0]
    with pytest.raises(LoweringError, match="not fit for TensorRT 11 fp16"):
        require_fit(onnx.load(str(paths["fp32"])), plan_build(11, "fp16"))


def test_vitopt_int8_is_refused_for_tensorrt_with_the_reason(exports, tmp_path):
    from vitopt.pipeline import PassContext, PassSpec, Pipeline
    ir, example, _ = exports
    calib = torch.randn(16, *example.shape[1:], generator=torch.Generator().manual_seed(1))
    quantized = Pipeline([PassSpec("quantize_int8")]).run(
        ir, context=PassContext(calib=calib, calib_source="test")).ir
    path = export_onnx(quantized, example, tmp_path / "int8.onnx")
    problems = onnx_problems(path, plan_build(11, "int8"), max_batch=8)
    assert len(problems) == 1
    assert "not symmetric int8" in problems[0] and "uint8 quantization" in problems[0]
    assert "use --precision fp16 on TensorRT" in problems[0]


def test_fixed_batch_is_refused_for_a_batch_range(exports, tmp_path):
    ir, example, _ = exports
    path = export_onnx(ir, example, tmp_path / "static.onnx", dynamic_batch=False)
    assert onnx_problems(path, plan_build(11, "fp32"), max_batch=1) == []
    problems = onnx_problems(path, plan_build(11, "fp32"), max_batch=8)
    assert len(problems) == 1 and "fixed batch (3)" in problems[0]


# --- the ONNX checks on hand-made graphs ------------------------------------------------------
def graph(nodes, initializers=(), opset=18, extra_opsets=()):
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])
    g = helper.make_graph(nodes, "g", [x], [y], initializer=list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def weight(name="w"):
    return helper.make_tensor(name, TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())


def qdq_graph(zero_type, zero_value):
    zero = helper.make_tensor("zp", zero_type, [], [zero_value])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    return graph([helper.make_node("QuantizeLinear", ["images", "s", "zp"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"]),
                  helper.make_node("MatMul", ["dq", "w"], ["output"])], [scale, zero, weight()])


def test_old_opset_unsupported_and_custom_ops_are_named():
    model = graph([helper.make_node("MatMul", ["images", "w"], ["m"]),
                   helper.make_node("Unique", ["m"], ["u"]),
                   helper.make_node("MatMulIntegerToFloat", ["u", "w"], ["output"],
                                    domain="com.microsoft")],
                  [weight()], opset=16, extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    problems = onnx_problems(model, plan_build(11, "fp32"))
    assert any("opset 16 is below 17" in p for p in problems)
    assert any("com.microsoft::MatMulIntegerToFloat" in p for p in problems)
    assert any("does not support: Unique" in p for p in problems)
    assert {"QLinearMatMul", "MatMulInteger", "DynamicQuantizeLinear"} <= UNSUPPORTED_OPS
    assert "LayerNormalization" not in UNSUPPORTED_OPS


def test_qdq_must_be_symmetric_int8():
    plan = plan_build(11, "int8")
    assert onnx_problems(qdq_graph(TensorProto.INT8, 0), plan) == []
    assert "uint8 quantization" in onnx_problems(qdq_graph(TensorProto.UINT8, 128), plan)[0]
    assert "non-zero zero point" in onnx_problems(qdq_graph(TensorProto.INT8, 3), plan)[0]
    no_qdq = graph([helper.make_node("MatMul", ["images", "w"], ["output"])], [weight()])
    assert "explicit quantization" in onnx_problems(no_qdq, plan)[0]


# --- the inspector summary ----------------------------------------------------------------
TRT10_JSON = json.dumps({"Layers": [
    {"Name": "conv1", "LayerType": "CaskConvolution",
     "Inputs": [{"Name": "images", "Format/Datatype": "Row major linear FP32"}],
     "Outputs": [{"Name": "c", "Format/Datatype": "Row major linear FP16 format"}]},
    {"Name": "{ForeignNode[blocks.0.attn]}", "LayerType": "Myelin", "TacticName": "_gemm_mha_v2",
     "Inputs": [{"Name": "c", "Format/Datatype": "Half"}],
     "Outputs": [{"Name": "output", "Format/Datatype": "Row major linear FP32"}]}],
    "Bindings": ["images", "output"]})
TRT11_JSON = json.dumps({"Layers": [
    {"Name": "fc1", "LayerType": "gemm",
     "Inputs": [{"Name": "q", "DataType": "Int8", "Format": "Row major linear"}],
     "Outputs": [{"Name": "o", "DataType": "Half", "Format": "Row major linear"}]}],
    "I/O Tensors": [{"Name": "images", "IOMode": "Input", "DataType": "Float"}]})


def test_inspector_summary_reads_both_json_schemas():
    ten = summarize_layers(TRT10_JSON)
    assert ten["layers"] == 2 and ten["by_precision"] == {"fp16": 1, "fp32": 1}
    assert ten["fused_attention"] == ["{ForeignNode[blocks.0.attn]}"]
    eleven = summarize_layers(TRT11_JSON)
    assert eleven["by_precision"] == {"fp16": 1} and eleven["layers_with_int8_inputs"] == 1
    assert eleven["fused_attention"] == []


def test_int8_fallback_warns():
    assert precision_warnings(summarize_layers(TRT11_JSON), "int8") == []
    warned = precision_warnings(summarize_layers(TRT10_JSON), "int8")
    assert len(warned) == 1 and "fell back to float" in warned[0]
    assert precision_warnings(summarize_layers(TRT10_JSON), "fp16") == []


# --- timing cache and engine records ------------------------------------------------------
def test_timing_cache_path_is_keyed_by_gpu_and_version(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = timing_cache_path("NVIDIA H100 80GB HBM3", (9, 0), "10.3.0")
    assert path == tmp_path / "vitopt" / "tensorrt" / "nvidia-h100-80gb-hbm3-sm90-trt10.3.0.timing-cache"
    others = {timing_cache_path("NVIDIA A100-SXM4-40GB", (8, 0), "10.3.0"),
              timing_cache_path("NVIDIA H100 80GB HBM3", (9, 0), "11.0.0"), path}
    assert len(others) == 3
    assert timing_cache_path("../../x", (8, 7), "10", root=tmp_path).parent == tmp_path


class FakeCache:
    def __init__(self, data):
        self.data = bytes(data)

    def serialize(self):
        return self.data + b"+timed"


class FakeConfig:
    def __init__(self, reject=False):
        self.reject, self.created, self.cache = reject, [], None

    def create_timing_cache(self, data):
        self.created.append(bytes(data))
        if self.reject and data:
            raise RuntimeError("timing cache header mismatch")
        return FakeCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


def test_timing_cache_is_reused_across_builds(tmp_path):
    path, said = tmp_path / "cache" / "gpu.timing-cache", []
    first = FakeConfig()
    load_timing_cache(first, path, said.append)
    save_timing_cache(first, path)
    assert first.created == [b""] and path.read_bytes() == b"+timed"
    second = FakeConfig()
    load_timing_cache(second, path, said.append)
    assert second.created == [b"+timed"] and "reusing the timing cache" in said[-1]
    rejecting = FakeConfig(reject=True)
    load_timing_cache(rejecting, path, said.append)
    assert rejecting.created == [b"+timed", b""] and "not usable" in said[-1]


def test_engine_record_mismatch_is_refused_with_the_reason():
    record = engine_record("10.3.0", H100, plan_build(10, "fp16"),
                           profile_shapes((3, 20, 20), 8), {"profile": "h100"}, None)
    check_record(record, "10.3.0", H100)
    with pytest.raises(BackendUnavailableError, match="TensorRT 10.3.0 on NVIDIA H100.*has TensorRT 10.4.0"):
        check_record(record, "10.4.0", H100)
    with pytest.raises(BackendUnavailableError, match="this GPU is NVIDIA A100.*capability 8.0"):
        check_record(record, "10.3.0", GpuInfo("NVIDIA A100-SXM4-40GB", (8, 0), 40))
    with pytest.raises(BackendUnavailableError, match="no NVIDIA GPU"):
        check_record(record, "10.3.0", None)
    with pytest.raises(ArtifactError, match="recompile"):
        check_record({"format": 99}, "10.3.0", H100)


# --- available() and a fake tensorrt module ---------------------------------------------------
def test_available_says_why_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    ok, why = get_backend("tensorrt").available()
    assert not ok and "cannot be imported" in why and "pip install tensorrt" in why
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    ok, why = TensorRTBackend().available()
    assert not ok and "8.6.1 is too old" in why
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(targets, "local_gpu", lambda: None)
    ok, why = TensorRTBackend().available()
    assert not ok and "has none" in why
    monkeypatch.setattr(targets, "local_gpu", lambda: GpuInfo("Tesla T4", (7, 5), 15))
    assert TensorRTBackend().available() == (True, "")
    assert not TensorRTBackend().supports("bf16")[0] and TensorRTBackend().supports("fp16")[0]


def fake_tensorrt(version, calls):
    """Just enough of the tensorrt module for build() to run: records what vitopt asks for."""
    enum = types.SimpleNamespace
    flags = enum(FP16="FP16", BF16="BF16", INT8="INT8", TF32="TF32")

    class Config(FakeConfig):
        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def set_flag(self, flag):
            calls.setdefault("set", []).append(flag)

        def clear_flag(self, flag):
            calls.setdefault("clear", []).append(flag)

        def add_optimization_profile(self, profile):
            calls["profile"] = profile.shape

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            self.shape = (name, lo, opt, hi)

    class Network:
        def get_input(self, i):
            return enum(name="images")

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            calls["config"] = Config()
            return calls["config"]

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls["opt_level"] = config.builder_optimization_level
            calls["monitor"] = config.progress_monitor
            return b"PLAN"

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse(self, data):
            calls["parsed"] = onnx.load_from_string(data)
            return True

    class Engine:
        def create_engine_inspector(self):
            return enum(get_engine_information=lambda fmt: TRT10_JSON)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine()

    class ProgressMonitor:
        def __init__(self):
            pass

    return types.SimpleNamespace(
        __version__=version, Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda s, l: None}),
        Builder=Builder, OnnxParser=Parser, Runtime=Runtime, BuilderFlag=flags,
        MemoryPoolType=enum(WORKSPACE="WORKSPACE"), ProfilingVerbosity=enum(DETAILED="DETAILED"),
        LayerInformationFormat=enum(JSON="JSON"), IProgressMonitor=ProgressMonitor)


@pytest.mark.parametrize("version, precision, onnx_float, set_flags, clear_flags", [
    ("11.0.0", "fp16", "fp16", [], []),
    ("10.3.0", "fp16", "fp32", ["FP16"], []),
    ("10.3.0", "fp32", "fp32", [], ["TF32"]),
])
def test_build_drives_tensorrt_per_version(version, precision, onnx_float, set_flags, clear_flags,
                                           exports, tmp_path, monkeypatch):
    calls, said = {}, []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, calls))
    monkeypatch.setattr(targets, "local_gpu", lambda: H100)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ir, example, _ = exports
    backend = TensorRTBackend(progress=said.append)
    files = backend.build_module(ir, example, tmp_path / "out", precision=precision, max_batch=16)
    assert files == ["model.engine", "tensorrt.json"]
    assert (tmp_path / "out" / "model.engine").read_bytes() == b"PLAN"
    record = json.loads((tmp_path / "out" / "tensorrt.json").read_text())
    assert record["tensorrt"] == version and record["gpu"] == H100.name and record["capability"] == "9.0"
    assert record["inspector"]["fused_attention"] and record["plan"]["onnx_float"] == onnx_float
    assert calls.get("set", []) == set_flags and calls.get("clear", []) == clear_flags
    assert calls["network_flags"] == 0
    assert calls["workspace"] == ("WORKSPACE", targets.TARGETS["h100"].workspace)
    assert calls["opt_level"] == 4 and calls["monitor"] is not None
    assert calls["profile"] == ("images", (1, 3, 20, 20), (16, 3, 20, 20), (16, 3, 20, 20))
    matmul_input = [n.input[1] for n in calls["parsed"].graph.node if n.op_type in ("MatMul", "Gemm")]
    assert matmul_input  # the parsed graph is the checked export
    cache = timing_cache_path(H100.name, H100.capability, version)
    assert cache.read_bytes() == b"+timed"
    # load refuses the engine on another GPU before TensorRT deserializes anything
    monkeypatch.setattr(targets, "local_gpu", lambda: GpuInfo("NVIDIA A100-SXM4-40GB", (8, 0), 40))
    with pytest.raises(BackendUnavailableError, match="specific to the GPU model"):
        backend.load(tmp_path / "out", files, precision=precision)


def test_build_refuses_a_graph_without_explicit_precision(exports, tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.0.0", calls))
    monkeypatch.setattr(targets, "local_gpu", lambda: H100)
    _, _, paths = exports
    with pytest.raises(LoweringError, match="strongly typed"):
        TensorRTBackend(progress=None).build(paths["fp32"], tmp_path, precision="fp16", max_batch=8)
    assert "parsed" not in calls  # refused before TensorRT saw it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not get_backend("tensorrt").available()[0],
                    reason="needs an NVIDIA GPU and TensorRT 10+ (not yet run by this project)")
def test_real_engine_matches_the_ir(exports, tmp_path):
    from vitopt.tolerances import compare
    ir, example, _ = exports
    backend = TensorRTBackend()
    files = backend.build_module(ir, example, tmp_path, precision="fp16", max_batch=8)
    engine = backend.load(tmp_path, files, precision="fp16")
    images = torch.randn(5, *example.shape[1:])
    with torch.no_grad():
        expected = ir(images).numpy()
    assert compare(engine.run(images.numpy()), expected, "fp16", "tensorrt").ok

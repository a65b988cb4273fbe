"""Targets and device profiles: the data, profile matching, precision rules, backend choice
with its reasons, the no-GPU message with the cross-compile offer, `vitopt targets`, and the
profile's batch range feeding CompileOptions. Backend availability is faked where a test is
about vitopt's choice, not about the engine."""
import pytest
import torch

import vitopt.backends
from vitopt import targets
from vitopt.cli import main
from vitopt.compiler import CompileOptions
from vitopt.errors import BackendUnavailableError, ConfigError
from vitopt.targets import TARGETS, GpuInfo

PROFILES = ("h100", "a100", "l4", "t4", "orin-agx", "orin-nano")
H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 79.1)
A100 = GpuInfo("NVIDIA A100-SXM4-40GB", (8, 0), 39.4)


def test_profiles_are_complete_and_follow_the_hardware_rules():
    for name in (*PROFILES, "cuda", "cpu"):
        assert name in TARGETS
    for name in PROFILES:
        t = TARGETS[name]
        arch = targets.arch_number(t.extra["cuda_arch"])
        assert t.device == "cuda" and t.backends == ("tensorrt", "aotinductor", "tvm")
        assert ("bf16" in t.precisions) == (arch >= 80), name
        assert "fp8" not in t.auto and t.auto[0] == "fp16"
        lo, opt, hi = t.batch
        assert 1 == lo <= opt <= hi and t.workspace > 0
        assert {"tvm_trials", "inductor_mode", "trt_opt_level"} <= set(t.tuning)
    assert [n for n in PROFILES if "fp8" in TARGETS[n].precisions] == ["h100", "l4"]
    assert TARGETS["h100"].cuda_arch == "sm_90" and TARGETS["t4"].cuda_arch == "sm_75"
    for jetson in ("orin-agx", "orin-nano"):
        assert TARGETS[jetson].extra["jetson"] and TARGETS[jetson].extra["tensorrt_major"] == 10
        assert TARGETS[jetson].cuda_arch == "sm_87"
    assert TARGETS["orin-nano"].workspace < TARGETS["orin-agx"].workspace < TARGETS["h100"].workspace


@pytest.mark.parametrize("gpu, profile", [
    (H100, "h100"), (A100, "a100"), (GpuInfo("NVIDIA L4", (8, 9), 22.0), "l4"),
    (GpuInfo("Tesla T4", (7, 5), 14.6), "t4"), (GpuInfo("Orin", (8, 7), 7.4), "orin-nano"),
    (GpuInfo("Orin", (8, 7), 61.4), "orin-agx"), (GpuInfo("NVIDIA RTX A6000", (8, 6), 47.5), None),
])
def test_profile_for_gpu(gpu, profile):
    found = targets.profile_for_gpu(gpu)
    assert (found.name if found else None) == profile


def test_arch_number_refuses_bad_names():
    assert targets.arch_number("sm_90") == 90 and targets.arch_number("SM_87") == 87
    for bad in ("sm9", "compute_x", "sm_"):
        with pytest.raises(ConfigError, match="sm_XX"):
            targets.arch_number(bad)


def test_precision_rules():
    targets.check_precision(TARGETS["h100"], "bf16")
    with pytest.raises(ConfigError, match="bf16 needs sm_80"):
        targets.check_precision(TARGETS["t4"], "bf16")
    with pytest.raises(ConfigError, match="no vitopt pass writes FP8"):
        targets.check_precision(TARGETS["h100"], "fp8")
    with pytest.raises(ConfigError, match="does not run fp8"):
        targets.check_precision(TARGETS["a100"], "fp8")
    targets.check_precision(TARGETS["cuda"], "bf16")  # generic: the machine decides


def test_without_a_gpu_the_message_offers_cross_compilation(monkeypatch):
    monkeypatch.setattr(targets, "local_gpu", lambda: None)
    with pytest.raises(BackendUnavailableError) as info:
        targets.require_device(TARGETS["h100"])
    message = str(info.value)
    assert info.value.exit_code == 3
    assert "needs an NVIDIA GPU" in message and "--backend tvm --cuda-arch sm_90" in message
    targets.require_device(TARGETS["h100"], backend="tvm")  # cross-compilation needs no GPU
    targets.require_device(TARGETS["cpu"])


def test_profile_of_another_gpu_is_refused_with_the_right_profile(monkeypatch):
    monkeypatch.setattr(targets, "local_gpu", lambda: A100)
    targets.require_device(TARGETS["a100"])
    targets.require_device(TARGETS["cuda"])
    with pytest.raises(BackendUnavailableError, match=r"sm_90.*A100.*--target a100"):
        targets.require_device(TARGETS["h100"])


class FakeBackend:
    def __init__(self, name, ok, why="", precisions=("fp32", "fp16")):
        self.name, self.ok, self.why, self.precisions = name, ok, why, precisions

    def available(self):
        return self.ok, self.why

    def require(self, precision=None):
        if not self.ok:
            raise BackendUnavailableError(self.why)

    def supports(self, precision):
        return precision in self.precisions, "no"


def fake_registry(monkeypatch, backends):
    monkeypatch.setattr(vitopt.backends, "BACKENDS", tuple(backends))
    monkeypatch.setattr(vitopt.backends, "get_backend", lambda name: backends[name])


def test_cuda_picks_the_first_available_backend_and_says_why(monkeypatch):
    fake_registry(monkeypatch, {
        "tensorrt": FakeBackend("tensorrt", False, "no module named 'tensorrt'"),
        "aotinductor": FakeBackend("aotinductor", True)})
    said = []
    assert targets.choose_backend(TARGETS["cuda"], None, log=said.append) == "aotinductor"
    assert "using aotinductor" in said[0] and "tensorrt: no module named 'tensorrt'" in said[0]
    name, skipped = targets.backend_decision(TARGETS["h100"])
    assert name == "aotinductor" and skipped == ["tensorrt: no module named 'tensorrt'"]
    fake_registry(monkeypatch, {"tensorrt": FakeBackend("tensorrt", False, "no module"),
                                "aotinductor": FakeBackend("aotinductor", False, "no g++")})
    with pytest.raises(BackendUnavailableError) as info:
        targets.choose_backend(TARGETS["cuda"], None)
    assert "no g++" in str(info.value) and "tvm: not part of this vitopt build yet" in str(info.value)


def test_auto_precision_follows_the_profile(monkeypatch):
    fake_registry(monkeypatch, {"tensorrt": FakeBackend("tensorrt", True,
                                                        precisions=("fp32", "fp16", "bf16", "int8"))})
    assert targets.choose_precision("tensorrt", "auto", "cuda", target=TARGETS["t4"]) == "fp16"
    fake_registry(monkeypatch, {"tensorrt": FakeBackend("tensorrt", True, precisions=("fp32",))})
    assert targets.choose_precision("tensorrt", "auto", "cuda", target=TARGETS["h100"]) == "fp32"
    with pytest.raises(ConfigError, match="bf16"):
        targets.choose_precision("tensorrt", "bf16", "cuda", target=TARGETS["t4"])


def test_profile_batch_range_feeds_compile_options():
    assert CompileOptions().max_batch == 8
    assert CompileOptions(target="h100").max_batch == TARGETS["h100"].batch[2]
    assert CompileOptions(target="orin-nano").max_batch == TARGETS["orin-nano"].batch[2]
    assert CompileOptions(target="h100", max_batch=16).max_batch == 16
    with pytest.raises(ConfigError, match="unknown target 'tpu'"):
        CompileOptions(target="tpu")


def test_vitopt_targets_lists_profiles_and_this_machine(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in (*PROFILES, "cuda", "cpu"):
        assert f"\n{name} " in out or out.startswith(name)
    assert "this machine:" in out and "builds here:" in out and "cross-compiling CUDA" in out
    assert "tensorrt" in out and "aotinductor" in out
    if not torch.cuda.is_available():
        assert "GPU: none" in out and "cuda and the GPU profiles: no (no GPU)" in out


def test_format_targets_with_a_gpu_names_profile_and_choice():
    summary = {"gpu": H100, "profile": "h100", "cross_compile": True,
               "backends": {"tensorrt": (False, "no module"), "aotinductor": (True, ""),
                            "tvm": (True, "")},
               "cuda_backend": ("aotinductor", ["tensorrt: no module"])}
    text = targets.format_targets(summary)
    assert "GPU: NVIDIA H100 80GB HBM3 (sm_90, 79 GiB); profile: h100" in text
    assert "cuda, h100: yes, with aotinductor (skipped tensorrt: no module)" in text
    assert "cross-compiling CUDA without a GPU: yes" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_compile_for_a_profile_without_gpu_exits_3(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = "timm:vit_tiny_patch16_224:img_size=20,patch_size=4,embed_dim=36,depth=1,num_heads=3"
    assert main(["compile", tiny, "--target", "h100", "-o", "x"]) == 3
    err = capsys.readouterr().err
    assert "needs an NVIDIA GPU" in err and "--cuda-arch sm_90" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_this_gpu_matches_a_profile_and_cuda_builds_here():
    gpu = targets.local_gpu()
    profile = targets.profile_for_gpu(gpu)
    if profile is not None:
        targets.require_device(profile)
    targets.require_device(TARGETS["cuda"])
    name, skipped = targets.backend_decision(TARGETS["cuda"])
    assert name is not None, skipped
    text = targets.format_targets()
    assert gpu.name in text and f"yes, with {name}" in text


def test_cpu_int8_tries_onnxruntime_first_without_int8_dot_products(monkeypatch):
    """OpenVINO's int8 linears run oneDNN's generic jit_gemm_I8 on x86 CPUs without VNNI/AMX
    (no faster than fp32); ONNX Runtime's MLAS kernels are faster there (SLOW_OPENVINO_INT8)."""
    fake_registry(monkeypatch, {"openvino": FakeBackend("openvino", True),
                                "onnxruntime": FakeBackend("onnxruntime", True)})
    cpu = TARGETS["cpu"]
    monkeypatch.setattr(targets, "x86_without_int8_dot", lambda: True)
    said = []
    assert targets.choose_backend(cpu, None, log=said.append, precision="int8") == "onnxruntime"
    assert "(the first choice); for int8, openvino second: " in said[0]
    assert "jit_gemm_I8" in said[0]
    for other in ("fp32", "bf16", "auto", None):
        assert targets.choose_backend(cpu, None, precision=other) == "openvino"
    assert targets.choose_backend(cpu, "openvino", precision="int8") == "openvino"  # asked for
    fake_registry(monkeypatch, {"openvino": FakeBackend("openvino", True),
                                "onnxruntime": FakeBackend("onnxruntime", False, "no module")})
    assert targets.backend_decision(cpu, "int8") == ("openvino", ["onnxruntime: no module"])
    monkeypatch.setattr(targets, "x86_without_int8_dot", lambda: False)  # VNNI, AMX, or not x86
    assert targets.backend_order(cpu, "int8") == (cpu.backends, None)


def test_int8_dot_product_check_reads_the_cpu_flags(monkeypatch):
    import vitopt.artifact
    for flags, slow in ((["avx2"], True), (["avx2", "avx512f", "avx512_vnni"], False),
                        (["avx2", "avx_vnni"], False), (["asimddp"], False), ([], False)):
        monkeypatch.setattr(vitopt.artifact, "hardware_info", lambda f=flags: {"flags": f})
        assert targets.x86_without_int8_dot() is slow, flags

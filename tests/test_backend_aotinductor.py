"""AOTInductor backend: a CPU .pt2 package against the IR, its build record, refusals; CUDA builds.

The CPU package is compiled once per module (g++ runs: about 10-35 s on two cores). CUDA tests
are marked `gpu` and skipped without a GPU; benchmarks/gpu_check.sh runs them on the GPU machine.
"""
import json

import numpy as np
import pytest
import torch
from build_copies import copy_built
from timm.models.vision_transformer import VisionTransformer

import vitopt.artifact as artifact_module
from vitopt.artifact import input_spec, output_spec, write_artifact
from vitopt.backends import BACKENDS, get_backend
from vitopt.backends import aotinductor as aoti
from vitopt.backends import aoti_load_check
from vitopt.errors import (ArtifactError, BackendUnavailableError, ConfigError, EngineLoadError,
                           LoweringError)
from vitopt.frontend.trace import trace
from vitopt.runtime import load as load_artifact
from vitopt.tolerances import compare

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "needs an NVIDIA GPU (torch.cuda.is_available() is False)"
H100 = {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0"}


def tiny_ir():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=20, patch_size=4, embed_dim=36, depth=1, num_heads=3,
                              num_classes=5).eval()
    return trace(model, torch.randn(2, 3, 20, 20))


def images(batch, seed=1):
    return torch.randn(batch, 3, 20, 20, generator=torch.Generator().manual_seed(seed))


def reference(ir, batch):
    x = images(batch)
    with torch.no_grad():
        return x.numpy(), ir(x).numpy()


@pytest.fixture(scope="module")
def ir():
    return tiny_ir()


@pytest.fixture(scope="module")
def cpu_package(ir, tmp_path_factory):
    out = tmp_path_factory.mktemp("aoti-cpu")
    files = get_backend("aotinductor").build_module(ir, images(2), out, precision="fp32",
                                                    max_batch=4)
    return out, files


def copy_package(built, dest, **record_changes):
    return copy_built(built, dest, aoti.RECORD, **record_changes)


def test_registered_and_available():
    assert "aotinductor" in BACKENDS
    backend = get_backend("aotinductor")
    assert backend.available() == (True, "")
    assert backend.input_format == "torch" and backend.version() == torch.__version__


def test_cpu_package_matches_ir(ir, cpu_package):
    out, files = cpu_package
    assert files == [aoti.PACKAGE, aoti.RECORD] and all((out / f).is_file() for f in files)
    engine = get_backend("aotinductor").load(out, files, precision="fp32")
    for batch in (1, 3):
        x, expected = reference(ir, batch)
        result = engine.run(x)
        assert result.dtype == np.float32 and result.shape == (batch, 5)
        check = compare(result, expected, "fp32", "aotinductor")
        assert check.ok, check


# --- the child-process load check (aoti_load_check): CUDA packages crashed on load in run 4 ---
def test_load_check_runs_for_cuda_packages_only(monkeypatch):
    monkeypatch.delenv(aoti_load_check.CHECK_ENV, raising=False)
    assert aoti_load_check.wanted("cuda") and not aoti_load_check.wanted("cpu")
    monkeypatch.setenv(aoti_load_check.CHECK_ENV, "always")
    assert aoti_load_check.wanted("cpu")
    monkeypatch.setenv(aoti_load_check.CHECK_ENV, "0")
    assert not aoti_load_check.wanted("cuda")


def test_load_check_opens_a_good_package_in_a_child(cpu_package, monkeypatch):
    out, files = cpu_package
    monkeypatch.setenv(aoti_load_check.CHECK_ENV, "always")
    get_backend("aotinductor").check_opens(out, files, precision="fp32", device="cpu",
                                           image_shape=(3, 20, 20))


def test_load_check_turns_a_crash_or_a_hang_into_an_engine_load_error(cpu_package, monkeypatch):
    out, files = cpu_package
    backend = get_backend("aotinductor")
    monkeypatch.setenv(aoti_load_check.CHECK_ENV, "always")
    monkeypatch.setenv(aoti_load_check.CRASH_ENV, "1")
    with pytest.raises(EngineLoadError, match="killed by SIGSEGV.*--backend tvm") as crash:
        backend.check_opens(out, files, precision="fp32", device="cpu", image_shape=(3, 20, 20))
    assert crash.value.backend == "aotinductor" and crash.value.exit_code == 3
    monkeypatch.delenv(aoti_load_check.CRASH_ENV)
    monkeypatch.setenv(aoti_load_check.LIMIT_ENV, "0.2")  # less than importing torch takes
    with pytest.raises(EngineLoadError, match="did not finish in 0.2 s"):
        backend.check_opens(out, files, precision="fp32", device="cpu", image_shape=(3, 20, 20))
    monkeypatch.setenv(aoti_load_check.LIMIT_ENV, "soon")
    with pytest.raises(ConfigError, match="VITOPT_AOTI_LOAD_CHECK_S.*'soon'"):
        backend.check_opens(out, files, precision="fp32", device="cpu", image_shape=(3, 20, 20))


def test_build_record(cpu_package):
    record = json.loads((cpu_package[0] / aoti.RECORD).read_text())
    assert record["device"] == "cpu" and record["precision"] == "fp32"
    assert record["dtype"] == "float32" and record["max_batch"] == 4
    assert record["input_shape"] == [3, 20, 20] and record["torch"] == torch.__version__
    assert record["gpu"] is None and record["tuning"] == "default"
    assert record["inductor_configs"] == {"cpp.dynamic_threads": True}


def test_artifact_loads_with_a_fresh_backend(ir, cpu_package, tmp_path):
    out, files = cpu_package
    backend = get_backend("aotinductor")
    manifest = {"backend": {"name": "aotinductor", "version": backend.version()},
                "precision": "fp32", "input": input_spec((20, 20), 3, [0.5] * 3, [0.5] * 3, 4),
                "output": output_spec("logits")}
    path = write_artifact(tmp_path / "tiny.vitopt", manifest, {f: out / f for f in files})
    runtime = load_artifact(path, threads=1)
    x, expected = reference(ir, 3)
    check = compare(runtime(x), expected, "fp32", "aotinductor")
    assert check.ok, check


def test_threads_apply_per_call_only(ir, cpu_package):
    before = torch.get_num_threads()
    engine = get_backend("aotinductor").load(*cpu_package, precision="fp32", threads=1)
    x, expected = reference(ir, 2)
    assert compare(engine.run(x), expected, "fp32", "aotinductor").ok
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("loader", aoti.LOADERS)
def test_every_loader_opens_the_cpu_package(ir, cpu_package, loader):
    engine = get_backend("aotinductor").load(*cpu_package, precision="fp32", loader=loader)
    x, expected = reference(ir, 3)
    check = compare(engine.run(x), expected, "fp32", "aotinductor")
    assert check.ok, check


def test_loader_choice(cpu_package, monkeypatch):
    monkeypatch.setenv(aoti.LOADER_ENV, "single-threaded")
    assert aoti.default_loader("cuda") == "single-threaded"
    assert aoti.default_loader("cpu") == "package"  # CPU packages keep the plain loader
    monkeypatch.setenv(aoti.LOADER_ENV, "no-such-loader")
    with pytest.raises(ConfigError, match="unknown AOTInductor loader 'no-such-loader'.*VITOPT"):
        aoti.default_loader("cuda")
    with pytest.raises(ConfigError, match="unknown AOTInductor loader 'bad'"):
        get_backend("aotinductor").load(*cpu_package, precision="fp32", loader="bad")


def test_cuda_package_refused_without_gpu(cpu_package, tmp_path, monkeypatch):
    monkeypatch.setattr(aoti, "gpu_identity", lambda: None)
    out, files = copy_package(cpu_package, tmp_path, device="cuda", gpu=H100)
    with pytest.raises(BackendUnavailableError, match="built for CUDA on NVIDIA H100.*no CUDA GPU"):
        get_backend("aotinductor").load(out, files, precision="fp32")


def test_cuda_package_refused_on_another_gpu(cpu_package, tmp_path, monkeypatch):
    monkeypatch.setattr(aoti, "gpu_identity", lambda: {"name": "NVIDIA L4", "capability": "8.9"})
    out, files = copy_package(cpu_package, tmp_path, device="cuda", gpu=H100)
    with pytest.raises(BackendUnavailableError, match="this GPU is NVIDIA L4.*Recompile"):
        get_backend("aotinductor").load(out, files, precision="fp32")


def test_cpu_package_refused_without_its_cpu_flags(cpu_package, tmp_path, monkeypatch):
    info = dict(artifact_module.hardware_info(), flags=["avx2"])
    monkeypatch.setattr(artifact_module, "hardware_info", lambda: info)
    out, files = copy_package(cpu_package, tmp_path, cpu_requires=["avx512f"])
    with pytest.raises(BackendUnavailableError, match="lacks avx512f"):
        get_backend("aotinductor").load(out, files, precision="fp32")


def test_precision_mismatch_and_bad_record(cpu_package, tmp_path):
    backend = get_backend("aotinductor")
    with pytest.raises(ArtifactError, match="built for 'fp32', not 'fp16'"):
        backend.load(*cpu_package, precision="fp16")
    out, files = copy_package(cpu_package, tmp_path)
    (out / aoti.RECORD).write_text("{not json")
    with pytest.raises(ArtifactError, match="cannot read the AOTInductor build record"):
        backend.load(out, files, precision="fp32")


def test_build_from_onnx_refuses(tmp_path):
    with pytest.raises(LoweringError, match="builds from the torch module"):
        get_backend("aotinductor").build(tmp_path / "m.onnx", tmp_path, precision="fp32",
                                         max_batch=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"tuning": "fast"}, "unknown tuning 'fast'"),
    ({"precision": "fp16"}, "on CPU builds fp32 only"),
    ({"precision": "int8"}, "'int8'"),
    ({"max_batch": 0}, "max_batch.*0"),
    ({"options": {"no_such_knob": 1}}, "no_such_knob"),
])
def test_bad_settings(ir, tmp_path, kwargs, message):
    settings = {"precision": "fp32", "max_batch": 2, **kwargs}
    with pytest.raises(ConfigError, match=message):
        get_backend("aotinductor").build_module(ir, images(1), tmp_path, **settings)


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without a GPU")
def test_half_precisions_need_a_gpu(ir, tmp_path):
    backend = get_backend("aotinductor")
    ok, reason = backend.supports("fp16")
    assert not ok and "CUDA GPUs only" in reason and "--precision fp32" in reason
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        backend.build_module(ir, images(1), tmp_path, precision="fp32", max_batch=2, device="cuda")


def test_missing_compiler_is_explained(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-cxx-compiler")
    ok, reason = get_backend("aotinductor").available()
    assert not ok and "'no-such-cxx-compiler'" in reason and "g++" in reason


# --- CUDA (run by benchmarks/gpu_check.sh on the GPU machine) --------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_cuda_package_matches_ir(ir, tmp_path, precision):
    backend = get_backend("aotinductor")
    ok, reason = backend.supports(precision)
    if not ok:
        pytest.skip(reason)
    files = backend.build_module(ir, images(2), tmp_path, precision=precision, max_batch=8,
                                 device="cuda")
    record = json.loads((tmp_path / aoti.RECORD).read_text())
    assert record["device"] == "cuda" and record["gpu"] == aoti.gpu_identity()
    assert record["dtype"] == aoti.DTYPES[precision]
    engine = get_backend("aotinductor").load(tmp_path, files, precision=precision)
    for batch in (1, 3, 8):
        x, expected = reference(ir, batch)
        result = engine.run(x)
        assert result.dtype == np.float32 and result.shape == (batch, 5)
        check = compare(result, expected, precision, "aotinductor")
        assert check.ok, check

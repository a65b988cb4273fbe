"""Backends: registry, lazy imports, availability messages, fp32/bf16 engines against torch."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vitopt.backends.openvino as ov_backend
from vitopt.backends import BACKENDS, available_backends, get_backend
from vitopt.errors import ArtifactError, BackendUnavailableError, ConfigError
from vitopt.lower.onnx_export import export_onnx
from vitopt.tolerances import compare


@pytest.fixture(scope="module")
def model_and_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=20, patch_size=4, embed_dim=24, depth=2, num_heads=2,
                              num_classes=7).eval()
    path = export_onnx(model, torch.randn(2, 3, 20, 20), tmp_path_factory.mktemp("onnx") / "m.onnx")
    return model, path


def reference(model, batch, seed=1):
    images = torch.randn(batch, 3, 20, 20, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return images.numpy(), model(images).numpy()


def has_bf16():
    return get_backend("openvino").supports("bf16")


def test_registry():
    assert set(BACKENDS) >= {"onnxruntime", "openvino"}
    assert set(available_backends()) <= set(BACKENDS)
    assert get_backend("openvino").name == "openvino"
    with pytest.raises(ConfigError, match="'tensorrtt'.*onnxruntime"):
        get_backend("tensorrtt")


def test_importing_vitopt_imports_no_engine():
    code = ("import sys, vitopt, vitopt.backends, vitopt.runtime, vitopt.artifact; "
            "print(sorted(m for m in ('onnxruntime', 'openvino', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_missing_engine_says_what_to_install(name, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    backend = get_backend(name)
    ok, reason = backend.available()
    assert not ok and f"pip install {name}" in reason
    with pytest.raises(BackendUnavailableError) as info:
        backend.require("fp32")
    assert info.value.exit_code == 3


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_fp32_engine_matches_torch(name, model_and_onnx, tmp_path):
    model, onnx_path = model_and_onnx
    backend = get_backend(name)
    files = backend.build(onnx_path, tmp_path, precision="fp32", max_batch=4)
    assert files and all((tmp_path / f).is_file() for f in files)
    engine = backend.load(tmp_path, files, precision="fp32", threads=1)
    assert backend.version()
    for batch in (1, 3):
        images, expected = reference(model, batch)
        out = engine.run(images)
        assert out.dtype == np.float32 and out.shape == (batch, 7)
        result = compare(out, expected, "fp32", name)
        assert result.ok, result


def test_openvino_fp32_really_runs_fp32(model_and_onnx, tmp_path):
    backend = get_backend("openvino")
    files = backend.build(model_and_onnx[1], tmp_path, precision="fp32", max_batch=2)
    bin_file = tmp_path / [f for f in files if f.endswith(".bin")][0]
    params = sum(p.numel() for p in model_and_onnx[0].parameters())
    assert bin_file.stat().st_size >= 4 * params * 0.9  # weights stored fp32, not compressed
    precisions = ov_backend.runtime_precisions(backend.load(tmp_path, files, precision="fp32"))
    assert precisions[("FullyConnected", "f32")] > 0
    assert not any(p == "bf16" for _, p in precisions)


@pytest.mark.skipif(not has_bf16()[0], reason=has_bf16()[1])
def test_openvino_bf16(model_and_onnx, tmp_path):
    model, onnx_path = model_and_onnx
    backend = get_backend("openvino")
    files = backend.build(onnx_path, tmp_path, precision="bf16", max_batch=4)
    engine = backend.load(tmp_path, files, precision="bf16", threads=1)
    images, expected = reference(model, 3)
    result = compare(engine.run(images), expected, "bf16", "openvino")
    assert result.ok, result
    precisions = ov_backend.runtime_precisions(engine)
    assert precisions[("FullyConnected", "bf16")] >= 8  # 4 linears per block, 2 blocks


def test_bf16_on_a_cpu_without_it(monkeypatch, model_and_onnx, tmp_path):
    monkeypatch.setattr(ov_backend, "cpu_capabilities", lambda: ("FP32", "INT8"))
    backend = get_backend("openvino")
    ok, reason = backend.supports("bf16")
    assert not ok and "bf16" in reason and "--precision fp32" in reason
    with pytest.raises(BackendUnavailableError, match="no bf16 support"):
        backend.build(model_and_onnx[1], tmp_path, precision="bf16", max_batch=1)


def test_bad_settings(model_and_onnx, tmp_path):
    backend = get_backend("onnxruntime")
    with pytest.raises(ConfigError, match="'bf16'"):
        backend.build(model_and_onnx[1], tmp_path, precision="bf16", max_batch=1)
    with pytest.raises(ConfigError, match="max_batch.*0"):
        backend.build(model_and_onnx[1], tmp_path, precision="fp32", max_batch=0)
    with pytest.raises(ConfigError, match="threads.*-2"):
        backend.build(model_and_onnx[1], tmp_path, precision="fp32", max_batch=1, threads=-2)
    with pytest.raises(ArtifactError, match=r"\.xml file"):
        get_backend("openvino").load(tmp_path, ["m.onnx"], precision="fp32")

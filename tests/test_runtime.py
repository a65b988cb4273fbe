"""The runtime: load checks, input validation, chunking, numpy/torch in and out, pre/post-processing."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import vitopt
import vitopt.backends.openvino as ov_backend
from vitopt.artifact import MANIFEST, input_spec, output_spec, write_artifact
from vitopt.backends import get_backend
from vitopt.backends.onnxruntime import OnnxRuntimeBackend
from vitopt.errors import ArtifactError, BackendUnavailableError, ConfigError, InputError
from vitopt.lower.onnx_export import export_onnx
from vitopt.runtime import load
from vitopt.tolerances import compare

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
LABELS = [f"class{i}" for i in range(7)]


def build(onnx_path, out, backend="onnxruntime", precision="fp32", max_batch=2, **manifest):
    engine = get_backend(backend)
    build_dir = out.with_name(out.name + ".build")
    names = engine.build(onnx_path, build_dir, precision=precision, max_batch=max_batch)
    spec = {"backend": {"name": backend, "version": engine.version()}, "precision": precision,
            "input": input_spec((20, 20), 3, MEAN, STD, max_batch),
            "output": output_spec("logits", LABELS)}
    spec.update(manifest)
    return write_artifact(out, spec, {name: build_dir / name for name in names})


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=20, patch_size=4, embed_dim=24, depth=2, num_heads=2,
                              num_classes=7).eval()
    root = tmp_path_factory.mktemp("rt")
    onnx_path = export_onnx(model, torch.randn(1, 3, 20, 20), root / "m.onnx")
    return model, onnx_path, build(onnx_path, root / "ort.vitopt")


@pytest.fixture(scope="module")
def runtime(compiled):
    return load(compiled[2], threads=1)


def images(batch):
    return torch.randn(batch, 3, 20, 20, generator=torch.Generator().manual_seed(batch))


def expected(model, x):
    with torch.no_grad():
        return model(x)


def test_numpy_batch_above_max_batch_is_chunked(compiled, runtime, monkeypatch):
    seen = []
    run = runtime.engine.run
    monkeypatch.setattr(runtime.engine, "run", lambda x: seen.append(len(x)) or run(x))
    x = images(5)
    out = runtime(x.numpy())
    assert isinstance(out, np.ndarray) and out.shape == (5, 7) and out.dtype == np.float32
    assert seen == [2, 2, 1]
    assert compare(out, expected(compiled[0], x), "fp32", "onnxruntime").ok


def test_torch_in_torch_out_and_single_image(compiled, runtime):
    x = images(3)
    out = runtime(x)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 7)
    assert compare(out, expected(compiled[0], x), "fp32", "onnxruntime").ok
    single = runtime(x[0])
    assert isinstance(single, torch.Tensor) and single.shape == (7,)
    assert torch.allclose(single, out[0], atol=1e-5)
    assert runtime(x.double().numpy()).dtype == np.float32  # other floats are converted


@pytest.mark.parametrize("shape, message", [
    ((2, 1, 20, 20), "3-channel images .*got 1 channels"),
    ((2, 3, 24, 20), "20x20 images .*got 24x20"),
    ((0, 3, 20, 20), "batch is empty"),
    ((1, 1, 3, 20, 20), r"\[B, 3, 20, 20\].*got shape \[1, 1, 3, 20, 20\]"),
])
def test_wrong_shapes(runtime, shape, message):
    with pytest.raises(InputError, match=message):
        runtime(np.zeros(shape, np.float32))
    with pytest.raises(InputError, match=message):
        runtime(torch.zeros(shape))


def test_wrong_types(runtime):
    with pytest.raises(InputError, match="dtype uint8.*preprocess"):
        runtime(np.zeros((1, 3, 20, 20), np.uint8))
    with pytest.raises(InputError, match="dtype int64"):
        runtime(torch.zeros((1, 3, 20, 20), dtype=torch.long))
    with pytest.raises(InputError, match="got list"):
        runtime([[0.0]])


def test_preprocess(runtime, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (31, 27), dtype=np.uint8)
    gray = Image.fromarray(pixels, mode="L")  # other size and mode than the model takes
    gray.save(tmp_path / "img.png")
    batch = runtime.preprocess([gray, tmp_path / "img.png"])
    assert batch.shape == (2, 3, 20, 20) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0], batch[1])
    flat = Image.new("RGB", (20, 20), (255, 0, 51))
    one = runtime.preprocess(flat)
    for channel, value in enumerate((1.0, 0.0, 0.2)):
        np.testing.assert_allclose(one[0, channel], (value - MEAN[channel]) / STD[channel],
                                   atol=1e-6)
    assert runtime(batch).shape == (2, 7)
    with pytest.raises(InputError, match="does not exist"):
        runtime.preprocess(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputError, match="cannot read"):
        runtime.preprocess(str(tmp_path / "text.png"))


def test_topk(runtime):
    logits = np.array([[0.0, 3.0, 1.0, 0, 0, 0, 0], [5.0, 0, 0, 0, 0, 0, 0]], np.float32)
    top = runtime.topk(logits, k=2)
    assert [name for name, _ in top[0]] == ["class1", "class2"]
    assert top[1][0][0] == "class0" and 0.9 < top[1][0][1] < 1.0
    single = runtime.topk(torch.from_numpy(logits[0]), k=10)
    assert len(single) == 7 and sum(score for _, score in single) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="k must be"):
        runtime.topk(logits, k=0)


def test_topk_needs_a_classifier(compiled, tmp_path):
    path = build(compiled[1], tmp_path / "f.vitopt", output=output_spec("features"))
    with pytest.raises(ConfigError, match="'features'"):
        load(path).topk(np.zeros(7))


def test_vitopt_load_and_repr(compiled):
    rt = vitopt.load(compiled[2])
    assert "onnxruntime" in repr(rt) and "max_batch=2" in repr(rt)
    assert rt.manifest["output"]["labels"] == LABELS


def test_openvino_artifact(compiled, tmp_path):
    model, onnx_path, _ = compiled
    rt = load(build(onnx_path, tmp_path / "ov.vitopt", backend="openvino", max_batch=2))
    x = images(3)  # above max_batch: OpenVINO's engine has a bounded batch, so chunks must work
    assert compare(rt(x), expected(model, x), "fp32", "openvino").ok


def test_backend_unavailable(compiled, monkeypatch):
    monkeypatch.setattr(OnnxRuntimeBackend, "available",
                        lambda self: self._import_error(ImportError("No module named x")))
    with pytest.raises(BackendUnavailableError, match="pip install onnxruntime") as info:
        load(compiled[2])
    assert info.value.exit_code == 3


def test_bf16_artifact_on_a_cpu_without_bf16(compiled, tmp_path, monkeypatch):
    path = build(compiled[1], tmp_path / "bf16.vitopt", backend="openvino", precision="fp32")
    rewrite(path, lambda data: data.update(precision="bf16"))
    monkeypatch.setattr(ov_backend, "cpu_capabilities", lambda: ("FP32", "INT8"))
    with pytest.raises(BackendUnavailableError, match="built for bf16 on .*no bf16 support"):
        load(path)


def test_engine_needs_cpu_flags_this_machine_lacks(compiled, tmp_path):
    path = build(compiled[1], tmp_path / "amx.vitopt",
                 hardware={"cpu": "Xeon 8480", "requires": ["amx_bf16", "no_such_flag"]})
    with pytest.raises(BackendUnavailableError, match="Xeon 8480.*lacks .*no_such_flag"):
        load(path)


def test_unknown_backend_in_manifest(compiled, tmp_path):
    path = build(compiled[1], tmp_path / "x.vitopt", backend="onnxruntime")
    rewrite(path, lambda data: data.update(backend={"name": "tensorrt-99", "version": "1"}))
    with pytest.raises(ArtifactError, match="'tensorrt-99'.*upgrade vitopt"):
        load(path)


def test_corrupt_engine_is_refused(compiled, tmp_path):
    path = build(compiled[1], tmp_path / "c.vitopt")
    engine = next(p for p in Path(path).iterdir() if p.name != MANIFEST)
    engine.write_bytes(engine.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ArtifactError, match="corrupt"):
        load(path)


def rewrite(path, change):
    data = json.loads((path / MANIFEST).read_text())
    change(data)
    (path / MANIFEST).write_text(json.dumps(data))

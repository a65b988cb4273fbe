"""ONNX lowering: one file, opset >= 18, dynamic batch, LayerNorm as single nodes, clear failures."""
import numpy as np
import onnx
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitopt.errors import ConfigError, LoweringError
from vitopt.lower.onnx_export import export_onnx, onnx_op_counts
from vitopt.tolerances import compare

DEPTH = 2


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=20, patch_size=4, embed_dim=24, depth=DEPTH, num_heads=2,
                             num_classes=7).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_vit()
    path = export_onnx(model, torch.randn(1, 3, 20, 20), tmp_path_factory.mktemp("onnx") / "m.onnx")
    return model, path


def test_graph_structure(exported):
    _, path = exported
    ops = onnx_op_counts(path)
    assert ops["LayerNormalization"] == 2 * DEPTH + 1
    assert ops["Softmax"] == DEPTH  # attention stays MatMul/Softmax/MatMul, one per block
    assert ops["MatMul"] >= 2 * DEPTH
    for decomposed in ("ReduceMean", "Sqrt", "Pow"):
        assert decomposed not in ops


def test_io_names_opset_dynamic_batch_single_file(exported):
    _, path = exported
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["output"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 20, 20]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no external data
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_matches_torch(exported, batch):
    import onnxruntime as ort

    model, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(batch, 3, 20, 20)
    (out,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = model(images)
    assert compare(out, expected, "fp32", "onnxruntime").ok


def test_export_is_quiet_and_keeps_training_mode(tmp_path, capfd):
    model = tiny_vit().train()
    export_onnx(model, torch.randn(2, 3, 20, 20), tmp_path / "sub" / "m.onnx", dynamic_batch=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert model.training
    dims = onnx.load(str(tmp_path / "sub" / "m.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 2


class DataDependent(torch.nn.Module):
    def forward(self, images):
        if images.sum() > 0:  # Python control flow on a tensor value: torch.export refuses
            return images.flatten(1)
        return -images.flatten(1)


def test_export_failure_names_the_cause(tmp_path, capfd):
    with pytest.raises(LoweringError, match="DataDependent.*torch.export.*data-dependent"):
        export_onnx(DataDependent(), torch.randn(2, 3, 4, 4), tmp_path / "bad.onnx")
    assert not list(tmp_path.iterdir())  # nothing half-written
    assert capfd.readouterr().err == ""


def test_bad_arguments():
    with pytest.raises(ConfigError, match="opset 17"):
        export_onnx(tiny_vit(), torch.randn(1, 3, 20, 20), "unused.onnx", opset=17)
    with pytest.raises(LoweringError, match=r"\[B, C, H, W\].*\[3, 20, 20\]"):
        export_onnx(tiny_vit(), torch.randn(3, 20, 20), "unused.onnx")
    with pytest.raises(LoweringError, match="fails on the example input"):
        export_onnx(tiny_vit(), torch.randn(1, 3, 16, 16), "unused.onnx")


def test_op_counts_reads_a_file(tmp_path):
    path = tmp_path / "relu.onnx"
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    vi = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "xy"]
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], "g", vi[:1], vi[1:])), path)
    assert onnx_op_counts(path) == {"Relu": 1}
    assert np.array(list(onnx_op_counts(path).values())).sum() == 1


class FoldsBatch(torch.nn.Module):
    def forward(self, images):
        return images.reshape(2, -1)  # valid torch, but the output's first axis is not the batch


def test_output_must_keep_the_batch_axis(tmp_path):
    with pytest.raises(LoweringError, match="first axis is not the batch.*dynamic_batch=False"):
        export_onnx(FoldsBatch(), torch.randn(2, 3, 4, 4), tmp_path / "fold.onnx")
    assert not list(tmp_path.iterdir())  # the refused model is not left behind
    export_onnx(FoldsBatch(), torch.randn(2, 3, 4, 4), tmp_path / "fold.onnx", dynamic_batch=False)


def test_decomposed_layer_norm_is_refused(tmp_path, monkeypatch):
    import vitopt.lower.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "_count_layer_norm_calls", lambda module, example: 3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LayerNorm(48))
    with pytest.raises(LoweringError, match="2 of 3 LayerNorms were decomposed"):
        export_onnx(model, torch.randn(2, 3, 4, 4), tmp_path / "ln.onnx")

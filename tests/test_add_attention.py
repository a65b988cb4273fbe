"""reparam_shiftadd attention=add (vitopt.ir.add_attention): structure, the linear form against
the quadratic reference, token sizes, engines (ONNX Runtime, OpenVINO, TVM llvm) at fp32
tolerance, declines and bad config, and accuracy on the digits proxy after the fine-tune
(stated bound)."""
import pytest
import torch
from torch import nn

from pass_checks import check_declines, check_engines_match, check_lossy_pass, run_pass
from vitopt.errors import ConfigError
from vitopt.ir.add_attention import (AddAttention, add_attention_linear, add_attention_quadratic,
                                     add_attention_stages, binary_sign, ste_sign)
from vitopt.ir.encoder import EncoderIR
from vitopt.ir.shift import shift_layers
from vitopt.ir.stages import Attention
from vitopt.ir.state import TokenState
from vitopt.pipeline import PassContext, PassSpec, Pipeline

UNTRAINED = {"attention": "add", "allow_untrained_add_attention": True}


def _images(ir, count=3, seed=5):
    h, w = ir.meta.image_size
    return torch.randn(count, ir.meta.in_chans, h, w, generator=torch.Generator().manual_seed(seed))


def _add(ir, **options):
    context = PassContext(calib=_images(ir, 8, seed=11), calib_source="test")
    return Pipeline([PassSpec("reparam_shiftadd", {**UNTRAINED, **options})]).run(ir, context=context)


def test_sign_is_never_zero_and_straight_through():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 4.0], requires_grad=True)
    assert binary_sign(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    y = ste_sign(x)
    assert torch.equal(y.detach(), binary_sign(x))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # gradient of clamp(x, -1, 1)


@pytest.mark.parametrize("sizes", [False, True])
def test_linear_form_equals_quadratic_reference(sizes):
    gen = torch.Generator().manual_seed(3)
    bq = binary_sign(torch.randn(2, 3, 29, 11, generator=gen))
    bk = binary_sign(torch.randn(2, 3, 29, 11, generator=gen))
    v = torch.randn(2, 3, 29, 7, generator=gen, dtype=torch.float64)
    weight = (torch.rand(2, 1, 29, 1, generator=gen, dtype=torch.float64) * 4 + 0.25
              if sizes else None)
    linear = add_attention_linear(bq.double(), bk.double(), v, weight)
    quadratic = add_attention_quadratic(bq.double(), bk.double(), v, weight)
    assert torch.allclose(linear, quadratic, rtol=1e-12, atol=1e-12)
    # and by hand: s_ij = m - Hamming(b_qi, b_kj)
    hamming = (bq[0, 1, 4][None] != bk[0, 1]).sum(dim=-1).double()
    s = (11 - hamming) * (weight[0, 0, :, 0] if sizes else 1.0)
    assert torch.allclose(linear[0, 1, 4], (s[:, None] * v[0, 1]).sum(0) / s.sum(), atol=1e-12)


@pytest.mark.parametrize("family", ["timm_vit", "hf_vit"])
def test_structure(family, traced_family):
    _, _, ir = traced_family(family)
    images = _images(ir)

    def structure(new):
        stages = add_attention_stages(new)
        assert len(stages) == len(new.attention_stages()) == ir.num_blocks
        for stage in stages.values():
            assert stage.hash_proj.shape == (stage.num_heads, stage.head_dim, 16)
            assert stage.hash_offset.shape == (stage.num_heads, 16)
            assert "add-attention" in stage.describe()
            assert all(type(m) is nn.Linear for m in stage.projections())  # layers=none
            h = stage.norm(torch.randn(2, 26, stage.embed_dim))
            q, k, _ = stage.heads_qkv(h)
            codes = torch.cat([stage.codes(q), stage.codes(k)])
            assert set(codes.unique().tolist()) == {-1.0, 1.0}
        assert not shift_layers(new)
        assert "add-attention" in new.table()[1]["detail"]
    result = check_lossy_pass(ir, "reparam_shiftadd", structure, images, layers="none",
                              hash_bits=16, **UNTRAINED)
    assert sorted(result.records[0].stats["attention"]) == [f"attn{i}" for i in range(ir.num_blocks)]


def test_with_mlp_shift_and_all(traced_family):
    _, _, ir = traced_family("timm_vit")
    mixed = _add(ir, layers="mlp").ir
    assert len(add_attention_stages(mixed)) == ir.num_blocks
    assert {n.split(".")[1] for n in shift_layers(mixed)} == {"fc1", "fc2"}
    everything = _add(ir, layers="all").ir  # the qkv / proj inside AddAttention become shift too
    assert {n.split(".")[1] for n in shift_layers(everything)} == {"qkv", "proj", "fc1", "fc2"}
    assert all(s.precision == "shift" for s in everything.blocks())


def test_token_sizes_weight_keys(traced_family):
    """After merge_tokens (token sizes, proportional attention) each key is weighted by its size:
    the stage equals the quadratic reference with those weights, and records what merging reads."""
    _, _, ir = traced_family("timm_vit")
    merged = Pipeline([PassSpec("merge_tokens", {"r": 3})]).run(ir).ir
    new = _add(merged, layers="none").ir
    stage = new.attention_stages()[1]
    assert isinstance(stage, AddAttention) and stage.record_keys == merged.attention_stages()[1].record_keys
    with torch.no_grad():
        assert torch.isfinite(new(_images(new))).all()
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(2, 23, stage.embed_dim, generator=gen)
        size = torch.rand(2, 23, 1, generator=gen) * 3 + 1
        got = stage(TokenState(x, size=size)).x
        q, k, v = stage.heads_qkv(stage.norm(x))
        out = add_attention_quadratic(stage.codes(q), stage.codes(k), v, size.reshape(2, 1, 23, 1))
        expected = x + stage.proj(out.transpose(1, 2).reshape(2, 23, -1))
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_engines_match_at_fp32(traced_family, tmp_path):
    """ONNX Runtime and OpenVINO run the exported add-attention within the fp32 tolerances."""
    from vitopt.lower.onnx_export import onnx_op_counts
    _, _, ir = traced_family("timm_vit")
    new = _add(ir, layers="none", hash_bits=7).ir
    check_engines_match(new, _images(new), tmp_path)
    counts = onnx_op_counts(tmp_path / "model.onnx")
    assert counts["Softmax"] == 0 and counts["GreaterOrEqual"] == 2 * ir.num_blocks


def test_tvm_llvm_matches(traced_family, tmp_path):
    """TVM's importer takes the add-attention graph as is (plain ATen ops: no converter)."""
    pytest.importorskip("tvm")
    from vitopt.backends import get_backend
    from vitopt.tolerances import compare
    _, _, ir = traced_family("timm_vit")
    new = _add(ir, layers="none", hash_bits=7).ir
    backend = get_backend("tvm")
    files = backend.build_module(new, _images(new, 2), tmp_path, precision="fp32", max_batch=2)
    engine = backend.load(tmp_path, files, precision="fp32")
    x = _images(new, 2, seed=9)
    with torch.no_grad():
        assert compare(engine.run(x.numpy()), new(x).numpy(), "fp32", "tvm").ok


def test_bad_config_and_declines(traced_family):
    _, _, ir = traced_family("timm_vit")
    with pytest.raises(ConfigError, match=r"attention 'additive' is unknown; use one of multiply, add"):
        run_pass(ir, "reparam_shiftadd", attention="additive")
    with pytest.raises(ConfigError, match="finetune=true.*allow_untrained_add_attention"):
        run_pass(ir, "reparam_shiftadd", attention="add")
    with pytest.raises(ConfigError, match="layers 'none' with attention 'multiply'"):
        run_pass(ir, "reparam_shiftadd", layers="none")
    with pytest.raises(ConfigError, match="hash_bits"):
        run_pass(ir, "reparam_shiftadd", hash_bits=0, **UNTRAINED)
    # already add-attention and shift-add: nothing left, declines
    once = _add(ir, layers="mlp").ir
    check_declines(once, "reparam_shiftadd", note="no softmax Attention stage", layers="mlp",
                   **UNTRAINED)
    # a model with no attention stage at all
    no_attention = EncoderIR([s for s in ir.clone().stages if not isinstance(s, Attention)],
                             ir.meta)
    check_declines(no_attention, "reparam_shiftadd", note="no softmax Attention stage",
                   layers="none", **UNTRAINED)
    partial = _add(no_attention, layers="mlp")  # the linears still go shift-add, with the note
    assert partial.records[0].modified and len(shift_layers(partial.ir)) == 4
    assert any("no softmax Attention stage" in n for n in partial.records[0].notes)


def test_digits_accuracy_after_finetune(digits_proxy):
    """Bound (measured first, see passes/reparam_shiftadd.py): add-attention alone with the
    pass's default fine-tune (ADD_EPOCHS epochs at the add-attention lr) ends within BOUND
    points of the float model on the held-out digits test split (untrained: chance)."""
    from vitopt.passes.reparam_shiftadd import ADD_EPOCHS
    tuned = run_pass(digits_proxy.ir, "reparam_shiftadd", layers="none", attention="add",
                     finetune=True, progress=False)
    stats = tuned.records[0].stats
    assert stats["finetune"]["epochs"] == ADD_EPOCHS and len(stats["attention"]) == 6
    accuracy = digits_proxy.top1(tuned.ir)
    assert 100 * (digits_proxy.base - accuracy) <= BOUND, (digits_proxy.base, accuracy)


#: Measured 2026-11-27 (benchmarks/shiftadd_accuracy.py, 2 threads): 97.50 % float -> 92.78 %
#: after the default 4-epoch fine-tune (-4.7 points); untrained it is at chance (10 %).
#: Bound: the measured loss + 8 images of margin (thread count changes float summation order).
BOUND = 7.0

"""Lifting every supported family into the encoder IR, exactly, and refusing what is not a ViT."""
import pytest
import torch

import model_zoo
from vitopt.errors import NumericsError, UnsupportedModelError
from vitopt.frontend import lift_blocks
from vitopt.frontend.trace import trace
from vitopt.ir import Attention, Head, Mlp, Pool, Stem, TracedTail

EXPECTED = {
    # family: (prefix tokens, pooling or tail, output kind)
    "timm_vit": (1, "cls", "logits"),
    "timm_vit_mean_pool": (0, "mean", "logits"),
    "timm_vit_registers": (4, "cls", "logits"),
    "timm_deit_distilled": (2, "tail", "logits"),
    "hf_vit": (1, "cls", "logits"),
    "hf_deit": (1 + 1, "cls", "logits"),
    "hf_clip_vision": (1, "cls", "features"),
    "hf_siglip_vision": (0, "map", "features"),
    "timm_vit_map": (0, "map", "logits"),
    "hf_dinov2": (1, "cls", "features"),
    "torchvision_vit": (1, "cls", "logits"),
    "user_vit": (1, "cls", "logits"),
}


@pytest.mark.parametrize("family", sorted(model_zoo.FAMILIES))
def test_lift_structure(family, traced_family):
    _, _, ir = traced_family(family)
    prefix, pooling, output = EXPECTED[family]
    assert isinstance(ir.stages[0], Stem)
    assert ir.num_prefix_tokens == prefix
    assert ir.num_blocks == 2
    kinds = [type(s) for s in ir.stages[1:5]]
    assert kinds == [Attention, Mlp, Attention, Mlp]
    assert ir.attention_stages()[0].num_heads == 3
    pool = ir.pool()
    assert (pool.pool if pool else "tail") == pooling
    if pooling == "tail":
        assert isinstance(ir.stages[-1], TracedTail)
    else:
        assert isinstance(ir.stages[-1], Head)
    assert ir.meta.output == output
    assert ir.token_counts()[1] == 25 + prefix  # 20x20 image, 4x4 patches


@pytest.mark.parametrize("family", sorted(model_zoo.FAMILIES))
@pytest.mark.parametrize("batch", [1, 3])
def test_lift_matches_model(family, batch, traced_family):
    model, example, ir = traced_family(family)
    images = torch.randn(batch, *example.shape[1:])
    with torch.no_grad():
        expected = model(images)
        if not isinstance(expected, torch.Tensor):
            expected = expected[0] if isinstance(expected, tuple) else next(
                getattr(expected, k) for k in ("logits", "pooler_output") if getattr(expected, k, None) is not None)
        got = ir(images)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_hf_separate_projections_and_layer_scale(traced_family):
    _, _, ir = traced_family("hf_dinov2")
    attn = ir.attention_stages()[0]
    assert attn.qkv is None and attn.q is not None
    assert attn.layer_scale is not None and ir.mlp_stages()[0].layer_scale is not None


def test_quick_gelu_and_tanh_gelu_recognised(traced_family):
    assert traced_family("hf_clip_vision")[2].mlp_stages()[0].act == "quick_gelu"
    assert traced_family("hf_siglip_vision")[2].mlp_stages()[0].act == "gelu_tanh"


def test_resnet_is_refused_with_a_clear_message():
    model, example = model_zoo.resnet()
    with pytest.raises(UnsupportedModelError, match="not a Vision Transformer"):
        trace(model, example)


def test_qk_norm_is_refused_naming_the_block():
    import timm
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=20, patch_size=4,
                              embed_dim=36, depth=1, num_heads=3, qk_norm=True).eval()
    with pytest.raises(UnsupportedModelError, match="block 0.*LayerNorm"):
        trace(model, torch.randn(2, 3, 20, 20))


def test_swiglu_mlp_is_refused():
    import timm
    from timm.layers import SwiGLUPacked
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=20, patch_size=4,
                              embed_dim=36, depth=1, num_heads=3, mlp_layer=SwiGLUPacked,
                              act_layer=torch.nn.SiLU).eval()
    with pytest.raises(UnsupportedModelError, match="block 0"):
        trace(model, torch.randn(2, 3, 20, 20))


def test_a_misread_stage_is_named(monkeypatch):
    real = lift_blocks.lift_attention

    def wrong_scale(branch):
        stage = real(branch)
        stage.scale *= 2.0
        return stage

    monkeypatch.setattr("vitopt.frontend.lift.lift_attention", wrong_scale)
    model, example = model_zoo.user_vit()
    with pytest.raises(NumericsError, match=r"stage 1 \(attn0\)"):
        trace(model, example)


def test_ir_tables_count_tokens_and_flops(traced_family):
    _, _, ir = traced_family("timm_vit")
    rows = ir.table()
    assert [r["name"] for r in rows] == ["stem", "attn0", "mlp0", "attn1", "mlp1", "norm", "pool", "head"]
    assert rows[1]["tokens_in"] == 26 and rows[-1]["tokens_in"] == 1
    mlp = ir.mlp_stages()[0]
    assert rows[2]["gflops"] * 1e9 == 2 * 26 * (36 * 144 + 144 * 36)
    assert ir.flops() == sum(round(r["gflops"] * 1e9) for r in rows)
    assert mlp.fc1.out_features == 144

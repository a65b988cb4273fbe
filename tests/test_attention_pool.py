"""Attention pooling (MAP, SigLIP's head) as a typed stage: lifted exactly from Hugging Face and
timm, proportional attention over merged tokens, token reduction and int8 in front of it on the
engines, and a traced tail (with the reason) where the tail is something else."""
import pytest
import torch

from model_zoo import flat_head_vit
from pass_checks import check_engines_match, run_pass
from vitopt.frontend.trace import trace
from vitopt.ir import TracedTail
from vitopt.ir.attention_pool import AttentionPool
from vitopt.ir.reduce import MergeTokens
from vitopt.ir.stages import Mlp, layer_norm_from, linear_from
from vitopt.ir.state import TokenState
from vitopt.pipeline import PassContext, Pipeline, resolve_pipeline


def _pool(dim=12, heads=3, latents=1, reduce="first", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def linear(out, inp):
        return linear_from(torch.randn(out, inp, generator=gen) * inp ** -0.5,
                           torch.randn(out, generator=gen) * 0.1)

    mlp = Mlp(norm=layer_norm_from(torch.rand(dim, generator=gen) + 0.5,
                                   torch.randn(dim, generator=gen), 1e-6, (dim,)),
              fc1=linear(2 * dim, dim), fc2=linear(dim, 2 * dim), act="gelu")
    return AttentionPool(latent=torch.randn(latents, dim, generator=gen), q=linear(dim, dim),
                         kv=linear(2 * dim, dim), proj=linear(dim, dim), num_heads=heads,
                         scale=(dim // heads) ** -0.5, mlp=mlp, reduce=reduce)


@pytest.mark.parametrize("family", ["hf_siglip_vision", "timm_vit_map"])
def test_siglip_attention_pooling_lifts_as_a_typed_stage(family, traced_family):
    _, _, ir = traced_family(family)
    pool = ir.pool()
    assert isinstance(pool, AttentionPool) and pool.pool == "map"
    assert not any(isinstance(s, TracedTail) for s in ir.stages)
    assert (pool.num_heads, pool.head_dim, pool.latent.shape) == (3, 12, (1, 36))
    assert pool.mlp.act == ("gelu_tanh" if family == "hf_siglip_vision" else "gelu")
    assert not any("traced graph" in note for note in ir.meta.notes)
    row = next(r for r in ir.table() if r["kind"] == "pool")
    assert row["tokens_in"] == 25 and row["tokens_out"] == 1 and "attention pooling" in row["detail"]


@pytest.mark.parametrize("latents,reduce", [(1, "first"), (3, "first"), (2, "mean")])
def test_a_merged_token_weighs_like_the_tokens_it_stands_for(latents, reduce):
    """Proportional attention: a row of size s attends exactly like s identical rows."""
    pool = _pool(latents=latents, reduce=reduce)
    x = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(3))
    repeated = torch.cat([x, x[:, 2:3], x[:, 2:3], x[:, 5:6]], dim=1)  # token 2 x3, token 5 x2
    size = torch.ones(2, 7, 1)
    size[:, 2], size[:, 5] = 3, 2
    with torch.no_grad():
        merged = pool(TokenState(x, size=size)).x
        expected = pool(TokenState(repeated)).x
        pool.size_bias = False
        plain = pool(TokenState(x, size=size)).x
    assert merged.shape == (2, 12)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert (plain - expected).abs().max() > 1e-3  # the bias is what makes them equal


def test_bad_attention_pool_shapes_are_clear_errors():
    good = _pool()
    with pytest.raises(ValueError, match=r"latent queries must be \[l, 12\]"):
        AttentionPool(latent=torch.zeros(1, 1, 12), q=good.q, kv=good.kv, proj=good.proj,
                      num_heads=3, scale=0.5, mlp=good.mlp)
    with pytest.raises(ValueError, match="5 heads do not divide the width 12"):
        AttentionPool(latent=torch.zeros(1, 12), q=good.q, kv=good.kv, proj=good.proj,
                      num_heads=5, scale=0.5, mlp=good.mlp)
    with pytest.raises(ValueError, match="fused kv"):
        AttentionPool(latent=torch.zeros(1, 12), q=good.q, kv=good.q, proj=good.proj,
                      num_heads=3, scale=0.5, mlp=good.mlp)
    with pytest.raises(ValueError, match="unknown latent reduction 'max'"):
        AttentionPool(latent=torch.zeros(1, 12), q=good.q, kv=good.kv, proj=good.proj,
                      num_heads=3, scale=0.5, mlp=good.mlp, reduce="max")


def test_other_tails_stay_traced_with_the_reason():
    model, images = flat_head_vit()
    ir = trace(model, images)
    assert isinstance(ir.stages[-1], TracedTail)
    assert any("not typed as attention pooling: expected one attention op after the last block, "
               "found 0" in note for note in ir.meta.notes)


@pytest.mark.parametrize("family", ["hf_siglip_vision", "timm_vit_map"])
def test_merging_runs_before_attention_pooling_on_the_engines(family, traced_family, tmp_path):
    _, images, ir = traced_family(family)
    result = run_pass(ir, "merge_tokens", r=4, proportional_attention=True)
    assert result.records[0].modified, result.records[0].notes
    kinds = [s.kind for s in result.ir.stages]
    assert kinds.count("merge") == 2 and kinds.index("merge") < kinds.index("pool")
    assert result.ir.token_counts()[kinds.index("pool")] == 25 - 8
    assert result.ir.pool().size_bias
    off = run_pass(ir, "merge_tokens", r=4, proportional_attention=False).ir
    assert not off.pool().size_bias
    check_engines_match(result.ir, images, tmp_path)


def test_merged_int8_with_attention_pooling_runs_on_the_engines(traced_family, tmp_path):
    _, images, ir = traced_family("timm_vit_map")
    specs = resolve_pipeline("none", ["merge_tokens:r=3", "quantize_int8"])
    calib = torch.randn(16, *images.shape[1:], generator=torch.Generator().manual_seed(1))
    out = Pipeline(specs).run(ir, context=PassContext(calib=calib)).ir
    assert any(isinstance(s, MergeTokens) for s in out.stages)
    assert isinstance(out.pool(), AttentionPool)
    check_engines_match(out, images, tmp_path, precision="int8")

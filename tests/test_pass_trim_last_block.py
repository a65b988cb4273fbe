import torch

from pass_checks import check_declines, check_engines_match, check_exact_pass, run_pass
from vitopt.ir.add_attention import AddAttention
from vitopt.ir.reduce import MergeTokens
from vitopt.pipeline import PassContext, Pipeline, resolve_pipeline


def _trimmed(ir):
    last = ir.attention_stages()[-1]
    assert last.query_tokens == 1
    index = list(ir.stages).index(last)
    assert ir.token_counts()[index + 1] == 1  # everything after the last attention: one row


def test_trim_is_exact_and_cuts_the_last_blocks_flops(traced_family):
    _, images, ir = traced_family("timm_vit")
    check_exact_pass(ir, "trim_last_block", _trimmed, images)
    result = run_pass(ir, "trim_last_block")
    last = ir.attention_stages()[-1]
    tokens = ir.token_counts()[list(ir.stages).index(last)]
    # the last block's keys/values still see every token; its q, proj and MLP one row
    saved = ir.flops() - result.ir.flops()
    assert 0 < saved < last.flops(tokens) + ir.mlp_stages()[-1].flops(tokens)
    assert result.records[0].stats["keys"] == tokens


def test_trim_removes_the_last_merge_and_keeps_the_output(traced_family):
    _, images, ir = traced_family("timm_vit")
    merged = run_pass(ir, "merge_tokens", r=2).ir
    last_block = merged.attention_stages()[-1].block
    assert any(isinstance(s, MergeTokens) and s.block == last_block for s in merged.stages)
    result = run_pass(merged, "trim_last_block")
    trimmed = result.ir
    assert not any(isinstance(s, MergeTokens) and s.block == last_block for s in trimmed.stages)
    assert result.records[0].stats["removed_reductions"] == 1
    assert not trimmed.attention_stages()[-1].record_keys
    trimmed.check()
    with torch.no_grad():
        assert torch.allclose(trimmed(images), merged(images), atol=1e-5)
    # merging after the trim would merge rows nobody reads: it declines and says what to do
    check_declines(run_pass(ir, "trim_last_block").ir, "merge_tokens", "run merge_tokens first",
                   r=2)


def test_trim_works_on_add_attention(traced_family):
    _, images, ir = traced_family("timm_vit")
    ir = ir.clone()
    last = ir.attention_stages()[-1]
    gen = torch.Generator().manual_seed(0)
    swapped = AddAttention(last, torch.randn(last.num_heads, last.head_dim, 8, generator=gen),
                           torch.zeros(last.num_heads, 8))
    ir.stages[list(ir.stages).index(last)] = swapped
    check_exact_pass(ir, "trim_last_block", _trimmed, images)


def test_trimmed_int8_engines_match_the_reference(traced_family, tmp_path):
    _, images, ir = traced_family("timm_vit")
    specs = resolve_pipeline("lossless", ["quantize_int8"])
    assert [s.name for s in specs[-2:]] == ["trim_last_block", "quantize_int8"]
    calib = torch.randn(16, *images.shape[1:], generator=torch.Generator().manual_seed(1))
    quantized = Pipeline(specs).run(ir, context=PassContext(calib=calib)).ir
    _trimmed(quantized)
    check_engines_match(quantized, images, tmp_path, precision="int8")


def test_trim_declines_when_the_output_reads_every_token(traced_family):
    _, _, mean_pool = traced_family("timm_vit_mean_pool")
    check_declines(mean_pool, "trim_last_block", "more than the class token")
    _, _, siglip = traced_family("hf_siglip_vision")
    check_declines(siglip, "trim_last_block", "pooling 'map'")
    from model_zoo import flat_head_vit
    from vitopt.frontend.trace import trace
    check_declines(trace(*flat_head_vit()), "trim_last_block", "traced tail")

"""prune_tokens (EViT): the stage against a plain reference, structure, ranking signal, every model
family on ONNX Runtime and OpenVINO, identity, declines, bad options."""
import pytest
import torch

from model_zoo import FAMILIES
from pass_checks import (check_declines, check_engines_match, check_identity, check_lossy_pass,
                         check_runs_or_declines,
                         run_pass)
from vitopt.errors import ConfigError
from vitopt.ir.reduce import TIE_STEP, PruneTokens
from vitopt.ir.state import TokenState
from vitopt.pipeline import PassSpec, Pipeline, resolve_pipeline

FAMILY_NAMES = [name for name in FAMILIES if name != "resnet"]
DECLINES = {}  # every family prunes (SigLIP's attention pooling lifts as a typed stage)


def naive_prune(x, size, attn, prefix, keep, fuse):
    """EViT's token reorganisation (Liang et al. 2022, §3.2), one image at a time: keep the `keep`
    patch tokens with the most class attention (most attended first), fuse the others into their
    attention-weighted average (normalised; its size is the sum of theirs)."""
    xs, sizes = [], []
    for b in range(x.shape[0]):
        n = x.shape[1]
        s = size[b, :, 0] if size is not None else None
        # Ranked by attention; ties and near-ties (index x TIE_STEP) go to the lower index.
        keys = attn[b, prefix:] - torch.arange(n - prefix, dtype=attn.dtype) * TIE_STEP
        ranked = sorted(range(prefix, n), key=lambda t: -float(keys[t - prefix]))
        kept, dropped = ranked[:keep], ranked[keep:]
        rows = [x[b, t] for t in list(range(prefix)) + kept]
        row_sizes = [s[t] for t in list(range(prefix)) + kept] if s is not None else []
        if fuse:
            w = torch.stack([attn[b, t] for t in dropped])
            rows.append((w[:, None] * x[b, dropped]).sum(0) / w.sum())
            if s is not None:
                row_sizes.append(s[dropped].sum())
        xs.append(torch.stack(rows))
        sizes.append(torch.stack(row_sizes) if row_sizes else None)
    return torch.stack(xs), (torch.stack(sizes).unsqueeze(-1) if size is not None else None)


@pytest.mark.parametrize("prefix,tokens,keep,fuse,sized", [
    (1, 26, 13, True, False), (0, 25, 7, True, True), (4, 29, 20, False, False), (2, 27, 1, True, True)])
def test_prune_stage_matches_the_paper_reference(prefix, tokens, keep, fuse, sized):
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(3, tokens, 7, generator=gen)
    attn = torch.rand(3, tokens, generator=gen).softmax(dim=-1)
    size = torch.randint(1, 5, (3, tokens, 1), generator=gen).float() if sized else None
    stage = PruneTokens(tokens_in=tokens, keep=keep, num_prefix_tokens=prefix, fuse=fuse, embed_dim=7)
    out = stage(TokenState(x, size=size, cls_attn=attn))
    ref_x, ref_size = naive_prune(x, size, attn, prefix, keep, fuse)
    assert out.x.shape == (3, stage.tokens_out(tokens), 7) == ref_x.shape
    torch.testing.assert_close(out.x, ref_x, rtol=1e-5, atol=1e-5)
    if sized:
        torch.testing.assert_close(out.size, ref_size)
        if fuse:  # every original token is still counted once
            torch.testing.assert_close(out.size.sum(1), size.sum(1))
    else:
        assert out.size is None
    assert out.cls_attn is None


def test_prune_tokens_structure_and_signal(traced_family):
    _, images, ir = traced_family("timm_vit")

    def structure(new):
        assert [s.kind for s in new.stages][:7] == ["stem", "attn", "prune", "mlp", "attn", "prune", "mlp"]
        assert all(a.record_cls_attn and a.cls_attn_query == "cls" for a in new.attention_stages())
        rows = {row["name"]: row for row in new.table()}
        assert (rows["prune0"]["tokens_in"], rows["prune0"]["tokens_out"]) == (26, 1 + 13 + 1)
        assert (rows["prune1"]["tokens_in"], rows["prune1"]["tokens_out"]) == (15, 1 + 7 + 1)

    result = check_lossy_pass(ir, "prune_tokens", structure, images, keep_rate=0.5)
    assert "class-token attention" in result.records[0].notes[0]
    assert result.records[0].stats["keep_per_block"] == [13, 7]


def test_prune_without_class_token_ranks_by_the_mean_query(traced_family):
    _, images, ir = traced_family("timm_vit_mean_pool")
    result = run_pass(ir, "prune_tokens", keep_rate=0.6, blocks=(1,), fuse=False)
    note = result.records[0].notes[0]
    assert "mean-query attention" in note and "blocks [1]" in note
    attention = result.ir.attention_stages()[1]
    assert attention.cls_attn_query == "mean" and not result.ir.attention_stages()[0].record_cls_attn
    assert [s.kind for s in result.ir.stages].count("prune") == 1


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prune_tokens_runs_on_every_engine(family, traced_family, tmp_path):
    _, images, ir = traced_family(family)
    check_runs_or_declines(ir, "prune_tokens", images, tmp_path, DECLINES, family, keep_rate=0.6)


def test_prune_after_merge_carries_sizes(traced_family, tmp_path):
    _, images, ir = traced_family("timm_vit_mean_pool")
    result = Pipeline([PassSpec("merge_tokens", {"schedule": (4, 0)}),
                       PassSpec("prune_tokens", {"keep_rate": 0.5, "blocks": (1,)})]).run(ir)
    assert [r.modified for r in result.records] == [True, True]
    assert [s.kind for s in result.ir.stages][1:8] == ["attn", "merge", "mlp", "attn", "prune", "mlp", "pool"]
    check_engines_match(result.ir, images, tmp_path)


def test_prune_identity_setting_declines(traced_family):
    _, images, ir = traced_family("timm_vit")
    check_identity(ir, "prune_tokens", images, "keep_rate 1.0", keep_rate=1.0)
    check_identity(ir, "prune_tokens", images, "removes no token", keep_rate=0.99)


def test_prune_declines_where_it_cannot_apply(traced_family):
    from model_zoo import hf_dinov2
    from vitopt.frontend.trace import trace
    from model_zoo import flat_head_vit
    model, images = flat_head_vit()  # a head over every token flattened: count baked in
    check_declines(trace(model, images), "prune_tokens", "bakes in the token count")
    model, images = hf_dinov2()
    check_declines(trace(model, images, output="last_hidden_state"), "prune_tokens", "token sequence")
    _, _, ir = traced_family("timm_vit")
    pruned = run_pass(ir, "prune_tokens").ir
    check_declines(pruned, "prune_tokens", "already prunes")


@pytest.mark.parametrize("option,match", [
    ("keep_rate=0", r"in \(0, 1\]"), ("keep_rate=1.5", r"in \(0, 1\]"), ("keep_rate=-0.2", r"in \(0, 1\]"),
    ("blocks=-1", "0-based"), ("blocks=1,1", "repeated"), ("fuse=maybe", "not a valid bool"),
])
def test_bad_prune_options_are_config_errors(option, match):
    with pytest.raises(ConfigError, match=match):
        resolve_pipeline("none", [f"prune_tokens:{option}"])


def test_prune_block_out_of_range_is_a_config_error(traced_family):
    _, _, ir = traced_family("timm_vit")
    with pytest.raises(ConfigError, match="block 5 is out of range; this model has blocks 0..1"):
        run_pass(ir, "prune_tokens", blocks=(5,))


def test_ir_invariants_catch_a_prune_without_attention_row(traced_family):
    _, _, ir = traced_family("timm_vit")
    pruned = run_pass(ir, "prune_tokens", keep_rate=0.5).ir
    pruned.attention_stages()[0].record_cls_attn = False
    with pytest.raises(ValueError, match="prune0 reads cls_attn"):
        pruned.check()


def test_prune_declines_before_an_existing_reduction(traced_family):
    _, _, ir = traced_family("timm_vit")
    merged = run_pass(ir, "merge_tokens", schedule=(0, 2)).ir
    check_declines(merged, "prune_tokens", "can only prune after it", blocks=(0,))
    pruned = run_pass(ir, "prune_tokens", blocks=(1,)).ir
    check_declines(pruned, "merge_tokens", "can only merge after it", r=2)

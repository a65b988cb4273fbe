"""merge_tokens (ToMe): the stage against a plain reference of the paper's algorithm, structure,
every model family on ONNX Runtime and OpenVINO, identity, declines, bad options."""
import pytest
import torch

from model_zoo import FAMILIES
from pass_checks import (check_declines, check_engines_match, check_identity, check_lossy_pass,
                         check_runs_or_declines,
                         run_pass)
from vitopt.errors import ConfigError
from vitopt.ir.reduce import TIE_STEP, MergeTokens
from vitopt.ir.stages import Pool
from vitopt.ir.state import TokenState
from vitopt.pipeline import resolve_pipeline

FAMILY_NAMES = [name for name in FAMILIES if name != "resnet"]
DECLINES = {}  # every family merges (SigLIP's attention pooling lifts as a typed stage)


def naive_merge(x, size, keys, prefix, r):
    """ToMe bipartite soft matching (Bolya et al. 2023, §3), one image at a time, with loops:
    A = every other patch token starting at the first, B = the rest; each A token's best B by
    cosine similarity of keys; the r A tokens with the most similar match merge into it by a
    size-weighted average. Returned in MergeTokens' documented order:
    [prefix | B tokens | unmerged A tokens by ascending similarity]."""
    xs, sizes = [], []
    for b in range(x.shape[0]):
        n = x.shape[1]
        s = size[b, :, 0] if size is not None else torch.ones(n)
        k = keys[b] / keys[b].norm(dim=-1, keepdim=True)
        a_idx, b_idx = list(range(prefix, n, 2)), list(range(prefix + 1, n, 2))
        best = {a: max(b_idx, key=lambda j: (float(k[a] @ k[j]), j)) for a in a_idx}
        score = {a: float(k[a] @ k[best[a]]) for a in a_idx}
        ranked = sorted(a_idx, key=lambda a: score[a] + (a - prefix) // 2 * TIE_STEP)
        unmerged, merged = ranked[:len(a_idx) - r], ranked[len(a_idx) - r:]
        rows, row_sizes = [], []
        for t in range(prefix):
            rows.append(x[b, t]), row_sizes.append(s[t])
        for j in b_idx:
            sources = [a for a in merged if best[a] == j]
            total = s[j] + sum(s[a] for a in sources)
            rows.append((s[j] * x[b, j] + sum(s[a] * x[b, a] for a in sources)) / total)
            row_sizes.append(total)
        for a in unmerged:
            rows.append(x[b, a]), row_sizes.append(s[a])
        xs.append(torch.stack(rows)), sizes.append(torch.stack(row_sizes))
    return torch.stack(xs), torch.stack(sizes).unsqueeze(-1)


@pytest.mark.parametrize("prefix,tokens,r,sized", [(1, 26, 5, False), (0, 25, 12, True),
                                                    (4, 29, 3, True), (2, 27, 1, False)])
def test_merge_stage_matches_the_paper_reference(prefix, tokens, r, sized):
    gen = torch.Generator().manual_seed(tokens)
    x, keys = torch.randn(3, tokens, 7, generator=gen), torch.randn(3, tokens, 5, generator=gen)
    size = torch.randint(1, 5, (3, tokens, 1), generator=gen).float() if sized else None
    stage = MergeTokens(tokens_in=tokens, r=r, num_prefix_tokens=prefix, embed_dim=7, head_dim=5)
    out = stage(TokenState(x, size=size, keys=keys))
    ref_x, ref_size = naive_merge(x, size, keys, prefix, r)
    assert out.x.shape == (3, tokens - r, 7) == ref_x.shape
    torch.testing.assert_close(out.x, ref_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.size, ref_size)
    assert out.keys is None and out.cls_attn is None
    # Size-weighted sums and total size are conserved; prefix tokens pass through untouched.
    s = size if sized else torch.ones(3, tokens, 1)
    torch.testing.assert_close((out.x * out.size).sum(1), (x * s).sum(1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.size.sum(1), s.sum(1))
    assert torch.equal(out.x[:, :prefix], x[:, :prefix])


def test_mean_pooling_after_a_merge_sees_every_original_token():
    gen = torch.Generator().manual_seed(0)
    x, keys = torch.randn(2, 25, 6, generator=gen), torch.randn(2, 25, 4, generator=gen)
    merged = MergeTokens(tokens_in=25, r=12, num_prefix_tokens=0, embed_dim=6, head_dim=4)(
        TokenState(x, keys=keys))
    pooled = Pool("mean", 0)(merged).x
    torch.testing.assert_close(pooled, x.mean(dim=1), rtol=1e-5, atol=1e-5)


def test_merge_tokens_structure_and_table(traced_family):
    _, images, ir = traced_family("timm_vit")

    def structure(new):
        kinds = [s.kind for s in new.stages]
        assert kinds[:7] == ["stem", "attn", "merge", "mlp", "attn", "merge", "mlp"]
        assert all(a.record_keys and a.size_bias for a in new.attention_stages())
        rows = {row["name"]: row for row in new.table()}
        assert (rows["merge0"]["tokens_in"], rows["merge0"]["tokens_out"]) == (26, 23)
        assert (rows["merge1"]["tokens_in"], rows["merge1"]["tokens_out"]) == (23, 20)
        assert rows["mlp0"]["tokens_in"] == 23 and rows["pool"]["tokens_in"] == 20
        assert new.flops() < ir.flops()

    result = check_lossy_pass(ir, "merge_tokens", structure, images, r=3)
    assert result.records[0].stats["r_per_block"] == [3, 3]
    assert "26 -> 20 tokens" in result.records[0].notes[0]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_merge_tokens_runs_on_every_engine(family, traced_family, tmp_path):
    _, images, ir = traced_family(family)
    check_runs_or_declines(ir, "merge_tokens", images, tmp_path, DECLINES, family, r=3)


def test_merge_without_proportional_attention_and_with_a_schedule(traced_family, tmp_path):
    _, images, ir = traced_family("timm_vit_mean_pool")
    off = run_pass(ir, "merge_tokens", schedule=(5, 0), proportional_attention=False)
    assert not any(a.size_bias for a in off.ir.attention_stages())
    assert [s.kind for s in off.ir.stages].count("merge") == 1
    on = run_pass(ir, "merge_tokens", schedule=(5, 0))
    with torch.no_grad():
        assert not torch.allclose(on.ir(images), off.ir(images))
    check_engines_match(off.ir, images, tmp_path)


def test_merge_to_a_flops_budget(traced_family):
    _, _, ir = traced_family("timm_vit")
    result = run_pass(ir, "merge_tokens", flops=0.8)
    assert result.ir.flops() <= 0.8 * ir.flops()
    low = run_pass(ir, "merge_tokens", flops=0.01)  # below reach: merge all it can, and say so
    assert low.records[0].modified and "below what merging reaches" in low.records[0].notes[-1]


def test_merge_identity_settings_decline(traced_family):
    _, images, ir = traced_family("timm_vit")
    check_identity(ir, "merge_tokens", images, "r = 0")
    check_identity(ir, "merge_tokens", images, "r = 0", schedule=(0, 0))
    check_identity(ir, "merge_tokens", images, "r = 0", flops=1.0)


def test_merge_declines_where_it_cannot_apply(traced_family):
    from model_zoo import hf_dinov2
    from vitopt.frontend.trace import trace
    from model_zoo import flat_head_vit
    model, images = flat_head_vit()  # a head over every token flattened: count baked in
    check_declines(trace(model, images), "merge_tokens", "bakes in the token count", r=2)
    model, images = hf_dinov2()
    tokens = trace(model, images, output="last_hidden_state")
    check_declines(tokens, "merge_tokens", "token sequence", r=2)


@pytest.mark.parametrize("option,match", [
    ("r=-1", "non-negative"), ("schedule=1,-2", "non-negative"), ("flops=0", r"\(0, 1\]"),
    ("flops=1.5", r"\(0, 1\]"), ("r=2:flops=0.5", "one of"), ("r=x", "not a valid int"),
])
def test_bad_merge_options_are_config_errors(option, match):
    with pytest.raises(ConfigError, match=match):
        resolve_pipeline("none", [f"merge_tokens:{option}"])


def test_merge_options_that_need_the_ir_are_config_errors(traced_family):
    _, _, ir = traced_family("timm_vit")
    with pytest.raises(ConfigError, match=r"r=13 is too large for block 0.*largest r every block"):
        run_pass(ir, "merge_tokens", r=13)
    with pytest.raises(ConfigError, match="r=9 is too large for block 1, which can merge at most "
                                          "8 of its 16 patch tokens"):
        run_pass(ir, "merge_tokens", r=9)  # 25 patches, 16 left after block 0
    with pytest.raises(ConfigError, match="3 entries but the model has 2 blocks"):
        run_pass(ir, "merge_tokens", schedule=(1, 1, 1))


def test_ir_invariants_catch_a_merge_without_keys(traced_family):
    _, _, ir = traced_family("timm_vit")
    merged = run_pass(ir, "merge_tokens", r=2).ir
    merged.attention_stages()[1].record_keys = False
    with pytest.raises(ValueError, match="merge1 reads keys"):
        merged.check()
    merged = run_pass(ir, "merge_tokens", r=2).ir
    merged.stages[2].r = 3  # now the next merge gets fewer tokens than it was built for
    with pytest.raises(ValueError, match="built for 24 tokens but gets 23"):
        merged.check()


FORBIDDEN_OPS = {"GatherElements", "ScatterElements", "ScatterND", "ArgMax", "ArgMin", "NonZero"}


@pytest.mark.parametrize("name,options", [("merge_tokens", {"r": 3}),
                                          ("prune_tokens", {"keep_rate": 0.5})])
def test_lowered_graph_uses_engine_friendly_ops(name, options, traced_family, tmp_path):
    """Row gathers are GatherND over the flattened batch; no GatherElements (a reference kernel
    in OpenVINO), no scatter, no ArgMax (OpenVINO's TopK(k=1)), no data-dependent shapes."""
    from vitopt.lower.onnx_export import export_onnx, onnx_op_counts
    _, images, ir = traced_family("timm_vit")
    reduced = run_pass(ir, name, **options).ir
    ops = onnx_op_counts(export_onnx(reduced, images, tmp_path / "m.onnx"))
    assert not FORBIDDEN_OPS & set(ops), ops
    assert ops["GatherND"] >= 2 and ops["TopK"] == 2


def test_compile_with_the_balanced_preset_records_the_token_schedule(tmp_path):
    import vitopt
    from model_zoo import timm_vit
    model, _ = timm_vit()
    report = vitopt.compile(model, tmp_path / "m.vitopt", backend="onnxruntime", precision="fp32",
                            preset="balanced", measure=False, image_size=20)
    schedule = report.manifest["token_schedule"]
    names = [row["name"] for row in report.manifest["stages"]]
    assert "merge0" in names and schedule[names.index("pool")] < schedule[1]
    assert [p["name"] for p in report.manifest["passes"]][-2:] == ["merge_tokens",
                                                                    "trim_last_block"]

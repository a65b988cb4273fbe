"""select_patch_tokens: k most-attended patch tokens of a token-sequence output, with positions."""
import pytest
import torch

from pass_checks import check_declines, check_engines_match, check_identity, check_lossy_pass, run_pass
from vitopt.errors import ConfigError
from vitopt.pipeline import resolve_pipeline

TOKEN_FAMILIES = {"hf_dinov2": 1, "hf_siglip_vision": 0, "hf_clip_vision": 1}  # -> prefix tokens


@pytest.fixture(scope="module")
def token_output():
    """Encoders traced with their patch-token output (pooling "none")."""
    import model_zoo
    from vitopt.frontend.trace import trace
    cache = {}

    def get(family):
        if family not in cache:
            model, images = model_zoo.FAMILIES[family]()
            cache[family] = (images, trace(model, images, output="last_hidden_state"))
        return cache[family]
    return get


@pytest.mark.parametrize("family", sorted(TOKEN_FAMILIES))
def test_selected_tokens_are_the_encoders_own_tokens_at_their_positions(family, token_output):
    images, ir = token_output(family)
    prefix = TOKEN_FAMILIES[family]

    def structure(new):
        assert [s.kind for s in new.stages][-3:] == ["select", "pool", "head"]
        return False  # the output shape changes: [B, prefix + k, D + 2]

    result = check_lossy_pass(ir, "select_patch_tokens", structure, images, keep=10)
    with torch.no_grad():
        full, out = ir(images), result.ir(images)
    assert out.shape == (3, prefix + 10, full.shape[-1] + 2)
    assert torch.equal(out[:, :prefix, :-2], full[:, :prefix])
    assert (out[:, :prefix, -2:] == -1).all()
    rows, cols = out[:, prefix:, -2].long(), out[:, prefix:, -1].long()
    index = rows * 5 + cols  # 20x20 images, 4x4 patches: a 5x5 grid
    assert ((rows >= 0) & (rows < 5) & (cols >= 0) & (cols < 5)).all()
    assert (index[:, 1:] > index[:, :-1]).all(), "tokens come back in image order"
    expected = torch.stack([full[b, prefix + index[b]] for b in range(3)])
    torch.testing.assert_close(out[:, prefix:, :-2], expected)
    signal = "class-token" if prefix else "mean-query"
    assert signal in result.records[0].notes[0]


@pytest.mark.parametrize("family", sorted(TOKEN_FAMILIES))
def test_select_patch_tokens_runs_on_every_engine(family, token_output, tmp_path):
    images, ir = token_output(family)
    result = run_pass(ir, "select_patch_tokens", keep_rate=0.5)
    assert result.records[0].modified
    check_engines_match(result.ir, images, tmp_path)


def test_select_without_positions_and_from_an_earlier_block(token_output):
    images, ir = token_output("hf_dinov2")
    result = run_pass(ir, "select_patch_tokens", keep=7, positions=False, block=0)
    assert result.ir.attention_stages()[0].record_cls_attn
    assert not result.ir.attention_stages()[1].record_cls_attn
    with torch.no_grad():
        assert result.ir(images).shape == (3, 8, ir(images).shape[-1])
    assert "[B, 8, D]" in result.records[0].notes[0]


def test_select_identity_and_declines(token_output, traced_family):
    images, ir = token_output("hf_siglip_vision")
    check_identity(ir, "select_patch_tokens", images, "identity")
    check_identity(ir, "select_patch_tokens", images, "identity", keep=25)
    _, _, pooled = traced_family("timm_vit")
    check_declines(pooled, "select_patch_tokens", "not the patch-token sequence", keep=3)


@pytest.mark.parametrize("option,match", [("keep=-1", "count"), ("keep_rate=0", r"\(0, 1\]"),
                                          ("keep=3:keep_rate=0.5", "not both")])
def test_bad_select_options_are_config_errors(option, match):
    with pytest.raises(ConfigError, match=match):
        resolve_pipeline("none", [f"select_patch_tokens:{option}"])


def test_select_options_that_need_the_ir_are_config_errors(token_output):
    _, ir = token_output("hf_dinov2")
    with pytest.raises(ConfigError, match="keep=40 is more than the 25 patch tokens"):
        run_pass(ir, "select_patch_tokens", keep=40)
    with pytest.raises(ConfigError, match="block 2 is out of range"):
        run_pass(ir, "select_patch_tokens", keep=4, block=2)

import pytest

from pass_checks import check_declines, check_exact_pass


@pytest.mark.parametrize("family", ["hf_vit", "hf_clip_vision", "hf_siglip_vision", "hf_dinov2"])
def test_fuse_qkv_is_exact_and_idempotent(family, traced_family):
    _, example, ir = traced_family(family)

    def fused(new):
        for stage in new.attention_stages():
            assert stage.qkv is not None and stage.q is None and stage.k is None and stage.v is None
            assert stage.qkv.out_features == 3 * stage.proj.in_features

    check_exact_pass(ir, "fuse_qkv", fused, example)


def test_fuse_qkv_declines_when_already_fused(traced_family):
    _, _, ir = traced_family("timm_vit")
    check_declines(ir, "fuse_qkv", "already")


def test_fuse_qkv_does_not_touch_its_input(traced_family):
    _, _, ir = traced_family("hf_vit")
    from pass_checks import run_pass
    run_pass(ir, "fuse_qkv")
    assert ir.attention_stages()[0].qkv is None

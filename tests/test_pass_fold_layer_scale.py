import pytest

from pass_checks import check_declines, check_exact_pass


@pytest.mark.parametrize("family", ["hf_dinov2", "timm_vit_registers"])
def test_fold_layer_scale_is_exact_and_idempotent(family, traced_family):
    _, example, ir = traced_family(family)

    def folded(new):
        assert all(s.layer_scale is None for s in new.blocks())

    check_exact_pass(ir, "fold_layer_scale", folded, example)


def test_fold_layer_scale_declines_without_layer_scale(traced_family):
    _, _, ir = traced_family("timm_vit")
    check_declines(ir, "fold_layer_scale", "no stage")

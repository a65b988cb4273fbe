"""int8 on the accuracy proxy: builtin:digits-vit, calibrated on the `calib` split (180 images),
top-1 on the held-out `test` split (360 images). A PROXY (a small ViT trained on scikit-learn
digits), not ImageNet. Naive min/max beside it: benchmarks/quantization.py."""
import pytest
import torch

from vitopt.pipeline import PassContext, PassSpec, Pipeline

MAX_LOSS_POINTS = 0.5
MAX_LOSS_MERGED_POINTS = 1.5  # int8 after the balanced token merging, against fp32 unmerged


@pytest.fixture(scope="module")
def proxy(digits_proxy):
    from vitopt.data.digits import load_digits_split

    calib, _ = load_digits_split("calib")
    return digits_proxy.ir, calib, digits_proxy.images, digits_proxy.top1, digits_proxy.base


@pytest.mark.parametrize("options", [{}, {"method": "percentile"}, {"attention": "qk"}, {"attention": "qkv"}])
def test_int8_loses_at_most_half_a_point(proxy, options):
    ir, calib, images, top1, base = proxy
    context = PassContext(calib=calib, calib_source="builtin:digits calib")
    quantized = Pipeline([PassSpec("quantize_int8", options)]).run(ir, context=context).ir
    assert 100 * (base - top1(quantized)) <= MAX_LOSS_POINTS
    with torch.no_grad():  # and the logits stay close to fp32 (SQNR > 20 dB)
        ref, out = ir(images), quantized(images)
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum())
    assert sqnr > 20, sqnr


def test_int8_after_balanced_merging_loses_at_most_one_and_a_half_points(proxy):
    """The balanced preset (token merging) then int8, calibrated on the merged IR, against the
    unmerged fp32 model; merging's averaged keys run as int8 GEMMs too (merge_key_proj)."""
    from vitopt.ir.quant import QuantLinear
    from vitopt.pipeline import resolve_pipeline
    ir, calib, images, top1, base = proxy
    context = PassContext(calib=calib, calib_source="builtin:digits calib")
    merged = Pipeline(resolve_pipeline("balanced", ["quantize_int8"])).run(ir, context=context).ir
    merging = [s for s in merged.attention_stages() if s.record_keys]
    assert merging and all(isinstance(s.merge_key_proj, QuantLinear) for s in merging)
    assert 100 * (base - top1(merged)) <= MAX_LOSS_MERGED_POINTS


def with_outlier_channels(ir, factor=300.0):
    """The same function with LayerNorm outlier channels (as in large trained ViTs): channel 0
    of every pre-norm LayerNorm x factor, the next linears' input column 0 / factor."""
    ir = ir.clone()
    with torch.no_grad():
        for stage in ir.blocks():
            stage.norm.weight[0] *= factor
            stage.norm.bias[0] *= factor
            for layer in (stage.qkv if hasattr(stage, "qkv") else stage.fc1,):
                layer.weight[:, 0] /= factor
    return ir


def test_balancing_rescues_outlier_channels_and_budget_falls_back(proxy):
    ir, calib, images, top1, base = proxy
    outliers = with_outlier_channels(ir)
    assert abs(top1(outliers) - base) < 1e-9  # the same function in fp32
    context = PassContext(calib=calib)
    naive = Pipeline([PassSpec("quantize_int8", {"smooth": False, "method": "minmax"})]).run(
        outliers, context=context).ir
    vitopt = Pipeline([PassSpec("quantize_int8")]).run(outliers, context=context).ir
    assert 100 * (base - top1(vitopt)) <= MAX_LOSS_POINTS
    naive_drop = 100 * (base - top1(naive))
    assert naive_drop > 5 * MAX_LOSS_POINTS, naive_drop
    # the budget returns the most sensitive layers to fp32 until inside it (decided on calib)
    from vitopt.data.digits import load_digits_split
    calib_images, calib_labels = load_digits_split("calib")
    context = PassContext(calib=calib, eval_images=calib_images, eval_labels=calib_labels)
    spec = PassSpec("quantize_int8", {"smooth": False, "method": "minmax", "max_accuracy_drop": 0.5})
    result = Pipeline([spec]).run(outliers, context=context)
    stats = result.records[0].stats
    budget = [n for n, why in stats["fallback"].items() if why.startswith("accuracy budget")]
    sqnr = {n: row["sqnr_db"] for n, row in stats["layers"].items()}
    kept_int8 = [v for n, v in sqnr.items() if n not in budget]
    assert budget and max(sqnr[n] for n in budget) <= min(kept_int8) + 0.01  # lowest SQNR first
    assert 100 * (base - top1(result.ir)) < naive_drop

"""Token reduction on the accuracy proxy: builtin:digits-vit, held-out `test` split (360 images).

A PROXY (a small ViT trained on scikit-learn digits), not ImageNet: it bounds what the passes
cost a trained ViT. The numbers behind these bounds: benchmarks/token_reduction.py.
"""
import pytest

from vitopt.pipeline import PassSpec, Pipeline, run_pipeline

MAX_LOSS_POINTS = 1.0


@pytest.fixture(scope="module")
def proxy(digits_proxy):
    return digits_proxy.ir, digits_proxy.top1, digits_proxy.base


def loss_points(top1, base, reduced):
    return 100 * (base - top1(reduced))


def test_balanced_preset_loses_at_most_one_point(proxy):
    ir, top1, base = proxy
    result = run_pipeline(ir, "balanced")
    merge = next(r for r in result.records if r.name == "merge_tokens")
    assert merge.modified and merge.gflops_after < 0.8 * merge.gflops_before, merge.notes
    assert loss_points(top1, base, result.ir) <= MAX_LOSS_POINTS


@pytest.mark.parametrize("name,options", [
    ("merge_tokens", {"r": 8}),                 # 65 -> 17 tokens, FLOPs x0.63
    ("prune_tokens", {"keep_rate": 0.8}),       # EViT placement: blocks 1, 3, 4
])
def test_realistic_settings_stay_within_a_point(proxy, name, options):
    ir, top1, base = proxy
    reduced = Pipeline([PassSpec(name, options)]).run(ir).ir
    assert reduced.flops() < 0.8 * ir.flops()
    assert loss_points(top1, base, reduced) <= MAX_LOSS_POINTS

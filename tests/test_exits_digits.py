"""Early exits on the digits proxy: trained heads, calibrated thresholds, held-out accuracy.

Heads train on the `train` split, thresholds are picked on `calib`, top-1 is measured on
`test` (used for neither). Bound: at most 1.0 point top-1 lost at the default budget.
"""
import functools

import pytest
import torch

from vitopt.pipeline import PassSpec, Pipeline

BUDGET = 1.0  # CompileOptions.exit_accuracy_drop's default


@functools.lru_cache(maxsize=None)
def digits_ir():
    from vitopt.data.digits import load_digits_split
    from vitopt.data.proxy import trace_digits_vit
    images, _ = load_digits_split("train")
    return trace_digits_vit(images[:2])


@pytest.fixture(scope="module")
def trained():
    from vitopt.data.digits import load_digits_split
    from vitopt.exits.train import train_heads
    ir = Pipeline([PassSpec("insert_exit_heads")]).run(digits_ir()).ir
    images, labels = load_digits_split("train")
    stats = train_heads(ir, images, labels, seed=0)
    return ir, stats


def test_calibrated_exits_lose_at_most_one_point_on_the_held_out_split(trained):
    from vitopt.data.digits import load_digits_split
    from vitopt.exits.calibrate import calibrate_thresholds
    from vitopt.exits.segments import run_with_exits
    ir, stats = trained
    ir = ir.clone()
    assert stats["loss"][-1] < stats["loss"][0] and min(stats["train_agreement"]) > 0.8
    calib = calibrate_thresholds(ir, *load_digits_split("calib"), BUDGET)
    assert calib["changed_points"] <= BUDGET and calib["compute_fraction"] < 0.9
    images, labels = load_digits_split("test")
    with torch.no_grad():
        full = (ir(images).argmax(1) == labels).float().mean().item()
    out, taken = run_with_exits(ir, images)
    top1 = (out.argmax(1) == labels).float().mean().item()
    assert 100 * (full - top1) <= 1.0, (full, top1, calib["thresholds"])
    assert (taken < len(calib["thresholds"])).mean() > 0.3  # exits really happen


def test_thresholds_that_never_exit_give_the_model_exactly(trained):
    from vitopt.data.digits import load_digits_split
    from vitopt.exits.segments import run_with_exits
    ir, _ = trained
    images, _ = load_digits_split("calib")
    with torch.no_grad():
        out, taken = run_with_exits(ir, images)  # fresh heads never exit until calibrated
        assert torch.equal(out, digits_ir()(images)) and (taken == 2).all()


def test_head_training_is_deterministic_with_a_seed():
    from vitopt.data.digits import load_digits_split
    from vitopt.exits.train import train_heads
    from vitopt.ir.exits import exit_stages
    images, labels = load_digits_split("train")
    images, labels = images[:96], labels[:96]
    weights = []
    for seed in (3, 3, 4):
        ir = Pipeline([PassSpec("insert_exit_heads", {"blocks": (3,)})]).run(digits_ir()).ir
        train_heads(ir, images, labels, epochs=1, seed=seed)
        weights.append(exit_stages(ir)[0].fc.weight.detach().clone())
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])

"""vitopt.schedule: static token schedules from a constant r, a keep ratio, a FLOPs budget or a
measured speedup."""
import pytest

from pass_checks import run_pass
from vitopt.errors import ConfigError
from vitopt.schedule import (Schedule, clipped_constant, default_prune_blocks, for_flops,
                             max_constant_r, merge_limits, merge_plan_flops, merge_schedule,
                             prune_keep_rate, schedule_for_speedup)


def test_constant_schedules_clip_where_a_block_runs_out(traced_family):
    _, _, ir = traced_family("timm_vit")  # 25 patches, 2 blocks
    assert clipped_constant(ir, 3) == [3, 3]
    assert clipped_constant(ir, 11) == [11, 7]
    assert merge_limits(ir, [11, 7]) == [12, 7]
    assert max_constant_r(ir) == 8


def test_plan_flops_match_the_merged_ir(traced_family):
    _, _, ir = traced_family("hf_deit")
    for rs in ([3, 3], [5, 0], [0, 6]):
        merged = run_pass(ir, "merge_tokens", schedule=tuple(rs)).ir
        assert merge_plan_flops(ir, rs) == merged.flops()


def test_merge_schedule_targets(traced_family):
    _, _, ir = traced_family("timm_vit")
    base = ir.flops()
    assert merge_schedule(ir, r=4) == [4, 4]
    assert 25 - sum(merge_schedule(ir, keep=0.5)) <= 13
    rs = merge_schedule(ir, flops=0.8)
    assert merge_plan_flops(ir, rs) <= 0.8 * base
    milder = clipped_constant(ir, rs[0] - 1)
    assert merge_plan_flops(ir, milder) > 0.8 * base, "the mildest schedule inside the budget"
    assert merge_schedule(ir, flops=0.8, max_rate=0.1, strict=False) == [2, 2]  # capped: r <= 2
    with pytest.raises(ConfigError, match=r"with r <= 2 \(max_rate 0.1\)"):
        merge_schedule(ir, flops=0.8, max_rate=0.1)
    with pytest.raises(ConfigError, match="cannot bring this model to 10% of its FLOPs"):
        merge_schedule(ir, flops=0.1)
    most = merge_schedule(ir, flops=0.1, strict=False)
    assert all(merge_plan_flops(ir, most) <= merge_plan_flops(ir, clipped_constant(ir, r)) for r in range(26))
    with pytest.raises(ConfigError, match="exactly one"):
        merge_schedule(ir, r=2, flops=0.5)


def test_prune_keep_rate_for_a_budget(traced_family):
    _, _, ir = traced_family("timm_vit")
    assert default_prune_blocks(12) == [3, 6, 9] and default_prune_blocks(2) == [0, 1]
    rate = prune_keep_rate(ir, flops=0.7)
    pruned = run_pass(ir, "prune_tokens", keep_rate=rate).ir
    assert pruned.flops() <= 0.7 * ir.flops()
    looser = run_pass(ir, "prune_tokens", keep_rate=round(rate + 0.01, 2)).ir
    assert looser.flops() > 0.7 * ir.flops()


def test_for_flops_gives_a_runnable_schedule(traced_family):
    _, images, ir = traced_family("timm_vit_mean_pool")
    schedule = for_flops(ir, 0.75, "merge_tokens")
    assert isinstance(schedule, Schedule) and schedule.flops_ratio <= 0.75
    assert schedule.option_text().startswith("merge_tokens:schedule=")
    reduced = run_pass(ir, schedule.pass_name, **schedule.options).ir
    assert reduced.token_counts() == schedule.tokens
    assert for_flops(ir, 0.75, "prune_tokens").flops_ratio <= 0.75
    with pytest.raises(ConfigError, match="no schedule search"):
        for_flops(ir, 0.75, "fuse_qkv")


def test_schedule_for_speedup_measures_on_the_backend(traced_family):
    _, _, ir = traced_family("timm_vit")
    try:
        schedule = schedule_for_speedup(ir, 1.01, backend="onnxruntime", precision="fp32", batch=2,
                                        runs=3, budgets=(0.7,))
    except ConfigError as exc:  # tiny model: timing noise may hide the gain; the error says so
        assert "no merge_tokens schedule reached 1.01x" in str(exc)
    else:
        assert schedule.speedup >= 1.01 and schedule.baseline_ms > 0 and schedule.flops_ratio <= 0.7
    with pytest.raises(ConfigError, match="above 1"):
        schedule_for_speedup(ir, 0.9)

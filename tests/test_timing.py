"""vitopt.timing: interleaved rounds and the paired-by-round ratio (no speed is asserted: the
callables here are counters and fixed sample lists)."""
import pytest

from vitopt.timing import measure_interleaved, measure_rounds, paired_ratio, summarize


def test_measure_rounds_alternates_callables_round_by_round():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    by_round = measure_rounds(fns, warmup=1, runs=2, rounds=3)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert [len(r) for r in by_round["a"]] == [2, 2, 2]
    assert measure_interleaved(fns, warmup=0, runs=2, rounds=3)["b"].runs == 6


def test_paired_ratio_cancels_drift_between_rounds():
    # The machine gets 3x slower in the last rounds: both callables slow down alike.
    slow = [[20.0, 21.0], [20.0, 22.0], [60.0, 61.0], [60.0, 62.0], [60.0, 60.0]]
    fast = [[10.0, 10.5], [10.0, 11.0], [30.0, 30.5], [30.0, 31.0], [30.0, 30.0]]
    paired = paired_ratio(slow, fast)
    assert paired["median"] == pytest.approx(2.0, rel=1e-6)
    assert paired["rounds"] == 5
    assert paired["p10"] <= paired["median"] <= paired["p90"]
    # Drift concentrated on one callable's share of the samples skews the ratio of medians.
    fast_drifted = [[10.0, 10.5], [10.0, 11.0], [10.0, 10.5], [30.0, 31.0], [30.0, 30.0]]
    overall = (summarize([m for r in slow for m in r], 0).median_ms
               / summarize([m for r in fast_drifted for m in r], 0).median_ms)
    assert overall != pytest.approx(paired_ratio(slow, fast_drifted)["median"])


def test_paired_ratio_refuses_unpaired_rounds():
    with pytest.raises(ValueError, match="same rounds"):
        paired_ratio([[1.0]], [[1.0], [2.0]])
    with pytest.raises(ValueError, match="same rounds"):
        paired_ratio([], [])

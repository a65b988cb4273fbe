"""Exit rules, threshold domains and the segmented engine's batch compaction (fake engines)."""
import math

import numpy as np
import pytest

from vitopt.errors import ConfigError
from vitopt.exits.rules import Carry, check_thresholds, decide, first_exits, never_threshold, scores
from vitopt.segmented import SegmentedEngine


def test_confidence_and_entropy_scores():
    logits = np.array([[0.0, 0.0], [10.0, 0.0]])
    assert np.allclose(scores("confidence", logits), [0.5, 1 / (1 + math.exp(-10))])
    assert np.allclose(scores("entropy", logits)[0], math.log(2))
    assert scores("entropy", np.array([[1e4, 0.0]]))[0] == 0.0


@pytest.mark.parametrize("rule", ["confidence", "entropy", "patience"])
def test_never_thresholds_never_exit(rule):
    logits = [np.array([[100.0, 0.0], [0.0, 100.0]])] * 3
    never = [never_threshold(rule, 3)] * 3
    assert (first_exits(rule, logits, never) == 3).all()


def test_patience_counts_agreeing_exits_per_sample():
    a = np.array([[1.0, 0.0], [1.0, 0.0]])
    b = np.array([[1.0, 0.0], [0.0, 1.0]])
    stop, carry = decide("patience", a, 2, Carry())
    assert not stop.any()
    stop, carry = decide("patience", b, 2, carry)
    assert stop.tolist() == [True, False] and carry.count.tolist() == [2, 1]
    assert first_exits("patience", [a, b, b], [2, 2, 2]).tolist() == [1, 2]


@pytest.mark.parametrize("rule,values,match", [
    ("confidence", [1.5], r"outside \[0, 1\]"), ("confidence", [-0.1], r"outside \[0, 1\]"),
    ("entropy", [-0.2], "outside"), ("entropy", [3.0], r"ln 10"),
    ("patience", [0.0], "integer >= 1"), ("patience", [1.5], "integer >= 1"),
    ("confidence", [0.5, 0.5], "2 exit thresholds given for 1"), ("confidence", [float("nan")], "finite"),
    ("nearest", [0.5], "unknown exit rule"),
])
def test_thresholds_outside_their_domain_are_config_errors(rule, values, match):
    with pytest.raises(ConfigError, match=match):
        check_thresholds(rule, values, 1, 10)


class FakeEngine:
    """Segment k of a toy model: tokens are per-sample ids; exit logits say 'confident' for ids
    listed in `confident`. Records the batch it was given."""

    backend, precision = "fake", "fp32"

    def __init__(self, confident, last=False):
        self.confident, self.last, self.batches = set(confident), last, []

    def run_all(self, inputs):
        ids = inputs[0][:, 0].copy()
        self.batches.append(ids.astype(int).tolist())
        # column 0 decides confidence (10: softmax ~1; 0: ~0.5), column 2 names the sample
        logits = np.array([[10.0 if int(i) in self.confident or self.last else 0.0, 0.0, i - 100.0]
                           for i in ids], dtype=np.float32)
        return [logits] if self.last else [logits, inputs[0] + 0.0]


def _engine(confident_per_exit):
    engines = [FakeEngine(c) for c in confident_per_exit] + [FakeEngine((), last=True)]
    return SegmentedEngine(engines, "confidence", [0.9] * len(confident_per_exit)), engines


def test_compaction_runs_survivors_only_and_keeps_the_original_order():
    engine, parts = _engine([{1, 4}, {0, 3}])
    images = np.arange(6, dtype=np.float32).reshape(6, 1)
    out, taken = engine.run_with_exits(images)
    assert taken.tolist() == [1, 0, 2, 1, 0, 2]
    assert parts[0].batches == [[0, 1, 2, 3, 4, 5]]
    assert parts[1].batches == [[0, 2, 3, 5]] and parts[2].batches == [[2, 5]]
    assert (out[:, 2] + 100).tolist() == [0, 1, 2, 3, 4, 5]  # each row is its own sample's output


def test_batch_one_and_nobody_exiting_pass_state_through():
    engine, parts = _engine([set(), set()])
    out, taken = engine.run_with_exits(np.array([[7.0]], dtype=np.float32))
    assert taken.tolist() == [2] and out[0, 2] == 7 - 100
    assert [p.batches for p in parts] == [[[7]], [[7]], [[7]]]


def test_everybody_exiting_at_the_first_head_skips_the_rest():
    engine, parts = _engine([{0, 1, 2}, set()])
    out, taken = engine.run_with_exits(np.arange(3, dtype=np.float32).reshape(3, 1))
    assert taken.tolist() == [0, 0, 0] and parts[1].batches == [] and parts[2].batches == []
    never, _ = engine.never_exiting().run_with_exits(np.arange(3, dtype=np.float32).reshape(3, 1))
    assert never[:, 0].tolist() == [10.0] * 3  # the last segment's answer for everyone


def test_segmented_engine_refuses_a_wrong_threshold_count():
    with pytest.raises(ValueError, match="need 1 thresholds"):
        SegmentedEngine([FakeEngine(()), FakeEngine((), True)], "confidence", [])

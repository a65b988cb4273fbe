"""Exit rules: when a sample may stop at an exit head. numpy only (the runtime needs no torch).

  confidence  exit when the largest softmax probability is > threshold; thresholds in [0, 1],
              1 never exits (a probability is never above 1). (BranchyNet-style; LGViT §3.4.)
  entropy     exit when the softmax entropy (nats) is < threshold; thresholds in [0, ln C],
              0 never exits. (Teerapittayanon et al. 2016, "BranchyNet".)
  patience    exit when the exit's prediction equals the previous exits' for `threshold`
              consecutive exits (this one included); integer thresholds >= 1, a value above the
              number of exits never exits. (Zhou et al. 2020, "BERT Loses Patience", PABEE.)

One threshold per exit head. `decide` works on one exit's logits for the samples still
running and returns which of them stop; `Carry` is the per-sample state patience needs across
exits (the runtime compacts it together with the batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from vitopt.errors import ConfigError

RULES = ("confidence", "entropy", "patience")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def scores(rule: str, logits: np.ndarray) -> np.ndarray:
    """The per-sample score a threshold is compared with (confidence or entropy)."""
    logits = np.asarray(logits, dtype=np.float64)
    if rule == "confidence":
        return softmax(logits).max(axis=1)
    if rule == "entropy":
        z = logits - logits.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return np.maximum(-(np.exp(log_p) * log_p).sum(axis=1), 0.0)
    raise ConfigError(f"rule {rule!r} has no score; rules with scores: confidence, entropy")


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ConfigError(f"unknown exit rule {rule!r}; choose one of {', '.join(RULES)}")
    return rule


def never_threshold(rule: str, num_exits: int) -> float:
    """A threshold at which the rule never exits."""
    check_rule(rule)
    return {"confidence": 1.0, "entropy": 0.0, "patience": float(num_exits + 1)}[rule]


def check_thresholds(rule: str, thresholds: Sequence[float], num_exits: int,
                     num_classes: int) -> Tuple[float, ...]:
    """Validate one threshold per exit for `rule`; ConfigError naming the bad value otherwise."""
    check_rule(rule)
    values = tuple(float(t) for t in thresholds)
    if len(values) != num_exits:
        raise ConfigError(f"{len(values)} exit thresholds given for {num_exits} exit heads; give "
                          f"one per exit")
    top = math.log(num_classes) if num_classes > 1 else 0.0
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise ConfigError(f"exit {index}: threshold {value} is not a finite number")
        if rule == "confidence" and not 0.0 <= value <= 1.0:
            raise ConfigError(f"exit {index}: confidence threshold {value} is outside [0, 1] (a "
                              f"softmax probability); use 1 to never exit")
        if rule == "entropy" and not 0.0 <= value <= top + 1e-9:
            raise ConfigError(f"exit {index}: entropy threshold {value} is outside [0, ln "
                              f"{num_classes} = {top:.4f}] nats; use 0 to never exit")
        if rule == "patience" and (value < 1 or value != int(value)):
            raise ConfigError(f"exit {index}: patience {value} must be an integer >= 1 (exits "
                              f"that must agree in a row); use {num_exits + 1} to never exit")
    return values


@dataclass
class Carry:
    """Per-sample state across exits (patience): last prediction and agreeing-exits count."""

    pred: Optional[np.ndarray] = None
    count: Optional[np.ndarray] = None

    def take(self, keep: np.ndarray) -> "Carry":
        if self.pred is None:
            return self
        return Carry(self.pred[keep], self.count[keep])


def decide(rule: str, logits: np.ndarray, threshold: float, carry: Carry) -> Tuple[np.ndarray, Carry]:
    """(mask of samples that exit here, carry for the samples) for one exit's logits [B, C]."""
    if rule == "confidence":
        return scores(rule, logits) > threshold, carry
    if rule == "entropy":
        return scores(rule, logits) < threshold, carry
    pred = np.asarray(logits).argmax(axis=1)
    if carry.pred is None:
        count = np.ones(pred.shape[0], dtype=np.int64)
    else:
        count = np.where(pred == carry.pred, carry.count + 1, 1)
    return count >= threshold, Carry(pred, count)


def first_exits(rule: str, exit_logits: Sequence[np.ndarray], thresholds: Sequence[float]) -> np.ndarray:
    """For logits of every exit on every sample: the exit each sample takes (len(exits) = none)."""
    n = exit_logits[0].shape[0] if exit_logits else 0
    taken = np.full(n, len(exit_logits), dtype=np.int64)
    carry = Carry()
    for index, (logits, threshold) in enumerate(zip(exit_logits, thresholds)):
        mask, carry = decide(rule, logits, threshold, carry)
        taken = np.where((taken == len(exit_logits)) & mask, index, taken)
    return taken

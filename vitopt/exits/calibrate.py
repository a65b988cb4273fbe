"""Pick exit thresholds that keep top-1 within a budget and save the most compute.

On labelled calibration images (never the held-out test split) every head and the final head
run once; then thresholds are searched on those logits without running the model again:
  * confidence / entropy: one threshold per exit, coordinate search from "never exit": for each
    exit in turn (two sweeps), the candidate (the exit's own calibration scores) that gives the
    least mean compute within the budget.
  * patience: one patience value for all exits (as PABEE), the smallest within budget.
The budget `max_drop` (top-1 points) bounds the share of calibration images whose prediction
differs from the model without exits. That share bounds the top-1 drop on the same images from
above (a changed prediction loses at most one correct answer); budgeting the drop itself let
thresholds count lucky corrections on 180 digits images and lost 1.1 points on the held-out
split where the calibration split showed 0.0; hence also the safety MARGIN below.
Compute is FLOPs per image (backbone up to the exit plus every head run on the way), as a
fraction of the model without exits. `curve` sweeps one common threshold for the report's
accuracy/compute table.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import torch

from vitopt.errors import ConfigError, InputError
from vitopt.exits.rules import check_thresholds, first_exits, never_threshold, scores
from vitopt.exits.segments import all_exit_logits, compute_per_exit, heads_config
from vitopt.ir.exits import exit_stages

CANDIDATES = 96  # thresholds tried per exit (quantiles of its scores)
#: Safety margin: a threshold is accepted only if the budget also holds at a threshold MARGIN
#: looser (confidence - 0.05; entropy + 5 % of ln C), so it never sits at the edge of a cluster
#: of confident mistakes that a small calibration set happened to miss.
MARGIN = 0.05


class ExitTable:
    """Every exit's logits on a labelled set, and the cost of stopping at each exit."""

    def __init__(self, ir, images: torch.Tensor, labels: torch.Tensor):
        if labels is None or labels.numel() != images.shape[0] or (labels < 0).any():
            raise InputError("threshold calibration needs labelled images (one label per image); "
                             "give a folder of class subfolders or builtin:digits")
        exits, final, _ = all_exit_logits(ir, images)
        self.exits = [e.numpy().astype(np.float64) for e in exits]
        self.final = final.numpy().astype(np.float64)
        self.labels = labels.numpy()
        costs, self.total = compute_per_exit(ir)
        self.costs = np.asarray(costs) / self.total
        self.correct = [l.argmax(1) == self.labels for l in self.exits + [self.final]]
        final_pred = self.final.argmax(1)
        self.same = [l.argmax(1) == final_pred for l in self.exits] + [np.ones(len(final_pred), bool)]
        self.reference = float(self.correct[-1].mean())

    def evaluate(self, rule: str, thresholds: Sequence[float]) -> dict:
        taken = first_exits(rule, self.exits, thresholds)
        correct = np.choose(taken, self.correct)
        changed = 1.0 - float(np.choose(taken, self.same).mean())
        counts = np.bincount(taken, minlength=len(self.exits) + 1)
        return {"top1": float(correct.mean()), "changed": changed,
                "compute": float(self.costs[taken].mean()),
                "distribution": (counts / len(taken)).tolist()}


def calibrate_thresholds(ir, images: torch.Tensor, labels: torch.Tensor, max_drop: float,
                         rule: Optional[str] = None) -> dict:
    """Set the heads' thresholds (in place) to meet `max_drop` top-1 points with the least
    compute; returns what was chosen, the resulting distribution and the accuracy curve.
    Thresholds given to insert_exit_heads (`fixed_threshold`) are kept and only evaluated."""
    if max_drop is None or not math.isfinite(max_drop) or max_drop < 0:
        raise ConfigError(f"the exit accuracy budget must be >= 0 top-1 points, got {max_drop!r}")
    heads = exit_stages(ir)
    rule = rule or heads_config(ir)[0]
    table = ExitTable(ir, images, labels)
    budget = max_drop / 100.0 + 1e-12  # allowed fraction of changed predictions
    if all(h.fixed_threshold for h in heads):  # given in the pass options: keep, only evaluate
        thresholds = [h.threshold for h in heads]
    elif rule == "patience":
        thresholds = _patience(table, budget, len(heads))
    else:
        thresholds = _coordinate(table, rule, budget, len(heads))
    check_thresholds(rule, thresholds, len(heads), heads[0].num_classes)
    set_thresholds(ir, rule, thresholds)
    chosen = table.evaluate(rule, thresholds)
    return {"rule": rule, "thresholds": [float(t) for t in thresholds], "budget_points": max_drop,
            "images": int(len(table.labels)), "reference_top1": table.reference,
            "top1": chosen["top1"], "drop_points": 100 * (table.reference - chosen["top1"]),
            "changed_points": 100 * chosen["changed"],
            "compute_fraction": chosen["compute"], "distribution": chosen["distribution"],
            "exit_costs": table.costs.tolist(), "curve": curve(table, rule, len(heads))}


def set_thresholds(ir, rule: str, thresholds: Sequence[float]) -> None:
    heads = exit_stages(ir)
    values = check_thresholds(rule, thresholds, len(heads), heads[0].num_classes if heads else 1)
    for head, value in zip(heads, values):
        head.rule, head.threshold = rule, value


def _candidates(table: ExitTable, rule: str, k: int) -> List[float]:
    values = scores(rule, table.exits[k])
    qs = np.unique(np.quantile(values, np.linspace(0, 1, CANDIDATES)))
    if rule == "confidence":  # exit when score > t: t just below a score lets that sample go
        cands = [1.0] + [float(np.nextafter(q, -np.inf)) for q in qs]
        return [min(1.0, max(0.0, c)) for c in cands]
    top = math.log(table.exits[k].shape[1])
    return [0.0] + [min(top, float(np.nextafter(q, np.inf))) for q in qs]


def _coordinate(table: ExitTable, rule: str, budget: float, count: int) -> List[float]:
    thresholds = [never_threshold(rule, count)] * count
    for _ in range(2):
        for k in range(count):
            best = (table.evaluate(rule, thresholds)["compute"], thresholds[k])
            for candidate in _candidates(table, rule, k):
                trial = thresholds[:k] + [candidate] + thresholds[k + 1:]
                result = table.evaluate(rule, trial)
                if result["compute"] >= best[0] - 1e-12:
                    continue
                if table.evaluate(rule, _loosen(rule, trial, table))["changed"] <= budget:
                    best = (result["compute"], candidate)
            thresholds[k] = best[1]
    return thresholds


def _loosen(rule: str, thresholds: List[float], table: ExitTable) -> List[float]:
    """The thresholds moved by MARGIN toward exiting more (the budget must hold there too)."""
    if rule == "confidence":
        return [max(0.0, t - MARGIN) for t in thresholds]
    top = math.log(table.exits[0].shape[1])
    return [min(top, t + MARGIN * top) if t > 0 else t for t in thresholds]


def _patience(table: ExitTable, budget: float, count: int) -> List[float]:
    for patience in range(1, count + 2):
        if table.evaluate("patience", [patience] * count)["changed"] <= budget:
            return [float(patience)] * count
    return [float(count + 1)] * count


def curve(table: ExitTable, rule: str, count: int) -> List[dict]:
    """Accuracy and compute for one common threshold over a range (the report's table)."""
    if rule == "confidence":
        points = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0]
    elif rule == "entropy":
        top = math.log(table.exits[0].shape[1])
        points = [top * f for f in (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.001, 0.0)]
    else:
        points = list(range(1, count + 2))
    rows = []
    for t in points:
        result = table.evaluate(rule, [t] * count)
        rows.append({"threshold": float(t), "top1": result["top1"], "changed": result["changed"],
                     "compute": result["compute"],
                     "distribution": result["distribution"]})
    return rows

"""Split an IR with exit heads into segments, and run the IR the way the segments will.

Segment k runs the stages from the end of segment k-1 up to exit head k and returns
(exit logits, tokens[, sizes]); the last segment runs the rest of the chain and returns the
model output. Segment 0 takes images; later segments take the token state (tokens [B, N, D]
and, after token merging, sizes [B, N, 1]). Side information (cls_attn, keys) never crosses a
boundary: reduction stages read what the attention stage of their own block records, and exits
sit after a block's MLP. Token counts are static per segment, only the batch is dynamic, so
each segment is an ordinary static engine.

`run_with_exits` is the reference executor of the deployed model: per-sample decisions with
the rule and thresholds on the heads, survivors compacted into a smaller batch, outputs in the
original order; `all_exit_logits` runs every head on every sample (for training, calibration).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from vitopt.errors import ConfigError
from vitopt.exits.rules import Carry, decide
from vitopt.ir.exits import ExitHead, exit_indices, exit_stages
from vitopt.ir.state import TokenState


class Segment(nn.Module):
    """Stages [start, stop) of an IR; when the last one is an exit head, also its logits."""

    def __init__(self, ir, start: int, stop: int, *, with_size: bool):
        super().__init__()
        self.stages = nn.ModuleList(ir.stages[start:stop])
        self.first = start == 0
        self.with_size = with_size  # takes a size input (a merge came before the boundary)
        self.exit = self.stages[-1] if isinstance(self.stages[-1], ExitHead) else None

    def forward(self, x: torch.Tensor, size: Optional[torch.Tensor] = None):
        state = TokenState(x, size=size)
        for stage in self.stages:
            state = stage(state)
        if self.exit is None:
            return state.x
        outputs = (self.exit.logits(state), state.x)
        return outputs + ((state.size,) if state.size is not None else ())


@dataclass
class SegmentPlan:
    """Where the IR splits: stage ranges, and whether each boundary carries token sizes."""

    bounds: List[Tuple[int, int]]
    size_in: List[bool]    # segment k takes sizes
    size_out: List[bool]   # segment k returns sizes (exit segments only)
    tokens_in: List[int]   # tokens entering segment k (0 for images)


def plan_segments(ir) -> SegmentPlan:
    cuts = [i + 1 for i in exit_indices(ir)]
    if not cuts:
        raise ConfigError("the IR has no exit heads to split at; run the insert_exit_heads pass")
    starts, stops = [0] + cuts, cuts + [len(ir.stages)]
    has_size = _sizes_at(ir, cuts)
    counts = ir.token_counts()
    return SegmentPlan(list(zip(starts, stops)), [False] + has_size, has_size + [False],
                       [0] + [counts[c] for c in cuts])


def _sizes_at(ir, cuts: List[int]) -> List[bool]:
    """Whether the token state carries sizes after stage cut-1 (found by running a probe)."""
    h, w = ir.meta.image_size
    state = TokenState(torch.zeros(1, ir.meta.in_chans, h, w))
    found, index = [], 0
    with torch.no_grad():
        for cut in cuts:
            state = ir.run_range(state, index, cut)
            index = cut
            found.append(state.size is not None)
    return found


def build_segments(ir) -> Tuple[List[Segment], SegmentPlan]:
    plan = plan_segments(ir)
    segments = [Segment(ir, a, b, with_size=s).eval() for (a, b), s in zip(plan.bounds, plan.size_in)]
    return segments, plan


# --- the reference executor of the deployed model ---------------------------------------
def heads_config(ir) -> Tuple[str, List[float]]:
    heads = exit_stages(ir)
    rules = {h.rule for h in heads}
    if len(rules) != 1:
        raise ConfigError(f"exit heads disagree on the exit rule ({sorted(rules)}); use one rule")
    return rules.pop(), [h.threshold for h in heads]


@torch.no_grad()
def run_with_exits(ir, images: torch.Tensor, thresholds=None, rule=None):
    """(outputs [B, C], exit taken per sample: 0..K-1 for the heads, K for the full model).

    Samples that pass their exit's threshold stop; the others continue in a compacted batch.
    """
    segments, _ = build_segments(ir)
    default_rule, default_thresholds = heads_config(ir)
    rule = rule or default_rule
    thresholds = default_thresholds if thresholds is None else list(thresholds)
    batch = images.shape[0]
    alive = np.arange(batch)
    taken = np.full(batch, len(segments) - 1, dtype=np.int64)
    outputs, carry, inputs = None, Carry(), (images,)
    for k, segment in enumerate(segments):
        result = segment(*inputs)
        if segment.exit is None:
            logits = result
        else:
            logits, *state = result
        if outputs is None:
            outputs = torch.empty((batch,) + tuple(logits.shape[1:]), dtype=logits.dtype)
        if segment.exit is None:
            outputs[torch.from_numpy(alive)] = logits
            break
        stop, carry = decide(rule, logits.numpy(), thresholds[k], carry)
        outputs[torch.from_numpy(alive[stop])] = logits[torch.from_numpy(stop)]
        taken[alive[stop]] = k
        keep = ~stop
        if not keep.any():
            break
        alive, carry = alive[keep], carry.take(keep)
        index = torch.from_numpy(keep)
        inputs = tuple(s[index] for s in state)
    return outputs, taken


@torch.no_grad()
def all_exit_logits(ir, images: torch.Tensor, batch_size: int = 256):
    """(logits of every exit head [K x [N, C]], final output [N, C], states at each exit).

    The states are what each head reads (TokenState after its block), for head training."""
    exits = exit_indices(ir)
    per_exit: List[List[torch.Tensor]] = [[] for _ in exits]
    states: List[List[TokenState]] = [[] for _ in exits]
    finals = []
    for start in range(0, images.shape[0], batch_size):
        state, index = TokenState(images[start:start + batch_size]), 0
        for k, cut in enumerate(exits):
            state = ir.run_range(state, index, cut + 1)
            index = cut + 1
            per_exit[k].append(ir.stages[cut].logits(state))
            states[k].append(TokenState(state.x, size=state.size))
        finals.append(ir.run_range(state, index, len(ir.stages)).x)
    return ([torch.cat(p) for p in per_exit], torch.cat(finals),
            [TokenState(torch.cat([s.x for s in st]),
                        size=torch.cat([s.size for s in st]) if st[0].size is not None else None)
             for st in states])


def compute_per_exit(ir) -> Tuple[List[float], float]:
    """(FLOPs per image when a sample stops at exit k, for k = 0..K-1 and the full path), and
    the FLOPs of the model without exits. Heads run on the way count toward later exits."""
    counts = ir.token_counts()
    total, cost, costs = 0.0, 0.0, []
    for stage, tokens in zip(ir.stages, counts):
        if isinstance(stage, ExitHead):
            cost += stage.head_flops(tokens)
            costs.append(cost)
        else:
            cost += stage.flops(tokens)
            total += stage.flops(tokens)
    return costs + [cost], total

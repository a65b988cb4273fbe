"""Static token schedules: how many tokens each reduction removes, chosen from a target.

Token counts are fixed per stage at compile time (only the batch is dynamic), so a token
reduction is a schedule: for merging, r_b tokens merged in block b; for pruning, a keep rate
at a few blocks. This module turns a target into such a schedule:

* `merge_schedule(ir, r=..|keep=..|flops=..)`: a constant r (ToMe's schedule; clipped where a
  block has too few tokens) for a keep ratio of the patch tokens after the last block, or for
  a FLOPs budget (a fraction of the unreduced model's FLOPs, from `ir.flops()` arithmetic).
* `prune_keep_rate(ir, flops=..)`: the largest EViT keep rate inside a FLOPs budget.
* `schedule_for_speedup(ir, target, backend=...)`: the mildest schedule whose engine, built and
  timed on this machine against the unreduced engine in the same run, is `target` times
  faster. This builds engines: minutes for a full-size model.

The result is a `Schedule`: the pass options that realise it (a PassSpec), the tokens entering
every stage, the FLOPs ratio and, when measured, the speedup.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from vitopt.errors import ConfigError
from vitopt.ir.reduce import keep_count, merge_flops
from vitopt.ir.stages import Attention


@dataclass
class Schedule:
    pass_name: str
    options: Dict[str, object]
    tokens: List[int] = field(default_factory=list)
    flops_ratio: float = 1.0
    speedup: Optional[float] = None
    latency_ms: Optional[float] = None
    baseline_ms: Optional[float] = None

    def spec(self):
        from vitopt.pipeline import PassSpec
        return PassSpec(self.pass_name, dict(self.options))

    def option_text(self) -> str:
        """The `--pass` text for this schedule, e.g. merge_tokens:schedule=8,8,8."""
        parts = [self.pass_name]
        for key, value in self.options.items():
            value = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            parts.append(f"{key}={value}")
        return ":".join(parts)


# --- merging --------------------------------------------------------------------------------
def merge_plan_flops(ir, rs: Sequence[int]) -> int:
    """FLOPs per image of `ir` with r_b tokens merged after block b's attention (ir unreduced)."""
    total, tokens, prefix = 0, 0, ir.num_prefix_tokens
    for stage in ir.stages:
        total += stage.flops(tokens)
        out = stage.tokens_out(tokens)
        if isinstance(stage, Attention) and rs[stage.block] > 0:
            total += merge_flops(out, prefix, rs[stage.block], stage.embed_dim, stage.head_dim)
            out -= rs[stage.block]
        tokens = out
    return total


def merge_limits(ir, rs: Sequence[int]) -> List[int]:
    """For each block, the most tokens it could merge after the merges of `rs` before it."""
    limits, removed = [], 0
    for stage, count in zip(ir.stages, ir.token_counts()):
        if isinstance(stage, Attention):
            limits.append((count - removed - ir.num_prefix_tokens) // 2)
            removed += min(rs[stage.block], limits[-1])
    return limits


def clipped_constant(ir, r: int) -> List[int]:
    """ToMe's constant schedule: r in every block, fewer where a block has too few tokens."""
    rs = [0] * ir.num_blocks
    for block in range(ir.num_blocks):
        rs[block] = r
        rs[block] = min(r, merge_limits(ir, rs)[block])
    return rs


def max_constant_r(ir) -> int:
    """The largest r that every block can merge (a constant schedule without clipping)."""
    best = 0
    for r in range(1, ir.token_counts()[1] + 1):
        rs = [r] * ir.num_blocks
        if any(r > limit for limit in merge_limits(ir, rs)):
            break
        best = r
    return best


def merge_schedule(ir, *, r: Optional[int] = None, keep: Optional[float] = None,
                   flops: Optional[float] = None, max_rate: Optional[float] = None,
                   strict: bool = True) -> List[int]:
    """Per-block r for one target: a constant `r`, a `keep` ratio of the patch tokens left
    after the last block, or a `flops` budget (fraction of the unreduced FLOPs), the smallest
    constant r (clipped per block) that fits it. `max_rate` caps r at that fraction of the
    encoder's patch tokens: a block that merges a large share of its tokens pairs dissimilar
    ones, which costs accuracy fastest on models with few tokens. A budget that merging cannot
    reach (or that the cap stops) raises ConfigError, or with strict=False gives the schedule
    that merges the most allowed."""
    if sum(t is not None for t in (r, keep, flops)) != 1:
        raise ConfigError("give exactly one merge target: r, keep or flops")
    patches = ir.token_counts()[1] - ir.num_prefix_tokens
    cap = patches if max_rate is None else max(1, int(max_rate * patches))
    if r is not None:
        return clipped_constant(ir, int(r))
    if keep is not None:
        if not 0 < keep <= 1:
            raise ConfigError(f"keep ratio must be in (0, 1], got {keep}")
        goal = math.ceil(keep * patches - 1e-9)
        for r in range(0, patches + 1):
            rs = clipped_constant(ir, r)
            if patches - sum(rs) <= goal or sum(rs) == sum(clipped_constant(ir, r + 1)):
                return rs
    if not 0 < flops <= 1:
        raise ConfigError(f"flops target must be a fraction in (0, 1], got {flops}")
    base = ir.flops()
    best, lowest = [0] * ir.num_blocks, 1.0
    for r in range(0, min(patches, cap) + 1):
        rs = clipped_constant(ir, r)
        ratio = merge_plan_flops(ir, rs) / base
        if ratio <= flops:
            return rs
        if ratio < lowest:
            best, lowest = rs, ratio
    if not strict:
        return best
    capped = f" with r <= {cap} (max_rate {max_rate})" if cap < patches else ""
    raise ConfigError(f"merging{capped} cannot bring this model to {flops:.0%} of its FLOPs; the "
                      f"most it reaches is {lowest:.0%} (flops >= {math.ceil(lowest * 100) / 100:.2f})")


# --- pruning --------------------------------------------------------------------------------
def default_prune_blocks(num_blocks: int) -> List[int]:
    """EViT's placement (blocks 4, 7, 10 of 12, 1-based) scaled to the depth: L/4, L/2, 3L/4."""
    return sorted({num_blocks * i // 4 for i in (1, 2, 3)})


def prune_plan_flops(ir, keep_rate: float, blocks: Sequence[int], fuse: bool = True) -> int:
    total, tokens, prefix = 0, 0, ir.num_prefix_tokens
    for stage in ir.stages:
        total += stage.flops(tokens)
        out = stage.tokens_out(tokens)
        if isinstance(stage, Attention) and stage.block in blocks:
            patches = out - prefix
            keep = keep_count(keep_rate, patches)
            if keep < patches:
                out = prefix + keep + int(fuse)
                total += 2 * (patches - keep) * stage.embed_dim * int(fuse)
        tokens = out
    return total


def prune_keep_rate(ir, *, flops: float, blocks: Optional[Sequence[int]] = None,
                    fuse: bool = True) -> float:
    """The largest keep rate (in steps of 0.01) whose pruned model fits a FLOPs budget."""
    if not 0 < flops <= 1:
        raise ConfigError(f"flops target must be a fraction in (0, 1], got {flops}")
    blocks = default_prune_blocks(ir.num_blocks) if blocks is None else list(blocks)
    base = ir.flops()
    for step in range(100, 0, -1):
        if prune_plan_flops(ir, step / 100, blocks, fuse) <= flops * base:
            return step / 100
    raise ConfigError(f"pruning at blocks {list(blocks)} cannot bring this model to {flops:.0%} "
                      f"of its FLOPs; prune earlier blocks or more of them")


# --- schedules from a target ------------------------------------------------------------------
def schedule_from(ir, pass_name: str, options: Dict[str, object]) -> Schedule:
    """Apply `pass_name` with `options` to a copy of `ir`; describe the schedule it makes."""
    from vitopt.pipeline import PassSpec, Pipeline
    result = Pipeline([PassSpec(pass_name, dict(options))]).run(ir)
    return Schedule(pass_name, dict(options), result.ir.token_counts(),
                    result.ir.flops() / ir.flops())


def for_flops(ir, flops: float, pass_name: str = "merge_tokens") -> Schedule:
    """The schedule of `pass_name` (merge_tokens or prune_tokens) within a FLOPs budget."""
    if pass_name == "merge_tokens":
        options = {"schedule": tuple(merge_schedule(ir, flops=flops))}
    elif pass_name == "prune_tokens":
        options = {"keep_rate": prune_keep_rate(ir, flops=flops)}
    else:
        raise ConfigError(f"no schedule search for pass {pass_name!r}; use merge_tokens or "
                          f"prune_tokens")
    return schedule_from(ir, pass_name, options)


def schedule_for_speedup(ir, target: float, *, pass_name: str = "merge_tokens",
                         backend: str = "openvino", precision: str = "bf16", batch: int = 8,
                         runs: int = 10, budgets: Sequence[float] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.45,
                                                                      0.4, 0.35, 0.3),
                         log: Optional[Callable[[str], None]] = None) -> Schedule:
    """The mildest schedule (by FLOPs budget, tried in the order of `budgets`) whose engine is
    at least `target` times faster than the unreduced engine, both built with `backend` and
    `precision` and timed at `batch` in interleaved rounds on this machine. Raises ConfigError
    when no budget reaches the target."""
    import tempfile

    import numpy as np

    from vitopt.timing import measure_interleaved

    if target <= 1:
        raise ConfigError(f"target speedup must be above 1, got {target}")
    log = log or (lambda message: None)
    images = np.random.default_rng(0).standard_normal(
        (batch, ir.meta.in_chans, *ir.meta.image_size)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="vitopt-schedule-") as tmp:
        base = build_engine(ir, Path(tmp) / "base", backend, precision, batch)
        best = None
        for budget in budgets:
            try:
                schedule = for_flops(ir, budget, pass_name)
            except ConfigError:
                break
            engine = build_engine(_apply(ir, schedule), Path(tmp) / f"b{budget}", backend, precision,
                                  batch)
            times = measure_interleaved({"base": lambda: base.run(images),
                                         "reduced": lambda: engine.run(images)}, runs=runs, rounds=2)
            schedule.baseline_ms = times["base"].median_ms
            schedule.latency_ms = times["reduced"].median_ms
            schedule.speedup = schedule.baseline_ms / schedule.latency_ms
            log(f"{schedule.option_text()}: FLOPs x{schedule.flops_ratio:.2f}, "
                f"{schedule.latency_ms:.1f} ms vs {schedule.baseline_ms:.1f} ms "
                f"({schedule.speedup:.2f}x)")
            best = schedule
            if schedule.speedup >= target:
                return schedule
    reached = f"; the best reached {best.speedup:.2f}x" if best else ""
    raise ConfigError(f"no {pass_name} schedule reached {target:.2f}x on {backend} "
                      f"{precision}{reached}")


def _apply(ir, schedule: Schedule):
    from vitopt.pipeline import Pipeline
    return Pipeline([schedule.spec()]).run(ir).ir


def build_engine(ir, folder, backend_name: str, precision: str, batch: int):
    """Lower `ir` to ONNX in `folder` and build + load a `backend_name` engine (max batch `batch`)."""
    import torch

    from vitopt.backends import get_backend
    from vitopt.lower.onnx_export import export_onnx

    backend = get_backend(backend_name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    example = torch.randn(min(2, batch), ir.meta.in_chans, *ir.meta.image_size)
    onnx_path = export_onnx(ir, example, folder / "model.onnx")
    files = backend.build(onnx_path, folder, precision=precision, max_batch=batch)
    return backend.load(folder, files, precision=precision)


__all__ = ["Schedule", "merge_schedule", "merge_plan_flops", "max_constant_r", "clipped_constant",
           "prune_keep_rate", "default_prune_blocks", "for_flops", "schedule_for_speedup",
           "schedule_from", "build_engine"]

"""Attach early-exit heads after chosen blocks (LGViT-style heterogeneous heads, lossy when used).

What: after the MLP stage of each chosen block, an `ExitHead` stage (vitopt.ir.exits): a light
"linear" head (LayerNorm -> class token or size-weighted mean of the patch tokens -> Linear)
or a heavier "attn_pool" head (one learned query attending over all tokens), for the shallow
exits by default ("auto": attn_pool for blocks in the first third of the depth, linear after).
The stage is a pass-through in the reference executor, so the IR's output is exactly the
model's; the heads only act once the IR is split into segments (vitopt.exits.segments) and the
runtime stops samples whose exit passes its threshold (vitopt.exits.rules: confidence, entropy,
patience). New heads start from fixed-seed random weights and never exit (thresholds at the
rule's "never" value) until trained (vitopt.exits.train, `--train`) and calibrated
(vitopt.exits.calibrate, `--exit-accuracy-drop`); explicit `thresholds` can be given.
Preconditions: a classifier (pooled output and a Head giving logits); the backbone is not
changed (frozen). Exits after token merging/pruning read the merged tokens and their sizes.
Declines when the IR already has exits or is not a classifier.
Order: after token reduction (exits see the reduced tokens), before quantize_int8 (which
quantizes the backbone; the heads stay float, they are a few thousand MACs).
Cost: none at the IR level; deployed, the accuracy cost is what the thresholds allow (the
compiler calibrates them to --exit-accuracy-drop on held-out calibration data). LGViT reports
about 1.7-1.9x fewer layers at about 1 point top-1 on ImageNet-scale ViTs.
Paper: Xu et al. 2023, "LGViT: Dynamic Early Exiting for Accelerating Vision Transformer".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

from vitopt.errors import ConfigError
from vitopt.exits.rules import RULES, check_thresholds, never_threshold
from vitopt.ir.exits import HEAD_KINDS, ExitHead, exit_stages
from vitopt.ir.stages import Head, Mlp
from vitopt.pipeline import PassConfig, PassResult, register_pass


@dataclass(frozen=True)
class InsertExitHeadsConfig(PassConfig):
    #: blocks (0-based) after which an exit is attached; () picks every ceil(depth / 4)-th block.
    blocks: Tuple[int, ...] = ()
    #: linear, attn_pool, or auto (attn_pool in the first third of the depth, linear after).
    head: str = "auto"
    rule: str = "confidence"
    #: one per exit; () means the rule's never-exit value until calibration sets them.
    thresholds: Tuple[float, ...] = ()
    seed: int = 0

    def validate(self) -> None:
        if self.head not in HEAD_KINDS + ("auto",):
            raise ConfigError(f"insert_exit_heads: head {self.head!r} is not one of "
                              f"{', '.join(HEAD_KINDS + ('auto',))}")
        if self.rule not in RULES:
            raise ConfigError(f"insert_exit_heads: rule {self.rule!r} is not one of {', '.join(RULES)}")
        if any(not isinstance(b, int) or isinstance(b, bool) for b in self.blocks):
            raise ConfigError(f"insert_exit_heads: blocks must be integers, got {list(self.blocks)}")
        if len(set(self.blocks)) != len(self.blocks):
            raise ConfigError(f"insert_exit_heads: blocks {list(self.blocks)} repeat a block")
        if self.thresholds and self.blocks and len(self.thresholds) != len(self.blocks):
            raise ConfigError(f"insert_exit_heads: {len(self.thresholds)} thresholds for "
                              f"{len(self.blocks)} exit blocks; give one per exit")


def default_blocks(depth: int) -> Tuple[int, ...]:
    step = max(1, math.ceil(depth / 4))
    return tuple(range(step - 1, depth - 1, step))


def exit_blocks(depth: int, config: InsertExitHeadsConfig) -> Tuple[int, ...]:
    """The sorted blocks to exit after; ConfigError for a block out of range."""
    blocks = tuple(sorted(config.blocks)) if config.blocks else default_blocks(depth)
    for block in blocks:
        if not 0 <= block < depth - 1:
            raise ConfigError(f"insert_exit_heads: cannot exit after block {block}: the model has "
                              f"{depth} blocks (0..{depth - 1}) and an exit after the last block "
                              f"is the model's own head; choose blocks in 0..{depth - 2}")
    if not blocks:
        raise ConfigError(f"insert_exit_heads: a {depth}-block model has no block to exit after")
    return blocks


def _classes(ir):
    """Classes of the model's head (a Linear, or a traced head run on one pooled feature)."""
    head = next((s for s in ir.stages if isinstance(s, Head)), None)
    if head is None:
        return None
    if isinstance(head.body, nn.Linear):
        return head.body.out_features
    try:
        with torch.no_grad():
            out = head.body(torch.zeros(1, ir.stem.embed_dim))
    except Exception:  # an opaque traced graph fails in many ways; any means "not a classifier"
        return None
    return int(out.shape[-1]) if out.ndim == 2 else None


def _refusal(ir):
    if exit_stages(ir):
        return "the IR already has exit heads; insert_exit_heads runs once"
    pool = ir.pool()
    if ir.meta.output != "logits" or pool is None or pool.pool == "none" or not _classes(ir):
        return ("exits need a classifier (pooled output and a head giving logits) to distil from; "
                "this model outputs " + (ir.meta.output if ir.meta.output != "logits" else
                                         "something else (a traced tail)"))
    return None


@register_pass("insert_exit_heads", config=InsertExitHeadsConfig, exact=False)
def insert_exit_heads(ir, config: InsertExitHeadsConfig) -> PassResult:
    refusal = _refusal(ir)
    if refusal:
        return PassResult(ir, False, {}, [refusal + "; no exits inserted"])
    depth = ir.num_blocks
    blocks = exit_blocks(depth, config)
    thresholds = (config.thresholds or
                  tuple(never_threshold(config.rule, len(blocks)) for _ in blocks))
    num_classes = _classes(ir)
    check_thresholds(config.rule, thresholds, len(blocks), num_classes)
    pool = "cls" if ir.pool().pool == "cls" else "mean"
    for order, (block, threshold) in enumerate(zip(blocks, thresholds)):
        attention = ir.attention_stages()[block]
        kind = config.head if config.head != "auto" else ("attn_pool" if block < depth / 3 else "linear")
        index = next(i for i, s in enumerate(ir.stages) if isinstance(s, Mlp) and s.block == block)
        stage = ExitHead(block=block, head=kind, pool=pool, num_prefix_tokens=ir.num_prefix_tokens,
                         embed_dim=attention.embed_dim, num_classes=num_classes,
                         num_heads=attention.num_heads, seed=config.seed + order)
        stage.rule, stage.threshold = config.rule, float(threshold)
        stage.fixed_threshold = bool(config.thresholds)  # given: the compiler keeps it
        ir.stages.insert(index + 1, stage)
    heads = exit_stages(ir)
    counts = dict(zip(range(len(ir.stages)), ir.token_counts()))
    index_of = {id(s): i for i, s in enumerate(ir.stages)}
    flops = [h.head_flops(counts[index_of[id(h)]]) for h in heads]
    stats = {"blocks": list(blocks), "heads": [h.head for h in heads], "rule": config.rule,
             "thresholds": list(thresholds), "head_gflops": [f / 1e9 for f in flops]}
    notes = [f"exit heads after blocks {list(blocks)} ({', '.join(h.head for h in heads)}), rule "
             f"{config.rule}; " + ("thresholds given" if config.thresholds else
                                   "they never exit until trained and calibrated")]
    return PassResult(ir, True, stats, notes)

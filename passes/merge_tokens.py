"""Merge similar patch tokens between attention and MLP (ToMe, lossy).

What: in each chosen block, a MergeTokens stage after the attention stage merges r patch tokens
into their most similar ones: bipartite soft matching on the head-averaged keys (cosine), size-
weighted averages, token sizes carried to later blocks, where attention adds log(size) to its
logits (proportional attention; `proportional_attention=false` turns that off), as does attention
pooling (SigLIP's MAP head), and mean pooling weights tokens by size. Token counts are static per stage: a constant `r` in every block
(ToMe), a per-block `schedule`, or a `flops` budget (fraction of the unreduced FLOPs) from which
vitopt.schedule picks the smallest constant r that fits (clipped where a block has too few
tokens), optionally capped by `max_rate` (r <= max_rate x patch tokens: a block that merges a
large share of its tokens pairs dissimilar ones). A budget the model cannot reach merges as much
as allowed, with a note.
Formulation: see vitopt/ir/reduce.py (one row gather per merge, a [N-r, r] 0/1 assignment
matmul; no scatter_reduce, no GatherElements, no strided slices).
Preconditions: an encoder whose output is pooled or classified (a token-sequence output keeps
every token: use select_patch_tokens); a traced tail must run on fewer tokens (tested by running
it), else the pass declines. Prefix tokens (class, distillation, registers) are never merged;
no class token is needed. Declines when r = 0 (identity) or when the IR already merges tokens.
Order: after the exact rewrites (fuse_qkv, fold_layer_scale), before quantization (calibrate on
the reduced graph). Combines with prune_tokens: whichever runs second reduces only in blocks
after the first one's last reduction (the stages after a reduction expect fixed counts).
Cost: ToMe reports about -0.4 top-1 at 2x throughput for off-the-shelf DeiT-S (r = 13). On vitopt's
digits proxy (64 patches, 6 blocks) a constant r up to 8 costs <= 0.3 points and FLOPs budgets
below ~0.6 cost 1-2.5 points; see benchmarks/token_reduction.py, which chose the presets'
budgets (`balanced`: flops 0.55, max_rate 0.1, r = 15 on DeiT-S; `fast`: flops 0.5, max_rate 0.15).
Paper: Bolya et al. 2023, "Token Merging: Your ViT But Faster" (ICLR 2023).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from vitopt.errors import ConfigError
from vitopt.ir.quant import QuantLinear, int8_key_projection
from vitopt.ir.reduce import (MergeTokens, has_stage, insert_after_attention,
                              last_reduction_block, tail_refusal, tokens_at_attention,
                              tokens_at_end)
from vitopt.pipeline import PassConfig, PassResult, register_pass
from vitopt.schedule import max_constant_r, merge_limits, merge_schedule


@dataclass(frozen=True)
class MergeTokensConfig(PassConfig):
    r: int = 0
    schedule: Tuple[int, ...] = ()
    flops: Optional[float] = None
    max_rate: Optional[float] = None
    proportional_attention: bool = True

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 0:
            raise ConfigError(f"merge_tokens: r must be a non-negative integer, got {self.r!r}")
        if any(not isinstance(r, int) or r < 0 for r in self.schedule):
            raise ConfigError(f"merge_tokens: schedule entries must be non-negative integers, got "
                              f"{list(self.schedule)}")
        if self.flops is not None and not 0 < self.flops <= 1:
            raise ConfigError(f"merge_tokens: flops is a fraction of the unreduced FLOPs in (0, 1], "
                              f"got {self.flops}")
        if sum((self.r > 0, bool(self.schedule), self.flops is not None)) > 1:
            raise ConfigError("merge_tokens: give one of r, schedule or flops, not several")
        if self.max_rate is not None:
            if not 0 < self.max_rate <= 0.5:
                raise ConfigError(f"merge_tokens: max_rate is a fraction of the patch tokens in "
                                  f"(0, 0.5], got {self.max_rate}")
            if self.flops is None:
                raise ConfigError("merge_tokens: max_rate caps the r that a flops budget picks; "
                                  "give flops too (or set r directly)")


def per_block_r(ir, config: MergeTokensConfig):
    """The r of every block, checked against the token counts (ConfigError when too large)."""
    if config.flops is not None:
        return merge_schedule(ir, flops=config.flops, max_rate=config.max_rate, strict=False)
    rs = list(config.schedule) if config.schedule else [config.r] * ir.num_blocks
    if len(rs) != ir.num_blocks:
        raise ConfigError(f"merge_tokens: schedule has {len(rs)} entries but the model has "
                          f"{ir.num_blocks} blocks; give one r per block")
    for block, (r, limit) in enumerate(zip(rs, merge_limits(ir, rs))):
        if r > limit:
            hint = (f"the largest r every block can merge is {max_constant_r(ir)}"
                    if not config.schedule else "lower it or merge earlier")
            raise ConfigError(f"merge_tokens: r={r} is too large for block {block}, which can merge "
                              f"at most {limit} of its {tokens_at(ir, rs, block)} patch tokens "
                              f"(half of them); {hint}")
    return rs


def tokens_at(ir, rs, block):
    """Patch tokens entering block `block` once the merges of rs before it are in place."""
    return tokens_at_attention(ir, block) - ir.num_prefix_tokens - sum(rs[:block])


@register_pass("merge_tokens", config=MergeTokensConfig, exact=False)
def merge_tokens(ir, config: MergeTokensConfig) -> PassResult:
    if ir.meta.output == "tokens" or (ir.pool() is not None and ir.pool().pool == "none"):
        return PassResult(ir, False, {}, ["the output is the token sequence, which merging would "
                                          "change; use select_patch_tokens for patch-token outputs"])
    if has_stage(ir, MergeTokens):
        return PassResult(ir, False, {}, ["the IR already merges tokens; merge_tokens runs once"])
    refusal = tail_refusal(ir, ir.token_counts()[1] - 1)
    if refusal:
        return PassResult(ir, False, {}, [refusal + "; merging declined"])
    rs = per_block_r(ir, config)
    if not any(rs):
        return PassResult(ir, False, {}, ["r = 0 merges no token (identity); set r, schedule or flops"])
    last = last_reduction_block(ir)
    if last is not None and any(rs[:last + 1]):
        return PassResult(ir, False, {}, [
            f"the IR already reduces tokens in block {last}; merge_tokens can only merge after it "
            f"(give a schedule with r = 0 up to block {last}, or run merge_tokens first)"])
    before_tokens, before_flops = ir.token_counts(), ir.flops()
    final_tokens = tokens_at_end(ir) - sum(rs)
    refusal = tail_refusal(ir, final_tokens)
    if refusal:
        return PassResult(ir, False, {}, [refusal + "; merging declined"])
    prefix = ir.num_prefix_tokens
    for attention in ir.attention_stages() + [ir.pool()]:
        if hasattr(attention, "size_bias"):  # attention stages and attention pooling
            attention.size_bias = config.proportional_attention
    for block, r in enumerate(rs):
        if r:
            attention = ir.attention_stages()[block]
            attention.record_keys = True
            source = attention.qkv if attention.qkv is not None else attention.k
            if isinstance(source, QuantLinear):  # merging after quantize_int8: int8 keys too
                attention.merge_key_proj = int8_key_projection(attention, source.input_quant,
                                                               source.weight_bits)
            insert_after_attention(ir, block, MergeTokens(
                tokens_in=tokens_at_attention(ir, block), r=r, num_prefix_tokens=prefix,
                embed_dim=attention.embed_dim, head_dim=attention.head_dim, block=block))
    counts = [n for n, s in zip(ir.token_counts(), ir.stages) if isinstance(s, MergeTokens)]
    ratio = ir.flops() / before_flops
    stats = {"r_per_block": rs, "tokens_in_per_merge": counts, "tokens_final": final_tokens,
             "flops_ratio": round(ratio, 4), "proportional_attention": config.proportional_attention}
    bias = "on" if config.proportional_attention else "off"
    notes = [f"merged {sum(rs)} patch tokens (r per block {rs}): {before_tokens[1]} -> "
             f"{final_tokens} tokens, FLOPs x{ratio:.2f}; proportional attention {bias}"]
    if config.flops is not None and ratio > config.flops + 1e-9:
        cap = " and max_rate" if config.max_rate is not None else ""
        notes.append(f"the FLOPs budget {config.flops:.2f} is below what merging reaches on this "
                     f"model; merged as much as the token counts{cap} allow")
    return PassResult(ir, True, stats, notes)

"""Keep the most-attended patch tokens after chosen blocks' attention (EViT, lossy).

What: after the attention stage of each chosen block, a PruneTokens stage keeps the
ceil(keep_rate * patches) patch tokens that receive the most attention, averaged over heads,
and (fuse=true) fuses the others into one token, their attention-weighted average. The
ranking row is computed by the attention stage from one query against all keys (q . K^T, one
row per head, never the N x N matrix, so fused attention stays fused):
  * the class token's query (q_cls) when token 0 is a class token the output is read from;
  * the mean query of the patch tokens (q_mean) for encoders without a class token, or with mean
    pooling (the class token is then not what the output attends through). The pass note says
    which row it used.
Blocks: `blocks` (0-based), default EViT's placement scaled to the depth (L/4, L/2, 3L/4: blocks
3, 6, 9 of DeiT-S). Token counts are static per stage (only the batch is dynamic).
Formulation: see vitopt/ir/reduce.py (TopK, one row gather, a 1 x M matmul for the fused token).
Preconditions: an encoder whose output is pooled or classified (use select_patch_tokens for a
token-sequence output); a traced tail must run on fewer tokens (tested by running it), else the
pass declines. Prefix tokens are never pruned. Declines when keep_rate = 1 (identity) or when
the IR already prunes tokens.
Order: after the exact rewrites, before quantization. With merge_tokens, whichever runs second
reduces only in blocks after the first one's last reduction; sizes from merging carry over.
Cost: EViT reports -0.3 top-1 at +50 % speed on DeiT-S (keep 0.7, with fine-tuning; less good
without). On vitopt's digits proxy see benchmarks/token_reduction.py.
Paper: Liang et al. 2022, "Not All Patches are What You Need: Expediting Vision Transformers via
Token Reorganizations" (EViT, ICLR 2022).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from vitopt.errors import ConfigError
from vitopt.ir.reduce import (PruneTokens, attention_signal, has_stage, insert_after_attention,
                              keep_count, last_reduction_block, record_signal, signal_name,
                              tail_refusal, tokens_at_attention, tokens_at_end)
from vitopt.pipeline import PassConfig, PassResult, register_pass
from vitopt.schedule import default_prune_blocks


@dataclass(frozen=True)
class PruneTokensConfig(PassConfig):
    keep_rate: float = 0.7
    blocks: Optional[Tuple[int, ...]] = None
    fuse: bool = True

    def validate(self) -> None:
        if not isinstance(self.keep_rate, (int, float)) or not 0 < self.keep_rate <= 1:
            raise ConfigError(f"prune_tokens: keep_rate is the fraction of patch tokens kept, in "
                              f"(0, 1]; got {self.keep_rate!r}")
        if self.blocks is not None:
            if any(not isinstance(b, int) or b < 0 for b in self.blocks):
                raise ConfigError(f"prune_tokens: blocks are 0-based block indices, got "
                                  f"{list(self.blocks)}")
            if len(set(self.blocks)) != len(self.blocks):
                raise ConfigError(f"prune_tokens: blocks has repeated entries: {list(self.blocks)}")


def decline(ir, why: str) -> PassResult:
    return PassResult(ir, False, {}, [why])


@register_pass("prune_tokens", config=PruneTokensConfig, exact=False)
def prune_tokens(ir, config: PruneTokensConfig) -> PassResult:
    blocks = sorted(config.blocks) if config.blocks is not None else default_prune_blocks(ir.num_blocks)
    bad = [b for b in blocks if b >= ir.num_blocks]
    if bad:
        raise ConfigError(f"prune_tokens: block {bad[0]} is out of range; this model has blocks "
                          f"0..{ir.num_blocks - 1}")
    if ir.meta.output == "tokens" or (ir.pool() is not None and ir.pool().pool == "none"):
        return decline(ir, "the output is the token sequence, which pruning would change; use "
                           "select_patch_tokens for patch-token outputs")
    if has_stage(ir, PruneTokens):
        return decline(ir, "the IR already prunes tokens; prune_tokens runs once")
    if config.keep_rate >= 1.0:
        return decline(ir, "keep_rate 1.0 keeps every token (identity)")
    refusal = tail_refusal(ir, ir.token_counts()[1] - 1)
    if refusal:
        return decline(ir, refusal + "; pruning declined")
    last = last_reduction_block(ir)
    if last is not None and blocks and blocks[0] <= last:
        return decline(ir, f"the IR already reduces tokens in block {last}; prune_tokens can only "
                           f"prune after it (blocks > {last})")
    plan, prefix, removed = [], ir.num_prefix_tokens, 0
    for block in range(ir.num_blocks):
        tokens = tokens_at_attention(ir, block) - removed
        patches = tokens - prefix
        keep = keep_count(config.keep_rate, patches)
        if block in blocks and keep < patches and keep + int(config.fuse) < patches:
            plan.append((block, tokens, keep))
            removed += tokens - (prefix + keep + int(config.fuse))
    tokens = tokens_at_end(ir) - removed
    if not plan:
        return decline(ir, f"keep_rate {config.keep_rate} removes no token at blocks {blocks}")
    refusal = tail_refusal(ir, tokens)
    if refusal:
        return decline(ir, refusal + "; pruning declined")
    before_tokens, before_flops = ir.token_counts(), ir.flops()
    signal = attention_signal(ir)
    for block, tokens_in, keep in plan:
        attention = ir.attention_stages()[block]
        record_signal(attention, signal)
        insert_after_attention(ir, block, PruneTokens(
            tokens_in=tokens_in, keep=keep, num_prefix_tokens=prefix, fuse=config.fuse,
            embed_dim=attention.embed_dim, block=block, signal=signal[0]))
    ratio = ir.flops() / before_flops
    stats = {"blocks": [b for b, _, _ in plan], "keep_per_block": [k for _, _, k in plan],
             "tokens_final": tokens, "flops_ratio": round(ratio, 4), "signal": signal[0]}
    fused = " + 1 fused token" if config.fuse else ""
    note = (f"pruned at blocks {stats['blocks']} keeping {stats['keep_per_block']} patch tokens"
            f"{fused}: {before_tokens[1]} -> {tokens} tokens, FLOPs x{ratio:.2f}; ranked by "
            f"{signal_name(signal)}")
    return PassResult(ir, True, stats, [note])

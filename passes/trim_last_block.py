"""Run the last block for the class token only, when the output reads nothing else (exact).

What: a classifier that pools the class token reads one row of the last block's output. That
row needs every token's keys and values in the last attention, but only the class token's
query; the other rows of q, of the attention output, the output projection, the MLP and the
final LayerNorm are computed and thrown away. The pass sets the last attention stage's
`query_tokens` to 1 (a separate q projection then runs on that row alone, as after
quantize_int8's q/k/v split), so everything after it runs on one row, and removes the token
reductions between the last attention and pooling (a merge or prune there only moves and
mixes rows the output never reads: every reduction stage keeps the prefix tokens first).
Saving: about 5/6 of the last block's FLOPs on an unreduced encoder (DeiT-S/16: 7 % of the
model); after token merging the last block holds few tokens, so less (balanced DeiT-S: 1.3 %,
plus its last merge).
Preconditions: Pool "cls" after the last block, with only MLP, LayerNorm and token-reduction
stages between the last attention and it. Declines for mean pooling and token-sequence outputs
(the output reads every row) and a traced tail (unknown reads). Early exits sit before the
last block (insert_exit_heads), so they are untouched.
Order: after the token passes (merge_tokens and prune_tokens decline on a trimmed IR: run them
first; `resolve_pipeline` puts passes added with --pass before a preset's trim). Precision
passes go after it (`resolve_pipeline` and compile's --precision put them there): on a
fake-quantized IR the trimmed block's one-row GEMMs round differently from the full ones in
the last float bits, which can move a value across a quantization step; before it, it still
runs, but its exactness check can fail on such a flip.
Cost: exact (the kept row is computed by the same operations).
"""
from __future__ import annotations

from dataclasses import dataclass

from vitopt.ir.reduce import REDUCE_STAGES
from vitopt.ir.stages import Attention, Mlp, Norm, Pool
from vitopt.pipeline import PassConfig, PassResult, register_pass

#: Stages that may sit between the last attention and pooling: row-wise ones, which then run on
#: the kept row, and token reductions, which are removed.
ROW_WISE = (Mlp, Norm)


@dataclass(frozen=True)
class TrimLastBlockConfig(PassConfig):
    pass


@register_pass("trim_last_block", config=TrimLastBlockConfig, exact=True)
def trim_last_block(ir, config: TrimLastBlockConfig) -> PassResult:
    attentions = ir.attention_stages()
    if not attentions:
        return PassResult(ir, False, {}, ["no attention stage to trim"])
    last = attentions[-1]
    if last.query_tokens is not None:
        return PassResult(ir, False, {}, [f"block {last.block} already runs for the first "
                                          f"{last.query_tokens} token(s) only"])
    pool = ir.pool()
    if pool is None or pool.pool != "cls":
        reads = f"pooling {pool.pool!r}" if pool is not None else "a traced tail"
        return PassResult(ir, False, {}, [f"the output reads more than the class token ({reads}); "
                                          "every row of the last block is needed"])
    stages = list(ir.stages)
    start, end = stages.index(last), stages.index(pool)
    between = stages[start + 1:end]
    other = [s for s in between if not isinstance(s, ROW_WISE + REDUCE_STAGES)]
    if other:
        return PassResult(ir, False, {}, [f"stage {other[0].kind}{getattr(other[0], 'block', '')} "
                                          "between the last attention and pooling may read every "
                                          "row; trim_last_block declined"])
    tokens_before, flops_before = ir.token_counts()[start], ir.flops()
    dropped = [s for s in between if isinstance(s, REDUCE_STAGES)]
    for stage in dropped:
        del ir.stages[list(ir.stages).index(stage)]
    last.query_tokens = 1
    # Nothing after the last attention reads its side outputs any more.
    last.record_cls_attn = last.record_keys = False
    last.merge_key_proj = None
    ratio = ir.flops() / flops_before
    notes = [f"block {last.block} runs for the class token only: its attention keeps all "
             f"{tokens_before} keys and values, 1 query; FLOPs x{ratio:.3f}"]
    if dropped:
        notes.append(f"removed {len(dropped)} token reduction(s) after the last attention "
                     f"({', '.join(s.kind for s in dropped)}): they only moved rows the output "
                     "does not read")
    return PassResult(ir, True, {"block": last.block, "keys": tokens_before,
                                 "removed_reductions": len(dropped),
                                 "flops_ratio": round(ratio, 4)}, notes)

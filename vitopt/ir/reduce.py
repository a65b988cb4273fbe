"""Token-reduction stages: prune (EViT), merge (ToMe) and select (VLM patch-token output).

Each stage maps a TokenState with N tokens to one with fewer, at a token count fixed when
the stage is built (`expected_tokens`; only the batch is dynamic). The side information
they need (`cls_attn`, `keys`) comes from the attention stage before them, which the pass
that inserts them asks to record it (`Attention.record_cls_attn` / `record_keys`);
`EncoderIR.check()` verifies that ordering through `Stage.reads`.

Formulation (what every engine runs with fast kernels; checked on DeiT-S/16 with OpenVINO
2026.4 bf16, compiled-model runtime info and PERF_COUNT per-op profiles; see design.md §7):
* every data-dependent row selection is a gather of whole rows over the flattened batch
  (`batch_rows`, ONNX GatherND: row copies, ~0.1 ms for [8, 197, 384]). No GatherElements (a
  reference kernel in OpenVINO, ~10x slower), no index expanded to the embedding width, no
  scatter_reduce, no strided slices: ToMe's alternating A/B split is arithmetic on indices
  (A = prefix + 2i, B = prefix + 1 + 2j). A merge gathers the kept rows (in their final
  order) and the sources separately: one gather followed by a split of the rows ran the split
  as a reference kernel in OpenVINO (VariadicSplit, 0.03-0.05 ms per merge at batch 8).
* sums of rows (merging sources into destinations, fusing pruned tokens) are small matmuls
  with a 0/1 assignment matrix built by Equal + Cast, [N-r, r] per image, never [N, N].
* divisions happen on the small weights, never on token rows, and the 0/1 matrix never feeds
  a matmul directly: either of those made OpenVINO keep the whole residual stream (and every
  LayerNorm after the first merge) in f32 with reorders around each bf16 GEMM.
* argmax is Equal(scores, max) + Where + ReduceMax: an ArgMax becomes TopK(k=1) in OpenVINO,
  which cost more than the rest of the merge. Ranking is one TopK over [B, Na] per merge, on
  keys with an index tie-break (`rank`): OpenVINO's TopK does not order ties by index.
* ToMe's head-averaged keys come from a [D -> Dh] projection with head-averaged key weights
  (`Attention.mean_key_projection`), a small GEMM, instead of a mean over the head axis; after
  quantize_int8 an int8 GEMM on the qkv's u8 input (`Attention.merge_key_proj`).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from vitopt.ir.stages import Attention, Pool, Stage, TracedTail
from vitopt.ir.state import TokenState


def batch_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` [B, K] of each image of x [B, N, ...] -> [B, K, ...] (a batched gather).

    Written as one gather over the flattened batch, `x.reshape(B*N, ...)[index + b*N]`, which
    lowers to ONNX GatherND/Gather (whole-row copies) rather than GatherElements.
    """
    b, n = x.shape[0], x.shape[1]
    offsets = torch.arange(b, device=x.device).unsqueeze(1) * n
    return x.reshape((-1,) + tuple(x.shape[2:]))[index + offsets]


#: Ranking keys are value -/+ index x TIE_STEP (2 ulps of 1.0 in fp32): exact ties (a random-init
#: model can give every token the same attention) and near-ties closer than index x 2.4e-7 go
#: to the lower index, in the reference executor and in every engine alike. ONNX TopK orders
#: ties by index but OpenVINO's TopK does not, so the rule cannot be left to the engines.
TIE_STEP = 2.0 ** -22


def rank(values: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """Indices that sort `values` [B, N] along dim 1 (ties: lower index first), as one TopK."""
    steps = torch.arange(values.shape[1], device=values.device, dtype=values.dtype) * TIE_STEP
    keys = values - steps if descending else values + steps
    return keys.topk(values.shape[1], dim=1, largest=descending).indices


def _prefix_index(batch: int, prefix: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(prefix, device=like.device).unsqueeze(0).expand(batch, prefix)


# --- pruning (EViT) ------------------------------------------------------------------------
class PruneTokens(Stage):
    """Keep the `keep` patch tokens with the highest class-token attention (EViT).

    Liang et al. 2022, "Not All Patches are What You Need" (EViT), §3: after a block's
    attention, rank patch tokens by the attention the class token pays them (averaged over
    heads), keep the top k, and optionally fuse the rest into one token, an average of the
    dropped tokens weighted by that attention. The paper writes the fused token as
    sum(a_i x_i); without retraining we normalise the weights (divide by sum(a_i)) so the fused
    token has the scale of a token. Prefix tokens are always kept, first, in place.
    Token sizes (from an earlier merge) follow their tokens; the fused token's size is the sum
    of the dropped ones. Without sizes (plain EViT) every row stays one token.
    """

    kind = "prune"
    reads = ("cls_attn",)

    def __init__(self, *, tokens_in: int, keep: int, num_prefix_tokens: int, fuse: bool = True,
                 embed_dim: int = 0, block: int = 0, signal: str = "cls"):
        super().__init__()
        _check_keep("PruneTokens", keep, tokens_in - num_prefix_tokens)
        self.expected_tokens = int(tokens_in)
        self.keep = int(keep)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.fuse = bool(fuse)
        self.embed_dim = int(embed_dim)
        self.block = int(block)
        self.signal = signal

    def tokens_out(self, tokens_in: int) -> int:
        return self.num_prefix_tokens + self.keep + int(self.fuse)

    def forward(self, state: TokenState) -> TokenState:
        x, size = state.x, state.size
        b, p = x.shape[0], self.num_prefix_tokens
        attn = state.cls_attn[:, p:]                                   # [B, Np]
        ranked = rank(attn)                                             # most attended first
        kept = p + self.keep
        order = torch.cat([_prefix_index(b, p, x), ranked + p], dim=1)
        order = order if self.fuse else order[:, :kept]
        rows = batch_rows(x, order)
        out = rows[:, :kept]
        sizes = batch_rows(size, order) if size is not None else None
        new_size = sizes[:, :kept] if sizes is not None else None
        if self.fuse:
            weight = batch_rows(attn, ranked[:, self.keep:]).unsqueeze(1)  # [B, 1, Np - keep]
            fused = (weight / weight.sum(dim=-1, keepdim=True)) @ rows[:, kept:]
            out = torch.cat([out, fused], dim=1)
            if sizes is not None:
                new_size = torch.cat([new_size, sizes[:, kept:].sum(dim=1, keepdim=True)], dim=1)
        return TokenState(out, size=new_size)

    def flops(self, tokens_in: int) -> int:
        dropped = tokens_in - self.num_prefix_tokens - self.keep
        return 2 * dropped * self.embed_dim if self.fuse else 0

    def describe(self) -> str:
        fused = " + 1 fused" if self.fuse else ""
        return (f"keep top {self.keep}{fused} patch tokens by "
                f"{'class-token' if self.signal == 'cls' else 'mean-query'} attention")


# --- merging (ToMe) ------------------------------------------------------------------------
def merge_flops(tokens_in: int, prefix: int, r: int, dim: int, head_dim: int) -> int:
    """FLOPs of one bipartite merge: the head-averaged key projection (in the attention stage),
    key norms, A.B^T similarities and the [N-r, r] assignment matmul."""
    patches = tokens_in - prefix
    a, b = (patches + 1) // 2, patches // 2
    return (2 * tokens_in * dim * head_dim + 3 * tokens_in * head_dim + 2 * a * b * head_dim
            + 2 * (tokens_in - r) * r * (dim + 1))


class MergeTokens(Stage):
    """Merge r patch tokens into their most similar ones (ToMe bipartite soft matching).

    Bolya et al. 2023, "Token Merging: Your ViT But Faster", §3: split the patch tokens into
    two alternating sets A and B, connect each A token to its most similar B token (cosine
    similarity of the head-averaged keys), merge the r most similar edges by a size-weighted
    average, and keep the sizes so that attention can weight each token by how many it stands
    for (proportional attention, softmax(qk^T/sqrt(d) + log s)). Prefix tokens never take part.

    Output order: [prefix | B tokens (merge destinations) | unmerged A tokens, least similar
    first]; the next merge splits that order alternately again, so each set mixes both.
    """

    kind = "merge"
    reads = ("keys",)

    def __init__(self, *, tokens_in: int, r: int, num_prefix_tokens: int, embed_dim: int = 0,
                 head_dim: int = 0, block: int = 0):
        super().__init__()
        patches = tokens_in - num_prefix_tokens
        if not 1 <= r <= patches // 2:
            raise ValueError(f"MergeTokens merges {r} of {patches} patch tokens; r must be in "
                             f"[1, {patches // 2}] (at most half of them)")
        self.expected_tokens = int(tokens_in)
        self.r = int(r)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.embed_dim, self.head_dim = int(embed_dim), int(head_dim)
        self.block = int(block)

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in - self.r

    def forward(self, state: TokenState) -> TokenState:
        x, size = state.x, state.size
        # n from the shape (equal to expected_tokens, which EncoderIR.check() enforces), so one
        # merge exported with a symbolic count (per parity of the count: TVM's stage import,
        # vitopt/backends/tvm_stage_import.py) serves every block with the same r.
        batch, n, p, r = x.shape[0], x.shape[1], self.num_prefix_tokens, self.r
        nb = (n - p) // 2
        na = n - p - nb  # not (n - p + 1) // 2: export could not prove the sum is n - p
        keys = state.keys / state.keys.norm(dim=-1, keepdim=True)
        # A = tokens p, p+2, ...; B = p+1, p+3, ...: the same gathers, by a constant index.
        a_keys = keys.index_select(1, torch.arange(p, n, 2, device=x.device))
        b_keys = keys.index_select(1, torch.arange(p + 1, n, 2, device=x.device))
        scores = a_keys @ b_keys.transpose(1, 2)                          # [B, Na, Nb]
        best = scores.amax(dim=-1, keepdim=True)
        # argmax as Equal + Where + ReduceMax (the last best B among ties): OpenVINO runs an
        # ArgMax as TopK(k=1) along the row, which cost more than the whole rest of the merge.
        match = torch.where(scores == best, torch.arange(nb, device=x.device), 0).amax(dim=-1)
        best = best.squeeze(-1)                                          # [B, Na]
        order = rank(best, descending=False)                             # unmerged first, r last
        dst = batch_rows(match, order[:, na - r:])                       # [B, r] index into B
        fixed = torch.cat([torch.arange(p, device=x.device),
                           torch.arange(p + 1, n, 2, device=x.device)])  # prefix, then B
        # Kept rows in their final order, and the r sources: two gathers, not one gather and a
        # split of the rows (OpenVINO runs that Split as a reference kernel).
        keep_index = torch.cat([fixed.unsqueeze(0).expand(batch, p + nb),
                                p + 2 * order[:, :na - r]], dim=1)       # [B, N-r]
        src_index = p + 2 * order[:, na - r:]                            # [B, r]
        keep, src = batch_rows(x, keep_index), batch_rows(x, src_index)
        # assign[b, i, j] = 1 when source j merges into kept row i (its B destination).
        assign = (torch.arange(n - r, device=x.device).reshape(1, -1, 1)
                  == (dst + p).unsqueeze(1)).to(x.dtype)                 # [B, N-r, r]
        # Size-weighted average, with every division on the small [B, N-r, *] weights and the
        # token rows only multiplied and summed: OpenVINO then keeps the stream in bf16 (a
        # matmul fed straight by the 0/1 Cast, or a Div of the rows, pins it to f32).
        if size is None:
            total = 1.0 + assign.sum(dim=-1, keepdim=True)                # [B, N-r, 1]
            inverse = 1.0 / total
            merged = keep * inverse + (assign * inverse) @ src
        else:
            keep_size, src_size = batch_rows(size, keep_index), batch_rows(size, src_index)
            weight = assign * src_size.transpose(1, 2)                     # [B, N-r, r]
            total = keep_size + weight.sum(dim=-1, keepdim=True)
            inverse = 1.0 / total
            merged = keep * (keep_size * inverse) + (weight * inverse) @ src
        return TokenState(merged, size=total)

    def flops(self, tokens_in: int) -> int:
        return merge_flops(tokens_in, self.num_prefix_tokens, self.r, self.embed_dim, self.head_dim)

    def describe(self) -> str:
        return f"merge {self.r} patch tokens (bipartite, key cosine), size-weighted"


# --- selection for patch-token outputs (VLM) ---------------------------------------------
class SelectTokens(Stage):
    """Keep the `keep` most-attended patch tokens of a patch-token output, in image order.

    For encoders whose output is the token sequence (a VLM's vision tower): the tokens the
    class token (or, without one, the mean query) attends to most in a chosen block are the
    informative ones (the ranking FastV and FoPru use to drop visual tokens before the
    language model). Prefix tokens stay first. With `positions`, two channels are appended
    to every output token: its patch row and column in the image grid (-1, -1 for prefix
    tokens). Small integers (<= 256) are exact in bf16/fp16 engines, which a flat index
    over a grid of more than 256 patches would not be.
    """

    kind = "select"
    reads = ("cls_attn",)

    def __init__(self, *, tokens_in: int, keep: int, num_prefix_tokens: int, grid_width: int,
                 positions: bool = True, block: int = 0, signal: str = "cls"):
        super().__init__()
        _check_keep("SelectTokens", keep, tokens_in - num_prefix_tokens)
        self.expected_tokens = int(tokens_in)
        self.keep = int(keep)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.grid_width = int(grid_width)
        self.positions = bool(positions)
        self.block = int(block)
        self.signal = signal

    def tokens_out(self, tokens_in: int) -> int:
        return self.num_prefix_tokens + self.keep

    def forward(self, state: TokenState) -> TokenState:
        x = state.x
        b, p = x.shape[0], self.num_prefix_tokens
        top = rank(state.cls_attn[:, p:])[:, :self.keep]
        top = top.topk(self.keep, dim=1, largest=False).values          # back to image order
        rows = batch_rows(x, torch.cat([_prefix_index(b, p, x), top + p], dim=1))
        size = None
        if state.size is not None:
            size = batch_rows(state.size, torch.cat([_prefix_index(b, p, x), top + p], dim=1))
        if self.positions:
            grid = torch.stack([torch.div(top, self.grid_width, rounding_mode="floor"),
                                top % self.grid_width], dim=-1).to(x.dtype)      # [B, k, 2]
            prefix = torch.full((1, p, 2), -1.0, dtype=x.dtype, device=x.device).expand(b, p, 2)
            rows = torch.cat([rows, torch.cat([prefix, grid], dim=1)], dim=-1)
        return TokenState(rows, size=size)

    def describe(self) -> str:
        pos = ", + (row, col) channels" if self.positions else ""
        return f"keep top {self.keep} patch tokens in image order{pos}"


def keep_count(rate: float, patches: int) -> int:
    """Patch tokens kept at keep rate `rate` (EViT rounds up)."""
    return max(1, min(patches, math.ceil(rate * patches - 1e-9)))


REDUCE_STAGES = (PruneTokens, MergeTokens, SelectTokens)


# --- helpers the passes share ---------------------------------------------------------------
def attention_signal(ir) -> Tuple[str, int]:
    """Which attention row ranks patch tokens: ("cls", 0) when token 0 is a class token the
    output is read from, else ("mean", p): the mean query of the patch tokens (q_mean . K^T,
    still one row), for encoders without a class token or with mean pooling."""
    pool, prefix = ir.pool(), ir.num_prefix_tokens
    if prefix >= 1 and (pool is None or pool.pool != "mean"):
        return "cls", 0
    return "mean", prefix


def signal_name(signal: Tuple[str, int]) -> str:
    return ("class-token attention (q_cls . K^T)" if signal[0] == "cls" else
            f"mean-query attention (q_mean . K^T, mean over tokens {signal[1]}..N)")


def record_signal(attention, signal: Tuple[str, int]) -> None:
    attention.record_cls_attn = True
    attention.cls_attn_query, attention.cls_attn_from = signal


def attention_index(ir, block: int) -> int:
    """Index in ir.stages of block `block`'s attention stage."""
    return next(i for i, s in enumerate(ir.stages) if isinstance(s, Attention) and s.block == block)


def insert_after_attention(ir, block: int, stage: Stage) -> None:
    ir.stages.insert(attention_index(ir, block) + 1, stage)


def tokens_at_attention(ir, block: int) -> int:
    return ir.token_counts()[attention_index(ir, block)]


def tokens_at_end(ir) -> int:
    """Tokens entering pooling (or the traced tail)."""
    index = next(i for i, s in enumerate(ir.stages) if isinstance(s, (Pool, TracedTail)))
    return ir.token_counts()[index]


def tail_refusal(ir, tokens: int) -> Optional[str]:
    """None when the traced tail (if any) runs on `tokens` tokens and gives the same output
    shape as on the full count; otherwise why not. Tested by running it."""
    index, tail = next(((i, s) for i, s in enumerate(ir.stages) if isinstance(s, TracedTail)),
                       (None, None))
    if tail is None or tail.accepts_any_tokens:
        return None
    full, dim = ir.token_counts()[index], ir.stem.embed_dim
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            expected = tail.body(torch.randn(2, full, dim, generator=gen)).shape
            got = tail.body(torch.randn(2, tokens, dim, generator=gen)).shape
    except Exception as exc:  # a traced graph fails in many ways; any of them means "no"
        return (f"the traced tail (pooling + head) fails on {tokens} tokens instead of {full} "
                f"({type(exc).__name__}); its traced graph bakes in the token count")
    if got[1:] != expected[1:]:
        return (f"the traced tail (pooling + head) gives shape {list(got)} on {tokens} tokens "
                f"instead of {list(expected)}; its traced graph bakes in the token count")
    return None


def has_stage(ir, cls) -> bool:
    return any(isinstance(s, cls) for s in ir.stages)


def last_reduction_block(ir) -> Optional[int]:
    """The block of the last token-reduction stage already in the IR (None: there is none).
    A new reduction must come after it: the stages after a reduction are built for fixed
    token counts. An attention stage cut to the output's tokens (trim_last_block) counts too."""
    blocks = [s.block for s in ir.stages if isinstance(s, REDUCE_STAGES)
              or (isinstance(s, Attention) and s.query_tokens is not None)]
    return max(blocks) if blocks else None


def _check_keep(stage: str, keep: int, patches: int) -> None:
    """A token-selection stage must keep at least one patch token and drop at least one."""
    if not 1 <= keep < patches:
        raise ValueError(f"{stage} keeps {keep} of {patches} patch tokens; keep must be in "
                         f"[1, {patches - 1}]")

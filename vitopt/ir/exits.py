"""Early-exit head stages: small classifiers attached after a block of the encoder chain.

An `ExitHead` is a pass-through stage in the reference executor (its `forward` returns the
token state unchanged, so an IR with exits computes exactly the model without them); its
`logits(state)` gives the exit's class scores. The segmented lowering (vitopt.exits.segments)
calls `logits` at the end of each segment and the runtime decides per sample whether to stop.

Two head kinds, after LGViT (Xu et al. 2023, "LGViT: Dynamic Early Exiting for Accelerating
Vision Transformer", ACM MM 2023), which attaches heterogeneous heads: heavier heads that
aggregate information over all tokens at shallow exits (whose class token has not gathered
much yet), light ones deeper in the network:
  * "linear":    LayerNorm -> class token (or size-weighted mean of patch tokens) -> Linear.
  * "attn_pool": LayerNorm -> one learned query attending over all tokens (multi-head, with
                 log(size) added to the logits when tokens were merged, as ToMe's proportional
                 attention) -> Linear projection + residual of the pooled token -> LayerNorm
                 -> Linear. LGViT's shallow heads use convolutions over the patch grid; a
                 query-attention pool is used here instead because it works on any token count
                 (after merging or pruning the patch grid is gone).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitopt.ir.stages import Stage, linear_flops
from vitopt.ir.state import TokenState

HEAD_KINDS = ("linear", "attn_pool")
POOLS = ("cls", "mean")


class ExitHead(Stage):
    """An early exit after block `block`: pass-through in forward, class scores in `logits`."""

    kind = "exit"
    rule = "confidence"
    threshold = 1.0  # never exits
    fixed_threshold = False  # True: set by the user, calibration leaves it

    def __init__(self, *, block: int, head: str, pool: str, num_prefix_tokens: int,
                 embed_dim: int, num_classes: int, num_heads: int = 1, seed: int = 0):
        super().__init__()
        if head not in HEAD_KINDS:
            raise ValueError(f"unknown exit head {head!r}; expected one of {HEAD_KINDS}")
        if pool not in POOLS:
            raise ValueError(f"unknown exit pooling {pool!r}; expected one of {POOLS}")
        self.block, self.head, self.pool = int(block), head, pool
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.embed_dim, self.num_classes = int(embed_dim), int(num_classes)
        self.num_heads = int(num_heads) if head == "attn_pool" else 1
        if self.embed_dim % self.num_heads:
            self.num_heads = 1
        generator = torch.Generator().manual_seed(seed)  # deterministic initial weights
        self.norm = nn.LayerNorm(embed_dim)
        if head == "attn_pool":
            self.query = nn.Parameter(torch.randn(1, 1, embed_dim, generator=generator) * 0.02)
            self.kv = _linear(embed_dim, 2 * embed_dim, generator)
            self.proj = _linear(embed_dim, embed_dim, generator)
            self.post_norm = nn.LayerNorm(embed_dim)
        self.fc = _linear(embed_dim, num_classes, generator)

    # --- reference executor ------------------------------------------------------------------
    def forward(self, state: TokenState) -> TokenState:
        return state  # exits never change the backbone's computation

    def logits(self, state: TokenState) -> torch.Tensor:
        """Class scores [B, num_classes] of this exit for the token state after its block."""
        if self.head == "linear" and self.pool == "cls":
            return self.fc(self.norm(state.x[:, 0]))  # LayerNorm is per token: norm one row only
        h = self.norm(state.x)
        feature = self._attention_pool(h, state.size) if self.head == "attn_pool" else self._pool(h, state.size)
        return self.fc(feature)

    def _pool(self, h: torch.Tensor, size) -> torch.Tensor:
        if self.pool == "cls":
            return h[:, 0]
        patches = h[:, self.num_prefix_tokens:]
        if size is None:
            return patches.mean(dim=1)
        weight = size[:, self.num_prefix_tokens:]
        return (patches * weight).sum(dim=1) / weight.sum(dim=1)

    def _attention_pool(self, h: torch.Tensor, size) -> torch.Tensor:
        b, n, d = h.shape
        heads, dh = self.num_heads, d // self.num_heads
        k, v = (t.reshape(b, n, heads, dh).transpose(1, 2) for t in self.kv(h).chunk(2, dim=-1))
        q = self.query.expand(b, 1, d).reshape(b, 1, heads, dh).transpose(1, 2)
        mask = size.log().reshape(b, 1, 1, n).to(h.dtype) if size is not None else None
        pooled = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)       # [B, H, 1, Dh]
        pooled = self.proj(pooled.transpose(1, 2).reshape(b, d))
        return self.post_norm(pooled + self._pool(h, size))

    # --- bookkeeping -----------------------------------------------------------------------
    def head_flops(self, tokens: int) -> int:
        """FLOPs of this head on one image with `tokens` tokens (only paid when it runs)."""
        flops = linear_flops(self.fc, 1)
        if self.head == "attn_pool":
            flops += linear_flops(self.kv, tokens) + linear_flops(self.proj, 1) + 4 * tokens * self.embed_dim
        return flops

    def flops(self, tokens_in: int) -> int:
        return 0  # the full-depth path does not run the head; see head_flops

    def describe(self) -> str:
        what = "attention pool" if self.head == "attn_pool" else f"{self.pool} token"
        return f"exit after block {self.block}: {what} -> linear {self.embed_dim}->{self.num_classes}"


def _linear(fan_in: int, fan_out: int, generator: torch.Generator) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(fan_out, fan_in, generator=generator) * 0.02)
        layer.bias.zero_()
    return layer


def exit_stages(ir) -> list:
    """The IR's exit heads in chain order."""
    return [s for s in ir.stages if isinstance(s, ExitHead)]


def exit_indices(ir) -> list:
    """Positions of the exit heads in ir.stages."""
    return [i for i, s in enumerate(ir.stages) if isinstance(s, ExitHead)]

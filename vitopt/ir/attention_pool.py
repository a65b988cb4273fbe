"""Attention pooling (MAP): learned latent queries attend over the tokens, then a residual MLP.

The pooling head of SigLIP (Hugging Face `SiglipMultiheadAttentionPoolingHead`, timm
`global_pool="map"`), after "Multihead Attention Pooling" in Zhai et al., "Scaling Vision
Transformers" (2022): with latents L [l, D] (usually l = 1),

    y = proj(MHA(q(L), k(x), v(x)))          [B, l, D]
    y = y + fc2(act(fc1(norm(y))))
    out = y[:, 0]   (or the mean over the latents)

As a typed stage it runs on any token count, so token reduction can run before it; when tokens
carry sizes (merging), log(size) is added to the logits (proportional attention, as in every
attention stage), so a merged token of size s weighs like the s tokens it stands for.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitopt.ir.stages import Mlp, Pool, linear_flops
from vitopt.ir.state import TokenState

#: How the latents' outputs become one feature vector.
LATENT_REDUCTIONS = ("first", "mean")


class AttentionPool(Pool):
    """Tokens [B, N, D] -> features [B, D] by attention from learned latent queries."""

    kinds = ("map",)

    def __init__(self, *, latent: torch.Tensor, q: nn.Linear, kv: nn.Linear, proj: nn.Linear,
                 num_heads: int, scale: float, mlp: Mlp, reduce: str = "first"):
        super().__init__("map")
        dim = proj.out_features
        if latent.dim() != 2 or latent.shape[1] != dim:
            raise ValueError(f"latent queries must be [l, {dim}], got {list(latent.shape)}")
        if kv.out_features != 2 * dim or q.out_features != dim:
            raise ValueError(f"attention pooling needs q -> {dim} and fused kv -> {2 * dim} "
                             f"outputs, got {q.out_features} and {kv.out_features}")
        if dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the width {dim}")
        if reduce not in LATENT_REDUCTIONS:
            raise ValueError(f"unknown latent reduction {reduce!r}; expected one of "
                             f"{LATENT_REDUCTIONS}")
        self.latent = nn.Parameter(latent.detach().clone(), requires_grad=False)
        self.q, self.kv, self.proj, self.mlp = q, kv, proj, mlp
        self.num_heads, self.head_dim = int(num_heads), dim // int(num_heads)
        self.scale = float(scale)
        self.reduce = reduce
        # Proportional attention over merged tokens; merge_tokens sets it with its option.
        self.size_bias = True

    @property
    def embed_dim(self) -> int:
        return self.proj.out_features

    def forward(self, state: TokenState) -> TokenState:
        x = state.x
        b, n, _ = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        latents = self.latent.shape[0]
        # The latent queries do not depend on the input: engines fold this projection.
        q = self.q(self.latent).reshape(1, latents, heads, head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None
        if state.size is not None and self.size_bias:
            mask = state.size.log().reshape(b, 1, 1, n).to(x.dtype)
        out = F.scaled_dot_product_attention(q.expand(b, -1, -1, -1), k, v, attn_mask=mask,
                                             scale=self.scale)
        y = self.proj(out.transpose(1, 2).reshape(b, latents, heads * head_dim))
        y = self.mlp(TokenState(y)).x
        return TokenState(y[:, 0] if self.reduce == "first" else y.mean(dim=1))

    def tokens_out(self, tokens_in: int) -> int:
        return 1

    def flops(self, tokens_in: int) -> int:
        latents = self.latent.shape[0]
        attention = 2 * 2 * latents * tokens_in * self.embed_dim  # q.K^T and attn.V
        return (linear_flops(self.kv, tokens_in) + linear_flops(self.q, latents) + attention +
                linear_flops(self.proj, latents) + self.mlp.flops(latents))

    def describe(self) -> str:
        latents = self.latent.shape[0]
        which = "latent 0" if self.reduce == "first" else "mean over latents"
        return (f"attention pooling: {latents} latent quer{'y' if latents == 1 else 'ies'}, "
                f"{self.num_heads} heads x {self.head_dim}, + MLP "
                f"{self.mlp.fc1.in_features}->{self.mlp.fc1.out_features}, {which}")

"""Typed stage nodes of the encoder IR.

Each stage is a small nn.Module that maps a TokenState to a TokenState, so the chain
runs as plain PyTorch (the reference executor) and exports as one graph. Stages have
typed attributes that passes read and rewrite, and report their own token counts,
FLOPs and parameters for `vitopt inspect`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitopt.ir.state import TokenState

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu")


def apply_activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if kind == "relu":
        return F.relu(x)
    if kind == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {kind!r}; expected one of {ACTIVATIONS}")


def linear_flops(layer: nn.Module, rows: int) -> int:
    """Multiply-accumulates of a linear layer on `rows` input rows, counted as 2 FLOPs each."""
    return 2 * rows * layer.in_features * layer.out_features


def count_params(module: nn.Module) -> int:
    """Parameters, counting int8 weights (buffers of vitopt.ir.quant.QuantLinear) too."""
    return (sum(p.numel() for p in module.parameters()) +
            sum(b.numel() for name, b in module.named_buffers() if name.endswith("weight_q")))


class Stage(nn.Module):
    """Base class: a typed node of the chain."""

    kind = "stage"
    #: precision annotation written by precision passes ("fp32", "fp16", "bf16", "int8", or
    #: "int8+fp32" when quantize_int8 kept some of the stage's linears in fp32).
    precision = "fp32"
    #: TokenState fields this stage needs from an attention stage before it ("cls_attn", "keys").
    reads: tuple = ()
    #: the token count the stage was built for (token-reduction stages); None: any.
    expected_tokens: Optional[int] = None

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in

    def flops(self, tokens_in: int) -> int:
        """FLOPs for one image entering with `tokens_in` tokens."""
        return 0

    def describe(self) -> str:
        return ""


class GraphStage(Stage):
    """A stage whose body is a slice of the traced ATen graph (kept as a GraphModule).

    Used for the stem (patch embedding, prefix tokens, position embedding, any pre-norm)
    and for heads vitopt does not need to understand. Passes treat it as opaque.
    """

    def __init__(self, graph_module: nn.Module):
        super().__init__()
        self.body = graph_module

    def forward(self, state: TokenState) -> TokenState:
        return state.with_x(self.body(state.x))

    def flops(self, tokens_in: int) -> int:
        return self.measured_flops

    measured_flops = 0


class Stem(GraphStage):
    """Images [B, C, H, W] -> tokens [B, N, D]: patch embedding, prefix tokens, position embedding."""

    kind = "stem"

    def __init__(self, graph_module, *, image_size, patch_size, in_chans, embed_dim,
                 num_prefix_tokens, num_tokens):
        super().__init__(graph_module)
        self.image_size = tuple(image_size)
        self.patch_size = tuple(patch_size)
        self.in_chans = int(in_chans)
        self.embed_dim = int(embed_dim)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.num_tokens = int(num_tokens)

    def tokens_out(self, tokens_in: int) -> int:
        return self.num_tokens

    def flops(self, tokens_in: int) -> int:
        patches = self.num_tokens - self.num_prefix_tokens
        return 2 * patches * self.in_chans * self.patch_size[0] * self.patch_size[1] * self.embed_dim

    def describe(self) -> str:
        return (f"patch {self.patch_size[0]}x{self.patch_size[1]}, image {self.image_size[0]}x"
                f"{self.image_size[1]}, prefix {self.num_prefix_tokens}")


class Attention(Stage):
    """x + ls * proj(MHSA(norm(x))), pre-norm multi-head self-attention.

    Projections are either one fused `qkv` Linear (timm, torchvision) or separate `q`,
    `k`, `v` Linears (Hugging Face); `fuse_qkv` turns the second into the first.
    """

    kind = "attn"

    def __init__(self, *, norm: nn.LayerNorm, num_heads: int, proj: nn.Linear,
                 qkv: Optional[nn.Linear] = None, q: Optional[nn.Linear] = None,
                 k: Optional[nn.Linear] = None, v: Optional[nn.Linear] = None,
                 scale: Optional[float] = None, layer_scale: Optional[torch.Tensor] = None,
                 block: int = 0):
        super().__init__()
        if (qkv is None) == (q is None or k is None or v is None):
            raise ValueError("Attention needs either a fused qkv projection or all of q, k, v")
        self.norm = norm
        self.qkv, self.q, self.k, self.v = qkv, q, k, v
        self.proj = proj
        self.num_heads = int(num_heads)
        self.head_dim = proj.in_features // self.num_heads
        self.scale = float(scale) if scale is not None else self.head_dim ** -0.5
        self.layer_scale = nn.Parameter(layer_scale) if layer_scale is not None else None
        self.block = int(block)
        # Side outputs requested by token-reduction passes (see TokenState).
        self.record_cls_attn = False
        self.record_keys = False
        # The query whose attention row `cls_attn` holds: "cls" (token 0), or "mean" (the mean
        # query of tokens cls_attn_from..N, for encoders without a class token).
        self.cls_attn_query = "cls"
        self.cls_attn_from = 0
        # Proportional attention (ToMe): add log(size) to the logits when tokens carry sizes.
        self.size_bias = True
        # Fake quantization of the attention matmul inputs (vitopt.ir.quant.AttentionQuant);
        # None keeps attention in float, fused by the engines.
        self.attn_quant = None
        # The head-averaged key projection as its own layer (an int8 QuantLinear that
        # quantize_int8 builds for a merging block, sharing the qkv input's quantizer); None
        # derives it from the qkv/k weights on the fly (`mean_key_projection`).
        self.merge_key_proj = None
        # Only the first `query_tokens` tokens leave this stage (trim_last_block: the output
        # reads no others): their queries attend over every token's keys and values, and the
        # other rows are never computed. None: every token.
        self.query_tokens = None

    @property
    def embed_dim(self) -> int:
        return self.norm.normalized_shape[0]

    def heads_qkv(self, h: torch.Tensor, queries: Optional[int] = None):
        """q, k, v per head, [B, heads, N, head_dim] (q for the first `queries` tokens only when
        given: a separate q projection then runs on those rows alone). A fused qkv output is
        split by reshape + permute + unbind (timm's form), not chunk: OpenVINO runs chunk's
        Split as a slow reference kernel (12 x 20-30 ms for DeiT-S at batch 8 on this CPU,
        PERF_COUNT)."""
        b, n, _ = h.shape
        if self.qkv is not None:
            qkv = self.qkv(h).reshape(b, n, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            return (q if queries is None else q[:, :, :queries]), k, v
        rows = h if queries is None else h[:, :queries]
        return tuple(t.reshape(b, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
                     for t in (self.q(rows), self.k(h), self.v(h)))

    def project_heads(self, out: torch.Tensor) -> torch.Tensor:
        """proj over the heads [B, heads, rows, head_dim] laid side by side. An int8 proj whose
        input quantizer runs before the head merge (`QuantLinear.early_input_quant`) gets it
        here: per-tensor quantization commutes with the transpose and reshape, and engines fuse
        it into the attention kernel's output and transpose int8 values instead of bf16 ones
        (OpenVINO 2026.4, DeiT-S/16 at batch 8: 0.07 ms bf16 transpose + 0.08 ms reorder + 0.05 ms
        FakeQuantize per block become a 0.02 ms int8 transpose)."""
        early = getattr(self.proj, "early_input_quant", None)
        if early is not None:
            out = early(out)
        b, _, rows, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, rows, self.num_heads * self.head_dim))

    def trim_rows(self, state: TokenState, rows: int) -> TokenState:
        """The state leaving a stage with `query_tokens`: the residual stream and the token
        sizes cut to the `rows` whose queries ran."""
        if self.query_tokens is None:
            return state
        size = state.size[:, :rows] if state.size is not None else None
        return TokenState(state.x[:, :rows], size=size)

    def forward(self, state: TokenState) -> TokenState:
        x = state.x
        b, n, _ = x.shape
        h = self.norm(x)
        q, k, v = self.heads_qkv(h, self.query_tokens)
        rows = q.shape[2]
        mask = None
        if state.size is not None and self.size_bias:  # proportional attention (ToMe): + log(size)
            mask = state.size.log().reshape(b, 1, 1, n).to(q.dtype)
        if self.attn_quant is not None:  # int8 attention matmuls (quantize_int8 option)
            out = self.attn_quant(q, k, v, mask, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = self.project_heads(out)
        if self.layer_scale is not None:
            out = out * self.layer_scale
        kept = self.trim_rows(state, rows)
        new = kept.with_x(kept.x + out)
        if self.record_cls_attn:
            # One row of attention per head from q_cls . K^T: never the full N x N matrix.
            query = (q[:, :, :1] if self.cls_attn_query == "cls"
                     else q[:, :, self.cls_attn_from:].mean(dim=2, keepdim=True))
            logits = (query @ k.transpose(-2, -1)).squeeze(2) * self.scale  # [B, H, N]
            if mask is not None:
                logits = logits + mask.reshape(b, 1, n)
            new.cls_attn = logits.softmax(dim=-1).mean(dim=1)
        if self.record_keys:
            new.keys = self.merge_keys(h)
        return new

    def merge_keys(self, h: torch.Tensor) -> torch.Tensor:
        """The keys averaged over heads [B, N, Dh] that token merging compares. Linear in h: one
        small projection with the head-averaged key weights (engines run it as a GEMM; a mean
        over the head axis of the transposed keys ran as a slow reduction in OpenVINO)."""
        if self.merge_key_proj is not None:
            return self.merge_key_proj(h)
        return F.linear(h, *self.mean_key_projection())

    def projections(self):
        return [m for m in (self.qkv, self.q, self.k, self.v, self.proj) if m is not None]

    def mean_key_projection(self):
        """(weight [Dh, D], bias [Dh] or None) giving the keys averaged over heads."""
        dim = self.num_heads * self.head_dim
        if self.qkv is not None:
            weight = self.qkv.weight[dim:2 * dim]
            bias = self.qkv.bias[dim:2 * dim] if self.qkv.bias is not None else None
        else:
            weight, bias = self.k.weight, self.k.bias
        weight = weight.reshape(self.num_heads, self.head_dim, -1).mean(dim=0)
        if bias is not None:
            bias = bias.reshape(self.num_heads, self.head_dim).mean(dim=0)
        return weight, bias

    def records(self) -> set:
        """The TokenState fields this stage writes for the stages after it."""
        return {name for name, on in (("cls_attn", self.record_cls_attn),
                                      ("keys", self.record_keys)) if on}

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in if self.query_tokens is None else min(tokens_in, self.query_tokens)

    def flops(self, tokens_in: int) -> int:
        n, rows = tokens_in, self.tokens_out(tokens_in)
        attn_flops = 2 * 2 * rows * n * self.num_heads * self.head_dim  # q.K^T and attn.V
        return self.projection_flops(n) + attn_flops

    def projection_flops(self, tokens_in: int) -> int:
        """The q/k/v (or qkv) and output projections; a separate q and the output projection run
        on the kept rows only (query_tokens)."""
        rows = self.tokens_out(tokens_in)
        return sum(linear_flops(m, rows if m is self.q or m is self.proj else tokens_in)
                   for m in self.projections())

    def describe(self) -> str:
        qkv = "fused qkv" if self.qkv is not None else "separate q/k/v"
        ls = ", layer scale" if self.layer_scale is not None else ""
        rows = (f", queries of the first {self.query_tokens} tokens only"
                if self.query_tokens else "")
        return f"{self.num_heads} heads x {self.head_dim}, {qkv}{ls}{rows}"


class Mlp(Stage):
    """x + ls * fc2(act(fc1(norm(x))))."""

    kind = "mlp"

    def __init__(self, *, norm: nn.LayerNorm, fc1: nn.Linear, fc2: nn.Linear, act: str,
                 layer_scale: Optional[torch.Tensor] = None, block: int = 0):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
        self.norm, self.fc1, self.fc2, self.act = norm, fc1, fc2, act
        self.layer_scale = nn.Parameter(layer_scale) if layer_scale is not None else None
        self.block = int(block)

    def forward(self, state: TokenState) -> TokenState:
        x = state.x
        out = self.fc2(apply_activation(self.fc1(self.norm(x)), self.act))
        if self.layer_scale is not None:
            out = out * self.layer_scale
        return state.with_x(x + out)

    def flops(self, tokens_in: int) -> int:
        return linear_flops(self.fc1, tokens_in) + linear_flops(self.fc2, tokens_in)

    def describe(self) -> str:
        ls = ", layer scale" if self.layer_scale is not None else ""
        return f"{self.fc1.in_features}->{self.fc1.out_features}->{self.fc2.out_features}, {self.act}{ls}"


class Norm(Stage):
    """The final LayerNorm over every token."""

    kind = "norm"

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.norm = norm

    def forward(self, state: TokenState) -> TokenState:
        return state.with_x(self.norm(state.x))


POOL_KINDS = ("cls", "mean", "none")


class Pool(Stage):
    """Tokens [B, N, D] -> features [B, D] (class token, mean of patch tokens), or none.

    `none` keeps the token sequence (a VLM's patch-token output). Attention pooling ("map")
    is the subclass vitopt.ir.attention_pool.AttentionPool.
    """

    kind = "pool"
    #: the pooling kinds this class implements (AttentionPool adds "map")
    kinds = POOL_KINDS

    def __init__(self, kind: str, num_prefix_tokens: int = 0):
        super().__init__()
        if kind not in self.kinds:
            raise ValueError(f"unknown pooling {kind!r}; expected one of {self.kinds}")
        self.pool = kind
        self.num_prefix_tokens = int(num_prefix_tokens)

    def forward(self, state: TokenState) -> TokenState:
        x = state.x
        if self.pool == "cls":
            return TokenState(x[:, 0])
        if self.pool == "mean":
            patches = x[:, self.num_prefix_tokens:]
            if state.size is None:
                return TokenState(patches.mean(dim=1))
            size = state.size[:, self.num_prefix_tokens:]
            return TokenState((patches * size).sum(dim=1) / size.sum(dim=1))
        return TokenState(x)

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in if self.pool == "none" else 1

    def describe(self) -> str:
        if self.pool == "mean":
            return f"mean over tokens from index {self.num_prefix_tokens}"
        return {"cls": "class token", "none": "keep all tokens"}[self.pool]


class Head(Stage):
    """The classifier / projection: a Linear, the identity, or an opaque traced graph."""

    kind = "head"

    def __init__(self, module: Optional[nn.Module] = None):
        super().__init__()
        self.body = module if module is not None else nn.Identity()

    def forward(self, state: TokenState) -> TokenState:
        return state.with_x(self.body(state.x))

    def flops(self, tokens_in: int) -> int:
        if isinstance(self.body, nn.Linear):
            return linear_flops(self.body, tokens_in)
        return 0

    def describe(self) -> str:
        if isinstance(self.body, nn.Linear):
            return f"linear {self.body.in_features}->{self.body.out_features}"
        if isinstance(self.body, nn.Identity):
            return "identity"
        return "traced graph"


class TracedTail(GraphStage):
    """Everything after the last block that vitopt did not recognise (e.g. attention pooling).

    Consumes the token sequence, so token-changing passes must check `accepts_any_tokens`.
    """

    kind = "tail"
    accepts_any_tokens = False

    def tokens_out(self, tokens_in: int) -> int:
        return 1

    def describe(self) -> str:
        return "traced graph (pooling + head)"


def layer_norm_from(weight, bias, eps, dim) -> nn.LayerNorm:
    norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=weight is not None, bias=bias is not None)
    with torch.no_grad():
        if weight is not None:
            norm.weight.copy_(weight)
        if bias is not None:
            norm.bias.copy_(bias)
    return norm


def linear_from(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)

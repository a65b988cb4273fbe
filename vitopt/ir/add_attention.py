"""AddAttention: attention with binary-coded queries and keys (Hamming similarity), linear form.

The IR node that `reparam_shiftadd attention=add` puts where a softmax `Attention` stage was.
It follows ShiftAddViT (You et al., NeurIPS 2023), which reparameterizes attention by mapping
queries and keys to binary codes in Hamming space, as Ecoformer (Liu et al., NeurIPS 2022,
kernelized hashing) does, and computing attention in linear-attention form, so the products
with the +-1 codes become additions and subtractions. Per head:

    b_q = sign(q H - t), b_k = sign(k H - t)       H [head_dim, m], t [m]: a hashing projection
    s_ij = (m + b_qi . b_kj) / 2 = m - Hamming(b_qi, b_kj)   in [0, m]
    out_i = sum_j w_j s_ij v_j / sum_j w_j s_ij             w_j: token size (1 without merging)
          = ((m/2) sum_j w_j v_j + (1/2) b_qi (b_k^T (w V))) / ((m/2) sum_j w_j + (1/2) b_qi . (b_k^T w))

sign is where(x >= 0, 1, -1), so a code is never 0. The second line is what `forward` runs:
b_k^T (w V) is [m, head_dim], so the cost is O(N m head_dim) instead of O(N^2 head_dim), and
every product in it has a +-1 operand (additions on hardware with such a kernel; the ONNX /
TVM lowerings here run it as an ordinary float MatMul with +-1 values, which is exact in
value: no speed-up is claimed for those engines). The hashing projection itself, q H and k H,
is a real multiply of the same order (2 N head_dim m per head).

Token sizes (merge_tokens' proportional attention adds log(size) to the softmax logits, i.e.
weights key j by size_j): here each key's similarity is weighted by size_j, the same reading.
Side outputs for token reduction (record_cls_attn, record_keys) are kept: the class-token row
is the normalised add-similarity row s_0j w_j / sum_j s_0j w_j, the keys are the float keys.
With `attn_quant` set (quantize_int8 attention=qkv), q, k and v are fake-quantized
before hashing, as the softmax stage does before its matmuls (attention=qk leaves them float).

Training (vitopt.data.shiftadd_finetune): in training mode the sign is straight-through
(forward sign, backward the gradient of clamp(x, -1, 1)), so H and t learn with the network.
`pca_hashing` initialises H and t from calibration queries and keys (PCA hashing: the top-m
principal directions of the joint q/k cloud, whitened so every bit sees unit variance, and t
at the mean, so bits are balanced); directions beyond head_dim are random Gaussian.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vitopt.ir.stages import Attention
from vitopt.ir.state import TokenState

#: Attributes of an Attention stage that passes set and that AddAttention keeps.
COPIED_FLAGS = ("record_cls_attn", "record_keys", "cls_attn_query", "cls_attn_from", "size_bias",
                "precision", "merge_key_proj", "query_tokens")
EPS = 1e-6  # guards the normaliser, which is 0 only when every key's code is the query's complement


def binary_sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where x >= 0, -1 elsewhere (never 0), in x's dtype."""
    return torch.where(x >= 0, torch.ones((), dtype=x.dtype), -torch.ones((), dtype=x.dtype))


def ste_sign(x: torch.Tensor) -> torch.Tensor:
    """binary_sign forward, gradient of clamp(x, -1, 1) backward (straight-through estimator)."""
    clipped = x.clamp(-1.0, 1.0)
    return clipped + (binary_sign(x) - clipped).detach()


def add_attention_linear(bq, bk, v, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Linear form. bq, bk [B, H, N, m] of +-1; v [B, H, N, d]; weight [B, 1, N, 1] or None."""
    m = bq.shape[-1]
    wv = v if weight is None else v * weight
    kv = bk.transpose(-2, -1) @ wv                                   # [B, H, m, d]
    num = 0.5 * m * wv.sum(dim=2, keepdim=True) + 0.5 * (bq @ kv)  # [B, H, N, d]
    if weight is None:
        ksum, wsum = bk.sum(dim=2, keepdim=True), float(bk.shape[2])
    else:
        ksum, wsum = (bk * weight).sum(dim=2, keepdim=True), weight.sum(dim=2, keepdim=True)
    den = 0.5 * m * wsum + 0.5 * (bq * ksum).sum(dim=-1, keepdim=True)  # [B, H, N, 1]
    return num / den.clamp_min(EPS)


def add_attention_quadratic(bq, bk, v, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same attention with the N x N similarity matrix (reference for tests)."""
    s = 0.5 * (bq.shape[-1] + bq @ bk.transpose(-2, -1))            # [B, H, N, N]
    if weight is not None:
        s = s * weight.transpose(-2, -1)
    return (s @ v) / s.sum(dim=-1, keepdim=True).clamp_min(EPS)


class AddAttention(Attention):
    """Attention stage with Hamming-similarity linear attention (see the module docstring).

    Holds the same norm, projections and layer scale as the Attention it replaces, plus
    `hash_proj` [heads, head_dim, m] and `hash_offset` [heads, m] (trainable parameters)."""

    def __init__(self, source: Attention, hash_proj: torch.Tensor, hash_offset: torch.Tensor):
        super().__init__(norm=source.norm, num_heads=source.num_heads, proj=source.proj,
                         qkv=source.qkv, q=source.q, k=source.k, v=source.v, scale=source.scale,
                         layer_scale=None, block=source.block)
        self.layer_scale = source.layer_scale
        self.attn_quant = source.attn_quant
        for name in COPIED_FLAGS:
            setattr(self, name, getattr(source, name))
        heads, dim, bits = hash_proj.shape
        if heads != self.num_heads or dim != self.head_dim or tuple(hash_offset.shape) != (heads, bits):
            raise ValueError(f"hash_proj {tuple(hash_proj.shape)} / hash_offset "
                             f"{tuple(hash_offset.shape)} do not fit {self.num_heads} heads x "
                             f"{self.head_dim}; expected [heads, head_dim, m] and [heads, m]")
        self.hash_proj = nn.Parameter(hash_proj.detach().clone().float())
        self.hash_offset = nn.Parameter(hash_offset.detach().clone().float())

    @property
    def hash_bits(self) -> int:
        return self.hash_proj.shape[-1]

    def codes(self, t: torch.Tensor) -> torch.Tensor:
        """+-1 codes [B, H, N, m] of queries or keys t [B, H, N, head_dim]."""
        z = t @ self.hash_proj - self.hash_offset[:, None, :]
        return ste_sign(z) if self.training else binary_sign(z)

    def forward(self, state: TokenState) -> TokenState:
        x = state.x
        b, n, _ = x.shape
        h = self.norm(x)
        q, k, v = self.heads_qkv(h, self.query_tokens)
        rows = q.shape[2]
        if self.attn_quant is not None:
            q, k, v = self.attn_quant.q(q), self.attn_quant.k(k), self.attn_quant.v(v)
        weight = None
        if state.size is not None and self.size_bias:  # proportional attention: weight by size
            weight = state.size.reshape(b, 1, n, 1).to(v.dtype)
        bq, bk = self.codes(q), self.codes(k)
        out = add_attention_linear(bq, bk, v, weight)
        out = self.project_heads(out)
        if self.layer_scale is not None:
            out = out * self.layer_scale
        kept = self.trim_rows(state, rows)
        new = kept.with_x(kept.x + out)
        if self.record_cls_attn:
            new.cls_attn = self._query_row(q, bk, weight)
        if self.record_keys:
            new.keys = self.merge_keys(h)
        return new

    def _query_row(self, q, bk, weight) -> torch.Tensor:
        """The class token's (or mean query's) normalised add-similarity row, head mean [B, N]."""
        query = (q[:, :, :1] if self.cls_attn_query == "cls"
                 else q[:, :, self.cls_attn_from:].mean(dim=2, keepdim=True))
        s = 0.5 * (self.hash_bits + self.codes(query) @ bk.transpose(-2, -1))  # [B, H, 1, N]
        if weight is not None:
            s = s * weight.transpose(-2, -1)
        s = s / s.sum(dim=-1, keepdim=True).clamp_min(EPS)
        return s.squeeze(2).mean(dim=1)

    def flops(self, tokens_in: int) -> int:
        """Projections, hashing (q H, k H: multiplies) and the linear-form attention, whose
        b_k^T V and b_q (.) products with +-1 codes are counted as one FLOP per addition."""
        n, m, d, heads = tokens_in, self.hash_bits, self.head_dim, self.num_heads
        rows = self.tokens_out(n)  # queries (query_tokens): their hashing and b_q products
        hashing = 2 * (rows + n) * d * m
        products = n * m * d + rows * m * d + 2 * rows * m  # b_k^T V, then b_q (.) per query
        return self.projection_flops(n) + heads * (hashing + products)

    def describe(self) -> str:
        return (f"{super().describe()}; add-attention: binary Q/K codes, {self.hash_bits} bits "
                f"per head, Hamming similarity, linear form")


def pca_hashing(queries: torch.Tensor, keys: torch.Tensor, bits: int,
                generator: Optional[torch.Generator] = None):
    """(hash_proj [H, d, m], hash_offset [H, m]) from calibration q, k [H, rows, d] (PCA hashing:
    top principal directions of the joint q/k rows, whitened; offset at the mean projection)."""
    heads, _, dim = queries.shape
    projs, offsets = [], []
    for head in range(heads):
        rows = torch.cat([queries[head], keys[head]]).double()
        mean = rows.mean(dim=0)
        cov = torch.cov((rows - mean).T)
        evals, evecs = torch.linalg.eigh(cov)           # ascending
        top = min(bits, dim)
        directions = evecs[:, -top:].flip(-1) / evals[-top:].flip(-1).clamp_min(1e-12).sqrt()
        if bits > dim:  # more bits than dimensions: random Gaussian directions, whitened too
            extra = torch.randn(dim, bits - dim, generator=generator, dtype=torch.float64)
            extra = extra / ((rows - mean) @ extra).std(dim=0).clamp_min(1e-12)
            directions = torch.cat([directions, extra], dim=1)
        projs.append(directions)
        offsets.append(mean @ directions)
    return torch.stack(projs).float(), torch.stack(offsets).float()


def add_attention_stages(ir) -> dict:
    """{"attn3": AddAttention, ...} over the IR's stages."""
    return {f"{s.kind}{s.block}": s for s in ir.stages if isinstance(s, AddAttention)}


def calibration_qk(ir, stages, images: torch.Tensor, batch: int = 32) -> dict:
    """{stage: (q, k)} with q, k [heads, rows, head_dim]: every query and key that `stages`
    (Attention stages of `ir`) compute on `images`, from one run of the IR (hooks on the norms)."""
    found = {id(s): ([], []) for s in stages}
    hooks = []
    for stage in stages:
        def hook(module, inputs, h, stage=stage):
            q, k, _ = stage.heads_qkv(h)
            found[id(stage)][0].append(q.transpose(0, 1).reshape(stage.num_heads, -1, stage.head_dim))
            found[id(stage)][1].append(k.transpose(0, 1).reshape(stage.num_heads, -1, stage.head_dim))
        hooks.append(stage.norm.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch):
                ir(images[start:start + batch])
    finally:
        for h in hooks:
            h.remove()
    return {s: (torch.cat(found[id(s)][0], dim=1), torch.cat(found[id(s)][1], dim=1))
            for s in stages}


def replace_with_add_attention(ir, stages, images: torch.Tensor, bits: int, seed: int = 0) -> dict:
    """Put an AddAttention (PCA hashing from `images`) where each of `stages` is, in place.
    Returns {old stage: new stage}."""
    qk = calibration_qk(ir, stages, images)
    gen = torch.Generator().manual_seed(seed)
    replaced = {}
    for index, stage in enumerate(ir.stages):
        if stage in qk:
            new = AddAttention(stage, *pca_hashing(*qk[stage], bits, generator=gen))
            ir.stages[index] = new
            replaced[stage] = new
    return replaced

"""Fuse separate q, k, v projections into one qkv Linear (exact).

What: each attention stage with three input projections (Hugging Face ViT, DeiT, CLIP,
SigLIP, DINOv2) gets one Linear whose weight stacks Wq, Wk, Wv (a missing bias becomes
zeros), so engines run one larger GEMM instead of three.
Preconditions: none; stages that already have a fused projection are left alone.
Order: any time before quantization (quantize one GEMM, not three).
Cost: exact up to float summation order (no accuracy cost).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vitopt.ir.stages import Attention
from vitopt.pipeline import PassConfig, PassResult, register_pass


@dataclass(frozen=True)
class FuseQkvConfig(PassConfig):
    pass


def fused_projection(q: nn.Linear, k: nn.Linear, v: nn.Linear) -> nn.Linear:
    parts = (q, k, v)
    has_bias = any(p.bias is not None for p in parts)
    fused = nn.Linear(q.in_features, sum(p.out_features for p in parts), bias=has_bias)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if has_bias:
            fused.bias.copy_(torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features)
                                        for p in parts]))
    return fused


@register_pass("fuse_qkv", config=FuseQkvConfig, exact=True)
def fuse_qkv(ir, config: FuseQkvConfig) -> PassResult:
    fused = 0
    for stage in ir.stages:
        if isinstance(stage, Attention) and stage.qkv is None:
            stage.qkv = fused_projection(stage.q, stage.k, stage.v)
            stage.q = stage.k = stage.v = None
            fused += 1
    if not fused:
        return PassResult(ir, False, {"fused": 0}, ["every attention stage already has a fused qkv projection"])
    return PassResult(ir, True, {"fused": fused}, [f"fused q/k/v in {fused} attention stages"])

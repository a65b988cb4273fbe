"""Fold LayerScale into the projection before it (exact).

What: a branch computing `gamma * (W x + b)` (LayerScale, as in DINOv2, CaiT and timm
models with init_values) becomes `(gamma W) x + gamma b`: one elementwise multiply per
stage disappears and the engine sees a plain Linear.
Preconditions: none; stages without LayerScale are left alone.
Order: before quantization (the folded weight is what gets quantized).
Cost: exact up to float rounding (no accuracy cost).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vitopt.ir.stages import Attention, Mlp
from vitopt.pipeline import PassConfig, PassResult, register_pass


@dataclass(frozen=True)
class FoldLayerScaleConfig(PassConfig):
    pass


def fold_scale_into(linear: torch.nn.Linear, gamma: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.mul_(gamma.reshape(-1, 1))
        if linear.bias is not None:
            linear.bias.mul_(gamma.reshape(-1))


@register_pass("fold_layer_scale", config=FoldLayerScaleConfig, exact=True)
def fold_layer_scale(ir, config: FoldLayerScaleConfig) -> PassResult:
    folded = 0
    for stage in ir.stages:
        if isinstance(stage, (Attention, Mlp)) and stage.layer_scale is not None:
            target = stage.proj if isinstance(stage, Attention) else stage.fc2
            fold_scale_into(target, stage.layer_scale.detach())
            stage.layer_scale = None
            folded += 1
    if not folded:
        return PassResult(ir, False, {"folded": 0}, ["no stage has a LayerScale to fold"])
    return PassResult(ir, True, {"folded": folded}, [f"folded LayerScale into {folded} projections"])

"""Short fine-tune that recovers accuracy after shift-add reparameterization (reparam_shiftadd).

DeepShift-PS (Elhoushi et al. 2021) trains power-of-two weights through a float latent weight
with a straight-through estimator: the forward pass uses the rounded weight (sign * 2^-p times
the per-channel scale fitted once on the pretrained weight; the codes are re-picked from the
latent weight every step, by the same function that freezes them at the end), the backward pass treats the rounding as the
identity. Activations go through the same per-row fixed-point rounding as the integer kernel
(straight-through too). Everything else in the IR (norms, biases, the layers that stay
multiply, the head) trains along with it.

Add-attention (reparam_shiftadd attention=add): the AddAttention stages (vitopt.ir.add_attention)
are already in the IR when this runs; their hashing projections and offsets train with the
rest, through the straight-through sign their training mode uses (forward sign, backward the
gradient of clamp(z, -1, 1); Ecoformer, Liu et al. 2022, and ShiftAddViT, You et al. 2023, learn
their binary codes this way too), at HASH_LR_SCALE times the learning rate: the projections are
whitened (entries of order 1), so at the network's rate they would hardly move in a short run.

Deterministic for a seed and thread count (vitopt.data.proxy's settings: 2 threads,
deterministic algorithms), labelled images from `builtin:digits` (train split) or an image
folder (its train/ subfolder when present); progress goes to stderr, one line per epoch.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitopt.ir.shift import (ShiftLinear, codes_for_scale, codes_to_weight, encode_weight,
                             fake_shift_linear)

BATCH = 32
WEIGHT_DECAY = 0.0
MAX_SHIFT_PIXELS = 2
LABEL_SMOOTHING = 0.1
HASH_LR_SCALE = 10.0
HASH_PARAMS = ("hash_proj", "hash_offset")


class TrainableShift(nn.Module):
    """A float latent weight whose forward uses its power-of-two rounding (straight-through)."""

    def __init__(self, linear: nn.Linear, max_shift: int, act_bits: int):
        super().__init__()
        self.latent = nn.Parameter(linear.weight.detach().clone().float())
        # The per-channel scale is fitted once, on the pretrained weight, and kept: each step
        # then only re-picks the codes (one cheap pass), and freezing gives exactly the
        # weights the last step trained with.
        self.register_buffer("scale", encode_weight(self.latent.detach(), max_shift)[1])
        self.bias = (nn.Parameter(linear.bias.detach().clone().float())
                     if linear.bias is not None else None)
        self.max_shift, self.act_bits = max_shift, act_bits

    def rounded(self) -> torch.Tensor:
        codes = codes_for_scale(self.latent.detach(), self.scale, self.max_shift)
        return self.latent + (codes_to_weight(codes, self.scale) - self.latent).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_shift_linear(x, self.rounded(), self.bias, self.act_bits)

    def freeze(self) -> ShiftLinear:
        codes = codes_for_scale(self.latent.detach(), self.scale, self.max_shift)
        return ShiftLinear(codes, self.scale, self.bias, self.max_shift, self.act_bits)


def _param_groups(ir) -> list:
    """AdamW groups: the add-attention hashing parameters at HASH_LR_SCALE x, the rest at 1 x."""
    hashing, rest = [], []
    for name, p in ir.named_parameters():
        if p.is_floating_point():
            (hashing if name.rsplit(".", 1)[-1] in HASH_PARAMS else rest).append(p)
    return [g for g in ({"params": rest, "scale": 1.0},
                        {"params": hashing, "scale": HASH_LR_SCALE}) if g["params"]]


def load_train_split(spec: str, ir) -> Tuple[torch.Tensor, torch.Tensor]:
    from vitopt.data.folder import resolve_dataset
    meta = ir.meta
    images, labels, _ = resolve_dataset(spec, "train", meta.image_size[0], meta.mean, meta.std,
                                        meta.in_chans)
    return images, labels


def finetune(ir, originals: Dict[str, Tuple[nn.Module, str, nn.Linear]], *, images, labels,
             epochs: int, lr: float, seed: int, max_shift: int, act_bits: int,
             verbose: bool = True) -> dict:
    """Train `ir` with TrainableShift in place of each original Linear named in `originals`
    ({name: (stage, attribute, linear)}), then put the frozen ShiftLinears there. In place.
    Add-attention hashing parameters in `ir` train too (see the module docstring).
    Returns {"epochs", "lr", "seconds", "final_loss"}."""
    from vitopt.data.proxy import _deterministic, _lr_at, _random_shift
    trainables = {}
    for name, (stage, attr, linear) in originals.items():
        trainables[name] = TrainableShift(linear, max_shift, act_bits)
        setattr(stage, attr, trainables[name])
    modes = {m: m.training for m in ir.modules()}
    grads = {p: p.requires_grad for p in ir.parameters()}
    started, loss_avg = time.perf_counter(), math.nan
    try:
        with _deterministic(2):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            groups = _param_groups(ir)
            for group in groups:
                for p in group["params"]:
                    p.requires_grad_(True)
            optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=WEIGHT_DECAY)
            steps = epochs * math.ceil(images.shape[0] / BATCH)
            step = 0
            ir.train()
            for epoch in range(epochs):
                order = torch.randperm(images.shape[0], generator=gen)
                total = 0.0
                for start in range(0, len(order), BATCH):
                    idx = order[start:start + BATCH]
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group["scale"] * _lr_at(step, steps, 0)
                    x = _random_shift(images[idx], MAX_SHIFT_PIXELS, gen)
                    loss = F.cross_entropy(ir(x), labels[idx], label_smoothing=LABEL_SMOOTHING)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(idx)
                    step += 1
                loss_avg = total / len(order)
                if verbose:
                    print(f"reparam_shiftadd fine-tune: epoch {epoch + 1}/{epochs} loss "
                          f"{loss_avg:.4f} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    finally:
        for module, training in modes.items():
            module.training = training
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for name, (stage, attr, _) in originals.items():
            setattr(stage, attr, trainables[name].freeze())
    return {"epochs": epochs, "lr": lr, "seconds": round(time.perf_counter() - started, 2),
            "final_loss": round(loss_avg, 4)}

"""Shift-add reparameterization: linears become ShiftLinear (power-of-two weights, lossy).

What: each chosen Linear inside the attention and MLP stages becomes a `ShiftLinear`
(vitopt.ir.shift): weights w ~ scale[n] * sign * 2^-p, p in [0, max_shift], stored as one
int8 code per weight plus a float32 scale per output channel (DeepShift-PS, Elhoushi et al.
2021; per-channel scale and the mixture of shift and multiply layers from ShiftAddViT, You et
al. 2023, "ShiftAddViT: Mixture of Multiplication Primitives Towards Efficient Vision
Transformer"). Its activations are rounded per row to `act_bits` fixed point and the matmul
runs as integer shifts and adds (kernels/shiftadd_tir.py on TVM; int8 DequantizeLinear weights
on ONNX engines, where power-of-two weights are exact in int8).
Which linears (`layers`): `mlp` (fc1, fc2; default), `all` (also qkv / q, k, v and proj), or
`sensitive`: every linear scored by its layer-local SQNR after rounding on calibration images
(the run's PassContext; synthetic ones without it), and the `multiply_fraction` with the
lowest SQNR stay multiply.
Fine-tune (`finetune=true`): a short straight-through training on labelled images (`data`,
builtin:digits or an image folder's train split; `epochs`, `lr`, `seed`), deterministic,
progress on stderr (vitopt.data.shiftadd_finetune). Without it the rounding error is left as
is: power-of-two rounding of a Gaussian weight is about 19 % relative error per layer.
Preconditions: float nn.Linear layers in Attention/Mlp stages; declines when none of the chosen
kind is left (already reparameterized, or quantized by quantize_int8).
Order: after token reduction (merge_tokens, prune_tokens) and fuse_qkv, before quantize_int8
(which leaves ShiftLinear alone).
Cost, digits proxy (held-out test top-1, 360 images; float model 97.50 %, measured
2026-11-26): MLP only 97.50 % without fine-tune, 96.94 % after the default 1-epoch fine-tune
(lr 1e-5; the bound tested in tests/test_pass_reparam_shiftadd.py is a loss <= 1.0 point);
all linears 96.94 % without fine-tune, 97.78 % with it; `sensitive` (half stay multiply)
97.50 %. On this proxy power-of-two rounding alone costs little (differences of 1-3 of 360
images), and the short fine-tune helps all-linears but not MLP-only.
Add-attention (binary-coded Q/K, Hamming similarity) is not implemented.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import nn

from vitopt.errors import ConfigError
from vitopt.ir.shift import ShiftLinear, codes_to_weight, encode_weight
from vitopt.ir.stages import Attention, Mlp
from vitopt.kernels.shiftadd_reference import ACT_BITS, MAX_SUPPORTED_SHIFT
from vitopt.pipeline import PassConfig, PassResult, register_pass

LAYER_CHOICES = ("mlp", "all", "sensitive")
MLP_ATTRS = ("fc1", "fc2")
ATTN_ATTRS = ("qkv", "q", "k", "v", "proj")


@dataclass(frozen=True)
class ReparamShiftaddConfig(PassConfig):
    layers: str = "mlp"
    max_shift: int = 6  # 6: every weight is an exact int8 (sign * 2^(6-p) <= 64) in ONNX
    act_bits: int = 16
    multiply_fraction: float = 0.5
    finetune: bool = False
    data: str = "builtin:digits"
    epochs: int = 1
    lr: float = 1e-5
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.layers not in LAYER_CHOICES:
            raise ConfigError(f"reparam_shiftadd: layers {self.layers!r} is unknown; use one of "
                              f"{', '.join(LAYER_CHOICES)}")
        if not 0 <= self.max_shift <= MAX_SUPPORTED_SHIFT:
            raise ConfigError(f"reparam_shiftadd: max_shift {self.max_shift} must be in "
                              f"[0, {MAX_SUPPORTED_SHIFT}]")
        if self.act_bits not in ACT_BITS:
            raise ConfigError(f"reparam_shiftadd: act_bits {self.act_bits} must be one of "
                              f"{ACT_BITS}")
        if not 0.0 <= self.multiply_fraction < 1.0:
            raise ConfigError(f"reparam_shiftadd: multiply_fraction {self.multiply_fraction} "
                              f"must be in [0, 1)")
        if self.epochs < 1 or not self.lr > 0:
            raise ConfigError(f"reparam_shiftadd: epochs {self.epochs} must be >= 1 and lr "
                              f"{self.lr} > 0")


def _candidates(ir, layers: str) -> Dict[str, Tuple[nn.Module, str]]:
    found = {}
    for stage in ir.stages:
        attrs = (MLP_ATTRS if isinstance(stage, Mlp) else
                 ATTN_ATTRS if isinstance(stage, Attention) and layers != "mlp" else ())
        for attr in attrs:
            if type(getattr(stage, attr, None)) is nn.Linear:
                found[f"{stage.kind}{stage.block}.{attr}"] = (stage, attr)
    return found


def _sqnr(ir, targets, images, max_shift) -> Dict[str, float]:
    """Layer-local SQNR (dB) of each linear's output with its weight rounded to shifts."""
    signal = {n: 0.0 for n in targets}
    noise = {n: 0.0 for n in targets}
    rounded = {n: codes_to_weight(*encode_weight(getattr(s, a).weight, max_shift))
               for n, (s, a) in targets.items()}
    hooks = []
    for name, (stage, attr) in targets.items():
        def hook(module, args, out, name=name):
            approx = nn.functional.linear(args[0], rounded[name], module.bias)
            signal[name] += out.pow(2).sum().item()
            noise[name] += (out - approx).pow(2).sum().item()
        hooks.append(getattr(stage, attr).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], 32):
                ir(images[start:start + 32])
    finally:
        for h in hooks:
            h.remove()
    return {n: 10 * math.log10(max(signal[n], 1e-30) / max(noise[n], 1e-30)) for n in targets}


def _choose(ir, cfg, context, notes) -> Tuple[dict, dict]:
    targets = _candidates(ir, cfg.layers)
    if cfg.layers != "sensitive" or not targets:
        return targets, {}
    from vitopt.data.calib import synthetic_calibration
    images = context.calib if context.calib is not None else None
    if images is None:
        images = synthetic_calibration(ir.meta.in_chans, ir.meta.image_size)
        notes.append("sensitivity scored on SYNTHETIC random images (no --calib given)")
    sqnr = _sqnr(ir, targets, images[:64], cfg.max_shift)
    keep = sorted(sqnr, key=sqnr.get)[:int(round(cfg.multiply_fraction * len(sqnr)))]
    kept = {n: f"multiply (SQNR {sqnr[n]:.1f} dB after rounding)" for n in keep}
    return {n: t for n, t in targets.items() if n not in kept}, kept


@register_pass("reparam_shiftadd", config=ReparamShiftaddConfig, exact=False, uses_context=True)
def reparam_shiftadd(ir, cfg: ReparamShiftaddConfig, context) -> PassResult:
    notes = []
    targets, kept = _choose(ir, cfg, context, notes)
    if not targets:
        return PassResult(ir, False, {}, [f"no float Linear layers of kind {cfg.layers!r} left "
                                          f"to reparameterize (already shift-add or quantized)"])
    stats = {"layers": sorted(targets), "multiply": kept, "max_shift": cfg.max_shift,
             "act_bits": cfg.act_bits}
    if cfg.finetune:
        from vitopt.data.shiftadd_finetune import finetune, load_train_split
        images, labels = load_train_split(cfg.data, ir)
        originals = {n: (s, a, getattr(s, a)) for n, (s, a) in targets.items()}
        stats["finetune"] = finetune(ir, originals, images=images, labels=labels,
                                     epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed,
                                     max_shift=cfg.max_shift, act_bits=cfg.act_bits,
                                     verbose=cfg.progress)
        notes.append(f"fine-tuned {cfg.epochs} epochs on {images.shape[0]} images of {cfg.data} "
                     f"(final loss {stats['finetune']['final_loss']})")
    else:
        for stage, attr in targets.values():
            setattr(stage, attr, ShiftLinear.from_linear(getattr(stage, attr), cfg.max_shift,
                                                         cfg.act_bits))
    for stage in ir.stages:
        if isinstance(stage, (Attention, Mlp)):
            kinds = {type(getattr(stage, a, None)) for a in MLP_ATTRS + ATTN_ATTRS}
            if ShiftLinear in kinds:
                stage.precision = "shift" if nn.Linear not in kinds else "shift+fp32"
    notes.insert(0, f"shift-add: {len(targets)} linears ({cfg.layers}) as sign*2^-p "
                    f"(p <= {cfg.max_shift}) x per-channel scale, activations int{cfg.act_bits} "
                    f"per row" + (f"; {len(kept)} kept multiply by sensitivity" if kept else ""))
    return PassResult(ir, True, stats, notes)

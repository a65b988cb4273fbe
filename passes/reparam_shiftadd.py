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
Cost, digits proxy (held-out test top-1, 360 images, one image = 0.28 points; float model
97.50 %; measured 2026-11-27 with benchmarks/shiftadd_accuracy.py, table in
benchmarks/results/cpu-amd-epyc-2c/shiftadd_accuracy.md): MLP only 97.50 % without fine-tune,
97.78 % after the default 1-epoch fine-tune (lr 1e-5; the bound tested in
tests/test_pass_reparam_shiftadd.py is a loss <= 1.0 point); all linears 96.94 % without
fine-tune, 97.78 % with it; `sensitive` (half stay multiply) 97.22 %. On this proxy
power-of-two rounding alone costs little (differences of 0-2 of 360 images).
Which attention (`attention`): `multiply` (default: softmax attention, unchanged) or `add`:
every softmax Attention stage becomes an AddAttention (vitopt.ir.add_attention; ShiftAddViT's
add-attention after Ecoformer, Liu et al. 2022): queries and keys are hashed per head to
`hash_bits` binary codes sign(x H - t), H and t initialised by PCA hashing on 64 images (the
fine-tune's train split, else the run's --calib, else synthetic ones with a warning), the
similarity is m - Hamming(b_q, b_k) and attention runs in linear form, O(N m head_dim) instead
of O(N^2 head_dim), every product in it with a +-1 operand. `layers=none` converts attention
only. Token sizes from merge_tokens weight each key (the proportional-attention reading); the
side outputs token reduction reads (class-token row, head-mean keys) are kept. Engines: ONNX
Runtime and OpenVINO (ONNX: GreaterOrEqual/Where for the sign, MatMul with +-1 values) and TVM
(plain ATen ops, no converter needed) match the IR at fp32 tolerance; no speed-up is claimed
for them, they run float MatMuls. Add-attention needs the fine-tune: without it the network,
trained for softmax attention, collapses (near-uniform attention), so `attention=add` without
`finetune=true` is a ConfigError unless `allow_untrained_add_attention=true` says the loss is
accepted (then a loud note). The fine-tune trains the hashing (straight-through sign) with the
rest; with attention=add its defaults are ADD_EPOCHS epochs at lr ADD_LR (1 epoch, 1e-5 without).
Add-attention cost, digits proxy (same table and command): without fine-tune 10.0 % (chance:
the network collapses); attention only (`layers=none`), 64 bits, the default 4 epochs at lr
5e-4: 92.78 % (-4.7 points); with MLP shift-add too: 93.61 % (-3.9 points). Development runs
(same data): 2 epochs 66.9 %, 32 bits / 2 epochs 71.7 %, 16 bits 55.3 %, lr 1e-3 unstable.
tests/test_add_attention.py bounds the default fine-tune's loss at 7 points. A longer fine-tune (ShiftAddViT trains for many
epochs) would recover more; the defaults keep it at about half a minute on 2 cores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from vitopt.errors import ConfigError
from vitopt.ir.add_attention import AddAttention, replace_with_add_attention
from vitopt.ir.shift import ShiftLinear, codes_to_weight, encode_weight
from vitopt.ir.stages import Attention, Mlp
from vitopt.kernels.shiftadd_reference import ACT_BITS, MAX_SUPPORTED_SHIFT
from vitopt.pipeline import PassConfig, PassResult, register_pass

LAYER_CHOICES = ("mlp", "all", "sensitive", "none")
ATTENTION_CHOICES = ("multiply", "add")
HASH_BITS = 64
MAX_HASH_BITS = 256
ADD_EPOCHS = 4
ADD_LR = 5e-4
CALIB_IMAGES = 64  # images whose queries and keys initialise the hashing (PCA)
MLP_ATTRS = ("fc1", "fc2")
ATTN_ATTRS = ("qkv", "q", "k", "v", "proj")


@dataclass(frozen=True)
class ReparamShiftaddConfig(PassConfig):
    layers: str = "mlp"
    max_shift: int = 6  # 6: every weight is an exact int8 (sign * 2^(6-p) <= 64) in ONNX
    act_bits: int = 16
    multiply_fraction: float = 0.5
    attention: str = "multiply"
    hash_bits: int = HASH_BITS
    allow_untrained_add_attention: bool = False
    finetune: bool = False
    data: str = "builtin:digits"
    epochs: Optional[int] = None  # None: 1, or ADD_EPOCHS with attention=add
    lr: Optional[float] = None  # None: 1e-5, or ADD_LR with attention=add
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.layers not in LAYER_CHOICES:
            raise ConfigError(f"reparam_shiftadd: layers {self.layers!r} is unknown; use one of "
                              f"{', '.join(LAYER_CHOICES)}")
        if self.attention not in ATTENTION_CHOICES:
            raise ConfigError(f"reparam_shiftadd: attention {self.attention!r} is unknown; use one "
                              f"of {', '.join(ATTENTION_CHOICES)}")
        if self.layers == "none" and self.attention != "add":
            raise ConfigError("reparam_shiftadd: layers 'none' with attention 'multiply' changes "
                              "nothing; choose layers mlp, all or sensitive, or attention=add")
        if self.attention == "add" and not self.finetune and not self.allow_untrained_add_attention:
            raise ConfigError("reparam_shiftadd: attention 'add' replaces softmax attention with "
                              "Hamming-similarity linear attention, which the network must be "
                              "trained for (see this pass's accuracy table); set finetune=true, or "
                              "allow_untrained_add_attention=true to accept the untrained model")
        if not 1 <= self.hash_bits <= MAX_HASH_BITS:
            raise ConfigError(f"reparam_shiftadd: hash_bits {self.hash_bits} must be in "
                              f"[1, {MAX_HASH_BITS}]")
        if not 0 <= self.max_shift <= MAX_SUPPORTED_SHIFT:
            raise ConfigError(f"reparam_shiftadd: max_shift {self.max_shift} must be in "
                              f"[0, {MAX_SUPPORTED_SHIFT}]")
        if self.act_bits not in ACT_BITS:
            raise ConfigError(f"reparam_shiftadd: act_bits {self.act_bits} must be one of "
                              f"{ACT_BITS}")
        if not 0.0 <= self.multiply_fraction < 1.0:
            raise ConfigError(f"reparam_shiftadd: multiply_fraction {self.multiply_fraction} "
                              f"must be in [0, 1)")
        if (self.epochs is not None and self.epochs < 1) or (self.lr is not None and
                                                             not self.lr > 0):
            raise ConfigError(f"reparam_shiftadd: epochs {self.epochs} must be >= 1 and lr "
                              f"{self.lr} > 0")

    def schedule(self) -> Tuple[int, float]:
        """(epochs, lr) of the fine-tune: the given ones, else the defaults of the mode."""
        add = self.attention == "add"
        return (self.epochs if self.epochs is not None else (ADD_EPOCHS if add else 1),
                self.lr if self.lr is not None else (ADD_LR if add else 1e-5))


def _candidates(ir, layers: str) -> Dict[str, Tuple[nn.Module, str]]:
    found = {}
    for stage in ir.stages if layers != "none" else ():
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


def _calibration_images(ir, cfg, context, notes) -> torch.Tensor:
    """Images whose queries and keys initialise the hashing: the fine-tune's train split, else
    the run's calibration images, else synthetic ones (with a note)."""
    if cfg.finetune:
        from vitopt.data.shiftadd_finetune import load_train_split
        return load_train_split(cfg.data, ir)[0][:CALIB_IMAGES]
    if context.calib is not None:
        return context.calib[:CALIB_IMAGES]
    import warnings
    message = ("reparam_shiftadd: add-attention hashing initialised on SYNTHETIC random images "
               "(no --calib given); pass --calib builtin:digits or a folder of real images")
    warnings.warn(message, stacklevel=4)
    notes.append(message)
    gen = torch.Generator().manual_seed(cfg.seed)
    return torch.randn(32, ir.meta.in_chans, *ir.meta.image_size, generator=gen)


def _to_add_attention(ir, cfg, context, targets, notes) -> dict:
    """Replace every softmax Attention stage with AddAttention; retarget `targets` (the new
    stage holds the same Linear modules). Returns {"attn3": "add, 32 bits", ...}."""
    stages = [s for s in ir.stages if isinstance(s, Attention) and not isinstance(s, AddAttention)]
    if not stages:
        notes.append("attention=add: no softmax Attention stage to convert (none in the model, "
                     "or already add-attention)")
        return {}
    images = _calibration_images(ir, cfg, context, notes)
    replaced = replace_with_add_attention(ir, stages, images, cfg.hash_bits, cfg.seed)
    for name, (stage, attr) in list(targets.items()):
        targets[name] = (replaced.get(stage, stage), attr)
    return {f"{s.kind}{s.block}": f"add, {cfg.hash_bits} bits" for s in replaced.values()}


@register_pass("reparam_shiftadd", config=ReparamShiftaddConfig, exact=False, uses_context=True)
def reparam_shiftadd(ir, cfg: ReparamShiftaddConfig, context) -> PassResult:
    notes = []
    targets, kept = _choose(ir, cfg, context, notes)
    attention = _to_add_attention(ir, cfg, context, targets, notes) if cfg.attention == "add" else {}
    if not targets and not attention:
        return PassResult(ir, False, {}, notes + [
            f"no float Linear layers of kind {cfg.layers!r} left to reparameterize (already "
            f"shift-add or quantized)" + (" and no attention to convert" if cfg.attention == "add"
                                          else "")])
    stats = {"layers": sorted(targets), "multiply": kept, "max_shift": cfg.max_shift,
             "act_bits": cfg.act_bits, "attention": attention}
    if cfg.finetune:
        from vitopt.data.shiftadd_finetune import finetune, load_train_split
        images, labels = load_train_split(cfg.data, ir)
        epochs, lr = cfg.schedule()
        originals = {n: (s, a, getattr(s, a)) for n, (s, a) in targets.items()}
        stats["finetune"] = finetune(ir, originals, images=images, labels=labels,
                                     epochs=epochs, lr=lr, seed=cfg.seed,
                                     max_shift=cfg.max_shift, act_bits=cfg.act_bits,
                                     verbose=cfg.progress)
        notes.append(f"fine-tuned {epochs} epochs (lr {lr:g}) on {images.shape[0]} images of "
                     f"{cfg.data} (final loss {stats['finetune']['final_loss']})")
    else:
        for stage, attr in targets.values():
            setattr(stage, attr, ShiftLinear.from_linear(getattr(stage, attr), cfg.max_shift,
                                                         cfg.act_bits))
        if attention:
            notes.append("add-attention WITHOUT fine-tune (allow_untrained_add_attention): the "
                         "network was trained for softmax attention; expect a large accuracy loss")
    for stage in ir.stages:
        if isinstance(stage, (Attention, Mlp)):
            kinds = {type(getattr(stage, a, None)) for a in MLP_ATTRS + ATTN_ATTRS}
            if ShiftLinear in kinds:
                stage.precision = "shift" if nn.Linear not in kinds else "shift+fp32"
    if targets:
        notes.insert(0, f"shift-add: {len(targets)} linears ({cfg.layers}) as sign*2^-p "
                        f"(p <= {cfg.max_shift}) x per-channel scale, activations int{cfg.act_bits} "
                        f"per row" + (f"; {len(kept)} kept multiply by sensitivity" if kept else ""))
    if attention:
        notes.insert(0, f"add-attention: {len(attention)} attention stages with binary Q/K codes "
                        f"({cfg.hash_bits} bits per head, Hamming similarity, linear form)")
    return PassResult(ir, True, stats, notes)

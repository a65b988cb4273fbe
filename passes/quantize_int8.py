"""Post-training int8 quantization of the encoder's linears, calibrated on images (lossy).

What: every Linear inside the attention and MLP stages (qkv or q/k/v, proj, fc1, fc2) becomes
a `QuantLinear` (vitopt.ir.quant): int8 weights, symmetric per output channel; a u8 input
quantized per tensor with a range calibrated by running calibration images through the IR's
reference executor. The IR then runs as fake quantization, so its output is the quantized
model's reference, and the ONNX lowering carries the same Q/DQ pairs (weights: per-channel
DequantizeLinear of int8 initializers; activations: QuantizeLinear -> DequantizeLinear before
the MatMul; bias and LayerNorm outside any Q/DQ). ViT-specific handling:
  * LayerNorm outputs have a few outlier channels. Scale balancing (SmoothQuant; RepQ-ViT's
    reparameterized LayerNorm) divides channel j of the LayerNorm affine by s_j and multiplies
    input column j of the next linear(s) by s_j, s_j = max|X_j|^alpha / max|W_:j|^(1-alpha):
    exact in fp32 (`smooth_layer_norms`), it moves the outliers into the per-channel weights.
  * Post-GELU activations (fc2 input) are skewed: asymmetric u8 keeps the true minimum
    (about -0.17) and only the upper end is clipped by the calibration method (PTQ4ViT's
    twin-uniform observation, done here with one asymmetric range).
  * Attention (`attention`): "qk" (default) makes the first attention matmul int8: the qkv
    GEMM is split into q, k and v GEMMs (exact), the attention scale is folded into q's weights
    (exact up to rounding), and q and k are quantized symmetric int8 per tensor (q at its
    GEMM's output, fused by the engines into the GEMM; k after the head split, which spares
    OpenVINO a slow [0,2,3,1] transpose of k), with the softmax and P.V in float
    (QKInt8Attention, which says why): OpenVINO runs it as its int8
    attention kernel (NNCF quantizes the same two inputs for transformers; DeiT-S/16 int8 +
    balanced merging, batch 8: about 4 % faster than float attention in dynamic- and
    static-shape engines); "float" keeps both attention matmuls in float (engines fuse them in
    bf16/fp32); "qkv" quantizes q, k, v in u8 per tensor (engines do not fuse it: kept for
    comparison). The softmax output is never min/max-quantized (FQ-ViT: its values span
    decades, min/max u8 rounds most of them to zero), except with `quantize_softmax=true`
    ("qkv" only), which exists only as the naive baseline for benchmarks/quantization.py.
    Add-attention stages (reparam_shiftadd attention=add) hash q and k to +-1 codes: "qk"
    leaves them in float.
  * The output projection's u8 input quantizer runs on the attention output before the head
    merge (Attention.project_heads; exact: per-tensor quantization commutes with the transpose
    and reshape), and the stem's on the images before the patchify: engines fuse it into the
    attention kernel and transpose int8 values (DeiT-S/16 int8 + balanced, OpenVINO, batch 8:
    about 3 % faster in a same-process A/B).
  * Token merging's head-averaged keys (a merging block's small [D -> Dh] projection) become an
    int8 layer too (`Attention.merge_key_proj`), reading the qkv's u8 input: as a float GEMM
    beside an int8 qkv it kept OpenVINO from folding that quantizer into the LayerNorm (DeiT-S
    balanced int8, batch 8: about 10 % slower). It follows the qkv (or k) into fp32 fallback.
Calibration methods for activation ranges: `minmax`, `percentile` (clip at the given
percentile), `mse` (default: the clipping with the least squared fake-quant error on the
calibration activations). Sensitivity: the layer-local SQNR of every quantized linear on the
calibration data is recorded (stats["layers"]); `keep_sensitive=N` keeps the N lowest-SQNR
layers in fp32 and `skip` names layers to keep in fp32 (e.g. `attn0.qkv,mlp5.fc2`);
`max_accuracy_drop=P` (top-1 points, with labelled eval images in the PassContext, from
`--eval`'s calib split so the held-out test split stays unseen) returns the lowest-SQNR layers
to fp32 one at a time until the drop against fp32 is at most P.
Overflow fix (`overflow_fix`, after NNCF's option of the same name): x86 CPUs without VNNI or
AMX run int8 GEMMs with VPMADDUBSW, which adds u8 x s8 products in pairs into a saturating
int16, so ONNX Runtime and OpenVINO then compute something other than the graph (seen on an
AVX2 EPYC: engine vs reference cosine 0.97 on a tiny SigLIP, exact with the fix). `auto`
(default) gives every int8 weight the 7-bit range [-63, 63] on such a CPU (`all`; `first_layer`
alone, NNCF's default, still left SigLIP's inner layers saturating) and the full range where
int8 products accumulate in int32 (VNNI, AMX, Arm dotprod, GPUs); `none`, `first_layer`, `all`
force a choice. The fake-quant reference uses the same weights, so the check stays exact; the
7-bit weights cost about 6 dB of weight SQNR (digits proxy: int8 97.78 either way, logit SQNR
35.3 against 35.4 dB). A CPU artifact with full-range weights records the int8 dot-product flag
it relies on (manifest hardware.requires), so loading it on a CPU without one is refused.
Data: the calibration images of the run's PassContext (`--calib builtin:digits|DIR`); without
any, random images with a warning. Bad calibration data is a ConfigError.
Preconditions: Attention/Mlp stages with float Linear layers; declines when there are none or
the IR is already quantized or cast to fp16/bf16 (cast_fp16 / cast_bf16 are exclusive with
int8). The stem's patchify convolution is quantized too (`quantize_stem`, default true), as an int8
GEMM over the patches with a u8 input whose range is min/max over the calibration images
(vitopt/ir/quant_stem.py), as OpenVINO + NNCF int8 does; the classifier head stays in float.
Order: last: after token reduction (merge_tokens, prune_tokens), ShiftAdd and early exits, so
calibration sees the reduced graph; after fuse_qkv (one range for q, k and v, which read the
same input; attention=qk then splits the GEMM again so q's and k's output quantizers fuse).
Cost: on the digits proxy about 0-0.5 top-1 points, and at most 1.5 after the balanced token
merging (97.50 fp32 -> 97.22 balanced + int8; tests/test_quantize_accuracy.py; naive min/max
with quantized softmax beside it in benchmarks/quantization.py).
Papers: Xiao et al. 2023, "SmoothQuant" (ICML); Li et al. 2023, "RepQ-ViT" (ICCV); Lin et al.
2022, "FQ-ViT" (IJCAI); Yuan et al. 2022, "PTQ4ViT" (ECCV).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from vitopt.errors import ConfigError
from vitopt.ir.add_attention import AddAttention
from vitopt.ir.quant import (ActQuant, AttentionQuant, QKInt8Attention, QuantLinear, SymQuant,
                             fake_quant_i8, fake_quant_u8, int8_key_projection, quant_layers)
from vitopt.ir.precision import cast_dtype
from vitopt.ir.quant_stem import insert_quant_conv, patch_conv_node
from vitopt.ir.stages import Attention, Mlp, Stem
from vitopt.pipeline import PassConfig, PassResult, register_pass

METHODS = ("minmax", "percentile", "mse")
#: Which weights get the 7-bit range (after NNCF's OverflowFix: none / first layer / all).
OVERFLOW_FIX = ("auto", "none", "first_layer", "all")
#: CPU flags of int8 dot-product instructions that accumulate u8 x s8 products in int32
#: (x86 VNNI and AMX, Arm's SDOT/UDOT): with one, full 8-bit weights cannot saturate.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
ATTENTION = ("float", "qk", "qkv")
ATTENTION_NOTE = {"float": "matmuls float", "qk": "q.K^T int8 (symmetric), P.V float",
                  "qkv": "q, k, v u8"}
SAMPLE_PER_BATCH = 1 << 16  # values kept per tensor and batch for percentile / MSE ranges
MSE_GRID = 40
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # searched per LayerNorm when alpha is unset
SMOOTH_ROWS = 512  # sampled LayerNorm output rows used to choose alpha
MSE_SAMPLE = 1 << 17  # values used to choose a range


@dataclass(frozen=True)
class QuantizeInt8Config(PassConfig):
    method: str = "mse"
    percentile: float = 99.99
    smooth: bool = True
    alpha: Optional[float] = None
    attention: str = "qk"
    quantize_softmax: bool = False
    quantize_stem: bool = True
    skip: Tuple[str, ...] = ()
    keep_sensitive: int = 0
    max_accuracy_drop: Optional[float] = None
    calib_limit: int = 128
    batch_size: int = 32
    overflow_fix: str = "auto"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"quantize_int8: method {self.method!r} is unknown; use one of "
                              f"{', '.join(METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"quantize_int8: percentile {self.percentile} must be in (50, 100]")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"quantize_int8: alpha {self.alpha} must be in [0, 1]")
        if self.attention not in ATTENTION:
            raise ConfigError(f"quantize_int8: attention {self.attention!r} is unknown; use one of "
                              f"{', '.join(ATTENTION)}")
        if self.quantize_softmax and self.attention != "qkv":
            raise ConfigError("quantize_int8: quantize_softmax needs attention=qkv")
        for name in ("keep_sensitive",):
            if getattr(self, name) < 0:
                raise ConfigError(f"quantize_int8: {name} must be >= 0")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise ConfigError(f"quantize_int8: max_accuracy_drop {self.max_accuracy_drop} must be "
                              f">= 0 (top-1 points)")
        if self.overflow_fix not in OVERFLOW_FIX:
            raise ConfigError(f"quantize_int8: overflow_fix {self.overflow_fix!r} is unknown; use "
                              f"one of {', '.join(OVERFLOW_FIX)}")
        if self.calib_limit < 2 or self.batch_size < 1:
            raise ConfigError("quantize_int8: calib_limit must be >= 2 and batch_size >= 1")


# --- int8 GEMM saturation (overflow fix) ----------------------------------------------------
def int8_dot_flags() -> List[str]:
    """The INT8_DOT_FLAGS this CPU has, in INT8_DOT_FLAGS order (empty: int8 GEMMs add u8 x s8
    products in saturating int16 pairs on x86, see overflow_fix_for)."""
    from vitopt.artifact import hardware_info
    flags = hardware_info()["flags"]
    return [f for f in INT8_DOT_FLAGS if f in flags]


def overflow_fix_for(choice: str, device: str = "cpu") -> Tuple[str, str]:
    """(fix, why): which weights get the 7-bit range where the engines' int8 GEMMs would
    saturate. x86 CPUs without VNNI or AMX multiply u8 x s8 with VPMADDUBSW, which adds each
    pair of products into a saturating int16: 2 x 255 x 127 = 64770 > 32767. ONNX Runtime and
    OpenVINO both do this on such CPUs (measured on a 2-core AVX2 EPYC: a Q/DQ MatMul with
    u8 inputs near 255 and weights of 127 gave 14.6 where the exact product is 243.2), so the
    engine no longer computes what the graph says. With 7-bit weights (|q| <= 63) a pair is at
    most 2 x 255 x 63 = 32130 and cannot saturate. NNCF has the same fix (OverflowFix; its
    default quantizes the first convolution's weights with half the range); images saturate
    first, since neighbouring pixels are large together."""
    if choice != "auto":
        return choice, f"overflow_fix={choice}"
    if device != "cpu":
        return "none", f"{device} int8 GEMMs accumulate in int32"
    from vitopt.artifact import hardware_info
    info = hardware_info()
    have = int8_dot_flags()
    if have:
        return "none", f"this CPU has {have[0]}: int8 products accumulate in int32"
    return "all", (f"this CPU ({info['cpu']}) has no VNNI, AMX or dot-product instructions, so "
                   f"int8 GEMMs add u8 x s8 products in pairs into int16, which saturates")


def weight_bits_for(fix: str) -> Tuple[int, int]:
    """(bits of the block linears' weights, bits of the stem's) under overflow fix `fix`."""
    return (7 if fix == "all" else 8), (7 if fix in ("all", "first_layer") else 8)


# --- the linears to quantize ---------------------------------------------------------------
def _stage_name(stage) -> str:
    return f"{stage.kind}{getattr(stage, 'block', '')}"


def target_linears(ir) -> Dict[str, Tuple[nn.Module, str]]:
    """{"attn0.qkv": (stage, attribute)} for every float Linear in attention and MLP stages."""
    found = {}
    for stage in ir.stages:
        if isinstance(stage, (Attention, Mlp)):
            for attr in ("qkv", "q", "k", "v", "proj", "fc1", "fc2"):
                if type(getattr(stage, attr, None)) is nn.Linear:
                    found[f"{_stage_name(stage)}.{attr}"] = (stage, attr)
    return found


KEY_SOURCES = ("qkv", "k")  # the linears whose weights give a merging block's averaged keys


def _use_layer(stage, attr: str, layer: nn.Module, key_layers: Dict[int, QuantLinear]) -> None:
    """Put `layer` (the float Linear or its QuantLinear) at stage.attr. A merging block's int8
    key projection (Attention.merge_key_proj) follows its key source into and out of int8."""
    setattr(stage, attr, layer)
    if id(stage) in key_layers and attr in KEY_SOURCES:
        stage.merge_key_proj = key_layers[id(stage)] if isinstance(layer, QuantLinear) else None


def _norm_consumers(stage) -> List[nn.Linear]:
    if isinstance(stage, Attention):
        return [m for m in (stage.qkv, stage.q, stage.k, stage.v) if type(m) is nn.Linear]
    return [stage.fc1] if type(stage.fc1) is nn.Linear else []


def _run_batches(ir, images, batch_size):
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            ir(images[start:start + batch_size])


# --- SmoothQuant / RepQ-ViT scale balancing (exact) ------------------------------------------
def smooth_layer_norms(ir, images: torch.Tensor, alpha: Optional[float] = 0.5,
                       batch_size: int = 32) -> Dict[str, Optional[float]]:
    """Fold per-channel scales between each pre-norm LayerNorm and the linears it feeds.
    Exact in fp32. `alpha=None` picks, per LayerNorm, the alpha in ALPHAS (or no balancing)
    whose int8 fake-quant output of the next linears is closest to fp32 on sampled rows.
    Returns {stage name: alpha used (None: left as is)}."""
    stages = [s for s in ir.stages if isinstance(s, (Attention, Mlp)) and _norm_consumers(s)
              and s.norm.weight is not None]
    absmax, rows, hooks = {}, {}, []
    gen = torch.Generator().manual_seed(0)
    for stage in stages:
        def hook(module, inputs, output, key=id(stage)):
            flat = output.detach().reshape(-1, output.shape[-1])
            m = flat.abs().amax(0)
            absmax[key] = torch.maximum(absmax[key], m) if key in absmax else m
            if key not in rows:
                rows[key] = flat[torch.randint(flat.shape[0], (min(SMOOTH_ROWS, flat.shape[0]),),
                                               generator=gen)]
        hooks.append(stage.norm.register_forward_hook(hook))
    try:
        _run_batches(ir, images, batch_size)
    finally:
        for h in hooks:
            h.remove()
    chosen = {}
    with torch.no_grad():
        for stage in stages:
            consumers = _norm_consumers(stage)
            weight = torch.cat([c.weight for c in consumers])
            w_max = weight.abs().amax(0).clamp_min(1e-5)
            x_max = absmax[id(stage)].clamp_min(1e-5)

            def scales(a):
                return (x_max ** a / w_max ** (1 - a)).clamp(1e-2, 1e2)
            if alpha is None:
                x, ref = rows[id(stage)], rows[id(stage)] @ weight.t()
                errors = {a: _int8_error(x, weight, scales(a) if a is not None else None, ref)
                          for a in (None,) + ALPHAS}
                best = min(errors, key=errors.get)
            else:
                best = alpha
            chosen[_stage_name(stage)] = best
            if best is None:
                continue
            s = scales(best)
            stage.norm.weight.div_(s)
            if stage.norm.bias is not None:
                stage.norm.bias.div_(s)
            for c in consumers:
                c.weight.mul_(s)
    return chosen


def _int8_error(x, weight, s, ref) -> float:
    """Squared error of int8 (x / s) @ (weight * s)^T against the float product."""
    from vitopt.ir.quant import quantize_weight
    if s is not None:
        x, weight = x / s, weight * s
    q, scale = quantize_weight(weight)
    act = ActQuant(x.min().item(), x.max().item())
    out = fake_quant_u8(x, act.scale, act.zero_point) @ (q.float() * scale[:, None]).t()
    return (out - ref).pow(2).sum().item()


# --- calibration -----------------------------------------------------------------------------
class _Observer:
    def __init__(self, gen):
        self.lo, self.hi, self.samples, self.gen = math.inf, -math.inf, [], gen
        self.drawn, self.ranges = None, {}

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        self.lo, self.hi = min(self.lo, flat.min().item()), max(self.hi, flat.max().item())
        if flat.numel() > SAMPLE_PER_BATCH:
            flat = flat[torch.randint(flat.numel(), (SAMPLE_PER_BATCH,), generator=self.gen)]
        self.samples.append(flat)

    def range(self, method: str, percentile: float, keep_min: bool) -> Tuple[float, float]:
        """(lo, hi) by `method`, searched once per setting (q, k and v share an observer)."""
        key = (method, percentile, keep_min)
        if key not in self.ranges:
            self.ranges[key] = self._search_range(method, percentile, keep_min)
        return self.ranges[key]

    def _search_range(self, method: str, percentile: float, keep_min: bool) -> Tuple[float, float]:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if method == "minmax" or hi - lo <= 0:
            return lo, hi
        x = self._sample()
        if method == "percentile":
            p = torch.quantile(x, torch.tensor([1 - percentile / 100, percentile / 100]))
            return (lo if keep_min else min(p[0].item(), 0.0)), max(p[1].item(), 0.0)
        best, best_err = (lo, hi), math.inf
        for ratio in torch.linspace(1.0 / MSE_GRID, 1.0, MSE_GRID).tolist():
            cand = (lo if keep_min else lo * ratio, hi * ratio)
            if cand[1] - cand[0] <= 0:
                continue
            q = ActQuant(*cand)
            err = (fake_quant_u8(x, q.scale, q.zero_point) - x).pow(2).mean().item()
            if err < best_err:
                best, best_err = cand, err
        return best

    def bound(self, method: str, percentile: float) -> float:
        """The clipping bound of a symmetric int8 range [-bound, bound]."""
        top = max(abs(self.lo), abs(self.hi))
        if method == "minmax" or top <= 0:
            return top
        x = self._sample()
        if method == "percentile":
            return max(torch.quantile(x.abs(), percentile / 100).item(), 1e-12)
        candidates = [top * r for r in torch.linspace(1.0 / MSE_GRID, 1.0, MSE_GRID).tolist()]
        return min(candidates, key=lambda b: (fake_quant_i8(x, b / 127.0) - x).pow(2).mean().item())

    def _sample(self) -> torch.Tensor:
        """The observed values, at most MSE_SAMPLE of them (drawn at random once, so that
        layers sharing an observer get the same range)."""
        if self.drawn is None:
            x = torch.cat(self.samples)
            if x.numel() > MSE_SAMPLE:
                x = x[torch.randint(x.numel(), (MSE_SAMPLE,), generator=self.gen)]
            self.drawn = x
        return self.drawn


def _calibrate(ir, images, targets, cfg) -> Dict[str, _Observer]:
    gen = torch.Generator().manual_seed(0)
    observers, hooks, shared = {}, [], {}
    for name, (stage, attr) in targets.items():
        if isinstance(stage, Attention) and attr in ("q", "k", "v"):
            # Separate q, k and v read the same normed tokens: one observer (on the norm's
            # output, every row even when trim_last_block cut q to the class token), so one
            # quantizer that engines apply once.
            if id(stage) not in shared:
                shared[id(stage)] = _Observer(gen)
                hooks.append(stage.norm.register_forward_hook(
                    lambda m, args, out, obs=shared[id(stage)]: obs.add(out)))
            observers[name] = shared[id(stage)]
            continue
        observers[name] = _Observer(gen)
        hooks.append(getattr(stage, attr).register_forward_pre_hook(
            lambda m, args, obs=observers[name]: obs.add(args[0])))
    for stage in _quantized_attention(ir, cfg):
        hooks += _attention_observers(stage, observers, gen, cfg)
    try:
        _run_batches(ir, images, cfg.batch_size)
    finally:
        for h in hooks:
            h.remove()
    return observers


def _quantized_attention(ir, cfg) -> List[Attention]:
    """The attention stages whose matmuls `cfg.attention` quantizes."""
    if cfg.attention == "float":
        return []
    return [s for s in ir.attention_stages()
            if not (cfg.attention == "qk" and isinstance(s, AddAttention))]


def split_qkv_for_int8_logits(stage: Attention) -> None:
    """attention=qk: q, k, v as three Linears (so q's and k's output quantizers fuse into their
    own GEMMs) and the attention scale folded into q's weights and bias (stage.scale becomes
    1). The same function up to float rounding."""
    with torch.no_grad():
        if stage.qkv is not None:
            dim = stage.num_heads * stage.head_dim
            for index, name in enumerate(("q", "k", "v")):
                part = nn.Linear(stage.qkv.in_features, dim, bias=stage.qkv.bias is not None)
                part.weight.copy_(stage.qkv.weight[index * dim:(index + 1) * dim])
                if stage.qkv.bias is not None:
                    part.bias.copy_(stage.qkv.bias[index * dim:(index + 1) * dim])
                setattr(stage, name, part)
            stage.qkv = None
        stage.q.weight.mul_(stage.scale)
        if stage.q.bias is not None:
            stage.q.bias.mul_(stage.scale)
    stage.scale = 1.0


def _attention_key(stage_name: str, part: str) -> str:
    """The observer of an attention matmul input ("attn3.attention.q"): its own name, apart from
    the projection layers' input observers ("attn3.q" observes the q projection's input)."""
    return f"{stage_name}.attention.{part}"


def _attention_observers(stage: Attention, observers, gen, cfg) -> list:
    """Observe the attention matmul inputs: for "qk" the q and k projection outputs (hooks on
    those Linears); for "qkv" q, k, v (and optionally the softmax output), recomputed from the
    stage's norm output exactly as the stage does (ranges without token sizes' log bias, which
    touches neither q nor k). Returns the hook handles."""
    name = _stage_name(stage)
    if cfg.attention == "qk":
        handles = []
        for part in ("q", "k"):
            observer = observers[_attention_key(name, part)] = _Observer(gen)
            handles.append(getattr(stage, part).register_forward_hook(
                lambda module, args, out, observer=observer: observer.add(out)))
        return handles
    parts = ("q", "k", "v") + (("softmax",) if cfg.quantize_softmax else ())
    for part in parts:
        observers[_attention_key(name, part)] = _Observer(gen)

    def hook(module, inputs, h):
        q, k, v = stage.heads_qkv(h)
        for part, t in (("q", q), ("k", k), ("v", v)):
            observers[_attention_key(name, part)].add(t)
        if cfg.quantize_softmax:
            logits = (q @ k.transpose(-2, -1)) * stage.scale
            observers[_attention_key(name, "softmax")].add(logits.softmax(-1))
    return [stage.norm.register_forward_hook(hook)]


def _install_attention(stage, observers, cfg) -> dict:
    """Put the calibrated attention quantization in place; returns its ranges for the stats.
    "qk": q's quantizer on the q projection (a q projection kept in float stays unquantized),
    k's in the explicit core, after the head split."""
    name = _stage_name(stage)
    try:
        if cfg.attention == "qk":
            quants = {part: SymQuant(observers[_attention_key(name, part)].bound(
                cfg.method, cfg.percentile), cfg.method) for part in ("q", "k")}
            stage.q.output_quant = quants["q"]  # fused into the q GEMM as its int8 output
            stage.attn_quant = QKInt8Attention(k_quant=quants["k"])  # see QKInt8Attention
            return {part: quant.to_dict() for part, quant in quants.items()}
        parts = [ActQuant(*observers[_attention_key(name, p)].range(cfg.method, cfg.percentile,
                                                                      False), cfg.method)
                 for p in ("q", "k", "v")]
        soft = (ActQuant(*observers[_attention_key(name, "softmax")].range("minmax", 100.0, False),
                         "minmax") if cfg.quantize_softmax else None)
    except ValueError as exc:
        raise ConfigError(f"quantize_int8: {name} attention: {exc}; use other calibration "
                          f"images") from exc
    stage.attn_quant = AttentionQuant(*parts, softmax=soft)
    return {p: getattr(stage.attn_quant, p).to_dict() for p in ("q", "k", "v", "softmax")
            if getattr(stage.attn_quant, p) is not None}


def _quantize_stem(ir, images, cfg, notes: List[str], bits: int = 8) -> Optional[dict]:
    """Swap the stem's patch convolution for a QuantPatchConv (int8 GEMM over the patches) with
    a min/max input range over the calibration images; None (and a note) where the stem has no
    single patchify convolution."""
    stem = next((s for s in ir.stages if isinstance(s, Stem)), None)
    node, why = patch_conv_node(stem) if stem is not None else (None, "no stem stage")
    if node is None:
        notes.append(f"stem kept in float: {why}")
        return None
    conv = insert_quant_conv(stem)
    observer = _Observer(torch.Generator().manual_seed(0))
    hook = conv.linear.register_forward_pre_hook(lambda module, args: observer.add(args[0]))
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], cfg.batch_size):
                stem.body(images[start:start + cfg.batch_size])
    finally:
        hook.remove()
    try:
        quant = ActQuant(observer.lo, observer.hi, "minmax")
    except ValueError as exc:
        raise ConfigError(f"quantize_int8: stem: {exc}; use other calibration images") from exc
    conv.quantize(quant, bits)
    stem.precision = "int8"
    return quant.to_dict()


# --- sensitivity -----------------------------------------------------------------------------
def _layer_sqnr(ir, images, originals: Dict[str, nn.Linear], cfg) -> Dict[str, float]:
    """Layer-local SQNR (dB): each QuantLinear against its float Linear on the same input (the
    block linears: the stem's patch GEMM has no fallback)."""
    layers = {name: layer for name, layer in quant_layers(ir).items() if name in originals}
    signal = {name: 0.0 for name in layers}
    noise = {name: 0.0 for name in layers}
    hooks = []
    for name, layer in layers.items():
        def hook(module, args, out, name=name):
            ref = originals[name](args[0])
            signal[name] += ref.pow(2).sum().item()
            noise[name] += (ref - out).pow(2).sum().item()
        hooks.append(layer.register_forward_hook(hook))
    try:
        _run_batches(ir, images[:cfg.batch_size], cfg.batch_size)
    finally:
        for h in hooks:
            h.remove()
    return {n: 10 * math.log10(max(signal[n], 1e-30) / max(noise[n], 1e-30)) for n in layers}


def _fit_accuracy_budget(ir, targets, originals, key_layers, sqnr, fallback, cfg,
                         context) -> List[str]:
    """Return layers to fp32, lowest SQNR first, until top-1 on the eval images drops by at
    most cfg.max_accuracy_drop points against the float model."""
    import warnings
    from vitopt.data.proxy import evaluate_top1
    if context.eval_labels is None:
        warnings.warn("quantize_int8: max_accuracy_drop needs labelled --eval data; the budget was "
                      "not applied", stacklevel=4)
        return ["max_accuracy_drop not applied: no labelled eval data"]
    images, labels = context.eval_images, context.eval_labels

    def top1():
        return evaluate_top1(ir, images, labels, batch_size=cfg.batch_size)

    current = {n: getattr(*targets[n]) for n in targets}
    attn = {id(s): s.attn_quant for s in ir.attention_stages()}
    for n, (stage, attr) in targets.items():
        _use_layer(stage, attr, originals[n], key_layers)
    for stage in ir.attention_stages():
        stage.attn_quant = None
    base = top1()  # the balanced float model: the same function as the input IR
    for n, (stage, attr) in targets.items():
        _use_layer(stage, attr, current[n], key_layers)
    for stage in ir.attention_stages():
        stage.attn_quant = attn[id(stage)]
    acc = top1()
    for name in sorted((n for n in sqnr if n not in fallback), key=sqnr.get):
        if 100 * (base - acc) <= cfg.max_accuracy_drop:
            break
        stage, attr = targets[name]
        _use_layer(stage, attr, originals[name], key_layers)
        fallback[name] = (f"accuracy budget: top-1 drop {100 * (base - acc):.2f} > "
                          f"{cfg.max_accuracy_drop} points (SQNR {sqnr[name]:.1f} dB)")
        acc = top1()
    return [f"accuracy budget: top-1 {base:.4f} float -> {acc:.4f} int8 on {len(labels)} eval "
            f"images (drop {100 * (base - acc):.2f} points, budget {cfg.max_accuracy_drop})"]


# --- the pass --------------------------------------------------------------------------------
@register_pass("quantize_int8", config=QuantizeInt8Config, exact=False, uses_context=True)
def quantize_int8(ir, cfg: QuantizeInt8Config, context) -> PassResult:
    if quant_layers(ir):
        return PassResult(ir, False, {}, ["the IR is already quantized"])
    if cast_dtype(ir):
        return PassResult(ir, False, {}, [
            f"the IR is already cast to {cast_dtype(ir)} (cast_{cast_dtype(ir)}); quantize_int8 "
            f"needs fp32 linears: use quantize_int8 or cast_{cast_dtype(ir)}, not both"])
    skip = set(cfg.skip)
    if cfg.attention == "qk":
        for stage in _quantized_attention(ir, cfg):
            if stage.qkv is not None and f"{_stage_name(stage)}.qkv" in skip:  # skip all three
                skip.remove(f"{_stage_name(stage)}.qkv")
                skip.update(f"{_stage_name(stage)}.{p}" for p in "qkv")
            split_qkv_for_int8_logits(stage)
    targets = target_linears(ir)
    if not targets:
        return PassResult(ir, False, {}, ["nothing to quantize: no Linear layers in attention "
                                          "or MLP stages"])
    unknown = sorted(skip - set(targets))
    if unknown:
        raise ConfigError(f"quantize_int8: skip names {unknown} are not layers of this model; "
                          f"layers: {', '.join(targets)}")
    from vitopt.data.calib import check_calibration, synthetic_calibration
    notes = []
    h, w = ir.meta.image_size
    if context.calib is None:
        images, source = synthetic_calibration(ir.meta.in_chans, (h, w)), "synthetic random"
        notes.append("calibrated on SYNTHETIC random images (no --calib given)")
    else:
        images, source = context.calib, context.calib_source or "given images"
    images = check_calibration(images[:cfg.calib_limit], ir.meta.in_chans, (h, w), where=source)

    fix, fix_why = overflow_fix_for(cfg.overflow_fix, getattr(context, "device", "cpu"))
    block_bits, stem_bits = weight_bits_for(fix)
    alphas = smooth_layer_norms(ir, images, cfg.alpha, cfg.batch_size) if cfg.smooth else {}
    smoothed = sum(a is not None for a in alphas.values())
    observers = _calibrate(ir, images, targets, cfg)
    ranges, originals, key_layers = {}, {}, {}
    for name, (stage, attr) in targets.items():
        keep_min = attr == "fc2"  # post-GELU: asymmetric, keep the true minimum
        lo, hi = observers[name].range(cfg.method, cfg.percentile, keep_min)
        try:
            quant = ActQuant(lo, hi, cfg.method + ("/keep-min" if keep_min else ""))
        except ValueError as exc:
            raise ConfigError(f"quantize_int8: {name}: {exc}; use other calibration images") from exc
        originals[name] = getattr(stage, attr)
        if isinstance(stage, Attention) and stage.record_keys and attr in KEY_SOURCES:
            # Token merging's averaged keys: an int8 GEMM on the same u8 input (from the
            # balanced float weights, before the source is quantized).
            key_layers[id(stage)] = int8_key_projection(stage, quant, block_bits)
        _use_layer(stage, attr, QuantLinear(originals[name], quant, block_bits), key_layers)
        ranges[name] = quant.to_dict()
    attention = {_stage_name(stage): _install_attention(stage, observers, cfg)
                 for stage in _quantized_attention(ir, cfg)}

    stem_range = _quantize_stem(ir, images, cfg, notes, stem_bits) if cfg.quantize_stem else None
    sqnr = _layer_sqnr(ir, images, originals, cfg)
    fallback = {n: "named in skip" for n in sorted(skip)}
    for name in sorted(sqnr, key=sqnr.get)[:cfg.keep_sensitive]:
        fallback.setdefault(name, f"lowest SQNR ({sqnr[name]:.1f} dB)")
    for name, why in fallback.items():
        stage, attr = targets[name]
        _use_layer(stage, attr, originals[name], key_layers)
    if cfg.max_accuracy_drop is not None:
        notes += _fit_accuracy_budget(ir, targets, originals, key_layers, sqnr, fallback, cfg,
                                      context)
    for stage in ir.attention_stages():
        if isinstance(stage.proj, QuantLinear):  # after the SQNRs, which need proj's float input
            stage.proj.input_quantized_early = True  # at the attention's output: project_heads
    for stage in ir.stages:
        if isinstance(stage, (Attention, Mlp)):
            kinds = {type(getattr(stage, a, None))
                     for a in ("qkv", "q", "k", "v", "proj", "fc1", "fc2")}
            if QuantLinear in kinds:
                stage.precision = "int8" if nn.Linear not in kinds else "int8+fp32"
    quantized = len(targets) - len(fallback)
    notes.append(f"int8: {quantized} of {len(targets)} linears (weights per channel, activations "
                 f"per tensor, {cfg.method}), {smoothed} of {len(alphas)} LayerNorms balanced "
                 f"(alpha {'searched' if cfg.alpha is None else cfg.alpha}), "
                 f"attention {ATTENTION_NOTE[cfg.attention]}, stem "
                 f"convolution {'int8' if stem_range else 'float'}; calibrated "
                 f"on {images.shape[0]} images ({source})")
    if fix != "none":
        which = "every int8 weight" if fix == "all" else "the stem's int8 weights"
        notes.append(f"overflow fix: {which} in the 7-bit range [-63, 63] ({fix_why})")
    if fallback:
        notes.append("kept in fp32: " + ", ".join(f"{n} ({why})" for n, why in fallback.items()))
    stats = {"method": cfg.method, "overflow_fix": {"fix": fix, "why": fix_why,
                                                   "weight_bits": block_bits,
                                                   "stem_weight_bits": stem_bits}, "calib_images": int(images.shape[0]), "calib_source": source,
             "stem": {"range": stem_range, "precision": "int8"} if stem_range else
             {"precision": "fp32"},
             "smoothed_norms": smoothed, "alphas": alphas, "quantized": quantized, "fallback": fallback,
             "attention": {"scheme": cfg.attention, "ranges": attention},
             "layers": {n: {"range": ranges[n], "sqnr_db": round(sqnr[n], 2),
                            "precision": "fp32" if n in fallback else "int8"} for n in targets}}
    return PassResult(ir, True, stats, notes)

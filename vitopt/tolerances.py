"""The one tolerance table: how close an output must be to its reference, by precision and backend.

Every numeric comparison in vitopt (tests, the IR-vs-original check, engine checks after a
build, `vitopt check`) goes through `compare()` with a (precision, backend) pair, so a bound
is stated once, here, and nowhere else.

Two kinds of bound, chosen by precision:

* exact-ish (fp32): elementwise, `|actual - expected| <= atol + rtol * |expected|`, like
  numpy.allclose. The only differences are summation order and kernel choice.
    - ("fp32", "torch")      atol 1e-4, rtol 1e-5: the lifted IR or a rewritten module vs the
                             original model, both eager PyTorch (design §2: max abs <= 1e-4).
    - ("fp32", "onnxruntime") atol 1e-4, rtol 1e-4: ORT keeps fp32 kernels close to eager.
    - ("fp32", "openvino")   atol 1e-3, rtol 1e-3: its fused attention and MVN kernels
                             reassociate more; still fp32 (the f32 precision hint is set).
    - ("fp32", "tensorrt")   atol 5e-3, rtol 5e-3: TensorRT may use TF32 on Ampere and later.
    - ("fp32", any other)    atol 1e-3, rtol 1e-3.
* lossy (bf16, fp16, int8): elementwise bounds mean little here (one logit near zero would fail
  any rtol), so two whole-output checks:
    - cosine similarity, taken per sample (the minimum over the batch) >= min_cos, and
    - max |actual - expected| <= atol * scale, where scale = max |expected| (the output scale).
  Values:
    - bf16: min_cos 0.99,  atol 0.10 of scale (8-bit mantissa, about 0.4 % per op).
    - fp16: min_cos 0.999, atol 0.02 of scale (11-bit mantissa; fp32 accumulation assumed).
    - int8: min_cos 0.98,  atol 0.25 of scale (calibrated, per-channel weights).
  These bound numerics only; a pass's accuracy cost is measured as top-1 on the proxy data.

A NaN or inf where the reference is finite always fails. Backends not in the table get the
precision's "*" row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from vitopt.errors import ConfigError, NumericsError

PRECISIONS = ("fp32", "bf16", "fp16", "int8")


@dataclass(frozen=True)
class Tolerance:
    """A bound. `scaled`: atol is a fraction of the output scale and rtol is unused (lossy)."""

    atol: float
    rtol: float = 0.0
    min_cos: float = 0.0
    scaled: bool = False


TABLE = {
    ("fp32", "torch"): Tolerance(atol=1e-4, rtol=1e-5),
    ("fp32", "onnxruntime"): Tolerance(atol=1e-4, rtol=1e-4),
    ("fp32", "openvino"): Tolerance(atol=1e-3, rtol=1e-3),
    ("fp32", "tensorrt"): Tolerance(atol=5e-3, rtol=5e-3),
    ("fp32", "*"): Tolerance(atol=1e-3, rtol=1e-3),
    ("bf16", "*"): Tolerance(atol=0.10, min_cos=0.99, scaled=True),
    ("fp16", "*"): Tolerance(atol=0.02, min_cos=0.999, scaled=True),
    ("int8", "*"): Tolerance(atol=0.25, min_cos=0.98, scaled=True),
}


def tolerance(precision: str, backend: str = "*") -> Tolerance:
    """The bound for outputs computed in `precision` on `backend` ("torch" for eager PyTorch)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return TABLE.get((precision, backend)) or TABLE[(precision, "*")]


@dataclass(frozen=True)
class Comparison:
    """The result of one comparison. max_rel is max_abs relative to the output scale."""

    max_abs: float
    max_rel: float
    cos_sim: float
    ok: bool
    tolerance: Tolerance
    reason: str = ""

    def __str__(self) -> str:
        verdict = "ok" if self.ok else f"FAILED ({self.reason})"
        return (f"max_abs={self.max_abs:.3g} max_rel={self.max_rel:.3g} "
                f"cos={self.cos_sim:.6f}: {verdict}")


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _min_cosine(actual: np.ndarray, expected: np.ndarray) -> float:
    """Cosine similarity per sample (first axis), the worst one; whole tensor when 0-d/1-d."""
    if actual.ndim >= 2:
        a, e = actual.reshape(actual.shape[0], -1), expected.reshape(expected.shape[0], -1)
    else:
        a, e = actual.reshape(1, -1), expected.reshape(1, -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(e, axis=1)
    dots = (a * e).sum(axis=1)
    # Two all-zero rows are identical; one zero row against a non-zero one is not.
    cos = np.where(norms > 0, dots / np.maximum(norms, 1e-300),
                   np.where(np.abs(a).sum(1) + np.abs(e).sum(1) == 0, 1.0, 0.0))
    return float(cos.min()) if cos.size else 1.0


def compare(actual, expected, precision: str = "fp32", backend: str = "*") -> Comparison:
    """Compare an output (numpy or torch) with its reference under the table's bound."""
    tol = tolerance(precision, backend)
    a, e = _as_numpy(actual), _as_numpy(expected)
    if a.shape != e.shape:
        return Comparison(float("inf"), float("inf"), 0.0, False, tol,
                          f"shape {list(a.shape)} differs from the reference's {list(e.shape)}")
    if not np.isfinite(a[np.isfinite(e)]).all():
        return Comparison(float("nan"), float("nan"), 0.0, False, tol,
                          "NaN or inf where the reference is finite")
    diff = np.abs(a - e)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(e).max()) if e.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    cos = _min_cosine(a, e)
    if tol.scaled:
        reasons = []
        if cos < tol.min_cos:
            reasons.append(f"cosine {cos:.6f} < {tol.min_cos}")
        if max_abs > tol.atol * scale:
            reasons.append(f"max abs {max_abs:.3g} > {tol.atol} x output scale {scale:.3g}")
        return Comparison(max_abs, max_rel, cos, not reasons, tol, "; ".join(reasons))
    bound = tol.atol + tol.rtol * np.abs(e)
    bad = int((diff > bound).sum())
    reason = "" if not bad else (f"{bad} of {diff.size} values exceed atol {tol.atol:g} + "
                                 f"rtol {tol.rtol:g} x |expected| (max abs {max_abs:.3g})")
    return Comparison(max_abs, max_rel, cos, bad == 0, tol, reason)


def require_close(actual, expected, precision: str = "fp32", backend: str = "*",
                  what: Optional[str] = None) -> Comparison:
    """compare(), raising NumericsError (exit code 2) naming `what` when the bound is not met."""
    result = compare(actual, expected, precision, backend)
    if not result.ok:
        subject = what or f"{backend} {precision} output"
        raise NumericsError(f"{subject} does not match its reference: {result} (bound for "
                            f"{precision} on {backend}: {result.tolerance}). Try fp32 or another "
                            f"backend to find which step loses accuracy.")
    return result

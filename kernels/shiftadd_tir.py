"""The shift-add linear as a TVM TensorIR kernel (llvm and cuda), its schedules and a launcher.

Computes exactly vitopt.kernels.shiftadd_reference.shift_linear_ref (integer arithmetic, then
one float rescale in the same order), as five TensorIR blocks from one te description:
    amax[m]        = max_k |x[m, k]|                           (per-row activation range)
    xq[m, k]       = clamp(floor(x / sx[m] + 0.5), -qmax, qmax) (int32 fixed point; sx inlined)
    acc32[j, m, n] = sum_{k in chunk j (the largest divisor of K that cannot overflow)} sel(c > 0, v, sel(c < 0, -v, 0)),
                     v = xq[m, k] << (max_shift - max(|c| - 1, 0)),  c = codes_t[k, n] (int8)
                     (only shifts, adds and selects; a chunk cannot overflow int32)
    acc[m, n]      = sum_j int64(acc32[j, m, n])
    out[m, n]      = (float32(acc) * sx[m]) * (scale[n] * 2^-max_shift)
The bias is not part of the kernel: the caller adds it as its own float32 op (the launcher in
numpy, the TVM converter as a Relax add). Inside one function LLVM contracts a multiply and a
following add into an FMA (TVM allows FP op fusion, and it happens even across loop nests once
small loops are unrolled), which rounds once where the reference rounds twice.
The weight codes come transposed ([K, N]) so the inner loop over output channels reads them
contiguously and vectorizes (int8 loads widened to int32 lanes, variable arithmetic shifts).

Schedules are data: kernels/tuning/shiftadd_<kind>.json names the tile sizes per target kind
(`llvm`, `cuda`); `schedule()` applies them. `build()` compiles a kernel for fixed shapes (or a
symbolic row count) and `ShiftAddKernel.__call__` is the launcher: it checks its inputs and
runs the compiled function. CUDA modules compile here without a GPU (NVRTC); running them needs
one. Idea and baseline: ShiftAddViT (You et al. 2023) wrote its shift kernels in TVM and
compared them with a TVM fp32 matmul; the schedule here is this project's own.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import numpy as np

from vitopt.errors import BackendUnavailableError, ConfigError, InputError
from vitopt.kernels.shiftadd_reference import (ACT_BITS, MAX_SUPPORTED_SHIFT, act_qmax,
                                               chunk_size)

TUNING_DIR = Path(__file__).resolve().parent / "tuning"
TARGET_KINDS = ("llvm", "cuda")


def _tvm():
    try:
        import tvm
        from tvm import te  # noqa: F401
    except ImportError as exc:  # optional engine
        raise BackendUnavailableError("the shift-add kernel needs TVM: pip install apache-tvm "
                                      f"(import failed: {exc})") from exc
    return tvm


def load_tuning(kind: str, name: str = "default") -> dict:
    """The schedule parameters for target kind `kind` from kernels/tuning/shiftadd_<kind>.json."""
    if kind not in TARGET_KINDS:
        raise ConfigError(f"no shift-add schedule for target kind {kind!r}; kinds: {TARGET_KINDS}")
    data = json.loads((TUNING_DIR / f"shiftadd_{kind}.json").read_text())
    if name not in data["configs"]:
        raise ConfigError(f"shift-add tuning {kind}/{name!r} does not exist; configs: "
                          f"{', '.join(data['configs'])}")
    return dict(data["configs"][name])


# --- the computation -----------------------------------------------------------------------
def shiftadd_te(x, codes_t, scale, act_bits: int, max_shift: int):
    """te description: x [M, K] float32, codes_t [K, N] int8, scale [N] -> out [M, N] float32,
    without the bias (see the module docstring)."""
    from tvm import te, tirx
    m_dim, k_dim = x.shape
    n_dim = codes_t.shape[1]
    k_int = int(k_dim)
    qmax = act_qmax(act_bits)
    limit = min(chunk_size(act_bits, max_shift), k_int)
    chunk = next(d for d in range(limit, 0, -1) if k_int % d == 0)  # equal chunks, no tail
    chunks = k_int // chunk
    k = te.reduce_axis((0, k_dim), name="k")
    amax = te.compute((m_dim,), lambda m: te.max(te.abs(x[m, k]), axis=k), name="amax")
    sx = te.compute((m_dim,), lambda m: tirx.Select(amax[m] > 0, amax[m] / float(qmax),
                                                    tirx.const(1.0, "float32")), name="sx")

    def quantize(m, j):
        v = te.floor(x[m, j] / sx[m] + tirx.const(0.5, "float32"))
        v = te.max(te.min(v, tirx.const(float(qmax), "float32")), tirx.const(-float(qmax), "float32"))
        return v.astype("int32")
    xq = te.compute((m_dim, k_dim), quantize, name="xq")
    r = te.reduce_axis((0, chunk), name="r")

    def term(j, m, n):
        kk = j * chunk + r
        c = codes_t[kk, n].astype("int32")
        v = xq[m, kk] << (max_shift - te.max(te.abs(c) - 1, 0))
        value = tirx.Select(c > 0, v, tirx.Select(c < 0, -v, tirx.const(0, "int32")))
        return te.sum(value, axis=r)
    acc32 = te.compute((chunks, m_dim, n_dim), term, name="acc32")  # chunk-major: n contiguous
    j = te.reduce_axis((0, chunks), name="j")
    acc = te.compute((m_dim, n_dim), lambda m, n: te.sum(acc32[j, m, n].astype("int64"), axis=j),
                     name="acc")
    pow2 = tirx.const(2.0 ** -max_shift, "float32")
    return te.compute((m_dim, n_dim), lambda m, n: acc[m, n].astype("float32") * sx[m] *
                      (scale[n] * pow2), name="out")


def prim_func(m: Union[int, None], k: int, n: int, act_bits: int = 16, max_shift: int = 6):
    """The unscheduled PrimFunc; m=None gives a symbolic row count (any batch)."""
    if act_bits not in ACT_BITS:
        raise ConfigError(f"act_bits {act_bits} is not supported; use one of {ACT_BITS}")
    if not 0 <= max_shift <= MAX_SUPPORTED_SHIFT:
        raise ConfigError(f"max_shift {max_shift} must be in [0, {MAX_SUPPORTED_SHIFT}]")
    tvm = _tvm()
    from tvm import te
    rows = te.var("m") if m is None else int(m)
    x = te.placeholder((rows, k), "float32", name="x")
    codes_t = te.placeholder((k, n), "int8", name="codes_t")
    scale = te.placeholder((n,), "float32", name="scale")
    out = shiftadd_te(x, codes_t, scale, act_bits, max_shift)
    return te.create_prim_func([x, codes_t, scale, out]).with_attr("global_symbol", "shiftadd").with_attr(
        "tir.noalias", tvm.tirx.const(1, "bool"))


# --- schedules -----------------------------------------------------------------------------
def schedule(func, kind: str, params: Optional[dict] = None):
    """Apply the tuning parameters for `kind` to the PrimFunc; returns the scheduled PrimFunc."""
    params = params or load_tuning(kind)
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("sx"))
    (_schedule_llvm if kind == "llvm" else _schedule_cuda)(sch, params)
    return sch.mod["main"]


def _schedule_llvm(sch, p: dict) -> None:
    block = sch.get_sblock("acc32")
    j, m, n, r = sch.get_loops(block)
    mo, mi = sch.split(m, [None, p["tile_m"]])
    no, ni, nv = sch.split(n, [None, p["tile_n"] // p["vector"], p["vector"]])
    sch.reorder(mo, no, j, r, mi, ni, nv)
    outer = sch.fuse(mo, no)
    if p.get("parallel", True):
        sch.parallel(outer)
    sch.vectorize(nv)
    if p.get("unroll", True):
        sch.unroll(mi)
    sch.decompose_reduction(block, r)
    for name in ("acc", "out"):
        loops = sch.get_loops(sch.get_sblock(name))
        sch.vectorize(sch.split(loops[1], [None, p["vector"]])[1])
        if p.get("parallel", True):
            sch.parallel(loops[0])
    if p.get("parallel", True):
        sch.parallel(sch.get_loops(sch.get_sblock("xq"))[0])


def _schedule_cuda(sch, p: dict) -> None:
    block = sch.get_sblock("acc32")
    j, m, n, _ = sch.get_loops(block)
    mo, mi = sch.split(m, [None, p["threads_m"]])
    no, ni = sch.split(n, [None, p["threads_n"]])
    sch.reorder(j, mo, no, mi, ni)
    sch.bind(sch.fuse(j, mo), "blockIdx.y")
    sch.bind(no, "blockIdx.x")
    sch.bind(mi, "threadIdx.y")
    sch.bind(ni, "threadIdx.x")
    for name in ("amax", "xq", "acc", "out"):
        loops = sch.get_loops(sch.get_sblock(name))
        spatial = loops[:1] if name == "amax" else loops[:2]
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        bx, tx = sch.split(fused, [None, p["threads_1d"]])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")


# --- build and launch ----------------------------------------------------------------------
def target_for(kind: str):
    tvm = _tvm()
    if kind == "llvm":
        return tvm.target.Target({"kind": "llvm", "mcpu": _host_cpu(), "num-cores": 1})
    if kind == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    raise ConfigError(f"unknown target kind {kind!r}; use one of {TARGET_KINDS}")


def _host_cpu() -> str:
    tvm = _tvm()
    name = tvm.target.codegen.llvm_get_system_cpu() if hasattr(tvm.target, "codegen") else ""
    return name or "generic"


def build(m: Optional[int], k: int, n: int, act_bits: int = 16, max_shift: int = 6,
          kind: str = "llvm", params: Optional[dict] = None, target=None):
    """Compile the kernel; returns a ShiftAddKernel (llvm) or the compiled module (cuda)."""
    tvm = _tvm()
    func = schedule(prim_func(m, k, n, act_bits, max_shift), kind, params)
    lib = tvm.compile(tvm.IRModule({"shiftadd": func}), target=target or target_for(kind))
    return ShiftAddKernel(lib, m, k, n, act_bits, max_shift, kind)


class ShiftAddKernel:
    """The launcher: validates inputs, runs the compiled kernel on numpy arrays."""

    def __init__(self, lib, m, k, n, act_bits, max_shift, kind):
        self.lib, self.m, self.k, self.n = lib, m, k, n
        self.act_bits, self.max_shift, self.kind = act_bits, max_shift, kind

    def __call__(self, x: np.ndarray, codes: np.ndarray, scale: np.ndarray,
                 bias: Optional[np.ndarray] = None) -> np.ndarray:
        """x [..., K] float32, codes int8 [N, K] (as ShiftLinear stores them), scale [N]."""
        if self.kind != "llvm":
            raise BackendUnavailableError(f"this launcher runs llvm kernels; the {self.kind} "
                                          "module needs a device (use lib with tvm.runtime)")
        tvm = _tvm()
        x = np.ascontiguousarray(x, dtype=np.float32)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]) if x.ndim else x
        self._check(x2, codes, scale, bias)
        dev = tvm.cpu()
        args = [x2, np.ascontiguousarray(codes.T), scale.astype(np.float32)]
        out = tvm.runtime.tensor(np.empty((x2.shape[0], self.n), np.float32), dev)
        self.lib["shiftadd"](*[tvm.runtime.tensor(a, dev) for a in args], out)
        result = out.numpy()
        if bias is not None:
            result = result + bias.astype(np.float32)
        return result.reshape(*lead, self.n)

    def _check(self, x2, codes, scale, bias) -> None:
        if x2.ndim != 2 or x2.shape[1] != self.k or (self.m is not None and x2.shape[0] != self.m):
            raise InputError(f"x has shape {list(x2.shape)} (rows x features); this kernel was "
                             f"built for [{self.m if self.m is not None else 'any'}, {self.k}]")
        if codes.dtype != np.int8 or codes.shape != (self.n, self.k):
            raise InputError(f"codes must be int8 [{self.n}, {self.k}]; got {codes.dtype} "
                             f"{list(codes.shape)}")
        if codes.size and int(np.abs(codes.astype(np.int32)).max()) > self.max_shift + 1:
            raise InputError(f"a weight code exceeds max_shift + 1 = {self.max_shift + 1}; build "
                             f"the kernel with the max_shift the codes were made for")
        if scale.shape != (self.n,):
            raise InputError(f"scale must have shape [{self.n}]; got {list(scale.shape)}")
        if bias is not None and bias.shape != (self.n,):
            raise InputError(f"bias must have shape [{self.n}]; got {list(bias.shape)}")

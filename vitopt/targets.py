"""Targets name hardware, not libraries: what to build for, which backends to try, defaults.

`cpu` builds for this machine's CPU (OpenVINO first, then ONNX Runtime). `cuda` builds for this
machine's NVIDIA GPU. The device profiles (`h100`, `a100`, `l4`, `t4`, `orin-agx`, `orin-nano`)
are `cuda` with data about one GPU: its CUDA architecture (`extra["cuda_arch"]`, which the TVM
backend compiles for), the precisions its tensor cores run, the batch range (min, opt, max) an
engine is built for, the TensorRT workspace and the tuning budget (TVM MetaSchedule trials,
the Inductor mode, the TensorRT builder optimisation level).

Backend choice for a GPU target: TensorRT when `tensorrt` imports, else AOTInductor (Triton
kernels), else TVM CUDA; `choose_backend` says which one it took and why it skipped the others.
On a machine without a GPU a GPU target fails with BackendUnavailableError (exit code 3) that
offers the one path that works there: TVM cross-compiles CUDA code without a GPU
(`--backend tvm --cuda-arch sm_90`).

Precision rules (NVIDIA's architecture whitepapers: bf16 tensor cores from Ampere, sm_80; FP8
from Ada/Hopper, sm_89/sm_90): bf16 only on sm_80 and newer, fp8 only where listed. `auto`
never picks fp8: no vitopt pass writes FP8 Q/DQ yet, so fp8 is recorded as a capability only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Collection, Dict, List, Optional, Tuple

from vitopt.errors import BackendUnavailableError, ConfigError

GPU_BACKENDS = ("tensorrt", "aotinductor", "tvm")
GiB = 1 << 30


@dataclass(frozen=True)
class Target:
    name: str
    device: str  # cpu | cuda
    backends: Tuple[str, ...]  # tried in order; --backend overrides
    precision: str = "auto"  # auto picks per backend and hardware
    description: str = ""
    extra: Dict[str, object] = field(default_factory=dict)
    #: what the hardware runs (None: whatever this machine's device runs)
    precisions: Optional[Tuple[str, ...]] = None
    #: `auto` tries these in order (None: the backend's own order, AUTO_PRECISION)
    auto: Optional[Tuple[str, ...]] = None
    batch: Tuple[int, int, int] = (1, 8, 8)  # min, opt, max batch an engine is built for
    workspace: int = 4 * GiB  # TensorRT builder workspace (bytes)
    tuning: Dict[str, object] = field(default_factory=dict)  # tvm_trials, inductor_mode, trt_opt_level

    @property
    def cuda_arch(self) -> Optional[str]:
        return self.extra.get("cuda_arch")  # type: ignore[return-value]


def _gpu(name, arch, precisions, batch, workspace_gib, tuning, description, **extra) -> Target:
    auto = tuple(p for p in ("fp16", "fp32") if p in precisions)
    return Target(name, "cuda", GPU_BACKENDS, description=description, precisions=precisions,
                  auto=auto, batch=batch, workspace=int(workspace_gib * GiB), tuning=tuning,
                  extra={"cuda_arch": arch, **extra})


_DATACENTER = {"tvm_trials": 2000, "inductor_mode": "max-autotune", "trt_opt_level": 4}
_JETSON = {"jetson": True, "tensorrt_major": 10}  # JetPack 6 ships TensorRT 10

TARGETS: Dict[str, Target] = {
    "cpu": Target("cpu", "cpu", ("openvino", "onnxruntime"),
                  description="this machine's CPU: OpenVINO (bf16 where the CPU has it), else ONNX "
                              "Runtime; int8 on an x86 CPU without VNNI/AMX: ONNX Runtime first"),
    "cuda": Target("cuda", "cuda", GPU_BACKENDS,
                   description="this machine's NVIDIA GPU (its own architecture)",
                   tuning={"tvm_trials": 1000, "inductor_mode": "default", "trt_opt_level": 3}),
    "h100": _gpu("h100", "sm_90", ("fp32", "fp16", "bf16", "int8", "fp8"), (1, 64, 256), 8,
                 _DATACENTER, "NVIDIA H100 (Hopper, 80 GB)"),
    "a100": _gpu("a100", "sm_80", ("fp32", "fp16", "bf16", "int8"), (1, 64, 256), 8,
                 _DATACENTER, "NVIDIA A100 (Ampere, 40/80 GB)"),
    "l4": _gpu("l4", "sm_89", ("fp32", "fp16", "bf16", "int8", "fp8"), (1, 32, 128), 4,
               _DATACENTER, "NVIDIA L4 (Ada, 24 GB)"),
    "t4": _gpu("t4", "sm_75", ("fp32", "fp16", "int8"), (1, 16, 64), 2,
               {"tvm_trials": 1000, "inductor_mode": "max-autotune", "trt_opt_level": 3},
               "NVIDIA T4 (Turing, 16 GB; no bf16)"),
    "orin-agx": _gpu("orin-agx", "sm_87", ("fp32", "fp16", "bf16", "int8"), (1, 8, 32), 2,
                     {"tvm_trials": 1000, "inductor_mode": "default", "trt_opt_level": 3},
                     "Jetson AGX Orin (JetPack 6, TensorRT 10, 32/64 GB shared)", **_JETSON),
    "orin-nano": _gpu("orin-nano", "sm_87", ("fp32", "fp16", "bf16", "int8"), (1, 1, 8), 0.5,
                      {"tvm_trials": 500, "inductor_mode": "default", "trt_opt_level": 2},
                      "Jetson Orin Nano (JetPack 6, TensorRT 10, 4/8 GB shared)", **_JETSON),
}

#: Precisions `auto` tries per (backend, device), fastest first; the first this machine runs wins.
AUTO_PRECISION = {
    ("openvino", "cpu"): ("bf16", "fp32"),
    ("onnxruntime", "cpu"): ("fp32",),
    ("aotinductor", "cpu"): ("fp32",),
    ("aotinductor", "cuda"): ("fp16", "fp32"),
    ("tensorrt", "cuda"): ("fp16", "fp32"),
    ("tvm", "cpu"): ("fp32",),
    ("tvm", "cuda"): ("fp16", "fp32"),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ConfigError(f"unknown target {name!r}; targets: {', '.join(TARGETS)} "
                          f"(`vitopt targets` describes them)")
    return TARGETS[name]


# --- this machine's GPU -------------------------------------------------------------------
@dataclass(frozen=True)
class GpuInfo:
    name: str
    capability: Tuple[int, int]
    memory_gib: float

    @property
    def arch(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


def cuda_available() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install is the same as none, here
        return False


@lru_cache(maxsize=1)
def local_gpu() -> Optional[GpuInfo]:
    """CUDA device 0 of this machine, or None without a usable GPU."""
    if not cuda_available():
        return None
    import torch
    props = torch.cuda.get_device_properties(0)
    return GpuInfo(props.name, (props.major, props.minor), props.total_memory / GiB)


def arch_number(arch: str) -> int:
    """"sm_90" -> 90; ConfigError for anything else."""
    digits = str(arch).lower().removeprefix("sm_")
    if not digits.isdigit() or len(digits) < 2:
        raise ConfigError(f"CUDA architecture {arch!r} is not of the form sm_XX (e.g. sm_80, sm_90)")
    return int(digits)


def profile_for_gpu(gpu: GpuInfo) -> Optional[Target]:
    """The device profile that describes `gpu` (matched by architecture, name and memory)."""
    candidates = [t for t in TARGETS.values() if t.cuda_arch == gpu.arch]
    if gpu.arch == "sm_87":  # both Orins: the Nano has at most 8 GB
        return TARGETS["orin-nano" if gpu.memory_gib <= 8.5 else "orin-agx"]
    named = [t for t in candidates if t.name.split("-")[0] in gpu.name.lower()]
    return (named or candidates or [None])[0]


# --- checks and choices -------------------------------------------------------------------
def cross_compile_hint(target: Target) -> str:
    arch = target.cuda_arch or "sm_90"
    return (f"TVM can still cross-compile CUDA code here without a GPU: "
            f"`vitopt compile MODEL --target {target.name} --backend tvm --cuda-arch {arch}` "
            f"(run the artifact on a machine with that GPU)")


def require_device(target: Target, backend: Optional[str] = None) -> None:
    """Raise BackendUnavailableError when this machine cannot build for `target`.

    A GPU target needs a GPU here, except with `backend="tvm"` (cross-compilation). A device
    profile also needs this machine's GPU to be of the profile's architecture: TensorRT and
    Triton build for the GPU they run on."""
    if target.device != "cuda" or backend == "tvm":
        return
    gpu = local_gpu()
    if gpu is None:
        raise BackendUnavailableError(
            f"target {target.name!r} needs an NVIDIA GPU, and this machine has none "
            f"(torch.cuda.is_available() is False). Compile on the machine that will run the "
            f"model, or use --target cpu to build for this CPU. {cross_compile_hint(target)}")
    if target.cuda_arch is not None and target.cuda_arch != gpu.arch:
        mine = profile_for_gpu(gpu)
        raise BackendUnavailableError(
            f"target {target.name!r} is a {target.cuda_arch} GPU, but this machine has "
            f"{gpu.name} ({gpu.arch}); engines built here run on {gpu.arch} only. Use "
            f"--target {mine.name if mine else 'cuda'} for this GPU. {cross_compile_hint(target)}")


#: Why int8 for a CPU without int8 dot products tries ONNX Runtime before OpenVINO. Measured
#: with PERF_COUNT and the suite (benchmarks/results/cpu-amd-epyc-avx2-2c/suite-deit-s-avx2,
#: DeiT-S/16, 2-core AVX2 EPYC, OpenVINO 2026.4, ONNX Runtime 1.32).
SLOW_OPENVINO_INT8 = ("openvino second: on a CPU without VNNI or AMX its int8 linears run "
                      "oneDNN's generic jit_gemm_I8, no faster than its fp32 ones, while ONNX "
                      "Runtime's MLAS u8s8 kernels ran DeiT-S/16 int8 1.6-1.8x faster than "
                      "OpenVINO int8 on a 2-core AVX2 EPYC")


def x86_without_int8_dot() -> bool:
    """An x86 CPU without VNNI/AMX (int8 GEMMs on it use VPMADDUBSW: slow, and saturating)."""
    from vitopt.artifact import hardware_info
    from vitopt.passes.quantize_int8 import int8_dot_flags
    return "avx2" in hardware_info()["flags"] and not int8_dot_flags()


def backend_order(target: Target, precision: Optional[str] = None) -> Tuple[Tuple[str, ...],
                                                                           Optional[str]]:
    """(the target's backends in the order to try for `precision`, why it differs from the
    target's own order or None). int8 on an x86 CPU without int8 dot products puts ONNX
    Runtime first (SLOW_OPENVINO_INT8)."""
    order = target.backends
    if (target.device == "cpu" and precision == "int8" and "onnxruntime" in order
            and "openvino" in order and order.index("openvino") < order.index("onnxruntime")
            and x86_without_int8_dot()):
        rest = tuple(b for b in order if b != "onnxruntime")
        return ("onnxruntime",) + rest, SLOW_OPENVINO_INT8
    return order, None


def choose_backend(target: Target, backend: Optional[str],
                   log: Optional[Callable[[str], None]] = None,
                   precision: Optional[str] = None,
                   unusable: Collection[str] = ()) -> str:
    """The backend to build with: the one asked for, else the first available for the target
    (in backend_order for `precision`), leaving out `unusable` (backends whose engine this
    machine could not open). `log` (when given) hears which one was taken and why
    the ones before it were skipped."""
    from vitopt.backends import get_backend
    if backend is not None:
        get_backend(backend).require()
        return backend
    name, skipped = backend_decision(target, precision, unusable)
    if name is None:
        raise BackendUnavailableError(f"no backend for target {target.name!r} works here: "
                                      + "; ".join(skipped))
    if log is not None:
        why = f" (skipped {'; '.join(skipped)})" if skipped else " (the first choice)"
        reordered = backend_order(target, precision)[1]
        log(f"target {target.name}: using {name}{why}"
            + (f"; for {precision}, {reordered}" if reordered else ""))
    return name


def backend_decision(target: Target, precision: Optional[str] = None,
                     unusable: Collection[str] = ()
                     ) -> Tuple[Optional[str], List[str]]:
    """(the first available backend of `target` for `precision` (backend_order) and not in
    `unusable`, or None; why each one before it was skipped)."""
    from vitopt.backends import BACKENDS, get_backend
    reasons = []
    for name in backend_order(target, precision)[0]:
        if name in unusable:
            reasons.append(f"{name}: its engine did not open on this machine")
            continue
        if name not in BACKENDS:
            reasons.append(f"{name}: not part of this vitopt build yet")
            continue
        ok, why = get_backend(name).available()
        if ok:
            return name, reasons
        reasons.append(f"{name}: {why}")
    return None, reasons


def check_precision(target: Target, precision: str) -> None:
    """ConfigError when the target's hardware does not run `precision`."""
    if precision == "auto" or target.precisions is None:
        return
    arch = target.cuda_arch or "?"
    if precision not in target.precisions:
        reason = "bf16 needs sm_80 or newer" if precision == "bf16" else "no such tensor cores"
        raise ConfigError(f"target {target.name} ({arch}) does not run {precision} ({reason}); "
                          f"it runs {', '.join(target.precisions)}")
    if precision == "fp8":
        raise ConfigError(f"the {target.name} ({arch}) has FP8 tensor cores, but no vitopt pass "
                          f"writes FP8 quantization yet; use --precision fp16 (or int8)")


def choose_precision(backend: str, precision: str, device: str = "cpu",
                     target: Optional[Target] = None) -> str:
    """Resolve `auto` to the fastest precision this machine runs well on `backend`."""
    from vitopt.backends import get_backend
    engine = get_backend(backend)
    if target is not None:
        check_precision(target, precision)
    if precision != "auto":
        engine.require(precision)
        return precision
    order = AUTO_PRECISION.get((backend, device), ("fp32",))
    if target is not None and target.auto is not None:
        order = tuple(p for p in target.auto if p in order) or order
    for candidate in order:
        if engine.supports(candidate)[0]:
            return candidate
    return "fp32"


# --- `vitopt targets` -----------------------------------------------------------------------
def machine_summary() -> dict:
    """What this machine can build for: its GPU (and matching profile), each registered
    backend's availability, and whether CUDA cross-compilation (TVM) is possible."""
    from vitopt.backends import BACKENDS, get_backend
    gpu = local_gpu()
    backends = {}
    for name in sorted(set(BACKENDS) | set(GPU_BACKENDS), key=lambda n: (n not in BACKENDS, n)):
        backends[name] = get_backend(name).available() if name in BACKENDS else (
            False, "not part of this vitopt build yet")
    profile = profile_for_gpu(gpu) if gpu else None
    return {"gpu": gpu, "profile": profile.name if profile else None, "backends": backends,
            "cross_compile": backends["tvm"][0],
            "cuda_backend": backend_decision(TARGETS["cuda"]) if gpu else (None, [])}


def format_targets(summary: Optional[dict] = None) -> str:
    summary = machine_summary() if summary is None else summary
    gpu, lines = summary["gpu"], []
    lines.append(f"{'target':10s} {'arch':6s} {'precisions':26s} {'batch':11s} {'workspace':9s} "
                 f"tuning")
    for t in TARGETS.values():
        arch = t.cuda_arch or ("host" if t.device == "cpu" else "local")
        precisions = " ".join(t.precisions) if t.precisions else "auto (this device)"
        tuning = ", ".join(f"{k}={v}" for k, v in t.tuning.items()) or "-"
        workspace = f"{t.workspace / GiB:g} GiB" if t.device == "cuda" else "-"
        lines.append(f"{t.name:10s} {arch:6s} {precisions:26s} {'/'.join(map(str, t.batch)):11s} "
                     f"{workspace:9s} {tuning}")
        lines.append(f"{'':10s} {t.description}; backends: {' > '.join(t.backends)}")
    lines.append("  (fp8: hardware capability only; no vitopt pass writes FP8 yet)")
    lines.append("\nthis machine:")
    if gpu is None:
        lines.append("  GPU: none (torch.cuda.is_available() is False)")
    else:
        lines.append(f"  GPU: {gpu.name} ({gpu.arch}, {gpu.memory_gib:.0f} GiB); profile: "
                     f"{summary['profile'] or 'none matches; use --target cuda'}")
    for name, (ok, why) in summary["backends"].items():
        lines.append(f"  {name:12s} {'available' if ok else 'unavailable: ' + why}")
    lines.append("\nbuilds here:")
    lines.append("  cpu: yes")
    if gpu is None:
        lines.append("  cuda and the GPU profiles: no (no GPU)")
    else:
        chosen, skipped = summary["cuda_backend"]
        why = f" (skipped {'; '.join(skipped)})" if skipped else ""
        lines.append(f"  cuda{', ' + summary['profile'] if summary['profile'] else ''}: "
                     + (f"yes, with {chosen}{why}" if chosen else "no backend: " + "; ".join(skipped)))
    if summary["cross_compile"]:
        lines.append("  cross-compiling CUDA without a GPU: yes (`--backend tvm --cuda-arch sm_XX`)")
    else:
        lines.append(f"  cross-compiling CUDA without a GPU: no (tvm: {summary['backends']['tvm'][1]})")
    return "\n".join(lines)

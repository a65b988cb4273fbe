"""TVM target dicts: llvm for this host's CPU, cuda for an sm_XX architecture; what a library needs.

TVM 0.27 takes targets as dicts. Two kinds are built here:

    llvm_target()        {"kind": "llvm", "mtriple": ..., "mcpu": "znver4", "mattr": [...],
                          "num-cores": 2}
    cuda_target("sm_90") {"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm", ...}}

Host detection is TVM's own (what `Target.from_device("cpu")` uses): LLVM's default triple and
host CPU name (`tvm.codegen.llvm.GetDefaultTargetTriple` / `GetHostCPUName`), plus the CPU
features the host really has (`tvm.codegen.llvm.GetHostCPUFeatures`, from cpuid). mcpu alone
would assume every feature of that CPU model; a VM may hide some (here: znver4 without mwaitx,
pku, rdpru, wbnoinvd), so `mattr` turns those off explicitly, as clang's `-march=native` does.
The features a library was compiled with are recorded, and `missing_cpu_features` names the
ones this CPU lacks, so a library built for another CPU is refused before it can fault.

CUDA libraries keep a generic llvm host (no mcpu): their host code is the VM's glue, and a
cross-compiled library must load on whatever x86 host sits next to the GPU.

`check_cuda_arch` validates an arch string without importing TVM (CompileOptions uses it).
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional

from vitopt.errors import ConfigError

#: CUDA architectures TVM's NVRTC path compiles for (Maxwell .. Blackwell; "a" = arch-specific).
CUDA_ARCHS = ("sm_50", "sm_52", "sm_53", "sm_60", "sm_61", "sm_62", "sm_70", "sm_72", "sm_75",
              "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_90a", "sm_100", "sm_100a",
              "sm_101", "sm_120")
_ARCH = re.compile(r"^sm_\d{2,3}a?$")


def check_cuda_arch(arch: str) -> str:
    """`arch` normalised ("SM_90" -> "sm_90"); ConfigError naming the known ones otherwise."""
    text = str(arch).strip().lower()
    if not _ARCH.match(text) or text not in CUDA_ARCHS:
        raise ConfigError(f"unknown CUDA architecture {arch!r}; use one of {', '.join(CUDA_ARCHS)} "
                          f"(sm_90: H100/H200, sm_80: A100, sm_89: L4, sm_75: T4, sm_87: Orin)")
    return text


def _ffi(name: str):
    import tvm  # noqa: F401  (registers the global functions)
    from tvm_ffi import get_global_func

    return get_global_func(name)


def host_cpu() -> Dict[str, object]:
    """{"triple", "cpu", "features": the features this CPU has, "lacks": the cpuid features
    LLVM checked and found absent} as LLVM sees them."""
    features = {str(k): bool(on) for k, on in dict(_ffi("tvm.codegen.llvm.GetHostCPUFeatures")()).items()}
    return {"triple": str(_ffi("tvm.codegen.llvm.GetDefaultTargetTriple")()),
            "cpu": str(_ffi("tvm.codegen.llvm.GetHostCPUName")()),
            "features": sorted(k for k, on in features.items() if on),
            "lacks": sorted(k for k, on in features.items() if not on)}


def _cpu_model_features(triple: str, cpu: str) -> List[str]:
    """The features LLVM assumes for CPU model `cpu` (what -mcpu alone would turn on)."""
    from tvm.target import Target, codegen

    return sorted(str(f) for f in codegen.llvm_get_cpu_features(
        Target({"kind": "llvm", "mtriple": triple, "mcpu": cpu})))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def llvm_target(num_cores: Optional[int] = None) -> Dict[str, object]:
    """The llvm target dict for this host: triple, CPU model, its real features, core count."""
    host = host_cpu()
    lacks = set(host["lacks"])  # only cpuid features: tuning flags (x87, nopl, ...) stay as mcpu says
    absent = [f for f in _cpu_model_features(host["triple"], host["cpu"]) if f in lacks]
    return {"kind": "llvm", "mtriple": host["triple"], "mcpu": host["cpu"],
            "mattr": [f"+{f}" for f in host["features"]] + [f"-{f}" for f in absent],
            "num-cores": int(num_cores or usable_cores())}


def cuda_target(arch: str) -> Dict[str, object]:
    """The cuda target dict for `arch`, with a generic x86/arm llvm host (see the module doc)."""
    triple = str(_ffi("tvm.codegen.llvm.GetDefaultTargetTriple")())
    return {"kind": "cuda", "arch": check_cuda_arch(arch), "host": {"kind": "llvm",
                                                                     "mtriple": triple}}


def required_features(target: Dict[str, object]) -> List[str]:
    """The CPU features an llvm target dict compiles for (its "+" mattr entries)."""
    return sorted(str(a)[1:] for a in target.get("mattr", ()) if str(a).startswith("+"))


def missing_cpu_features(required: List[str]) -> List[str]:
    """Those of `required` this CPU lacks."""
    have = set(host_cpu()["features"])
    return [f for f in required if f not in have]


def visible_cuda_arch() -> Optional[str]:
    """"sm_XY" of CUDA device 0 as TVM sees it, or None without a GPU (or a CUDA-less TVM)."""
    import tvm

    try:
        device = tvm.cuda(0)
        if not device.exist:
            return None
        return "sm_" + str(device.compute_version).replace(".", "")
    except Exception:  # a TVM without CUDA, or a broken driver, is the same as no GPU here
        return None


def gpu_name() -> Optional[str]:
    import tvm

    try:
        device = tvm.cuda(0)
        return str(device.device_name) if device.exist else None
    except Exception:  # see visible_cuda_arch
        return None

"""Targets name hardware, not libraries: what to build for, which backends to try, defaults.

`cpu` builds for this machine's CPU (OpenVINO first, then ONNX Runtime). `cuda` and the
device profiles are GPU targets; on a machine without a GPU they fail with a clear
message (exit code 3) instead of building something that cannot run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from vitopt.errors import BackendUnavailableError, ConfigError


@dataclass(frozen=True)
class Target:
    name: str
    device: str  # cpu | cuda
    backends: Tuple[str, ...]  # tried in order; --backend overrides
    precision: str = "auto"  # auto picks per backend and hardware
    description: str = ""
    extra: Dict[str, object] = field(default_factory=dict)


TARGETS: Dict[str, Target] = {
    "cpu": Target("cpu", "cpu", ("openvino", "onnxruntime"),
                  description="this machine's CPU: OpenVINO (bf16 where the CPU has it), else ONNX Runtime"),
    "cuda": Target("cuda", "cuda", ("tensorrt", "aotinductor", "tvm"),
                   description="an NVIDIA GPU on this machine"),
}

#: Precisions `auto` tries per (backend, device), fastest first; the first this machine runs wins.
AUTO_PRECISION = {
    ("openvino", "cpu"): ("bf16", "fp32"),
    ("onnxruntime", "cpu"): ("fp32",),
    ("aotinductor", "cpu"): ("fp32",),
    ("aotinductor", "cuda"): ("fp16", "fp32"),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ConfigError(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")
    return TARGETS[name]


def cuda_available() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install is the same as none, here
        return False


def require_device(target: Target) -> None:
    if target.device == "cuda" and not cuda_available():
        raise BackendUnavailableError(
            f"target {target.name!r} needs an NVIDIA GPU, and this machine has none "
            f"(torch.cuda.is_available() is False). Compile on the machine that will run the "
            f"model, or use --target cpu to build for this CPU.")


def choose_backend(target: Target, backend: Optional[str]) -> str:
    """The backend to build with: the one asked for, else the first available for the target."""
    from vitopt.backends import BACKENDS, get_backend
    if backend is not None:
        get_backend(backend).require()
        return backend
    reasons = []
    for name in target.backends:
        if name not in BACKENDS:
            reasons.append(f"{name}: not part of this vitopt build yet")
            continue
        ok, why = get_backend(name).available()
        if ok:
            return name
        reasons.append(f"{name}: {why}")
    raise BackendUnavailableError(f"no backend for target {target.name!r} works here: " + "; ".join(reasons))


def choose_precision(backend: str, precision: str, device: str = "cpu") -> str:
    """Resolve `auto` to the fastest precision this machine runs well on `backend`."""
    from vitopt.backends import get_backend
    engine = get_backend(backend)
    if precision != "auto":
        engine.require(precision)
        return precision
    for candidate in AUTO_PRECISION.get((backend, device), ("fp32",)):
        if engine.supports(candidate)[0]:
            return candidate
    return "fp32"

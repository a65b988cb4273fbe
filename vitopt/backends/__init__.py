"""The backend registry: names to backend classes, imported only when asked for.

    get_backend("openvino").available()  ->  (True, "") or (False, "why; pip install ...")

A new backend adds one line to _REGISTRY ("name": "module:Class"); importing this package
imports no engine library.
"""
from __future__ import annotations

import importlib
from typing import List

from vitopt.backends.base import Backend, Engine
from vitopt.errors import ConfigError

_REGISTRY = {
    "onnxruntime": "vitopt.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "vitopt.backends.openvino:OpenVINOBackend",
    "aotinductor": "vitopt.backends.aotinductor:AOTInductorBackend",
    "tensorrt": "vitopt.backends.tensorrt:TensorRTBackend",
    "tvm": "vitopt.backends.tvm:TVMBackend",
}
BACKENDS = tuple(_REGISTRY)


def get_backend(name: str) -> Backend:
    """A backend instance by name; ConfigError naming the known ones for an unknown name."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def available_backends() -> List[str]:
    """Names of the backends that work on this machine, in registry order."""
    return [name for name in BACKENDS if get_backend(name).available()[0]]


__all__ = ["Backend", "Engine", "BACKENDS", "get_backend", "available_backends"]

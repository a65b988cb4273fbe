"""How vitopt's own torch custom ops become Relax when the TVM backend imports an exported program.

TVM's `from_exported_program` knows the ATen ops; an op that a pass introduces (for example the
shift-add linear, `vitopt::shift_linear`) needs a converter. Converters register here, keyed by
the op's name as the exported graph spells it (`"shift_linear.default"`), and the TVM backend
passes `custom_convert_map()` to the importer:

    @register_tvm_converter("shift_linear.default")
    def _shift_linear(node, importer):          # (torch.fx.Node, BaseFXGraphImporter)
        ...                                     # -> relax.Var (e.g. a call_tir to a kernel)

The modules that register converters are listed in CONVERTER_MODULES and imported only when
the map is asked for, so importing vitopt never imports TVM.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict

from vitopt.errors import ConfigError

#: Modules whose import registers converters (each imports tvm itself, lazily or at the top).
CONVERTER_MODULES: tuple = ("vitopt.lower.shift_ops", "vitopt.lower.tvm_aten_ops")

_CONVERTERS: Dict[str, Callable] = {}


def register_tvm_converter(op_name: str) -> Callable[[Callable], Callable]:
    """Decorator: register `fn(node, importer) -> relax.Var` for the exported op `op_name`."""
    def wrap(fn: Callable) -> Callable:
        if op_name in _CONVERTERS and _CONVERTERS[op_name] is not fn:
            raise ConfigError(f"a TVM converter for {op_name!r} is already registered "
                              f"({_CONVERTERS[op_name].__module__}); each op has one converter")
        _CONVERTERS[op_name] = fn
        return fn
    return wrap


def custom_convert_map() -> Dict[str, Callable]:
    """Every registered converter, after importing the modules that define them."""
    for module in CONVERTER_MODULES:
        importlib.import_module(module)
    return dict(_CONVERTERS)

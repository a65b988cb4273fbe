"""Built-in passes. Importing this package registers every pass module in it.

Each module is one pass, named like its file; see `vitopt passes` for the list.
"""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

"""Read what a pickle would import, without running it: the check behind safe loading.

`pickletools` lists a pickle's opcodes; the GLOBAL / STACK_GLOBAL ones name the callables
unpickling would import and call. vitopt refuses a file whose pickle names anything but
torch's own tensor-rebuilding functions, unless the user passes --trust-pickle.
"""
from __future__ import annotations

import io
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import torch


def _strip_root(name: str) -> str:
    """'archive/data.pkl' -> 'data.pkl': PyTorch zips keep everything under one top folder."""
    return name.split("/", 1)[1] if "/" in name else name


_SAFE_GLOBAL = re.compile(r"^(torch\._utils\._rebuild_\w+|torch\.\w*Storage|torch\.Size|"
                          r"torch\.device|torch\.serialization\._get_layout|"
                          r"collections\.OrderedDict|_codecs\.encode|"
                          r"(__builtin__|builtins)\.(set|frozenset|bytearray))$")


def _is_safe_global(name: str) -> bool:
    if _SAFE_GLOBAL.match(name):
        return True
    module, _, attr = name.rpartition(".")
    return module == "torch" and isinstance(getattr(torch, attr, None), torch.dtype)


def _unsafe_names(names: list[str]) -> list[str]:
    """Imported names other than the tensor-rebuilding ones, in order, without repeats."""
    seen = []
    for name in names:
        if name not in seen and not _is_safe_global(name):
            seen.append(name)
    return seen


def _pickle_imports_of_file(path: Path) -> list[str] | None:
    """Names the file's pickles would import (never running them); None if it is no pickle."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                member = next((n for n in zf.namelist() if _strip_root(n) == "data.pkl"), None)
                data = zf.read(member) if member else b""
        else:
            data = path.read_bytes()
    except (zipfile.BadZipFile, OSError):
        return None
    return _pickle_imports(data)


def _pickle_imports(data: bytes, max_pickles: int = 4) -> list[str] | None:
    """Globals imported by the pickles at the start of data (torch's legacy format chains a few).

    Walks the opcodes with pickletools, executing nothing. None when the first pickle does not
    parse to its STOP opcode (the bytes are not a pickle).
    """
    names, start = [], 0
    for index in range(max_pickles):
        parsed = _scan_one_pickle(data, start)
        if parsed is None:
            return names if index else None
        found, start = parsed
        names += found
        if start >= len(data):
            break
    return names


def _scan_one_pickle(data: bytes, start: int) -> tuple[list[str], int] | None:
    names, strings, memo, last = [], [], {}, None
    try:
        for op, arg, pos in pickletools.genops(io.BytesIO(data[start:])):
            if op.name == "STOP":
                return names, start + pos + 1
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                names.append(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
            elif op.name in ("EXT1", "EXT2", "EXT4"):
                names.append(f"<extension {arg}>")
            last = _track_strings(op.name, arg, last, strings, memo)
    except (ValueError, EOFError, IndexError, KeyError):
        return None
    return None


def _track_strings(op: str, arg: Any, last: Any, strings: list, memo: dict) -> Any:
    """Follow string pushes through the memo, so STACK_GLOBAL's module and name are known."""
    if isinstance(arg, str) and ("UNICODE" in op or "STRING" in op):
        strings.append(str(arg))
        return str(arg)
    if op == "MEMOIZE":
        memo[len(memo)] = last
        return last
    if op in ("PUT", "BINPUT", "LONG_BINPUT"):
        memo[arg] = last
        return last
    if op in ("GET", "BINGET", "LONG_BINGET"):
        value = memo.get(arg)
        if isinstance(value, str):
            strings.append(value)
        return value
    return None


# ---------------------------------------------------------------------------- state dicts

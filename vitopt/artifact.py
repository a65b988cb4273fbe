"""The artifact on disk: a directory holding manifest.json and the engine files it lists.

    write_artifact(path, manifest, {"model.xml": Path(...), "model.bin": b"..."})
    manifest = read_manifest(path)   # checks format version and every file's sha256

Writing is all or nothing: everything goes into a temporary directory next to the target,
which replaces the target with a rename at the very end, so a failed compile never leaves a
half artifact and an existing artifact survives until the new one is complete.

Manifest keys (write_artifact fills the ones marked *; the caller supplies the rest):
  format_version*, vitopt_version*, created*, hardware* (unless given), files* {name: sha256},
  source {name, sha256}, passes [{name, config}], token_schedule [tokens per stage],
  precision, backend {name, version}, input (see input_spec), output (see output_spec),
  stages (the IR's table), accuracy, latency. hardware may carry "requires": [cpu flags]
  when an engine only runs on CPUs with those flags.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import uuid
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

from vitopt.errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("format_version", "backend", "precision", "input", "output", "files")
RECOMPILE = "recompile it with `vitopt compile`"
# CPU flags that decide which kernels engines can use; the manifest records the ones present.
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "neon", "asimd",
             "asimddp")


# --- manifest pieces ---------------------------------------------------------------------
def input_spec(image_size: Sequence[int], in_chans: int, mean: Sequence[float],
               std: Sequence[float], max_batch: int) -> dict:
    """The manifest's "input": what Runtime validates and preprocess() produces."""
    height, width = image_size
    return {"shape": [int(in_chans), int(height), int(width)], "dtype": "float32",
            "layout": "NCHW", "max_batch": int(max_batch),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def output_spec(kind: str, labels: Optional[Sequence[str]] = None) -> dict:
    """The manifest's "output": kind is logits | probabilities | features | tokens."""
    return {"kind": kind, "labels": list(labels) if labels is not None else None}


def source_spec(name: str, path: Optional[Union[str, Path]] = None) -> dict:
    """The manifest's "source": the model's name and, when it came from a file, its sha256."""
    return {"name": name, "sha256": sha256_file(path) if path is not None else None}


def hardware_info() -> dict:
    """This machine: CPU model, the CPU flags in CPU_FLAGS it has, usable cores, architecture."""
    info = dict(_hardware_info())
    info["flags"] = list(info["flags"])
    return info


@lru_cache(maxsize=1)
def _hardware_info() -> dict:
    cpu, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and cpu in ("unknown", "", platform.machine()):
                    cpu = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass  # not Linux: model name from platform, no flags
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return {"cpu": cpu, "flags": [f for f in CPU_FLAGS if f in flags], "cores": cores,
            "machine": platform.machine(), "system": platform.system(), "gpu": None}


def sha256_file(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- writing -----------------------------------------------------------------------------
def write_artifact(path: Union[str, Path], manifest: dict,
                   files: Mapping[str, Union[str, Path, bytes]]) -> Path:
    """Write manifest + files as the directory `path`, atomically; returns the path.

    `files` maps a plain file name to a source path (copied) or bytes. An existing artifact at
    `path` is replaced only once the new one is complete; a non-artifact is never replaced.
    """
    from vitopt import __version__

    target = Path(path)
    _check_target(target)
    for name in files:
        _check_name(name)
    manifest = dict(manifest)
    manifest.setdefault("hardware", hardware_info())
    manifest.update(format_version=FORMAT_VERSION, vitopt_version=__version__,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        hashes: Dict[str, str] = {}
        for name, source in files.items():
            if isinstance(source, (bytes, bytearray)):
                (tmp / name).write_bytes(source)
            elif Path(source).is_file():
                shutil.copyfile(source, tmp / name)
            else:
                raise ArtifactError(f"engine file {name!r} should come from {source}, which "
                                    f"does not exist; the backend build did not write it")
            hashes[name] = sha256_file(tmp / name)
        manifest["files"] = hashes
        _check_keys(manifest, target)
        text = _to_json(manifest)
        (tmp / MANIFEST).write_text(text, encoding="utf-8")
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_target(target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ArtifactError(f"cannot write the artifact to {target}: a file is already there; "
                            f"choose another output path or remove the file")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise ArtifactError(f"refusing to replace {target}: it is a non-empty directory "
                            f"without {MANIFEST}, so not a vitopt artifact; choose another "
                            f"output path or remove it")


def _check_name(name: str) -> None:
    if (not isinstance(name, str) or not name or name in (".", "..", MANIFEST)
            or "/" in name or "\\" in name or name.startswith(".")):
        raise ArtifactError(f"bad engine file name {name!r}: use a plain file name (no "
                            f"directories, not {MANIFEST!r}, not hidden)")


def _check_keys(manifest: dict, where: Path) -> None:
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise ArtifactError(f"the manifest of {where} lacks {', '.join(missing)}; "
                            f"{RECOMPILE} (a writer must supply them)")


def _to_json(manifest: dict) -> str:
    def default(value):
        if isinstance(value, Path):
            return str(value)
        if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
            return value.tolist()
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    try:
        return json.dumps(manifest, indent=2, default=default, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"the manifest cannot be written as JSON: {exc}") from exc


def _swap_in(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- reading -----------------------------------------------------------------------------
def read_manifest(path: Union[str, Path], *, verify: bool = True) -> dict:
    """The manifest of the artifact at `path`, after checking it (and, with verify, every file)."""
    root = Path(path)
    if root.name == MANIFEST and root.is_file():
        root = root.parent
    if not root.exists():
        raise ArtifactError(f"no artifact at {root}; compile one with `vitopt compile MODEL "
                            f"-o {root}`")
    if not root.is_dir():
        raise ArtifactError(f"{root} is a file, not an artifact directory; pass the directory "
                            f"that `vitopt compile -o` wrote")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST}: it is not a vitopt artifact or was not "
                            f"written completely; {RECOMPILE}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({exc}); it was edited or "
                            f"damaged: {RECOMPILE}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path} holds a JSON {type(manifest).__name__}, not an "
                            f"object; {RECOMPILE}")
    _check_version(manifest.get("format_version"), manifest_path)
    _check_keys(manifest, root)
    if verify:
        verify_files(root, manifest)
    return manifest


def _check_version(version, where: Path) -> None:
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{where} has no valid format_version (got {version!r}); {RECOMPILE}")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{where} has artifact format {version}, newer than this vitopt "
                            f"reads ({FORMAT_VERSION}); upgrade vitopt (`pip install -U vitopt`)")
    if version < FORMAT_VERSION:
        raise ArtifactError(f"{where} has artifact format {version}, older than this vitopt "
                            f"reads ({FORMAT_VERSION}); {RECOMPILE}")


def verify_files(root: Path, manifest: dict) -> None:
    """Check that every file the manifest lists is present with its recorded sha256."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"the manifest of {root} lists no engine files; {RECOMPILE}")
    for name, expected in files.items():
        _check_name(name)
        path = Path(root) / name
        if not path.is_file():
            raise ArtifactError(f"engine file {name} is missing from {root}; {RECOMPILE}")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"engine file {name} in {root} is corrupt: its sha256 is "
                                f"{actual[:12]}..., the manifest records {str(expected)[:12]}...; "
                                f"{RECOMPILE}")

"""The machine a suite ran on: CPU model and ISA flags (/proc/cpuinfo), cores, threads,
memory, GPU and driver when present, and the versions of every library that took part."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from datetime import datetime, timezone
from typing import Optional

LIBRARIES = ("torch", "timm", "transformers", "onnx", "onnxruntime", "openvino", "nncf", "numpy",
             "matplotlib")
#: /proc/cpuinfo flags that decide which kernels engines pick
ISA_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4", "vnni", "bmi")


def cpu_info() -> dict:
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("unknown", "", platform.machine()):
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = sorted(f for f in value.split() if f.startswith(ISA_PREFIXES))
    except OSError:
        pass
    return {"model": model, "isa_flags": flags, "cores_available": len(os.sched_getaffinity(0)),
            "cores_total": os.cpu_count(), "memory_gb": _memory_gb()}


def _memory_gb() -> Optional[float]:
    try:
        with open("/proc/meminfo") as handle:
            kb = int(handle.readline().split()[1])
        return round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def gpu_info() -> Optional[dict]:
    import torch
    if not torch.cuda.is_available():
        return None
    info = {"name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            driver, memory = (v.strip() for v in out.stdout.splitlines()[0].split(",", 1))
            info.update(driver=driver, memory=memory)
    return info


def versions() -> dict:
    from importlib import metadata
    import vitopt
    found = {"python": platform.python_version(), "vitopt": vitopt.__version__}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine_info(threads: Optional[int], device: str) -> dict:
    import torch
    return {"cpu": cpu_info(), "gpu": gpu_info() if device == "cuda" else None,
            "threads": threads or torch.get_num_threads(), "device": device,
            "system": f"{platform.system()} {platform.release()}", "versions": versions(),
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def machine_slug(info: dict) -> str:
    """Folder name for results: `cpu-<model>-<N>c` (as benchmarks/common.py names it) or the GPU."""
    if info.get("gpu"):
        return re.sub(r"[^a-z0-9]+", "-", info["gpu"]["name"].lower()).strip("-")
    name = re.sub(r"[^a-z0-9]+", "-", info["cpu"]["model"].lower()).strip("-")
    return f"cpu-{name}-{info['cpu']['cores_available']}c"

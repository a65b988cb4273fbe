"""Shared by the benchmark scripts: machine description, result files, table formatting."""
from __future__ import annotations

import json
import os
import platform
import re
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine_info() -> dict:
    import torch
    from vitopt.artifact import hardware_info
    info = hardware_info()
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("openvino", "onnxruntime", "timm", "nncf", "tvm"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except Exception:
            pass
    return {"cpu": info["cpu"], "flags": info["flags"], "cores_available": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "versions": versions,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def machine_dir() -> Path:
    from vitopt.artifact import hardware_info
    name = re.sub(r"[^a-z0-9]+", "-", hardware_info()["cpu"].lower()).strip("-")
    path = RESULTS / f"cpu-{name}-{len(os.sched_getaffinity(0))}c"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(stem: str, records: list, markdown: str, extra: dict | None = None) -> Path:
    out = machine_dir()
    payload = {"machine": machine_info(), "records": records, **(extra or {})}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    return out


def markdown_table(rows: list, columns: list) -> str:
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in columns) + " |"
            for r in rows]
    return "\n".join([head, rule, *body]) + "\n"

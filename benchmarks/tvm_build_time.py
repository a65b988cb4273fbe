"""How long TVM takes to build a token-merged DeiT-S for CUDA, whole-model against stage by stage.

The build time, not the engine's speed: token merging gives every block its own token count,
and the whole-model import lowers one set of TIR functions per count (see
vitopt/backends/tvm_stage_import.py). This builds the same IR both ways, one after the other in
one process, cross-compiled for --cuda-arch (no GPU needed), and records for each: seconds per
step (import with fp16, prepare = legalize/fold/fuse, compile = dlight + tvm.compile +
export_library), the number of TIR functions after fusion, and the stage import's summary.

    flock /tmp/vitopt-bench.lock .venv/bin/python benchmarks/tvm_build_time.py
    python benchmarks/tvm_build_time.py --preset none --lowerings whole,stages

Writes tvm_build_time.json and .md under --out (default: benchmarks/results/<machine>/).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_dir, machine_info, markdown_table  # noqa: E402


def log(message: str) -> None:
    print(f"[tvm_build_time] {message}", file=sys.stderr, flush=True)


def merged_ir(model_name: str, preset: str):
    import timm

    from vitopt.frontend.trace import trace
    from vitopt.pipeline import run_pipeline

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    return run_pipeline(trace(model, torch.randn(2, 3, 224, 224)), preset).ir


def build(ir, lowering: str, arch: str, max_batch: int, out: Path) -> dict:
    """One cross-compile, step by step as TVMBackend.build_module runs them."""
    import tvm

    from vitopt.backends import tvm as tvm_backend

    target = tvm_backend.TVMBackend.target_for("cuda", arch)
    plan = tvm_backend.batch_plan("cuda", max_batch, tuned=False)
    example = torch.randn(2, 3, 224, 224)
    mode, why = tvm_backend.choose_lowering(ir, lowering, 0)
    seconds, summary = {}, None
    with tvm_backend.fast_inspect_stack():
        started = time.perf_counter()
        if mode == "stages":
            mod, summary = tvm_backend.import_stages(
                ir, example, plan, max_batch,
                transform=lambda m: tvm_backend.after_import(m, "fp16", True))
        else:
            mod = tvm_backend.after_import(
                tvm_backend.import_module(ir, example, plan, max_batch), "fp16", True)
        seconds["import"] = time.perf_counter() - started
        started = time.perf_counter()
        mod = tvm_backend.prepare(mod, target)
        seconds["prepare"] = time.perf_counter() - started
        functions = sum(isinstance(f, tvm.tirx.PrimFunc) for _, f in mod.functions_items())
        started = time.perf_counter()
        tvm_backend.compile_library(mod, target, out / "model.so", None)
        seconds["compile"] = time.perf_counter() - started
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    return {"lowering": mode, "why": why, "seconds": seconds,
            "total_s": round(sum(seconds.values()), 1), "tir_functions": functions,
            "library_mb": round((out / "model.so").stat().st_size / 2 ** 20, 1),
            "stage_import": summary}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--lowerings", default="whole,stages")
    parser.add_argument("--cuda-arch", default="sm_90")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    ir = merged_ir(args.model, args.preset)
    rows = []
    for lowering in args.lowerings.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            log(f"{args.model} {args.preset}: building with lowering={lowering}")
            row = build(ir, lowering, args.cuda_arch, args.max_batch, Path(tmp))
        log(f"{lowering}: {row['total_s']}s, {row['tir_functions']} TIR functions")
        rows.append(row)
    out = args.out or machine_dir()
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "tvm_build_time", "machine": machine_info(), "model": args.model,
              "preset": args.preset, "cuda_arch": args.cuda_arch, "precision": "fp16",
              "max_batch": args.max_batch, "rows": rows}
    (out / "tvm_build_time.json").write_text(json.dumps(record, indent=2) + "\n")
    flat = [{"lowering": r["lowering"], **r["seconds"], "total_s": r["total_s"],
             "tir_functions": r["tir_functions"], "library_mb": r["library_mb"]} for r in rows]
    table = markdown_table(flat, [
        ("lowering", "lowering", "{}"), ("import", "import + fp16 s", "{}"),
        ("prepare", "prepare s", "{}"), ("compile", "compile s", "{}"), ("total_s", "total s", "{}"),
        ("tir_functions", "TIR functions", "{}"), ("library_mb", "library MB", "{}")])
    (out / "tvm_build_time.md").write_text(
        f"# TVM CUDA build time: {args.model} `{args.preset}`, fp16, {args.cuda_arch} "
        f"(cross-compiled), one process\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

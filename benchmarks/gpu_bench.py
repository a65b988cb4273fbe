"""GPU benchmark: eager, vitopt (its IR under torch.compile; AOTInductor) and torch.compile.

    python3 benchmarks/gpu_bench.py --out DIR                      # DeiT-S/16 on CUDA, fp16
    python3 benchmarks/gpu_bench.py --out DIR --vit-b              # ... and ViT-B/16
    python3 benchmarks/gpu_bench.py --device cpu --quick --out DIR # same code, tiny ViT, CPU, fp32

Configs (one record per model, config, preset, batch):
  eager        the plain timm model, .to(precision), eager PyTorch
  vitopt-jit   trace -> run_pipeline(ir, preset) -> the IR .to(precision) under torch.compile with
               --jit-profile: the same compiler as the peer, so the difference is what vitopt's
               passes buy (one cell per --presets entry)
  vitopt-aoti  the same IR through vitopt's aotinductor backend: built in one child process, then
               loaded and timed in a fresh one (a crash in the loader costs that cell only)
  compile      the peer: torch.compile of the plain model with --compile-profile
Compile profiles (PROFILES): "max-autotune" is torch's max-autotune mode options (GEMM template
autotuning, CUDA graphs) bounded by AUTOTUNE_BOUNDS; "max-autotune-aten" is the same with GEMMs
and convolutions left to ATen (cuBLAS/cuDNN), so no GEMM template search (pointwise and
reduction kernels still try more configs); "reduce-overhead" is CUDA graphs without autotuning;
"default" is torch.compile's default.
Defaults: the peer (compile) at the largest batch gets "max-autotune", the issue's peer; vitopt-jit
gets "reduce-overhead": token merging gives every block its own token count, so DeiT-S `balanced`
has ~110 distinct GEMM/BMM shapes (8 in the lossless IR) for max-autotune to search, and on CPU
its Inductor compile already takes 3.4x the plain model's without any autotuning (77 s against
23 s, two cores): a max-autotune compile of it does not fit a cell's cap. vitopt-jit's ratio to
the max-autotune peer is therefore a lower bound, and the same-profile peer gives the
like-for-like one (--jit-profile max-autotune-aten or max-autotune when there is time).
Only the --autotune-batches (default: the largest batch) use the compile/jit profiles; other
batches use --other-profile (default reduce-overhead) for every config, one compiled callable
per (cell, profile) reused across that cell's batches (static shapes: a new batch recompiles).
When --jit-profile differs from --compile-profile the peer is also run with the jit profile
(role "same-profile peer"), so vitopt-jit has a same-compiler baseline as well.

Order (most important first; each cell a child process with an explicit cap, CAPS): eager (all
batches), then at the autotune batches vitopt-jit with --lead-preset, compile, the same-profile
peer, vitopt-jit with the other presets; then the other batches in the same order; then
vitopt-aoti per preset (build, then load). A cell that would get less than --min-cell-s of what
is left of --budget-s is not started and is recorded as skipped; one that runs past its cap is
killed with its compile workers and recorded as failed ("timed out after N s during <step>"),
keeping the batches it finished. A preset missing from vitopt.pipeline.PRESETS is skipped.
Timing: warm-up calls, then >= --runs calls each followed by a device synchronize
(vitopt.timing.measure): median, p10, p90; images/s = batch / median. Inputs stay on the device.
Each record has vs_eager and vs_compile (throughput over eager / over the peer at the same model
and batch); gpu_bench.json's `target` is the issue's goal: vitopt's best config with the lead
preset at the largest batch >= 2x the peer's images/s.
Writes gpu_bench.json (env, settings, records, target) and gpu_bench.md.
Exit code: 0 all ran (skips allowed), 1 a cell failed or timed out, 2 a numerics check failed.
"""
from __future__ import annotations

import argparse
import copy
import getpass
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

MODELS = ("deit_small_patch16_224",)
VIT_B = "vit_base_patch16_224"
QUICK_MODEL = "tiny_vit"  # a small timm ViT at 32x32, for --quick
CONFIGS = ("eager", "vitopt-jit", "vitopt-aoti", "compile")
PRESETS = ("lossless", "balanced")
LEAD_PRESET = "balanced"
TARGET_RATIO = 2.0
PROFILES = ("max-autotune", "max-autotune-aten", "reduce-overhead", "default")
#: Inductor settings that bound max-autotune's compile time (on top of the mode's options);
#: a knob this torch lacks is skipped and listed in the record's bounds_missing.
AUTOTUNE_BOUNDS = {
    "coordinate_descent_tuning": False,  # the mode turns it on; it re-tunes every fused kernel
    "max_autotune_gemm_backends": "ATEN,TRITON",  # no CPP/CUTLASS candidates
    "max_autotune_gemm_search_space": "DEFAULT",  # not EXHAUSTIVE
    "precompilation_timeout_seconds": 30,  # give up on slow candidate kernels
    "max_autotune_prune_choices_based_on_shared_mem": True,  # the H100 run spent time on
    # candidates that then failed with "out of resource: shared memory"
    "inductor_default_autotune_warmup": 5,  # ms per candidate (torch's default 25)
    "inductor_default_autotune_rep": 20,  # ms per candidate (torch's default 100)
}
ATEN_ONLY = {"max_autotune_gemm_backends": "ATEN", "max_autotune_conv_backends": "ATEN"}
#: Per-cell time caps in seconds (the H100 run: eager cell 14 s; max-autotune of DeiT-S > 50 s).
CAPS = {"eager": 25, "vitopt-jit": 80, "compile": 90, "other-batches": 60, "aoti-build": 90,
        "aoti-load": 30}
QUICK_CAP_S = 240  # --quick (CPU tests): slow shared cores, the test has its own timeout
RESERVE_S = 3.0  # kept back from the budget for writing the report
BACKEND_OF = {"eager": "torch", "compile": "inductor", "vitopt-jit": "inductor",
              "vitopt-aoti": "aotinductor"}
FIELDS = ("model", "batch", "config", "preset", "profile", "precision", "backend", "median_ms",
          "p10_ms", "p90_ms", "images_per_s", "compile_s", "max_abs_diff", "cos", "check_ok",
          "status", "error", "vs_eager", "vs_compile")


@dataclass
class Plan:
    """One cell: a child process (two for vitopt-aoti) for some batches of one config."""

    model: str
    config: str
    preset: Optional[str]
    batches: List[int]
    profile: Optional[str]
    cap_s: float
    role: str = ""

    @property
    def name(self) -> str:
        parts = [self.model, self.config, self.preset, self.profile,
                 "b" + ",".join(map(str, self.batches))]
        return " ".join(p for p in parts if p)


# --- the parent: plan cells, run each in a child with a timeout, write the report -----------
def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.cell:
        return run_cell(args)
    started = time.monotonic()
    deadline = started + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"env": environment(args.device), "settings": settings(args), "records": []}
    known = available_presets()
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        for plan in plan_cells(args):
            if plan.preset and plan.preset not in known:
                reason = (f"preset {plan.preset!r} is not in vitopt.pipeline.PRESETS here "
                          f"(it has {', '.join(known)})")
                records = skipped(args, plan, reason)
            else:
                records = run_plan(args, plan, deadline, Path(tmp), out)
            report["records"] += records
            finish(report, args)
            write_report(report, out)
    report["settings"]["seconds"] = round(time.monotonic() - started, 1)
    finish(report, args)
    write_report(report, out)
    print(markdown(report))
    return exit_code(report["records"])


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/gpu-bench", help="folder for gpu_bench.json/.md")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny model, batches 3,1, few runs")
    parser.add_argument("--models", type=_names, help=f"comma list; default {','.join(MODELS)}")
    parser.add_argument("--vit-b", action="store_true", help=f"add {VIT_B}")
    parser.add_argument("--configs", type=_names, default=list(CONFIGS), help="comma list")
    parser.add_argument("--presets", type=_names, default=list(PRESETS),
                        help="vitopt presets for vitopt-jit and vitopt-aoti (comma list)")
    parser.add_argument("--lead-preset", default=LEAD_PRESET,
                        help="the preset run first (right after eager) and used for `target`")
    parser.add_argument("--batches", type=_ints, help="comma list, run in this order; "
                                                      "default 64,1 (quick: 3,1)")
    parser.add_argument("--autotune-batches", type=_ints,
                        help="batches compiled with the compile/jit profiles; default the largest")
    parser.add_argument("--compile-profile", default="max-autotune", choices=PROFILES,
                        help="the peer's profile at the autotune batches")
    parser.add_argument("--jit-profile", default="reduce-overhead", choices=PROFILES,
                        help="vitopt-jit's profile at the autotune batches (see the docstring "
                             "for why not max-autotune by default)")
    parser.add_argument("--other-profile", default="reduce-overhead", choices=PROFILES,
                        help="every compiled config's profile at the other batches")
    parser.add_argument("--precision", choices=("fp16", "bf16", "fp32"),
                        help="default fp16 on cuda, fp32 on cpu")
    parser.add_argument("--runs", type=int, help="timed runs per batch (default 30; quick 5)")
    parser.add_argument("--warmup", type=int, help="untimed runs (default 5; quick 2)")
    parser.add_argument("--budget-s", type=float, help="total time for all cells (default "
                                                       "200; quick 900)")
    parser.add_argument("--min-cell-s", type=float, default=15.0,
                        help="a cell that would get less than this is skipped, not started")
    parser.add_argument("--cell-cap-s", type=float, help="one cap for every cell (tests)")
    parser.add_argument("--aoti-tuning", default="default", choices=("default", "max-autotune"))
    parser.add_argument("--aoti-loader", help="vitopt.backends.aotinductor loader for the load "
                                              "child (default: $VITOPT_AOTI_LOADER or package)")
    parser.add_argument("--aoti-options", type=json.loads, default={},
                        help="extra inductor options (JSON) for the AOTInductor build")
    parser.add_argument("--skip-aoti", metavar="REASON",
                        help="record vitopt-aoti as skipped with this reason")
    # the child's arguments
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=("build", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--package-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = args.models or ([QUICK_MODEL] if args.quick else list(MODELS))
    if args.vit_b and VIT_B not in args.models:
        args.models.append(VIT_B)
    args.batches = args.batches or ([3, 1] if args.quick else [64, 1])
    args.autotune_batches = args.autotune_batches or [max(args.batches)]
    args.precision = args.precision or ("fp16" if args.device == "cuda" else "fp32")
    args.runs = args.runs or (5 if args.quick else 30)
    args.warmup = args.warmup or (2 if args.quick else 5)
    args.budget_s = args.budget_s if args.budget_s is not None else (900.0 if args.quick else 200.0)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    return args


def _names(text: str) -> List[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str) -> List[int]:
    return [int(part) for part in _names(text)]


def available_presets() -> List[str]:
    from vitopt.pipeline import PRESETS as KNOWN

    return list(KNOWN)


def cap(args, kind: str) -> float:
    if args.cell_cap_s is not None:
        return args.cell_cap_s
    return float(QUICK_CAP_S if args.quick else CAPS[kind])


def plan_cells(args) -> List[Plan]:
    """Every cell in run order: most important first (see the module docstring)."""
    configs = args.configs
    lead = [args.lead_preset] if args.lead_preset in args.presets else args.presets[:1]
    others = [p for p in args.presets if p not in lead]
    big = [b for b in args.batches if b in args.autotune_batches]
    small = [b for b in args.batches if b not in args.autotune_batches]
    plans: List[Plan] = []
    for model in args.models:
        if "eager" in configs:
            plans.append(Plan(model, "eager", None, list(args.batches), None, cap(args, "eager")))
        for batches, phase in ((big, "autotune"), (small, "other")):
            if not batches:
                continue
            jit = args.jit_profile if phase == "autotune" else args.other_profile
            peer = args.compile_profile if phase == "autotune" else args.other_profile
            kind = lambda c: c if phase == "autotune" else "other-batches"  # noqa: E731
            if "vitopt-jit" in configs:
                plans += [Plan(model, "vitopt-jit", p, batches, jit, cap(args, kind("vitopt-jit")))
                          for p in lead]
            if "compile" in configs:
                plans.append(Plan(model, "compile", None, batches, peer,
                                  cap(args, kind("compile")), "peer"))
                if "vitopt-jit" in configs and jit != peer:
                    plans.append(Plan(model, "compile", None, batches, jit,
                                      cap(args, kind("compile")), "same-profile peer"))
            if "vitopt-jit" in configs:
                plans += [Plan(model, "vitopt-jit", p, batches, jit, cap(args, kind("vitopt-jit")))
                          for p in others]
        if "vitopt-aoti" in configs:
            plans += [Plan(model, "vitopt-aoti", p, list(args.batches), None,
                           cap(args, "aoti-build")) for p in lead + others]
    return plans


def run_plan(args, plan: Plan, deadline: float, tmp: Path, out: Path) -> List[dict]:
    if plan.config == "vitopt-aoti" and args.skip_aoti:
        return skipped(args, plan, args.skip_aoti)
    if plan.config != "vitopt-aoti":
        state, error = run_child(args, plan, [], deadline, plan.cap_s, tmp, out)
        if state is None:
            return skipped(args, plan, error)
        return complete(state["records"], args, plan, error)
    package = tmp / f"{plan.model}-{plan.preset}-aoti"
    package.mkdir(parents=True, exist_ok=True)
    build, error = run_child(args, plan, ["--stage", "build", "--package-dir", str(package)],
                             deadline, plan.cap_s, tmp, out, "build")
    if build is None:
        return skipped(args, plan, error)
    if error or not build.get("build"):
        return complete([], args, plan, f"AOTInductor build: {error or 'no package'}")
    load, error = run_child(args, plan, ["--stage", "load", "--package-dir", str(package)],
                            deadline, cap(args, "aoti-load"), tmp, out, "load")
    if load is None:
        return skipped(args, plan, f"built in {build['build']['build_s']:.0f}s, but {error}")
    records = [dict(r, **build["build"]) for r in load["records"]]
    return complete(records, args, plan, error and f"AOTInductor load: {error}")


def run_child(args, plan: Plan, extra: List[str], deadline: float, cap_s: float, tmp: Path,
              out: Path, stage: str = ""):
    """(state, error): the child's saved state and what went wrong; state None when skipped."""
    left = deadline - time.monotonic() - RESERVE_S
    timeout = min(cap_s, left)
    if timeout < min(args.min_cell_s, cap_s):
        return None, f"not run: no time left ({max(left, 0):.0f}s of the budget left, " \
                     f"a cell needs {min(args.min_cell_s, cap_s):.0f}s)"
    result = tmp / f"{plan.name.replace(' ', '_').replace(',', '-')}{stage}.json"
    command = [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()),
               "--cell", plan.config, "--model", plan.model, "--preset", plan.preset or "",
               "--profile", plan.profile or "", "--batches", ",".join(map(str, plan.batches)),
               "--result", str(result)] + child_flags(args) + extra
    started = time.monotonic()
    label = plan.name + (f" ({stage})" if stage else "")
    with open(out / "gpu_bench.log", "a", encoding="utf-8") as log:
        log.write(f"\n=== {label} (timeout {timeout:.0f}s) ===\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code, error = process.wait(timeout=timeout), None
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the child and its compile workers
            process.wait()
            code, error = None, f"timed out after {timeout:.0f}s"
    state = json.loads(result.read_text()) if result.is_file() else {"records": [], "step": "start"}
    if error is None and code != 0:
        error = state.get("error") or (f"killed by {_signal_name(-code)} (see gpu_bench.log)"
                                       if code < 0 else f"child exited with code {code}")
    if error:
        error = f"{error} during {state.get('step')}"
    print(f"{label}: {time.monotonic() - started:.0f}s" + (f", {error}" if error else ""),
          flush=True)
    return state, error


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def child_flags(args) -> List[str]:
    flags = ["--device", args.device, "--precision", args.precision, "--runs", str(args.runs),
             "--warmup", str(args.warmup), "--aoti-tuning", args.aoti_tuning,
             "--aoti-options", json.dumps(args.aoti_options)]
    if args.aoti_loader:
        flags += ["--aoti-loader", args.aoti_loader]
    return flags + (["--quick"] if args.quick else [])


def complete(records: List[dict], args, plan: Plan, error: Optional[str]) -> List[dict]:
    """One record per batch: those the child wrote, plus failed ones for the batches it did not."""
    done = {r["batch"] for r in records}
    for batch in plan.batches:
        if batch not in done:
            records.append(record(plan.model, plan.config, batch, args.precision,
                                  preset=plan.preset, profile=plan.profile, role=plan.role,
                                  status="failed",
                                  error=error or "the child wrote no result for this batch"))
    for r in records:
        r["role"] = plan.role
    order = {b: i for i, b in enumerate(plan.batches)}
    return sorted(records, key=lambda r: order.get(r["batch"], 0))


def skipped(args, plan: Plan, reason: str) -> List[dict]:
    print(f"{plan.name}: skipped, {reason}", flush=True)
    return [record(plan.model, plan.config, batch, args.precision, preset=plan.preset,
                   profile=plan.profile, role=plan.role, status="skipped", error=reason)
            for batch in plan.batches]


def record(model: str, config: str, batch: int, precision: str, **fields) -> dict:
    base = dict.fromkeys(FIELDS)
    base.update(model=model, config=config, batch=batch, precision=precision,
                backend=BACKEND_OF[config], status="ok")
    base.update(fields)
    return base


def exit_code(records: List[dict]) -> int:
    if any(r["check_ok"] is False for r in records):
        return 2
    return 1 if any(r["status"] == "failed" for r in records) else 0


# --- ratios, the target, the report ----------------------------------------------------------
def finish(report: dict, args) -> None:
    """vs_eager / vs_compile on every record, and the issue's target."""
    records = report["records"]
    ok = [r for r in records if r["status"] == "ok" and r["median_ms"]]

    def find(model, batch, config, profile=None, role=None):
        return next((r for r in ok if r["model"] == model and r["batch"] == batch and
                     r["config"] == config and (profile is None or r["profile"] == profile) and
                     (role is None or r.get("role") == role)), None)

    for r in records:
        r["vs_eager"] = r["vs_compile"] = r["vs_same_profile_compile"] = None
        if r not in ok:
            continue
        eager = find(r["model"], r["batch"], "eager")
        peer = find(r["model"], r["batch"], "compile", role="peer")
        if eager:
            r["vs_eager"] = eager["median_ms"] / r["median_ms"]
        if peer and r["config"] != "eager":
            r["vs_compile"] = peer["median_ms"] / r["median_ms"]
            r["vs_compile_profile"] = peer["profile"]
        same = find(r["model"], r["batch"], "compile", profile=r["profile"])
        if same and r["config"].startswith("vitopt") and r["profile"]:
            r["vs_same_profile_compile"] = same["median_ms"] / r["median_ms"]
    report["target"] = target(records, args)


def target(records: List[dict], args) -> dict:
    model, batch = args.models[0], max(args.batches)
    preset = args.lead_preset if args.lead_preset in args.presets else (args.presets or [None])[0]
    candidates = [r for r in records if r["model"] == model and r["batch"] == batch and
                  r["config"].startswith("vitopt") and r["preset"] == preset and
                  r["status"] == "ok" and r["images_per_s"]]
    peer = next((r for r in records if r["model"] == model and r["batch"] == batch and
                 r["config"] == "compile" and r.get("role") == "peer" and r["status"] == "ok"),
                None)
    best = max(candidates, key=lambda r: r["images_per_s"], default=None)
    out = {"model": model, "batch": batch, "preset": preset, "goal_ratio": TARGET_RATIO,
           "peer": "torch.compile " + args.compile_profile + f" {args.precision}, plain model",
           "peer_images_per_s": peer and peer["images_per_s"],
           "vitopt_best": best and {k: best.get(k) for k in (
               "config", "profile", "images_per_s", "median_ms", "check_ok",
               "same_precision_cos")},
           "ratio": None, "met": None,
           "ratio_vs_same_profile_peer": best and best.get("vs_same_profile_compile")}
    if best and peer:
        out["ratio"] = best["images_per_s"] / peer["images_per_s"]
        out["met"] = out["ratio"] >= TARGET_RATIO
    return out


def environment(device: str) -> dict:
    import torch

    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "triton": _version("triton"), "timm": _version("timm"), "device": device,
           "cpu": _cpu_name(), "cpus": os.cpu_count(), "cuda": torch.version.cuda,
           "inductor_cache_was_warm": os.path.isdir(cache) and bool(os.listdir(cache)),
           "aoti_loader_env": os.environ.get("VITOPT_AOTI_LOADER")}
    if device == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        env.update(gpu=torch.cuda.get_device_name(0), capability=f"{major}.{minor}",
                   driver=_nvidia_smi("driver_version"))
    return env


def settings(args) -> dict:
    used = {args.compile_profile, args.jit_profile, args.other_profile}
    profiles = {}
    for name in sorted(used):
        options, applied, missing = profile_options(name)
        profiles[name] = {"options": options, "bounds_missing": missing}
    return {"models": args.models, "configs": args.configs, "presets": args.presets,
            "lead_preset": args.lead_preset, "batches": args.batches,
            "autotune_batches": args.autotune_batches,
            "compile_profile": args.compile_profile, "jit_profile": args.jit_profile,
            "other_profile": args.other_profile, "profiles": profiles,
            "batch_note": "the autotune batches are compiled with compile_profile (the peer) and "
                          "jit_profile (vitopt-jit); the other batches with other_profile; one "
                          "torch.compile callable per cell, static shapes (dynamic=False)",
            "precision": args.precision, "runs": args.runs, "warmup": args.warmup,
            "budget_s": args.budget_s, "min_cell_s": args.min_cell_s,
            "caps_s": {k: cap(args, k) for k in CAPS}, "aoti_tuning": args.aoti_tuning,
            "aoti_loader": args.aoti_loader, "aoti_options": args.aoti_options,
            "skip_aoti": args.skip_aoti,
            "timing": "perf_counter around each call followed by a device synchronize"}


def profile_options(profile: str) -> tuple:
    """(options for torch.compile, bounds applied, bounds this torch lacks)."""
    import torch._inductor
    from torch._inductor import config

    known = config.get_config_copy()
    if profile == "default":
        return {}, {}, []
    if profile == "reduce-overhead":
        return dict(torch._inductor.list_mode_options("reduce-overhead")), {}, []
    options = dict(torch._inductor.list_mode_options("max-autotune"))
    bounds = dict(AUTOTUNE_BOUNDS, **(ATEN_ONLY if profile == "max-autotune-aten" else {}))
    applied = {k: v for k, v in bounds.items() if k in known}
    options.update(applied)
    return options, applied, sorted(set(bounds) - set(applied))


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # missing or broken: the report says None
        return None


def _cpu_name() -> str:
    from vitopt.artifact import hardware_info

    return hardware_info()["cpu"]


def _nvidia_smi(field: str) -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def write_report(report: dict, out: Path) -> None:
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "gpu_bench.md").write_text(markdown(report), encoding="utf-8")


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# GPU bench: {env.get('gpu') or env['cpu']}", "",
             ", ".join(f"{k} {v}" for k, v in env.items() if v is not None), "",
             "| model | batch | config | preset | profile | prec | median ms | p10 | p90 | img/s | "
             "vs eager | vs compile | compile s | max abs | cos | status |", "|" + "---|" * 16]
    for r in report["records"]:
        status = r["status"] if r["check_ok"] is not False else "NUMERICS FAILED"
        config = r["config"] + (" (same-profile peer)" if r.get("role") == "same-profile peer"
                                else "")
        lines.append(f"| {r['model']} | {r['batch']} | {config} | {r['preset'] or ''} | "
                     f"{r['profile'] or ''} | {r['precision']} | {_num(r['median_ms'])} | "
                     f"{_num(r['p10_ms'])} | {_num(r['p90_ms'])} | {_num(r['images_per_s'], 0)} | "
                     f"{_ratio(r['vs_eager'])} | {_ratio(r['vs_compile'])} | "
                     f"{_num(r['compile_s'], 1)} | {_num(r['max_abs_diff'], 4)} | "
                     f"{_num(r['cos'], 5)} | {status} |")
    t = report.get("target")
    if t:
        best = t["vitopt_best"]
        name = " ".join(str(best[k]) for k in ("config", "profile") if best[k]) if best else None
        verdict = {True: "met", False: "not met", None: "unknown"}[t["met"]]
        lines += ["", f"Target ({t['model']}, batch {t['batch']}, preset {t['preset']}): vitopt's "
                      f"best ({name or 'none ran'}) "
                      f"{_num(best and best['images_per_s'], 0) or 'n/a'} img/s vs {t['peer']} "
                      f"{_num(t['peer_images_per_s'], 0) or 'n/a'} img/s = "
                      f"{_ratio(t['ratio']) or 'n/a'} (goal {t['goal_ratio']:.1f}x: {verdict}); "
                      f"against the peer compiled like it: "
                      f"{_ratio(t['ratio_vs_same_profile_peer']) or 'n/a'}"]
    errors = [f"- {r['model']} {r['config']} {r['preset'] or ''} b{r['batch']} ({r['status']}): "
              f"{r['error']}" for r in report["records"] if r["error"]]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def _num(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}x"


# --- the child: one cell -----------------------------------------------------------------------
class Cell:
    """One cell's progress, written to --result after every step so a timeout loses little."""

    def __init__(self, args):
        self.args, self.path = args, Path(args.result)
        self.model_name, self.config = args.model, args.cell
        self.preset, self.profile = args.preset or None, args.profile or None
        self.state = {"records": [], "step": "start", "error": None}

    def step(self, name: str) -> None:
        print(f"[{self.model_name} {self.config} {self.preset or ''}] {name}", flush=True)
        self.state["step"] = name
        self.save()

    def add(self, batch: int, **fields) -> None:
        self.state["records"].append(record(self.model_name, self.config, batch,
                                            self.args.precision, preset=self.preset,
                                            profile=self.profile, **fields))
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state), encoding="utf-8")
        tmp.replace(self.path)


def run_cell(args) -> int:
    import torch

    cell = Cell(args)
    try:
        torch.manual_seed(0)
        RUNNERS[cell.config](cell)
    except Exception as exc:  # recorded for the parent; the traceback goes to the log
        import traceback

        traceback.print_exc()
        cell.state["error"] = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
        cell.save()
        return 1
    return 0


def create_model(cell: Cell):
    import timm

    cell.step("creating the model")
    if cell.model_name == QUICK_MODEL or cell.args.quick:
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                 patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                 num_classes=10).eval()
    return timm.create_model(cell.model_name, pretrained=False).eval()


def images(size: int, batch: int, device: str):
    import torch

    return torch.randn(batch, 3, size, size,
                       generator=torch.Generator().manual_seed(batch)).to(device)


def image_size(model) -> int:
    size = model.default_cfg.get("input_size", (3, 224, 224))[-1]
    return int(getattr(getattr(model, "patch_embed", None), "img_size", (size,))[0])


def dtype_of(precision: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def reference(module, x):
    """The fp32 output of `module` on images `x` (fp32), computed on x's device."""
    import torch

    ref = copy.deepcopy(module).float().to(x.device)
    with torch.no_grad():
        return ref(x).float().cpu()


def timed(cell: Cell, fn):
    from vitopt.timing import measure

    sync = _synchronizer(cell.args.device)

    def call():
        fn()
        sync()

    return measure(call, warmup=cell.args.warmup, runs=cell.args.runs)


def _synchronizer(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _first(output):
    return output[0] if isinstance(output, (list, tuple)) else output


def check_fields(output, expected, precision: str, backend: str, same_precision=None) -> dict:
    """The project's bound against the fp32 reference; plus, for compiled configs, the cosine
    against eager at the same precision (tells compiler error from fp16 effects, e.g. a token
    merge that matches differently in fp16)."""
    import torch

    from vitopt.tolerances import compare

    result = compare(output, expected, precision, backend)
    fields = {"max_abs_diff": result.max_abs, "cos": result.cos_sim, "check_ok": result.ok,
              "check": str(result)}
    if same_precision is not None:
        cos = torch.nn.functional.cosine_similarity(torch.as_tensor(output).float().flatten(1),
                                                    same_precision.float().flatten(1))
        fields["same_precision_cos"] = float(cos.min())
    return fields


def timing_fields(timing, batch: int) -> dict:
    return {"median_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
            "images_per_s": batch * 1e3 / timing.median_ms, "runs": timing.runs}


def run_eager(cell: Cell) -> None:
    import torch

    args = cell.args
    model = create_model(cell)
    size = image_size(model)
    module = copy.deepcopy(model).to(args.device, dtype_of(args.precision))
    for batch in args.batches:
        cell.step(f"eager batch {batch}")
        x32 = images(size, batch, args.device)
        expected, x = reference(model, x32), x32.to(dtype_of(args.precision))
        with torch.no_grad():
            out = module(x)
            timing = timed(cell, lambda: module(x))
        cell.add(batch, **timing_fields(timing, batch),
                 **check_fields(out, expected, args.precision, "torch"))


def lift(cell: Cell, model):
    """(IR after the preset's passes, names of the passes that changed it, seconds)."""
    from vitopt.frontend.trace import trace
    from vitopt.pipeline import run_pipeline

    cell.step(f"trace + {cell.preset} pipeline")
    started = time.perf_counter()
    example = images(image_size(model), 2, "cpu")
    result = run_pipeline(trace(model, example), cell.preset)
    passes = [r.name for r in result.records if r.modified]
    return result.ir, passes, time.perf_counter() - started


def run_compile(cell: Cell) -> None:
    model = create_model(cell)
    run_compiled(cell, model, image_size(model))


def run_jit(cell: Cell) -> None:
    model = create_model(cell)
    ir, passes, lift_s = lift(cell, model)
    run_compiled(cell, ir, image_size(model), lift_s=lift_s, passes=passes,
                 tokens=ir.token_counts())


def run_compiled(cell: Cell, module, size: int, **extra) -> None:
    """torch.compile(module at precision, the cell's profile); one callable for all its batches."""
    import torch

    args = cell.args
    options, applied, missing = profile_options(cell.profile)
    dtype = dtype_of(args.precision)
    half = copy.deepcopy(module).to(args.device, dtype)
    torch._dynamo.reset()
    compiled = torch.compile(half, options=options, dynamic=False)
    for index, batch in enumerate(args.batches):
        cell.step(f"references batch {batch}")
        x32 = images(size, batch, args.device)
        expected, x = reference(module, x32), x32.to(dtype)
        with torch.no_grad():
            eager = half(x).float().cpu()
            cell.step(f"compile ({cell.profile}) batch {batch}")
            started = time.perf_counter()
            out = _first(compiled(x)).float().cpu()  # a copy: CUDA graphs reuse their output
            _synchronizer(args.device)()
            compile_s = time.perf_counter() - started
            cell.step(f"timing ({cell.profile}) batch {batch}")
            timing = timed(cell, lambda: compiled(x))
        cell.add(batch, **timing_fields(timing, batch), compile_s=compile_s, options=options,
                 bounds_applied=applied, bounds_missing=missing, dynamic=False,
                 callable_reused=index > 0, cudagraph_skips=_cudagraph_skips(), **extra,
                 **check_fields(out, expected, args.precision, "inductor", eager))


def _cudagraph_skips() -> Optional[int]:
    """How often Inductor declined CUDA graphs in this process (the log says why); None where
    this torch does not count them."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["cudagraph_skips"])
    except Exception:  # an internal counter: absent in some versions
        return None


def run_aoti(cell: Cell) -> None:
    (run_aoti_build if cell.args.stage == "build" else run_aoti_load)(cell)


def run_aoti_build(cell: Cell) -> None:
    """Build the package (one dynamic batch up to the largest); save inputs and references."""
    import torch

    from vitopt.backends import get_backend

    args = cell.args
    model = create_model(cell)
    size = image_size(model)
    ir, passes, lift_s = lift(cell, model)
    folder = Path(args.package_dir)
    cell.step(f"AOTInductor build ({args.aoti_tuning})")
    options = dict(profile_options("max-autotune")[1] if args.aoti_tuning == "max-autotune"
                   else {}, **args.aoti_options)
    started = time.perf_counter()
    files = get_backend("aotinductor").build_module(
        ir, images(size, 2, "cpu"), folder, precision=args.precision, max_batch=max(args.batches),
        device=args.device, tuning=args.aoti_tuning, options=options or None)
    build_s = time.perf_counter() - started
    cell.step("references")
    half = copy.deepcopy(ir).to(args.device, dtype_of(args.precision))
    saved = {}
    for batch in args.batches:
        x32 = images(size, batch, args.device)
        with torch.no_grad():
            saved[batch] = {"x": x32.cpu(), "expected": reference(ir, x32),
                            "eager": half(x32.to(dtype_of(args.precision))).float().cpu()}
    torch.save(saved, folder / "references.pt")
    cell.state["build"] = {"compile_s": build_s, "lift_s": lift_s, "passes": passes,
                           "tuning": args.aoti_tuning, "aoti_options": options, "files": files,
                           "tokens": ir.token_counts(), "build_s": build_s}
    cell.save()


def run_aoti_load(cell: Cell) -> None:
    """Load the package in this fresh process and time it (inputs already on the device)."""
    import torch

    from vitopt.backends import get_backend
    from vitopt.backends.aotinductor import default_loader

    args = cell.args
    folder = Path(args.package_dir)
    saved = torch.load(folder / "references.pt")
    loader = args.aoti_loader or default_loader(args.device)
    cell.step(f"AOTInductor load ({loader})")
    started = time.perf_counter()
    engine = get_backend("aotinductor").load(folder, ["model.pt2", "aotinductor.json"],
                                             precision=args.precision, loader=loader)
    load_s = time.perf_counter() - started
    for batch in args.batches:
        cell.step(f"vitopt-aoti batch {batch}")
        x32, expected = saved[batch]["x"], saved[batch]["expected"]
        x = x32.to(args.device, dtype_of(args.precision))
        host = x32.numpy()
        with torch.no_grad():
            out = _first(engine.runner(x)).float().cpu()
            timing = timed(cell, lambda: engine.runner(x))
        e2e = timed(cell, lambda: engine.run(host))
        cell.add(batch, **timing_fields(timing, batch), e2e_median_ms=e2e.median_ms,
                 loader=loader, load_s=load_s,
                 **check_fields(out, expected, args.precision, "aotinductor",
                                saved[batch]["eager"]))


RUNNERS = {"eager": run_eager, "compile": run_compile, "vitopt-jit": run_jit,
           "vitopt-aoti": run_aoti}

if __name__ == "__main__":
    sys.exit(main())

"""AOTInductor load diagnostic: which way of building and opening a CUDA .pt2 works on this machine.

    python3 benchmarks/aoti_diag.py --out DIR [--budget-s 60]          # on the GPU machine
    python3 benchmarks/aoti_diag.py --device cpu --builds default --loads package --out DIR

Why: on the H100 (torch 2.11.0+cu130) the first CUDA fp16 package the GPU test built segfaulted in
`aoti_load_package` -> AOTIModelPackageLoader's constructor, loaded in the process that built it
while Inductor's compile-worker pool was alive. This script narrows that down in about a minute.

Every build and every load is its own process (`python3 -X faulthandler`), so a segfault costs
that variant only and its Python stack lands in its log. All of them start at once: builds at
t=0, each build's load variants as soon as its package is written (built.json). Tiny models,
fp16 on CUDA (fp32 on CPU), dynamic batch up to 8, checked on a batch of 3 against fp32 eager.

Builds (BUILDS): default        vitopt's backend.build_module, as the GPU test does; then opens
                                the package in the same process (pool alive): the crash as seen
                 no-pool        the same with TORCHINDUCTOR_COMPILE_THREADS=1 (no worker pool),
                                then opens it in the same process
                 shutdown-workers  default build, shutdown_compile_workers(), open in-process
                 embed-kernels  aot_inductor.embed_kernel_binary=True (kernels inside the .so), only
                                where this torch has that option; then opens it in-process
                 plain-mlp      control: Linear-GELU-Linear through torch's own API, no vitopt
Loads (fresh process; LOADERS of vitopt.backends.aotinductor.open_package), on the default
build: package (aoti_load_package as is), single-threaded (run_single_threaded=True),
device-index (device_index=0), loader-class (torch._C._aoti.AOTIModelPackageLoader directly),
so-runner (the wrapper .so run by AOTIModelContainerRunnerCuda: no package loader at all); on
every other build: package. Each step prints an `@@ step` line, so a crash names its step.
Also `ldd -r` of the default build's .so (missing libraries, undefined symbols).

Writes DIR/aoti_diag.json (env, builds, loads, ldd, recommended) and DIR/aoti_diag/ (each
process's log). `recommended`: fresh_process_loader (the first loader that worked in a fresh
process), same_process_loader ("package" when opening in the building process works, "no-workers"
when only that works after shutting the pool down), build_options (when only another build
loads). Exit code 0 when some variant built, loaded and matched; 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

#: name -> (environment, inductor options (dropped, and listed, where this torch lacks them),
#:          how to open the package in the building process afterwards (None: not at all))
BUILDS = {
    "default": ({"TORCHINDUCTOR_COMPILE_THREADS": "4"}, {}, "package"),
    "no-pool": ({"TORCHINDUCTOR_COMPILE_THREADS": "1"}, {}, "package"),
    "shutdown-workers": ({"TORCHINDUCTOR_COMPILE_THREADS": "4"}, {}, "no-workers"),
    "embed-kernels": ({"TORCHINDUCTOR_COMPILE_THREADS": "4"},
                      {"aot_inductor.embed_kernel_binary": True}, "package"),
    "plain-mlp": ({"TORCHINDUCTOR_COMPILE_THREADS": "4"}, {}, "package"),
}
FRESH_LOADERS = ("package", "single-threaded", "device-index", "loader-class", "so-runner")
#: Builds that must have every one of their options (else they are skipped, not half-applied).
ALL_OPTIONS_NEEDED = ("embed-kernels",)
#: Builds with the default options: a fresh-process load of any of them says the same thing.
DEFAULT_OPTIONS = ("default", "no-pool", "shutdown-workers")
LOAD_TIMEOUT_S = 30.0  # import torch, CUDA init, open, run (run 3: 12 s was not enough)
#: The debugger-wrapped load (--gdb): the load stops itself with SIGTRAP after this many seconds,
#: so a hang also gives native stacks; the debugger process gets DEBUG_EXTRA_S more.
DEBUG_TRAP_S, DEBUG_EXTRA_S = 40.0, 20.0
DEBUG_COMMANDS = ("set pagination off", "set confirm off", "set print thread-events off",
                  "handle SIGPIPE nostop noprint pass", "run", "bt 40", "info threads",
                  "thread apply all bt 15", "kill", "quit")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.build:
        return build_child(args)
    if args.load:
        return load_child(args)
    return parent(args)


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/aoti-diag")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--budget-s", type=float, default=60.0, help="the whole diagnostic")
    parser.add_argument("--builds", default=",".join(BUILDS), help="comma list of BUILDS")
    parser.add_argument("--loads", default=",".join(FRESH_LOADERS),
                        help="fresh-process loaders tried on the default build")
    parser.add_argument("--load-timeout-s", type=float, default=LOAD_TIMEOUT_S,
                        help="each fresh-process load")
    parser.add_argument("--gdb", action="store_true",
                        help="also load the default build under cuda-gdb (or gdb) and keep the "
                             "native backtrace of a crash, or of every thread after "
                             f"{DEBUG_TRAP_S:.0f} s")
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.builds = [b for b in args.builds.split(",") if b]
    args.loads = [b for b in args.loads.split(",") if b]
    unknown = [b for b in args.builds if b not in BUILDS] + \
        [b for b in args.loads if b not in FRESH_LOADERS]
    if unknown:
        parser.error(f"unknown build/load variant(s) {unknown}")
    return args


# --- the parent: no torch import, only processes and files ------------------------------------
class Proc:
    def __init__(self, kind: str, name: str, command: List[str], log: Path, timeout: float,
                 env: Optional[dict] = None):
        self.kind, self.name, self.log, self.started = kind, name, log, time.monotonic()
        self.deadline = self.started + timeout
        self.timeout, self.timed_out, self.code = timeout, False, None
        self.handle = open(log, "w", encoding="utf-8")
        self.process = subprocess.Popen(command, stdout=self.handle, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=env)

    def poll(self, now: float) -> bool:
        """True once the process has ended (or was killed at its deadline)."""
        if self.code is not None:
            return True
        code = self.process.poll()
        if code is None and now >= self.deadline:
            self.kill()
            self.timed_out, code = True, self.process.wait()
        if code is not None:
            self.code, self.seconds = code, time.monotonic() - self.started
            self.handle.close()
        return self.code is not None

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # with its compile workers
        except ProcessLookupError:
            pass

    def outcome(self) -> dict:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.is_file() else ""
        steps = [line.split("@@ step", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("@@ step")]
        out = {"exit": self.code, "seconds": round(getattr(self, "seconds", 0.0), 1),
               "last_step": steps[-1] if steps else None, "log": self.log.name}
        if self.timed_out:
            out["error"] = f"timed out after {self.timeout:.0f}s"
        elif self.code is not None and self.code < 0:
            out["error"] = f"killed by {_signal_name(-self.code)}"
            out["crash"] = _crash_lines(text)
        elif self.code:
            out["error"] = _last_error(text) or f"exit code {self.code}"
        return out


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _crash_lines(text: str) -> List[str]:
    """faulthandler's 'Fatal Python error' line and the innermost frames of the current thread."""
    lines = text.splitlines()
    keep = [line for line in lines if line.startswith("Fatal Python error")]
    for index, line in enumerate(lines):
        if line.startswith("Current thread"):
            keep += [frame.strip() for frame in lines[index + 1:index + 7]]
            break
    return keep


def _last_error(text: str) -> Optional[str]:
    lines = [line for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line or "Exception" in line:
            return line.strip()[:400]
    return lines[-1].strip()[:400] if lines else None


def parent(args) -> int:
    out = Path(args.out)
    logs = out / "aoti_diag"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    end = started + args.budget_s
    work = Path(tempfile.mkdtemp(prefix="aoti-diag-"))
    script = str(Path(__file__).resolve())
    python = [sys.executable, "-X", "faulthandler", script]
    build_timeout = max(5.0, args.budget_s - args.load_timeout_s - 1)
    procs: List[Proc] = []
    waiting: Dict[str, Path] = {}  # build name -> its folder, until its built.json appears
    for name in args.builds:
        folder = work / name
        folder.mkdir()
        env = dict(os.environ, **BUILDS[name][0])
        if name != "default":  # the default build warms the shared cache for later builds
            env["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor-cache")
        procs.append(Proc("build", name, python + ["--build", name, "--dir", str(folder),
                                                   "--device", args.device],
                          logs / f"build-{name}.log", build_timeout, env))
        waiting[name] = folder
    print(f"aoti_diag: {len(procs)} builds started (timeout {build_timeout:.0f}s each), "
          f"budget {args.budget_s:.0f}s, device {args.device}", flush=True)
    while True:
        now = time.monotonic()
        for name, folder in list(waiting.items()):
            built = _read(folder / "built.json") if (folder / "built.json").is_file() else None
            if built is not None:
                del waiting[name]
                if built.get("skipped"):
                    print(f"  build {name}: skipped, {built['skipped']}", flush=True)
                    continue
                loaders = args.loads if name == "default" else ["package"]
                print(f"  build {name}: package written after {now - started:.0f}s; "
                      f"starting loads {', '.join(loaders)}", flush=True)
                for loader in loaders:
                    timeout = min(args.load_timeout_s, max(1.0, end - now))
                    procs.append(Proc("load", f"{name}/{loader}", python + [
                        "--load", loader, "--dir", str(folder), "--device", args.device],
                        logs / f"load-{name}-{loader}.log", timeout))
                if name == "default" and args.gdb:
                    procs.append(debugger_load(python, folder, args.device, logs))
                    end = max(end, now + DEBUG_TRAP_S + DEBUG_EXTRA_S)
        done = [p.poll(now) for p in procs]
        if all(done) and not any((waiting[n] / "built.json").is_file() for n in waiting):
            break
        if now >= end:
            for p in procs:
                if not p.poll(now):
                    p.kill()
                    p.timed_out, p.code = True, p.process.wait()
                    p.seconds = time.monotonic() - p.started
                    p.handle.close()
            break
        time.sleep(0.25)
    report = collect(args, procs, work)
    report["seconds"] = round(time.monotonic() - started, 1)
    (out / "aoti_diag.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(summary(report), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if report["recommended"]["fresh_process_loader"] or \
        report["recommended"]["same_process_loader"] else 1


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def collect(args, procs: List[Proc], work: Path) -> dict:
    builds, loads, debug = {}, {}, None
    for p in procs:
        if p.kind == "build":
            folder = work / p.name
            built = _read(folder / "built.json")
            entry = {"process": p.outcome(), "built": built is not None}
            entry.update(built or {})
            inproc = _read(folder / "inproc.json")
            if BUILDS[p.name][2] and built and not (built.get("skipped")):
                entry["same_process_load"] = inproc or {
                    "ok": False, "loader": BUILDS[p.name][2],
                    "error": p.outcome().get("error") or "no result",
                    "crashed_in": p.outcome().get("last_step")}
            builds[p.name] = entry
        elif p.kind == "debug":
            debug = debugger_report(p)
        else:
            build, loader = p.name.split("/")
            result = _read(work / build / f"load-{loader}.json")
            entry = {"process": p.outcome()}
            entry.update(result or {"ok": False, "error": p.outcome().get("error") or
                                    "no result", "crashed_in": p.outcome().get("last_step")})
            loads[p.name] = entry
    env = next((b.get("env") for b in builds.values() if b.get("env")), None)
    report = {"device": args.device, "env": env, "builds": builds, "loads": loads,
              "ldd": ldd_report(work / "default" / "model.pt2")}
    if debug is not None:
        report["debugger"] = debug
    report["recommended"] = recommend(builds, loads)
    return report


def debugger() -> Optional[str]:
    """cuda-gdb (on PATH or in /usr/local/cuda/bin), else gdb, else None."""
    for name in ("cuda-gdb", "/usr/local/cuda/bin/cuda-gdb", "gdb"):
        found = shutil.which(name)
        if found:
            return found
    return None


def debugger_load(python: List[str], folder: Path, device: str, logs: Path) -> Proc:
    """The "package" load of the default build under a debugger: where a segfault happens in
    C++ (run 3's crash) faulthandler shows only the Python frame; this keeps the native one.
    The load sends itself SIGTRAP after DEBUG_TRAP_S, so a hang also stops with stacks."""
    tool = debugger()
    command = python + ["--load", "package", "--dir", str(folder), "--device", device]
    if tool is None:
        command = [sys.executable, "-c", "print('no cuda-gdb or gdb on this machine')"]
    else:
        command = [tool, "-q", "-batch", "-nx"] + \
            [arg for line in DEBUG_COMMANDS for arg in ("-ex", line)] + ["--args"] + command
    env = dict(os.environ, AOTI_DIAG_TRAP_AFTER=str(DEBUG_TRAP_S))
    env.pop("AOTI_DIAG_TEST_CRASH", None)
    if os.environ.get("AOTI_DIAG_TEST_DEBUG_CRASH"):  # tests: a segfault under the debugger
        env["AOTI_DIAG_TEST_CRASH"] = os.environ["AOTI_DIAG_TEST_DEBUG_CRASH"]
    return Proc("debug", "default/package-under-debugger", command,
                logs / "load-default-debugger.log", DEBUG_TRAP_S + DEBUG_EXTRA_S, env)


def debugger_report(proc: Proc) -> dict:
    """The debugger's tool, the signal the load stopped on and the native frames after it."""
    text = proc.log.read_text(encoding="utf-8", errors="replace") if proc.log.is_file() else ""
    lines = text.splitlines()
    report = {"process": proc.outcome(), "tool": debugger() or "none: no cuda-gdb or gdb here"}
    stops = [i for i, line in enumerate(lines) if "received signal" in line]
    if stops:
        report["signal"] = lines[stops[0]].strip()
        report["frames"] = [line.rstrip() for line in lines[stops[0] + 1:]
                            if line.startswith(("#", "Thread ", "* ", "  "))][:160]
    else:
        report["signal"] = None
        report["tail"] = [line.rstrip() for line in lines[-30:]]
    return report


def ldd_report(package: Path) -> dict:
    """`ldd -r` of the package's .so: libraries not found and undefined symbols."""
    if not package.is_file() or shutil.which("ldd") is None:
        return {"ran": False}
    folder = package.parent / "ldd"
    try:
        with zipfile.ZipFile(package) as archive:
            names = [n for n in archive.namelist() if n.endswith(".so")]
            archive.extractall(folder, names)
        if not names:
            return {"ran": False, "error": "no .so in the package"}
        # torch's own libraries are on no rpath (the process that loads the .so has them):
        # point ldd at them so that what stays unresolved means something
        env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(
            filter(None, [_torch_lib(), os.environ.get("LD_LIBRARY_PATH")])))
        done = subprocess.run(["ldd", "-r", str(folder / names[0])], capture_output=True,
                              text=True, timeout=20, env=env)
    except (OSError, zipfile.BadZipFile, subprocess.TimeoutExpired) as exc:
        return {"ran": False, "error": str(exc)}
    lines = (done.stdout + done.stderr).splitlines()
    problems = [l.strip() for l in lines if "not found" in l or "undefined symbol" in l]
    return {"ran": True, "so": Path(names[0]).name, "libraries": len(lines),
            "problems": problems[:20], "problem_count": len(problems)}


def _torch_lib() -> Optional[str]:
    import importlib.util

    spec = importlib.util.find_spec("torch")  # finds it without importing it
    locations = list(spec.submodule_search_locations or []) if spec else []
    return os.path.join(locations[0], "lib") if locations else None


def recommend(builds: dict, loads: dict) -> dict:
    fresh = sorted({name.split("/")[1] for name, r in loads.items()
                    if name.split("/")[0] in DEFAULT_OPTIONS and r.get("ok")})
    fresh_loader = next((l for l in FRESH_LOADERS if l in fresh), None)
    same = {name: (b.get("same_process_load") or {}).get("ok") for name, b in builds.items()
            if b.get("same_process_load") is not None}
    same_loader = "package" if same.get("default") else (
        "no-workers" if same.get("shutdown-workers") else None)
    options: dict = {}
    if fresh_loader is None:
        for name in ("embed-kernels",):
            if (loads.get(f"{name}/package") or {}).get("ok"):
                options = builds[name].get("options_applied") or {}
                fresh_loader = "package"
                break
    lines = []
    if fresh_loader:
        lines.append(f"a fresh process loads the package with loader {fresh_loader!r}"
                     + (f" when built with {options}" if options else ""))
    elif any(name.split("/")[0] in DEFAULT_OPTIONS for name in loads):
        lines.append("no loader worked in a fresh process")
    else:
        lines.append("no package with the default options was built in time to load")
    if same:
        lines.append("same process as the build: " + ", ".join(
            f"{k} {'ok' if v else 'FAILED'}" for k, v in same.items()))
    control = loads.get("plain-mlp/package")
    if control is not None:
        lines.append(f"torch-only control (plain-mlp) fresh load: "
                     f"{'ok' if control.get('ok') else 'FAILED'}")
    return {"fresh_process_loader": fresh_loader, "same_process_loader": same_loader,
            "build_options": options, "fresh_process_ok": fresh,
            "same_process": same, "summary": "; ".join(lines)}


def summary(report: dict) -> str:
    lines = ["aoti_diag results:"]
    for name, b in report["builds"].items():
        status = "skipped: " + b["skipped"] if b.get("skipped") else (
            f"built in {b.get('build_s', 0):.0f}s" if b.get("built") else
            f"NOT BUILT ({b['process'].get('error') or b['process'].get('last_step')})")
        same = b.get("same_process_load")
        if same is not None:
            status += "; same-process load " + ("ok" if same.get("ok") else
                                                f"FAILED ({same.get('error')}, in "
                                                f"{same.get('crashed_in')})")
        lines.append(f"  build {name}: {status}")
    for name, r in report["loads"].items():
        lines.append(f"  load  {name}: " + ("ok" if r.get("ok") else
                                            f"FAILED ({r.get('error')}, in {r.get('crashed_in')})")
                     + (f" cos {r['cos']:.5f}" if r.get("cos") is not None else ""))
    ldd = report["ldd"]
    if ldd.get("ran"):
        lines.append(f"  ldd -r {ldd['so']}: {ldd['problem_count']} problem(s)"
                     + "".join(f"\n    {p}" for p in ldd["problems"][:5]))
    debug = report.get("debugger")
    if debug is not None:
        lines.append(f"  under {debug.get('tool')}: " + (debug.get("signal") or "no signal; "
                     + "; ".join(debug.get("tail", [])[-3:])))
        lines += [f"    {frame}" for frame in debug.get("frames", [])[:25]]
    lines.append("  recommended: " + json.dumps({k: v for k, v in report["recommended"].items()
                                                  if k != "summary"}))
    lines.append("  " + report["recommended"]["summary"])
    return "\n".join(lines)


# --- the children -----------------------------------------------------------------------------
def step(name: str) -> None:
    print(f"@@ step {name}", flush=True)
    if os.environ.get("AOTI_DIAG_TEST_CRASH") == name:  # tests: a segfault at this step
        os.kill(os.getpid(), signal.SIGSEGV)


def _precision(device: str) -> str:
    return "fp16" if device == "cuda" else "fp32"


def _dtype(precision: str):
    import torch

    return {"fp16": torch.float16, "fp32": torch.float32}[precision]


def tiny_module(kind: str):
    """(module, example batch of 3, float32): the GPU test's tiny ViT IR, or a plain MLP."""
    import torch

    torch.manual_seed(0)
    if kind == "plain-mlp":
        module = torch.nn.Sequential(torch.nn.Linear(60, 64), torch.nn.GELU(),
                                     torch.nn.Linear(64, 5)).eval()
        return module, torch.randn(3, 60, generator=torch.Generator().manual_seed(1))
    from timm.models.vision_transformer import VisionTransformer

    from vitopt.frontend.trace import trace

    model = VisionTransformer(img_size=20, patch_size=4, embed_dim=36, depth=1, num_heads=3,
                              num_classes=5).eval()
    ir = trace(model, torch.randn(2, 3, 20, 20))
    return ir, torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(1))


def environment(device: str) -> dict:
    import inspect

    import torch
    from torch._inductor import config

    known = config.get_config_copy()
    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda,
           "aoti_load_package": str(inspect.signature(torch._inductor.aoti_load_package)),
           "config_names": {name: name in known for name in sorted(
               {k for spec in BUILDS.values() for k in spec[1]}
               | {"aot_inductor.precompile_headers", "aot_inductor.package_cpp_only",
                  "aot_inductor.emit_multi_arch_kernel", "compile_threads"})},
           "compile_threads": known.get("compile_threads")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return env


def build_child(args) -> int:
    folder = Path(args.dir)
    env_vars, wanted, same_process = BUILDS[args.build]
    step("import")
    import torch
    from torch._inductor import config

    known = config.get_config_copy()
    applied = {k: v for k, v in wanted.items() if k in known}
    missing = sorted(set(wanted) - set(applied))
    built = {"env": environment(args.device), "options_applied": applied,
             "options_missing": missing, "environment": env_vars}
    if missing and args.build in ALL_OPTIONS_NEEDED:
        built["skipped"] = f"this torch lacks {', '.join(missing)}"
        (folder / "built.json").write_text(json.dumps(built), encoding="utf-8")
        return 0
    precision = _precision(args.device)
    dtype = _dtype(precision)
    step("model")
    module, x = tiny_module(args.build)
    with torch.no_grad():
        expected = module(x).float()
    torch.save({"x": x, "expected": expected, "precision": precision}, folder / "io.pt")
    step("build")
    started = time.perf_counter()
    if args.build == "plain-mlp":
        from torch.export import Dim

        with torch.no_grad():
            program = torch.export.export(module.to(args.device, dtype),
                                          (x.to(args.device, dtype),),
                                          dynamic_shapes=({0: Dim("batch", min=1, max=8)},))
        torch._inductor.aoti_compile_and_package(program, package_path=str(folder / "model.pt2"),
                                                 inductor_configs=dict(applied))
    else:
        from vitopt.backends import get_backend

        get_backend("aotinductor").build_module(module, x, folder, precision=precision,
                                                max_batch=8, device=args.device,
                                                options=applied or None)
    built["build_s"] = round(time.perf_counter() - started, 1)
    (folder / "built.json").write_text(json.dumps(built), encoding="utf-8")
    print(f"built in {built['build_s']}s", flush=True)
    if same_process:
        result = open_and_check(folder, same_process, args.device, prefix="same-process ")
        (folder / "inproc.json").write_text(json.dumps(result), encoding="utf-8")
    return 0


def load_child(args) -> int:
    folder = Path(args.dir)
    trap_after = os.environ.get("AOTI_DIAG_TRAP_AFTER")
    watchdog = None
    if trap_after:  # under the debugger: stop with SIGTRAP if still running (a hang)
        watchdog = subprocess.Popen(
            ["sh", "-c", f"sleep {float(trap_after):.0f}; kill -TRAP {os.getpid()}"],
            start_new_session=True)
    result = open_and_check(folder, args.load, args.device)
    if watchdog is not None:
        watchdog.kill()
    (folder / f"load-{args.load}.json").write_text(json.dumps(result), encoding="utf-8")
    return 0 if result["ok"] else 1


def open_and_check(folder: Path, loader: str, device: str, prefix: str = "") -> dict:
    """Open folder/model.pt2 with `loader`, run the saved batch, compare with fp32 eager."""
    step(f"{prefix}import")
    import torch

    from vitopt.backends.aotinductor import open_package

    result = {"loader": loader, "ok": False}
    try:
        if device == "cuda":
            step(f"{prefix}cuda-init")
            torch.zeros(1, device="cuda")
        io = torch.load(folder / "io.pt")
        step(f"{prefix}open ({loader})")
        started = time.perf_counter()
        runner = open_package(folder / "model.pt2", loader, device)
        result["open_s"] = round(time.perf_counter() - started, 2)
        step(f"{prefix}run")
        with torch.no_grad():
            out = runner(io["x"].to(device, _dtype(io["precision"])))
        out = (out[0] if isinstance(out, (list, tuple)) else out).float().cpu()
        step(f"{prefix}check")
        expected = io["expected"]
        cos = torch.nn.functional.cosine_similarity(out.flatten(1), expected.flatten(1)).min()
        scale = float(expected.abs().max()) or 1.0
        result.update(cos=float(cos), max_rel=float((out - expected).abs().max()) / scale,
                      shape=list(out.shape))
        result["ok"] = bool(out.shape == expected.shape and cos > 0.999)
        if not result["ok"]:
            result["error"] = f"output differs: cos {float(cos):.5f}, shape {list(out.shape)}"
    except Exception as exc:  # recorded: the parent compares variants
        import traceback

        traceback.print_exc()
        text = str(exc).strip()
        result["error"] = f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
    print(f"{prefix}{loader}: {'ok' if result['ok'] else result.get('error')}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())

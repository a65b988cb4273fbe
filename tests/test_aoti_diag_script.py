"""benchmarks/aoti_diag.py on CPU: builds and loads in their own processes, a segfault recorded with
the step it happened in, and the recommendation drawn from the results.

On the GPU machine it diagnoses CUDA packages (benchmarks/gpu_check.sh runs it first); here one
fp32 CPU build (g++: about 20 s on two cores) and two fresh-process loads exercise the same code.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "aoti_diag.py"


def load_script():
    spec = importlib.util.spec_from_file_location("aoti_diag", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("aoti-diag")
    env = dict(os.environ, AOTI_DIAG_TEST_CRASH="same-process open (package)",
               AOTI_DIAG_TEST_DEBUG_CRASH="open (package)")
    gdb = ["--gdb"] if load_script().debugger() else []
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--builds", "default",
                           "--loads", "package,so-runner", "--budget-s", "200", "--out", str(out)]
                          + gdb,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / "aoti_diag.json").read_text()), done.stdout


def test_a_crash_in_the_building_process_is_recorded_with_its_step(cpu_run):
    out, report, stdout = cpu_run
    build = report["builds"]["default"]
    assert build["built"] and build["build_s"] > 0 and build["env"]["torch"]
    same = build["same_process_load"]
    assert same["ok"] is False and same["error"] == "killed by SIGSEGV"
    assert same["crashed_in"] == "same-process open (package)"
    assert build["process"]["crash"][0].startswith("Fatal Python error: Segmentation fault")
    assert "same-process load FAILED (killed by SIGSEGV" in stdout
    assert (out / "aoti_diag" / "build-default.log").is_file()


def test_fresh_process_loads_and_the_recommendation(cpu_run):
    _, report, _ = cpu_run
    for loader in ("package", "so-runner"):
        load = report["loads"][f"default/{loader}"]
        assert load["ok"] is True and load["cos"] > 0.9999 and load["shape"] == [3, 5], load
    rec = report["recommended"]
    assert rec["fresh_process_loader"] == "package" and rec["same_process_loader"] is None
    assert rec["fresh_process_ok"] == ["package", "so-runner"] and rec["build_options"] == {}
    assert report["ldd"].get("problem_count", 0) == 0


def test_recommend_prefers_what_worked():
    diag = load_script()
    crashed = {"ok": False, "error": "killed by SIGSEGV"}
    builds = {"default": {"same_process_load": crashed},
              "shutdown-workers": {"same_process_load": {"ok": True}},
              "embed-kernels": {"options_applied": {"aot_inductor.embed_kernel_binary": True}}}
    loads = {"default/package": crashed, "default/single-threaded": {"ok": True},
             "embed-kernels/package": {"ok": True}}
    rec = diag.recommend(builds, loads)
    assert rec["fresh_process_loader"] == "single-threaded" and rec["build_options"] == {}
    assert rec["same_process_loader"] == "no-workers"
    loads["default/single-threaded"] = crashed
    rec = diag.recommend(builds, loads)
    assert rec["fresh_process_loader"] == "package"
    assert rec["build_options"] == {"aot_inductor.embed_kernel_binary": True}
    loads["no-pool/package"] = {"ok": True}  # the default options, built without a pool
    rec = diag.recommend(builds, loads)
    assert rec["fresh_process_loader"] == "package" and rec["build_options"] == {}


def test_a_crash_under_the_debugger_keeps_its_native_frames(cpu_run):
    _, report, stdout = cpu_run
    if load_script().debugger() is None:
        assert "debugger" not in report
        pytest.skip("no cuda-gdb or gdb here")
    debug = report["debugger"]
    assert "SIGSEGV" in debug["signal"], debug
    assert any(frame.startswith("#0") for frame in debug["frames"]), debug
    assert any("kill" in frame or "raise" in frame for frame in debug["frames"]), debug
    assert "under " in stdout and "SIGSEGV" in stdout

"""benchmarks/gpu_bench.py on CPU: the --quick run writes every field; a timed-out cell is recorded.

The GPU run itself happens on the GPU machine (benchmarks/gpu_check.sh); this checks the same code
path on a tiny ViT so the script cannot arrive there broken. About a minute on two cores.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
FIELDS = {"model", "batch", "config", "precision", "backend", "median_ms", "p10_ms", "p90_ms",
          "images_per_s", "compile_s", "max_abs_diff", "cos", "check_ok", "status", "error"}


def bench(out, *flags, timeout=400):
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out),
               *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench")
    done = bench(out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / "gpu_bench.json").read_text()), done.stdout


def test_every_cell_has_a_complete_record(quick_run):
    _, report, _ = quick_run
    records = report["records"]
    cells = {(r["config"], r["batch"]) for r in records}
    assert cells == {(c, b) for c in ("eager", "compile", "vitopt") for b in (1, 3)}
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["status"] == "ok" and r["error"] is None and r["check_ok"] is True, r
        assert r["model"] == "tiny_vit" and r["precision"] == "fp32"
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1e3 / r["median_ms"])
        assert r["max_abs_diff"] < 1e-3 and r["cos"] > 0.9999
    by_config = {r["config"]: r for r in records}
    assert by_config["eager"]["compile_s"] is None
    assert by_config["compile"]["compile_s"] > 0 and by_config["compile"]["bounds_applied"]
    assert by_config["vitopt"]["backend"] == "aotinductor"
    assert by_config["vitopt"]["tuning"] == "default" and by_config["vitopt"]["e2e_median_ms"] > 0


def test_environment_and_markdown(quick_run):
    out, report, stdout = quick_run
    assert report["env"]["torch"] and report["env"]["device"] == "cpu"
    assert report["settings"]["compile_bounds"]["coordinate_descent_tuning"] is False
    table = (out / "gpu_bench.md").read_text()
    assert table.count("| tiny_vit |") == 6 and "| tiny_vit |" in stdout
    assert (out / "gpu_bench.log").is_file()


def test_a_cell_that_times_out_is_recorded_and_the_rest_go_on(tmp_path):
    done = bench(tmp_path, "--configs", "eager,eager", "--budget-s", "0", "--min-cell-s", "0.3",
                 timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    records = json.loads((tmp_path / "gpu_bench.json").read_text())["records"]
    assert len(records) == 4  # both cells ran (and timed out), one record per batch each
    for r in records:
        assert r["status"] == "failed" and "timed out after 0s" in r["error"], r
        assert r["median_ms"] is None and r["check_ok"] is None

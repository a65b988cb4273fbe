"""Isolated suite cells (vitopt/suite/isolation.py), on the CPU with tiny models: real cells
pass through child processes, and a cell that segfaults, exits, hangs past its limit or finds no
time left becomes a failed record while the run goes on. Failures are injected with the
worker's test hook $VITOPT_SUITE_FAULT (before the cell builds anything, so they cost a Python
start each). Also: the GPU matrices resolve on this machine (so a typo cannot cost GPU time).
About 40 s on two cores; no speed is asserted."""
import json
from pathlib import Path

import pytest

from vitopt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "benchmarks" / "schema" / "bench_record.schema.json"

MATRIX = {
    "name": "isolation-test", "description": "tiny cells, some failing on purpose",
    "device": "cpu", "threads": 1, "timing": {"warmup": 1, "runs": 10, "rounds": 1},
    "calib_images": 8, "cell_timeout_s": 240,
    "groups": [{"model": "tiny_vit", "batches": [1, 3],
                "peers": ["torch-eager-fp32", "torch-bf16-autocast", "torch-compile", "ort-fp32"],
                "vitopt": [{"preset": "lossless", "precision": "fp32"}]}],
}
FAULTS = "torch-bf16-autocast=segv,torch-compile=raise,ort-fp32=exit"


@pytest.fixture(scope="module")
def isolated_run(tmp_path_factory):
    from vitopt.suite.isolation import Isolation
    from vitopt.suite.matrix import parse_matrix
    from vitopt.suite.outputs import write_outputs
    from vitopt.suite.runner import run_suite
    out = tmp_path_factory.mktemp("isolated")
    matrix = parse_matrix(MATRIX, "isolation-test")
    isolation = Isolation.for_matrix(matrix, log_path=out / "cells.log")
    snapshots, lines = [], []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VITOPT_SUITE_FAULT", FAULTS)
        result = run_suite(matrix, log=lines.append, isolation=isolation,
                           on_progress=lambda partial: snapshots.append(partial.to_json()))
    write_outputs(result, out / "results")
    return out, result.to_json(), snapshots, lines


def _by_cell(doc):
    return {(r["cell"], r["batch"]): r for r in doc["records"]}


def test_real_cells_pass_through_their_own_processes(isolated_run):
    _, doc, _, _ = isolated_run
    records = _by_cell(doc)
    for cell in ("torch-eager-fp32", "vitopt lossless fp32"):
        for batch in (1, 3):
            r = records[(cell, batch)]
            assert r["status"] == "ok", r["error"]
            assert r["failure"] is None and r["latency_ms"]["samples"] >= 10
            assert r["cosine_vs_eager"] > 0.999 and r["gflops_per_image"] > 0
    vitopt = records[("vitopt lossless fp32", 1)]
    assert vitopt["engine"].startswith("vitopt/") and vitopt["artifact_bytes"] > 0
    assert vitopt["best_peer"] == "torch-eager-fp32" and vitopt["speedup_vs_best_peer"] > 0
    assert doc["suite"]["complete"] is True and "isolation" in doc["method"]


def test_a_crash_and_an_exit_are_failed_records_and_the_run_goes_on(isolated_run):
    _, doc, _, lines = isolated_run
    records = _by_cell(doc)
    segv = records[("torch-bf16-autocast", 1)]
    assert segv["status"] == "error" and segv["latency_ms"] is None
    assert segv["failure"]["reason"] == "crash" and segv["failure"]["signal"] == "SIGSEGV"
    assert segv["failure"]["exit_code"] == -11 and "SIGSEGV" in segv["error"]
    assert "inject_fault" in segv["failure"]["output_tail"]        # faulthandler's stack
    assert "innermost frame" in segv["error"]
    raised = records[("torch-compile", 3)]["failure"]               # an uncaught exception
    assert raised["reason"] == "exit" and raised["exit_code"] == 1
    assert "RuntimeError: injected failure" in raised["output_tail"]
    exited = records[("ort-fp32", 1)]["failure"]
    assert exited["reason"] == "exit" and exited["exit_code"] == 3 and exited["signal"] is None
    assert any("FAILED" in line and "torch-compile" in line for line in lines)
    assert records[("vitopt lossless fp32", 3)]["status"] == "ok"   # after the failures


def test_a_hang_is_killed_at_its_limit_with_its_stack(monkeypatch):
    from vitopt.suite.isolation import Isolation, run_child
    from vitopt.suite.matrix import parse_matrix
    monkeypatch.setenv("VITOPT_SUITE_FAULT", "torch-eager-fp32=hang")
    matrix = parse_matrix(MATRIX)
    payload = run_child(matrix, 0, 0, "torch-eager-fp32", 10.0, Isolation(), log=lambda m: None)
    failure = payload["failure"]
    assert failure["reason"] == "timeout" and failure["timeout_s"] == 10.0
    assert failure["signal"] == "SIGKILL" and failure["seconds"] < 30
    assert "inject_fault" in failure["output_tail"]                # the dump before the kill
    assert payload["error"].startswith("timed out after 10 s")


def test_results_are_written_after_every_cell_and_validate(isolated_run):
    from vitopt.suite.schema import load_schema, validate
    out, doc, snapshots, _ = isolated_run
    schema = load_schema(SCHEMA)
    assert len(snapshots) == 5                               # one per cell
    assert [len(s["records"]) for s in snapshots] == [2, 4, 6, 8, 10]   # 2 batches per cell
    assert all(s["suite"]["complete"] is False and validate(s, schema) == [] for s in snapshots)
    assert validate(doc, schema) == []
    log = (out / "cells.log").read_text()
    assert log.count("===== ") == 5 and "VITOPT_SUITE_FAULT" in log
    md = (out / "results" / "suite.md").read_text()
    assert "killed by SIGSEGV" in md and "exit code 3" in md


def test_partial_files_say_so(isolated_run, tmp_path):
    from vitopt.suite.matrix import parse_matrix
    from vitopt.suite.outputs import write_partial
    from vitopt.suite.runner import SuiteResult
    _, _, snapshots, _ = isolated_run
    first = snapshots[0]
    partial = SuiteResult(parse_matrix(MATRIX), first["machine"], first["method"],
                          first["records"], 1.0, "test", complete=False)
    written = write_partial(partial, tmp_path)
    assert json.loads(written[0].read_text())["suite"]["complete"] is False
    assert "Partial results" in written[1].read_text()


def test_budget_and_skipped_backends_need_no_process():
    from vitopt.suite.isolation import Isolation, _run_or_skip, parse_skip
    from vitopt.suite.matrix import parse_matrix
    from vitopt.suite.runner import empty_cells
    matrix = parse_matrix(MATRIX)
    cells = empty_cells(matrix.groups[0])
    spent = Isolation(timeout_s=60, budget_s=5)
    payload = _run_or_skip(matrix, 0, 0, cells[0], spent, log=lambda m: None)
    assert payload["failure"]["reason"] == "no-time" and "budget" in payload["error"]
    skip = Isolation(skip_backends=parse_skip(["onnxruntime: no loader works"]))
    vitopt_cell = cells[-1]
    object.__setattr__(vitopt_cell.config, "backend", "onnxruntime")
    payload = _run_or_skip(matrix, 0, len(cells) - 1, vitopt_cell, skip, log=lambda m: None)
    assert payload["failure"]["reason"] == "skipped" and "no loader works" in payload["error"]
    with pytest.raises(ConfigError, match="unknown backend"):
        parse_skip(["aoti"])
    with pytest.raises(ConfigError, match="too short"):
        Isolation(timeout_s=1)


# --- the GPU matrices, checked here so a typo cannot cost GPU time ---------------------------
@pytest.mark.parametrize("name", ["gpu", "gpu-quick"])
def test_gpu_matrices_resolve(name):
    from vitopt.suite import load_matrix
    from vitopt.suite.main import check_matrix_file
    matrix = load_matrix(REPO / "benchmarks" / "matrix" / f"{name}.json")
    assert matrix.device == "cuda" and matrix.cell_timeout_s <= 300
    cells = {(g.model, c.backend, c.preset, c.precision) for g in matrix.groups for c in g.vitopt}
    # gpu-quick leaves AOTInductor out: no CUDA package opened on the lent H100's image (run 4)
    assert {b for _, b, _, _ in cells} == ({"tvm"} if name == "gpu-quick" else
                                           {"tvm", "aotinductor"})
    assert {p for _, _, p, _ in cells} >= {"balanced"} and {p for *_, p in cells} == {"fp16"}
    assert all("torch-compile-max-autotune" in g.peers and "torch-eager-fp16" in g.peers
               for g in matrix.groups)
    assert check_matrix_file(str(REPO / "benchmarks" / "matrix" / f"{name}.json"),
                             build_models=False, log=lambda m: None) > 0


def test_two_call_gpu_matrices_split_the_peers_from_the_tvm_cells():
    """GPU.md's two calls: the torch peers while TVM's first wheel part travels, then TVM with
    eager again as the anchor between the two runs."""
    from vitopt.suite import load_matrix
    from vitopt.suite.main import check_matrix_file
    peers = load_matrix(REPO / "benchmarks" / "matrix" / "gpu-peers.json")
    tvm = load_matrix(REPO / "benchmarks" / "matrix" / "gpu-tvm.json")
    assert [g.peers for g in peers.groups] == [("torch-eager-fp16", "torch-compile-max-autotune")]
    assert all(not g.vitopt for g in peers.groups)
    assert [g.peers for g in tvm.groups] == [("torch-eager-fp16",)]
    assert {(c.backend, c.preset) for g in tvm.groups for c in g.vitopt} == {
        ("tvm", "none"), ("tvm", "balanced")}
    for name in ("gpu-peers", "gpu-tvm"):
        assert check_matrix_file(str(REPO / "benchmarks" / "matrix" / f"{name}.json"),
                                 build_models=False, log=lambda m: None) > 0


def test_gpu_matrix_covers_issue_7():
    from vitopt.suite import load_matrix
    matrix = load_matrix(REPO / "benchmarks" / "matrix" / "gpu.json")
    assert {(g.model, g.batches) for g in matrix.groups} == {("deit_s", (1, 64)),
                                                             ("vit_b16", (1, 64))}
    for group in matrix.groups:
        assert {(c.backend, c.preset) for c in group.vitopt} == {
            (b, p) for b in ("tvm", "aotinductor") for p in ("none", "balanced")}


@pytest.mark.parametrize("change, message", [
    ({"peers": ["ort-fp32"]}, "do not run on cuda"),
    ({"vitopt": [{"precision": "int8", "backend": "aotinductor"}]}, "not built on cuda"),
    ({"vitopt": [{"precision": "fp16", "backend": "openvino"}]}, "does not build for cuda"),
])
def test_cuda_matrix_refuses_cells_that_cannot_run_there(change, message):
    from vitopt.suite.matrix import parse_matrix
    data = {"name": "t", "device": "cuda",
            "groups": [{"model": "tiny_vit", "batches": [1], **change}]}
    with pytest.raises(ConfigError, match=message):
        parse_matrix(data)


def test_cpu_matrix_refuses_gpu_only_cells():
    from vitopt.suite.matrix import parse_matrix
    with pytest.raises(ConfigError, match="do not run on cpu"):
        parse_matrix({"name": "t", "groups": [{"model": "tiny_vit", "batches": [1],
                                               "peers": ["torch-eager-fp16"]}]})
    with pytest.raises(ConfigError, match="not built on cpu"):
        parse_matrix({"name": "t", "groups": [{"model": "tiny_vit", "batches": [1], "vitopt": [
            {"precision": "fp16", "backend": "tvm"}]}]})

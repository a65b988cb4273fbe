"""The benchmark suite: vitopt beside the engines people would use instead, in one run.

A *matrix* (a JSON file, `benchmarks/matrix/*.json`) names models, batch sizes, peers (torch
eager/autocast/compile, ONNX Runtime fp32/int8, OpenVINO fp32/bf16, OpenVINO + NNCF int8, and
on GPU torch fp16 and torch.compile max-autotune) and vitopt configurations (no passes, each
pass alone, presets, precisions). `run_suite` builds every cell, times the cells of one model
and batch in interleaved rounds, and returns one record per cell and batch; `write_outputs`
writes JSON (validated against `benchmarks/schema/bench_record.schema.json`), Markdown and PNG
plots, and `update_readme` regenerates the README's headline table from the JSON.

    from vitopt.suite import load_matrix, run_suite, write_outputs
    result = run_suite(load_matrix("benchmarks/matrix/cpu-quick.json"), log=print)
    write_outputs(result, "out/suite")

One module per job: matrix (the data files), models (builders, random init, no downloads),
peers (each engine set up as its documentation recommends), cells (vitopt and peer cells),
runner (build, check, time), isolation + cell_worker (each cell in its own process with a
time limit: always on cuda, `--isolate` elsewhere; a crash or hang is a failed record),
machine (CPU/GPU and versions), schema (a small JSON Schema validator), tables (Markdown and
the README headline), plots (PNG).
"""
from vitopt.suite.matrix import Matrix, load_matrix
from vitopt.suite.runner import SuiteResult, run_suite
from vitopt.suite.tables import update_readme
from vitopt.suite.outputs import write_outputs

__all__ = ["Matrix", "SuiteResult", "load_matrix", "run_suite", "update_readme", "write_outputs"]

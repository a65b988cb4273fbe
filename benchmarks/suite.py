"""The benchmark suite: vitopt beside torch, ONNX Runtime and OpenVINO, one matrix, one run.

    python benchmarks/suite.py benchmarks/matrix/cpu-headline.json --update-readme README.md
    python benchmarks/suite.py --quick                        # cpu-quick.json, a few minutes
    python benchmarks/suite.py benchmarks/matrix/cpu.json     # the full CPU matrix (hours)
    python benchmarks/suite.py --from benchmarks/results/.../suite.json [--update-readme README.md]
                              # tables, plots (and README headline) again from a results file
    python benchmarks/suite.py benchmarks/matrix/gpu.json --check
                              # dry run: every cell resolves, the models build (CPU, no GPU)
    python benchmarks/suite.py benchmarks/matrix/gpu-quick.json --budget-s 250
                              # on the GPU (benchmarks/gpu_check.sh runs this)

Cells run isolated, each in its own process with a time limit, on cuda (always) and with
--isolate: a crash or hang is a failed record, and suite.json/suite.md are rewritten after every
cell (vitopt/suite/isolation.py).

Matrices are data (benchmarks/matrix/*.json, format in vitopt/suite/matrix.py); results go to
benchmarks/results/<machine>/suite/ (suite.json, suite.md, PNG plots, README.md). Run timing
benchmarks under the shared lock: `flock /tmp/vitopt-bench.lock python benchmarks/suite.py ...`.
Same as `vitopt bench-suite`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("matrix", nargs="?", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="")
    parser.add_argument("--out", default=None)
    parser.add_argument("--update-readme", default=None, metavar="README")
    parser.add_argument("--isolate", action="store_true",
                        help="each cell in its own child process (always on for cuda matrices)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="isolated runs: seconds for the whole suite; cells that would start "
                             "with too little left are recorded as not run")
    parser.add_argument("--cell-timeout-s", type=float, default=None,
                        help="isolated runs: seconds per cell (default: the matrix's "
                             "cell_timeout_s, else 600)")
    parser.add_argument("--skip-backend", action="append", default=[], metavar="NAME[: why]",
                        help="isolated runs: record this backend's vitopt cells as skipped")
    parser.add_argument("--check", action="store_true",
                        help="only load the matrix, list its cells and build its models on the "
                             "CPU (a dry run; runs no cell)")
    parser.add_argument("--from", dest="source", default=None, metavar="SUITE_JSON",
                        help="regenerate suite.md, plots (and with --update-readme the README headline) "
                             "from this results file; runs nothing")
    args = parser.parse_args(argv)
    if args.source:
        from vitopt.suite import update_readme
        from vitopt.suite.outputs import rewrite_from
        for path in rewrite_from(args.source):
            print(f"wrote {path}")
        if args.update_readme:
            print(update_readme(args.update_readme, args.source,
                                repo_root=Path(args.update_readme).parent))
        return 0
    from vitopt.suite.main import check_matrix_file, run_matrix_file
    models = [m for m in args.models.split(",") if m]
    if args.check:
        check_matrix_file(args.matrix, quick=args.quick, models=models)
        return 0
    run_matrix_file(args.matrix, out=args.out, quick=args.quick, models=models,
                    readme=args.update_readme, isolate=args.isolate, budget_s=args.budget_s,
                    cell_timeout_s=args.cell_timeout_s, skip_backends=args.skip_backend,
                    argv=["python", "benchmarks/suite.py", *(argv if argv is not None else sys.argv[1:])])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark suite: vitopt beside torch, ONNX Runtime and OpenVINO, one matrix, one run.

    python benchmarks/suite.py benchmarks/matrix/cpu-headline.json --update-readme README.md
    python benchmarks/suite.py --quick                        # cpu-quick.json, a few minutes
    python benchmarks/suite.py benchmarks/matrix/cpu.json     # the full CPU matrix (hours)
    python benchmarks/suite.py --from benchmarks/results/.../suite.json [--update-readme README.md]
                              # tables, plots (and README headline) again from a results file

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
    from vitopt.suite.main import run_matrix_file
    run_matrix_file(args.matrix, out=args.out, quick=args.quick,
                    models=[m for m in args.models.split(",") if m], readme=args.update_readme,
                    argv=["python", "benchmarks/suite.py", *(argv if argv is not None else sys.argv[1:])])
    return 0


if __name__ == "__main__":
    sys.exit(main())

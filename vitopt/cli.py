"""The `vitopt` command line. Each subcommand's body is one call into the Python API.

Exit codes: 0 ok, 1 user error, 2 accuracy/numerics check failed, 3 backend or hardware
unavailable. Errors print as one message without a traceback unless --debug is given.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import List, Optional

from vitopt.errors import ConfigError, VitoptError

EXIT_CODES = """exit codes:
  0  ok
  1  user error (bad file, option, model or input)
  2  accuracy or numerics check failed
  3  backend or hardware unavailable"""


def _log(message: str) -> None:
    print(f"[vitopt] {message}", file=sys.stderr, flush=True)


# --- compile ------------------------------------------------------------------------------
def _add_option_flags(parser: argparse.ArgumentParser, options_cls) -> None:
    """One flag per CompileOptions field: names, types, defaults and help come from the field."""
    hints = typing.get_type_hints(options_cls)
    for f in dataclasses.fields(options_cls):
        name = "--" + f.metadata.get("cli_name", f.name).replace("_", "-")
        kind = hints[f.name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind)
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=help_text)
        elif f.metadata.get("repeat"):
            parser.add_argument(name, dest=f.name, action="append", default=[], help=help_text)
        elif typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            parser.add_argument(name, dest=f.name, type=_comma_list(item), default=f.default,
                                help=f"{help_text} (default: {','.join(map(str, f.default))})")
        else:
            default = f.default
            parser.add_argument(name, dest=f.name, type=base, default=default,
                                help=help_text + (f" (default: {default})" if default is not None else ""))


def _comma_list(item):
    def parse(text: str):
        try:
            return tuple(item(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {item.__name__}, got {text!r}")
    return parse


def cmd_compile(args) -> int:
    """Compile a model into an artifact for a target, and print the report."""
    from vitopt.compiler import CompileOptions, compile_model
    from vitopt.report import format_compile_report
    fields = {f.name for f in dataclasses.fields(CompileOptions)}
    options = CompileOptions(**{k: v for k, v in vars(args).items() if k in fields})
    report = compile_model(args.model, args.output, options, log=_log)
    print(format_compile_report(report))
    return 0


# --- run, inspect, passes, bench, targets ---------------------------------------------------
def cmd_run(args) -> int:
    """Run an artifact on image files and print the top-k predictions."""
    import vitopt
    runtime = vitopt.load(args.artifact, threads=args.threads)
    images = runtime.preprocess(args.images)
    outputs = runtime(images)
    for path, output in zip(args.images, outputs):
        if runtime.output_kind in ("logits", "probabilities"):
            ranked = runtime.topk(output, k=args.top)
            print(f"{path}:")
            for label, score in ranked:
                print(f"  {score:7.4f}  {label}")
        else:
            print(f"{path}: {runtime.output_kind} of shape {list(output.shape)}, "
                  f"norm {float((output ** 2).sum()) ** 0.5:.4f}")
    return 0


def cmd_inspect(args) -> int:
    """Show an artifact's manifest and its per-stage table."""
    from vitopt.artifact import read_manifest
    from vitopt.report import format_manifest
    manifest = read_manifest(args.artifact)
    print(json.dumps(manifest, indent=2) if args.json else format_manifest(manifest, args.artifact))
    return 0


def cmd_passes(args) -> int:
    """List the registered passes and the presets."""
    from vitopt.pipeline import PRESETS, registry
    passes = registry()
    width = max(len(n) for n in passes)
    for name, info in passes.items():
        kind = "exact" if info.exact else "lossy"
        options = ", ".join(f.name for f in dataclasses.fields(info.config)) or "no options"
        print(f"{name.ljust(width)}  {kind}  {info.summary}  [{options}]")
    print("\npresets:")
    for name, specs in PRESETS.items():
        print(f"  {name}: {' -> '.join(s.name for s in specs) or '(no passes)'}")
    return 0


def cmd_bench(args) -> int:
    """Time an artifact against its source model in eager PyTorch, in the same run."""
    from vitopt.bench import bench_artifact, format_bench
    rows = bench_artifact(args.artifact, batches=args.batch, runs=args.runs, model=args.model,
                          threads=args.threads, log=_log)
    print(format_bench(rows))
    return 0


def cmd_bench_suite(args) -> int:
    """Run a benchmark matrix (benchmarks/matrix/*.json): vitopt beside its peers, one run."""
    from vitopt.suite.main import check_matrix_file, run_matrix_file
    models = [m for m in (args.models or "").split(",") if m]
    if args.check:
        if args.matrix is None:
            raise ConfigError("bench-suite --check needs a matrix file, e.g. "
                              "benchmarks/matrix/gpu-quick.json")
        check_matrix_file(args.matrix, quick=args.quick, models=models)
        return 0
    run_matrix_file(args.matrix, out=args.out, quick=args.quick, models=models,
                    readme=args.update_readme, log=_log, isolate=args.isolate,
                    budget_s=args.budget_s, cell_timeout_s=args.cell_timeout_s,
                    skip_backends=args.skip_backend or ())
    return 0


def cmd_targets(args) -> int:
    """List targets and device profiles, and what this machine can build for."""
    from vitopt.targets import format_targets
    print(format_targets())
    return 0


# --- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from vitopt.compiler import CompileOptions
    parser = argparse.ArgumentParser(prog="vitopt", description=__doc__.splitlines()[0],
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help=cmd_compile.__doc__, description=cmd_compile.__doc__)
    p.add_argument("model", help="timm:NAME, hf:DIR, torchvision:NAME, builtin:digits-vit, or a file "
                                 "(.pt2, .pt/.pth TorchScript or state dict, .safetensors)")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    _add_option_flags(p, CompileOptions)
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("run", help=cmd_run.__doc__, description=cmd_run.__doc__)
    p.add_argument("artifact")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("inspect", help=cmd_inspect.__doc__, description=cmd_inspect.__doc__)
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="print the raw manifest")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("passes", help=cmd_passes.__doc__, description=cmd_passes.__doc__)
    p.set_defaults(fn=cmd_passes)

    p = sub.add_parser("bench", help=cmd_bench.__doc__, description=cmd_bench.__doc__)
    p.add_argument("artifact")
    p.add_argument("--batch", type=_comma_list(int), default=(1, 8), help="batch sizes (default 1,8)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per cell (default 20)")
    p.add_argument("--model", default=None, help="source model spec (default: the one in the manifest)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("bench-suite", help=cmd_bench_suite.__doc__,
                       description=cmd_bench_suite.__doc__)
    p.add_argument("matrix", nargs="?", default=None,
                   help="matrix file (default with --quick: benchmarks/matrix/cpu-quick.json)")
    p.add_argument("--quick", action="store_true", help="one timing round (>= 10 runs per cell)")
    p.add_argument("--models", default=None, help="only these models of the matrix (comma list)")
    p.add_argument("--out", default=None,
                   help="results folder (default: benchmarks/results/<machine>/suite)")
    p.add_argument("--update-readme", default=None, metavar="README",
                   help="regenerate README's headline table from the results")
    p.add_argument("--check", action="store_true",
                   help="only check that every cell resolves (models build and trace): no timing")
    p.add_argument("--isolate", action="store_true",
                   help="run every cell in its own process (always on for cuda matrices)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="bound the whole run (isolated cells); cells that do not fit are skipped")
    p.add_argument("--cell-timeout-s", type=float, default=None,
                   help="bound one isolated cell (default: the matrix's cell_timeout_s)")
    p.add_argument("--skip-backend", action="append", default=None, metavar="NAME[: why]",
                   help="record this backend's vitopt cells as skipped (repeatable)")
    p.set_defaults(fn=cmd_bench_suite)

    p = sub.add_parser("targets", help=cmd_targets.__doc__, description=cmd_targets.__doc__)
    p.set_defaults(fn=cmd_targets)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except VitoptError as exc:
        if args.debug:
            raise
        print(f"vitopt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vitopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Write a suite run: suite.json (checked against the record schema first), suite.md, the PNG
plots and a short README.md saying how each number was produced."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Union

from vitopt.errors import NumericsError
from vitopt.suite.plots import plot_pareto, plot_speedup
from vitopt.suite.runner import SuiteResult, __doc__ as METHOD_DOC
from vitopt.suite.schema import load_schema, validate
from vitopt.suite.tables import results_markdown

#: the schema in a source checkout (benchmarks/ is not installed with the package)
DEFAULT_SCHEMA = Path(__file__).resolve().parents[2] / "benchmarks" / "schema" / "bench_record.schema.json"


def check_document(doc: dict, schema_path: Union[str, Path] = DEFAULT_SCHEMA) -> None:
    errors = validate(doc, load_schema(schema_path))
    if errors:
        raise NumericsError(f"suite results do not match {schema_path}: " + "; ".join(errors[:10]))


def write_outputs(result: SuiteResult, out: Union[str, Path],
                  schema: Optional[Union[str, Path]] = None) -> List[Path]:
    """Write the run under `out`; validates against `schema` (default: the repo's schema when
    this is a source checkout). Returns the files written."""
    return write_document(result.to_json(), out, schema)


def write_partial(result: SuiteResult, out: Union[str, Path],
                  schema: Optional[Union[str, Path]] = None) -> List[Path]:
    """suite.json and suite.md of a run still going (suite.complete false), after each cell of
    an isolated run: a run killed from outside still leaves its finished cells."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = result.to_json()
    schema = schema or (DEFAULT_SCHEMA if DEFAULT_SCHEMA.exists() else None)
    if schema is not None:
        check_document(doc, schema)
    files = [out / "suite.json", out / "suite.md"]
    _write_atomic(files[0], json.dumps(doc, indent=1) + "\n")
    _write_atomic(files[1], results_markdown(doc))
    return files


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def rewrite_from(results: Union[str, Path], schema: Optional[Union[str, Path]] = None) -> List[Path]:
    """Regenerate suite.md, README.md and the plots next to an existing suite.json."""
    results = Path(results)
    return write_document(json.loads(results.read_text()), results.parent, schema)


def write_document(doc: dict, out: Union[str, Path],
                   schema: Optional[Union[str, Path]] = None) -> List[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    schema = schema or (DEFAULT_SCHEMA if DEFAULT_SCHEMA.exists() else None)
    if schema is not None:
        check_document(doc, schema)
    for stale in out.glob("*.png"):
        stale.unlink()
    files = [out / "suite.json", out / "suite.md", out / "README.md"]
    _write_atomic(files[0], json.dumps(doc, indent=1) + "\n")
    files[1].write_text(results_markdown(doc))
    files[2].write_text(_readme(doc))
    files += plot_pareto(doc["records"], out) + plot_speedup(doc["records"], out)
    return files


def _readme(doc: dict) -> str:
    suite, machine = doc["suite"], doc["machine"]
    method = METHOD_DOC.split("Method, recorded with the results:", 1)[1].split("A cell that", 1)[0]
    return (f"# Benchmark suite results: {suite['name']}\n\n"
            f"The latest run of `{suite['command']}` on {machine['cpu']['model']} "
            f"({machine['cpu']['cores_available']} cores, {machine['threads']} threads"
            + (f"; GPU {machine['gpu']['name']}" if machine.get("gpu") else "") + "), "
            f"{machine['date']}. The machine is shared with other work: numbers move between "
            f"runs; ratios within one run are what to compare.\n\n"
            f"- `suite.json`: one record per cell and batch (schema: "
            f"`benchmarks/schema/bench_record.schema.json`), with the machine, versions and method\n"
            f"- `suite.md`: the tables, and how each peer and vitopt configuration was set up\n"
            f"- `pareto_*.png`: top-1 on the digits proxy vs latency, Pareto front\n"
            f"- `speedup.png`: each vitopt configuration's speed-up over the best peer\n\n"
            f"How each number was produced:\n\n```\n{method.strip()}\n```\n\n"
            f"Peers: see `vitopt/suite/peers.py` (each set up as its documentation recommends); "
            f"vitopt cells: `vitopt.compiler.compile_model` then `vitopt.runtime.load`.\n")

"""The benchmark suite: the tiny matrix end to end through `vitopt bench-suite` (records, schema,
Markdown, plots, README headline), the schema validator, and the matrix loader's errors.
No speed is asserted: the tiny matrix's numbers mean nothing."""
import json
from pathlib import Path

import pytest

from vitopt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "benchmarks" / "matrix" / "tiny.json"
SCHEMA = REPO / "benchmarks" / "schema" / "bench_record.schema.json"


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    from vitopt.cli import main
    out = tmp_path_factory.mktemp("suite")
    readme = out / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- bench:headline:start -->\nold\n"
                      "<!-- bench:headline:end -->\nafter\n")
    code = main(["bench-suite", str(TINY), "--out", str(out / "results"),
                 "--update-readme", str(readme)])
    assert code == 0
    doc = json.loads((out / "results" / "suite.json").read_text())
    return out, doc, readme


def test_tiny_matrix_records_cover_every_cell_and_batch(suite_run):
    from vitopt.suite import load_matrix
    _, doc, _ = suite_run
    matrix = load_matrix(TINY)
    expected = {(g.model, b, c) for g in matrix.groups for b in g.batches
                for c in [*g.peers, *(v.name for v in g.vitopt)]}
    got = {(r["model"], r["batch"], r["cell"]) for r in doc["records"]}
    assert got == expected
    failed = [(r["cell"], r["error"]) for r in doc["records"] if r["status"] != "ok"]
    assert not failed
    for r in doc["records"]:
        assert r["latency_ms"]["samples"] >= 10
        assert r["latency_ms"]["p10"] <= r["latency_ms"]["median"] <= r["latency_ms"]["p90"]
        exact = not r["passes_applied"] or set(r["passes_applied"]) <= {"fuse_qkv", "fold_layer_scale"}
        assert r["cosine_vs_eager"] > (0.999 if exact else 0.9)   # all fp32; merging is lossy
        assert r["gflops_per_image"] > 0
        assert r["best_peer"] in {"torch-eager-fp32", "ov-fp32", "ort-fp32"}
    eager = [r for r in doc["records"] if r["cell"] == "torch-eager-fp32"]
    assert all(abs(r["speedup_vs_torch_eager"] - 1.0) < 1e-9 for r in eager)


def test_proxy_accuracy_and_flops_follow_the_passes(suite_run):
    _, doc, _ = suite_run
    proxy = {r["cell"]: r for r in doc["records"] if r["model"] == "digits_vit"}
    assert all(r["proxy"] and 0.9 <= r["top1"] <= 1.0 for r in proxy.values())
    assert proxy["vitopt merge_tokens fp32"]["passes_applied"] == ["merge_tokens"]
    merged = proxy["vitopt merge_tokens fp32"]["gflops_per_image"]
    assert merged < 0.9 * proxy["torch-eager-fp32"]["gflops_per_image"]
    assert proxy["ov-fp32"]["gflops_per_image"] == proxy["torch-eager-fp32"]["gflops_per_image"]
    tiny = {r["cell"]: r for r in doc["records"] if r["model"] == "tiny_vit" and r["batch"] == 1}
    # exact passes: only trim_last_block changes the FLOPs (the last block's class row only)
    lossless, eager = (tiny[cell]["gflops_per_image"]
                       for cell in ("vitopt lossless fp32", "torch-eager-fp32"))
    assert 0.5 * eager < lossless < eager
    assert all(r["top1"] is None for r in doc["records"] if r["model"] == "tiny_vit")


def test_results_validate_against_the_schema_file(suite_run):
    from vitopt.suite.schema import load_schema, validate
    _, doc, _ = suite_run
    schema = load_schema(SCHEMA)
    assert validate(doc, schema) == []
    broken = json.loads(json.dumps(doc))
    broken["records"][0]["latency_ms"]["samples"] = 3
    del broken["records"][1]["status"]
    broken["records"][2]["kind"] = "other"
    broken["machine"]["extra"] = 1
    errors = validate(broken, schema)
    assert any("records[0].latency_ms.samples" in e and "minimum" in e for e in errors)
    assert any("records[1]" in e and "'status'" in e for e in errors)
    assert any("records[2].kind" in e for e in errors)
    assert any("unexpected key 'extra'" in e for e in errors)


def test_markdown_plots_and_readme_headline(suite_run):
    out, doc, readme = suite_run
    results = out / "results"
    md = (results / "suite.md").read_text()
    assert "## Headline" in md and "### batch 2" in md and "How each cell was set up" in md
    for png in ("speedup.png", "pareto_digits_vit_b2.png"):
        assert (results / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "How each number was produced" in (results / "README.md").read_text()
    text = readme.read_text()
    assert "old" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert "| digits_vit | 2 |" in text and "| tiny_vit | 3 |" in text
    # regenerating from the same file gives the same section: nothing typed by hand survives
    from vitopt.suite import update_readme
    before = readme.read_text()
    update_readme(readme, results / "suite.json", repo_root=out)
    assert readme.read_text() == before


def test_headline_picks_the_fastest_preset_and_its_ratio():
    from vitopt.suite.tables import headline_rows

    def record(cell, kind, config_kind, median, best_peer="ov-bf16", best_ms=10.0):
        return {"model": "m", "batch": 8, "cell": cell, "kind": kind, "config_kind": config_kind,
                "status": "ok", "latency_ms": {"median": median}, "best_peer": best_peer,
                "speedup_vs_best_peer": best_ms / median, "top1": None,
                "passes_applied": ["merge_tokens"] if "balanced" in cell else []}

    rows = headline_rows([record("torch-eager-fp32", "peer", "peer", 40.0),
                          record("ov-bf16", "peer", "peer", 10.0),
                          record("vitopt none bf16", "vitopt", "baseline", 4.0),
                          record("vitopt balanced bf16", "vitopt", "preset", 8.0),
                          record("vitopt lossless bf16", "vitopt", "preset", 9.5)])
    assert rows[0]["vitopt"].startswith("vitopt balanced bf16")   # baseline is not a preset
    assert rows[0]["ratio"] == pytest.approx(1.25)
    assert rows[0]["torch-eager-fp32"] == 40.0 and rows[0]["ov-nncf-int8"] is None
    assert rows[0]["plain"].startswith("vitopt none bf16 4.00")   # fastest without merging
    # exact passes (trim_last_block included) and int8 count as "without token reduction"
    trimmed = record("vitopt lossless int8", "vitopt", "preset", 3.0)
    trimmed["passes_applied"] = ["fuse_qkv", "trim_last_block", "quantize_int8"]
    merged = record("vitopt fast int8", "vitopt", "preset", 2.0)
    merged["passes_applied"] = ["merge_tokens", "trim_last_block", "quantize_int8"]
    rows = headline_rows([record("ov-bf16", "peer", "peer", 10.0), trimmed, merged])
    assert rows[0]["vitopt"].startswith("vitopt fast int8")
    assert rows[0]["plain"].startswith("vitopt lossless int8 3.00")


def test_pareto_front():
    from vitopt.suite.plots import pareto_front
    points = [(1.0, 0.90), (2.0, 0.95), (1.5, 0.89), (3.0, 0.95), (2.5, 0.97)]
    assert pareto_front(points) == [(1.0, 0.90), (2.0, 0.95), (2.5, 0.97)]


@pytest.mark.parametrize("change, message", [
    ({"groups": [{"model": "nope", "batches": [1]}]}, "unknown model"),
    ({"groups": [{"model": "tiny_vit", "batches": [1], "peers": ["tensorrt"]}]}, "unknown peer"),
    ({"groups": [{"model": "tiny_vit", "batches": [0]}]}, "positive integers"),
    ({"timing": {"runs": 5}}, "runs >= 10"),
    ({"groups": [{"model": "tiny_vit", "batches": [1], "vitopt": [{"preset": "turbo"}]}]},
     "unknown preset"),
    ({"groups": [{"model": "tiny_vit", "batches": [1], "vitopt": [{"precision": "int4"}]}]},
     "precision"),
    ({"colour": "red"}, "unknown key"),
])
def test_matrix_errors_name_the_bad_entry(change, message):
    from vitopt.suite.matrix import parse_matrix
    data = {"name": "t", "groups": [{"model": "tiny_vit", "batches": [1]}], **change}
    with pytest.raises(ConfigError, match=message):
        parse_matrix(data)


def test_every_committed_matrix_loads():
    from vitopt.suite import load_matrix
    names = {p.stem for p in (REPO / "benchmarks" / "matrix").glob("*.json")}
    assert {"cpu", "cpu-quick", "tiny", "gpu"} <= names
    for path in (REPO / "benchmarks" / "matrix").glob("*.json"):
        assert load_matrix(path).groups


def test_schema_refuses_keywords_it_does_not_check(tmp_path):
    from vitopt.suite.schema import load_schema
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"type": "object", "properties": {"a": {"pattern": "x"}}}))
    with pytest.raises(ConfigError, match="pattern"):
        load_schema(path)


def test_cli_check_resolves_a_matrix_without_timing(capsys):
    from vitopt.cli import main
    assert main(["bench-suite", str(TINY), "--check"]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["bench-suite", "--check"]) == 1  # no matrix: a clear error, not a traceback
    assert "needs a matrix file" in capsys.readouterr().err

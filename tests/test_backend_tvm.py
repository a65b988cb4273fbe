"""TVM backend: llvm library against the IR, build record and refusals, CUDA cross-compilation
(no GPU needed), the tuning database's reuse, bad options; a GPU-marked CUDA run.

One depth-1 tiny ViT is compiled once per module for llvm (about 10-20 s on two cores) and once
per CUDA arch (NVRTC, about 20-40 s). The tuning test tunes the tiny model's GEMM tasks with a
budget of one trial each, then compiles again and checks that nothing new was tuned.
"""
import json

import numpy as np
import pytest
import torch
from build_copies import copy_built

tvm = pytest.importorskip("tvm", reason="the TVM backend needs apache-tvm (pip install vitopt[tvm])")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from vitopt.backends import BACKENDS, get_backend  # noqa: E402
from vitopt.backends import tvm as tvm_backend  # noqa: E402
from vitopt.backends import tvm_targets, tvm_tuning  # noqa: E402
from vitopt.compiler import CompileOptions, compile_model  # noqa: E402
from vitopt.errors import ArtifactError, BackendUnavailableError, ConfigError  # noqa: E402
from vitopt.frontend.trace import trace  # noqa: E402
from vitopt.runtime import load as load_artifact  # noqa: E402
from vitopt.tolerances import compare  # noqa: E402

HAS_GPU = tvm_targets.visible_cuda_arch() is not None
NO_GPU = "needs an NVIDIA GPU that TVM sees (tvm.cuda(0).exist is False)"


def tiny_ir():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=20, patch_size=4, embed_dim=36, depth=1, num_heads=3,
                              num_classes=5).eval()
    return trace(model, torch.randn(2, 3, 20, 20))


def images(batch, seed=1):
    return torch.randn(batch, 3, 20, 20, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ir():
    return tiny_ir()


@pytest.fixture(scope="module")
def llvm_library(ir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tvm-llvm")
    files = get_backend("tvm").build_module(ir, images(2), out, precision="fp32", max_batch=4)
    return out, files


def copy_library(built, dest, **record_changes):
    return copy_built(built, dest, tvm_backend.RECORD, **record_changes)


def test_registered_and_available():
    assert "tvm" in BACKENDS
    backend = get_backend("tvm")
    assert backend.available() == (True, "")
    assert backend.input_format == "torch" and backend.version() == tvm.__version__


def test_llvm_library_matches_ir(ir, llvm_library):
    out, files = llvm_library
    assert files == [tvm_backend.LIBRARY, tvm_backend.RECORD]
    engine = get_backend("tvm").load(out, files, precision="fp32")
    for batch in (1, 3):
        x = images(batch)
        with torch.no_grad():
            expected = ir(x).numpy()
        actual = engine.run(x.numpy())
        assert actual.dtype == np.float32 and actual.shape == expected.shape
        result = compare(actual, expected, "fp32", "tvm")
        assert result.ok, result


def test_llvm_record(llvm_library):
    out, _ = llvm_library
    record = json.loads((out / tvm_backend.RECORD).read_text())
    host = tvm_targets.host_cpu()
    assert record["device"] == "cpu" and record["dtype"] == "float32" and record["max_batch"] == 4
    assert record["target"]["kind"] == "llvm" and record["target"]["mcpu"] == host["cpu"]
    assert set(record["cpu"]["features"]) <= set(host["features"]) and record["cpu"]["features"]
    assert record["batch_plan"] == {"mode": "per-image", "batch": 1}
    assert record["tuning"]["trials"] == 0 and record["tvm"] == tvm.__version__


def test_load_refuses_cpu_features_this_cpu_lacks(llvm_library, tmp_path):
    lacking = tvm_targets.host_cpu()["lacks"]
    if not lacking:
        pytest.skip("this CPU has every feature LLVM checks for")
    out, files = llvm_library
    record = json.loads((out / tvm_backend.RECORD).read_text())
    cpu = dict(record["cpu"], features=record["cpu"]["features"] + [lacking[0]])
    dest, files = copy_library(llvm_library, tmp_path, cpu=cpu)
    with pytest.raises(BackendUnavailableError, match=lacking[0]):
        get_backend("tvm").load(dest, files, precision="fp32")


def test_load_refuses_other_precision_and_bad_record(llvm_library, tmp_path):
    out, files = llvm_library
    with pytest.raises(ArtifactError, match="fp16"):
        get_backend("tvm").load(out, files, precision="fp16")
    dest, files = copy_library(llvm_library, tmp_path)
    (dest / tvm_backend.RECORD).write_text("{\"device\": \"tpu\"}")
    with pytest.raises(ArtifactError, match="not a TVM build record"):
        get_backend("tvm").load(dest, files, precision="fp32")


def test_compile_model_round_trip(ir, tmp_path):
    out = tmp_path / "tiny.vitopt"
    report = compile_model(ir, out, target="cpu", backend="tvm", max_batch=4, measure=False)
    assert report.manifest["backend"]["name"] == "tvm"
    assert report.manifest["checks"]["engine_vs_ir_ok"]
    runtime = load_artifact(out)
    x = images(3, seed=5)
    with torch.no_grad():
        expected = ir(x).numpy()
    assert compare(runtime(x.numpy()), expected, "fp32", "tvm").ok


def test_token_merging_lowers_through_tvm(ir, tmp_path):
    """merge_tokens reduces with aten.amax, which TVM's importer lacks: vitopt/lower/tvm_aten_ops."""
    from vitopt.pipeline import run_pipeline

    merged = run_pipeline(ir, "none", ["merge_tokens:r=2"]).ir
    assert any(stage.kind == "merge" for stage in merged.stages)
    backend = get_backend("tvm")
    files = backend.build_module(merged, images(2), tmp_path / "m", precision="fp32", max_batch=2)
    engine = backend.load(tmp_path / "m", files, precision="fp32")
    x = images(2, seed=7)
    with torch.no_grad():
        assert compare(engine.run(x.numpy()), merged(x).numpy(), "fp32", "tvm").ok


@pytest.mark.parametrize("arch", ["sm_90"])  # sm_80: test_tvm_stage_import's cross-compile
def test_cuda_cross_compile_without_gpu(ir, tmp_path, arch):
    if HAS_GPU:
        pytest.skip("this machine has a GPU; cross-compilation is the path for machines without")
    out = tmp_path / f"tiny-{arch}.vitopt"
    logs = []
    report = compile_model(ir, out, target="cuda", backend="tvm", cuda_arch=arch, max_batch=4,
                           precision="fp16", log=logs.append)
    manifest = report.manifest
    note = f"cross-compiled for {arch}, not run on this machine"
    assert manifest["checks"] == {"cross_compiled": note} and manifest["latency"] == []
    assert any(note in line for line in logs)
    record = json.loads((out / tvm_backend.RECORD).read_text())
    assert record["cuda_arch"] == arch and record["cross_compiled"] is True
    assert record["target"]["kind"] == "cuda" and record["target"]["arch"] == arch
    assert record["precision"] == "fp16" and record["batch_plan"]["mode"] == "dynamic"
    assert (out / tvm_backend.LIBRARY).stat().st_size > 0
    with pytest.raises(BackendUnavailableError, match=f"CUDA library for {arch}.*no CUDA GPU"):
        load_artifact(out)


def test_cuda_without_arch_or_gpu_is_refused(ir, tmp_path):
    if HAS_GPU:
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendUnavailableError, match="--cuda-arch"):
        get_backend("tvm").build_module(ir, images(2), tmp_path, precision="fp16", max_batch=2,
                                        device="cuda")


def test_bad_options(ir, tmp_path):
    with pytest.raises(ConfigError, match="sm_99"):
        CompileOptions(target="cuda", backend="tvm", cuda_arch="sm_99")
    with pytest.raises(ConfigError, match="sm_XX|unknown CUDA"):
        CompileOptions(cuda_arch="hopper")
    with pytest.raises(ConfigError, match="tune-trials"):
        CompileOptions(backend="tvm", tune_trials=-1)
    backend = get_backend("tvm")
    with pytest.raises(ConfigError, match="tune_trials"):
        backend.build_module(ir, images(2), tmp_path, precision="fp32", max_batch=2,
                             tune_trials=-3)
    with pytest.raises(ConfigError, match="fp32 only"):
        backend.build_module(ir, images(2), tmp_path, precision="fp16", max_batch=2)
    with pytest.raises(ConfigError, match="--backend tvm"):
        compile_model(ir, tmp_path / "x.vitopt", backend="onnxruntime", tune_trials=4,
                      measure=False)
    assert CompileOptions(cuda_arch="SM_80").cuda_arch == "sm_80"


def test_database_location(tmp_path, monkeypatch):
    target = {"kind": "llvm", "mcpu": "x"}
    monkeypatch.setenv(tvm_tuning.CACHE_ENV, str(tmp_path / "cache"))
    folder = tvm_tuning.database_dir(target)
    assert folder.parent == tmp_path / "cache" / "tvm" and (folder / "target.json").is_file()
    explicit = tvm_tuning.database_dir(target, str(tmp_path / "db"))
    assert explicit.parent == tmp_path / "db"
    other = tvm_tuning.database_dir({"kind": "llvm", "mcpu": "y"}, str(tmp_path / "db"))
    assert other != explicit  # keyed by target
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        tvm_tuning.database_dir(target, str(tmp_path / "file"))


def test_tuning_database_is_reused(ir, tmp_path):
    backend = get_backend("tvm")
    db = tmp_path / "db"
    tasks = [t for t in tvm_tuning.extract_tasks(
        tvm_backend.prepare(tvm_backend.import_module(ir, images(2), {"batch": 1}, 1),
                            tvm_targets.llvm_target()), tvm_targets.llvm_target())
             if any(a in t.task_name for a in tvm_tuning.ANCHORS)]
    records = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        logs = []
        files = backend.build_module(ir, images(2), out, precision="fp32", max_batch=2,
                                     tune_trials=len(tasks), tuning_db=str(db), log=logs.append)
        records.append(json.loads((out / tvm_backend.RECORD).read_text())["tuning"])
        engine = backend.load(out, files, precision="fp32")
        with torch.no_grad():
            assert compare(engine.run(images(2).numpy()), ir(images(2)).numpy(), "fp32", "tvm").ok
    first, second = records
    assert first["new_tasks"] == len(tasks) and first["trials_run"] >= len(tasks)
    assert second["new_tasks"] == 0 and second["trials_run"] == 0
    assert second["reused_tasks"] == len(tasks)


def test_search_population_follows_the_trial_budget():
    assert tvm_tuning.population_size(1) == 64
    assert tvm_tuning.population_size(8) == 128
    assert tvm_tuning.population_size(32) == tvm_tuning.population_size(500) == 512


def _add_one_module(gpu_only=False):
    """b = a + 1; with gpu_only, b = a GPU warp intrinsic, which an llvm build rejects."""
    from tvm import te

    a = te.placeholder((8,), "float32", name="a")
    if gpu_only:
        b = te.compute((8,), lambda i: tvm.tirx.call_intrin("float32", "tirx.tvm_warp_activemask"))
    else:
        b = te.compute((8,), lambda i: a[i] + 1.0, name="b")
    return tvm.IRModule({"main": te.create_prim_func([a, b])})


def test_reused_worker_builder_builds_batches_and_reports_failures():
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.target import Target

    from vitopt.backends.tvm_builder import reused_worker_builder

    builder = reused_worker_builder(1, 120, tvm_tuning.load_tensor_intrinsics)
    try:
        target = Target(tvm_targets.llvm_target())
        for _ in range(2):  # two batches through the same pool
            good, = builder.build([BuilderInput(_add_one_module(), target)])
            assert good.error_msg is None and good.artifact_path.endswith(".tar")
        bad, = builder.build([BuilderInput(_add_one_module(gpu_only=True), target)])
        assert bad.artifact_path is None and "the build raised" in bad.error_msg
    finally:
        builder.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)
def test_cuda_fp16_on_gpu_matches_ir(ir, tmp_path):
    backend = get_backend("tvm")
    files = backend.build_module(ir, images(2), tmp_path, precision="fp16", max_batch=4,
                                 device="cuda")
    record = json.loads((tmp_path / tvm_backend.RECORD).read_text())
    assert record["cross_compiled"] is False and record["cuda_arch"] == tvm_targets.visible_cuda_arch()
    engine = backend.load(tmp_path, files, precision="fp16")
    for batch in (1, 3):
        x = images(batch)
        with torch.no_grad():
            expected = ir(x).numpy()
        result = compare(engine.run(x.numpy()), expected, "fp16", "tvm")
        assert result.ok, result

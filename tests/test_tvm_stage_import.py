"""TVM stage-by-stage lowering (vitopt/backends/tvm_stage_import.py): which stages share a
function, the llvm library against the IR, CUDA cross-compilation, when it declines.

The model is a depth-3 tiny ViT with token merging (r=2 per block), so its blocks run at three
token counts (17, 15, 13): the whole-model import would lower each block's functions once per
count, the stage import once (merges: once per parity of the count). That the stage and
whole-model libraries agree follows from both matching the IR; test_backend_tvm covers the
whole-model one.
"""
import json

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm", reason="the TVM backend needs apache-tvm (pip install vitopt[tvm])")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from vitopt.backends import get_backend  # noqa: E402
from vitopt.backends import tvm as tvm_backend  # noqa: E402
from vitopt.backends import tvm_stage_import as stage_import  # noqa: E402
from vitopt.backends import tvm_targets  # noqa: E402
from vitopt.errors import ConfigError  # noqa: E402
from vitopt.frontend.trace import trace  # noqa: E402
from vitopt.pipeline import run_pipeline  # noqa: E402
from vitopt.tolerances import compare  # noqa: E402

HAS_GPU = tvm_targets.visible_cuda_arch() is not None


def images(batch, seed=1):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def plain_ir():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=2,
                              num_classes=5).eval()
    return trace(model, images(2))


@pytest.fixture(scope="module")
def merged_ir(plain_ir):
    merged = run_pipeline(plain_ir, "none", ["merge_tokens:r=2"]).ir
    attention_tokens = [n for stage, n in zip(merged.stages, merged.token_counts())
                        if stage.kind == "attn"]
    assert attention_tokens == [17, 15, 13]
    return merged


@pytest.fixture(scope="module")
def llvm_build(merged_ir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tvm-stages")
    logs = []
    files = get_backend("tvm").build_module(merged_ir, images(2), out, precision="fp32",
                                            max_batch=4, log=logs.append)
    return out, files, logs


def test_stages_of_one_kind_share_a_key(merged_ir):
    states = stage_import.stage_states(merged_ir, images(2))
    groups = stage_import.group_stages(merged_ir, states)
    kinds = {tuple(merged_ir.stages[i].kind for i in members): members for members in groups}
    # attn0 sees no token sizes yet, so it has its own key; attn1 and attn2 share one.
    attention = [m for m in groups if merged_ir.stages[m[0]].kind == "attn"]
    assert [len(m) for m in attention] == [1, 2]
    assert [len(m) for m in groups if merged_ir.stages[m[0]].kind == "mlp"] == [3]
    assert ("stem",) in kinds and ("head",) in kinds


def test_structure_key_tells_different_computations_apart(merged_ir):
    attn1, attn2 = [s for s in merged_ir.stages if s.kind == "attn"][1:]
    assert stage_import.structure_key(attn1) == stage_import.structure_key(attn2)
    other = attn2.__class__.__new__(attn2.__class__)
    other.__dict__.update(attn2.__dict__)
    other.__dict__["scale"] = attn2.scale * 2          # a different softmax scale
    assert stage_import.structure_key(other) != stage_import.structure_key(attn1)
    # a tensor held as a plain attribute is baked into the export: its values count
    attn1.extra, attn2.extra = torch.zeros(2), torch.ones(2)
    try:
        assert stage_import.structure_key(attn1) != stage_import.structure_key(attn2)
    finally:
        del attn1.extra, attn2.extra


def test_import_shares_functions_lifts_weight_work_and_cross_compiles(merged_ir, tmp_path):
    """The CUDA plan (symbolic batch, fp16): one import, checked, then compiled for sm_80
    (sm_90: test_backend_tvm's whole-model cross-compile); no GPU needed."""
    mod, summary = stage_import.import_stages(
        merged_ir, images(2), {"batch": None}, 4,
        transform=lambda m: tvm_backend.after_import(m, "fp16", True))
    assert summary["lowering"] == "stage functions" and summary["stages"] == len(merged_ir.stages)
    shared = {(s["kind"], s["stages"], s["tokens"]) for s in summary["shared"]}
    assert ("mlp", 3, "symbolic, 11..15") in shared and ("attn", 2, "symbolic, 13..15") in shared
    # merges 1 and 2 (15 and 13 tokens, with sizes): their A/B split depends on the count's
    # parity, so they share a function over counts 2 * half + 1
    assert ("merge", 2, "2 * half + 1, 13..15") in shared
    assert summary["functions"] < len(merged_ir.stages)
    functions = {gvar.name_hint: func for gvar, func in mod.functions_items()
                 if isinstance(func, tvm.relax.Function)}
    assert "main" in functions and not any(n.endswith("_transform_params") for n in functions)
    # the shared attention function takes its qkv and proj weights transposed ([in, out]) and
    # in fp16: LiftTransformParams moved the transposes and casts out, to run once at build
    # time (the proj weight only since tvm_rewrites stopped broadcasting it over the batch)
    attn = functions[next(n for n in functions if n.endswith("_attn") and n != "stage1_attn")]
    weights = {(tuple(int(d) for d in p.ty.shape), str(p.ty.dtype)) for p in attn.params
               if all(isinstance(d, tvm.tirx.IntImm) for d in p.ty.shape)}
    assert ((24, 72), "float16") in weights and ((24, 24), "float16") in weights
    assert not any(shape == (72, 24) or dtype == "float32" and len(shape) == 2
                   for shape, dtype in weights)
    target = tvm_backend.TVMBackend.target_for("cuda", "sm_80")
    with tvm_backend.fast_inspect_stack():
        tvm_backend.compile_library(tvm_backend.prepare(mod, target), target,
                                    tmp_path / "model.so", None)
    assert (tmp_path / "model.so").stat().st_size > 0


def test_llvm_library_matches_ir(merged_ir, llvm_build):
    out, files, logs = llvm_build
    record = json.loads((out / tvm_backend.RECORD).read_text())
    assert record["lowering"]["mode"] == "stages" and "3 token counts" in record["lowering"]["why"]
    assert any("TVM lowering: stages" in line for line in logs)
    engine = get_backend("tvm").load(out, files, precision="fp32")
    for batch in (1, 3):
        x = images(batch, seed=batch)
        with torch.no_grad():
            expected = merged_ir(x).numpy()
        actual = engine.run(x.numpy())
        assert actual.shape == expected.shape
        result = compare(actual, expected, "fp32", "tvm")
        assert result.ok, result
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


class _ShapeBranch(torch.nn.Module):
    """A stage whose code branches on its token count: no symbolic count can export it."""

    kind = "branch"

    def forward(self, state):
        return state.with_x(state.x * 2 if state.x.shape[1] > 14 else state.x)


def test_a_stage_that_fixes_its_count_gets_one_function_per_count():
    from types import SimpleNamespace

    from vitopt.ir.state import TokenState

    stages = [_ShapeBranch() for _ in range(3)]
    states = [TokenState(torch.randn(1, n, 4)) for n in (17, 15, 13)]
    ir = SimpleNamespace(stages=stages)
    logs = []
    made = list(stage_import._group_modules(ir, states + [states[-1]], [0, 1, 2], None,
                                            logs.append))
    assert [(members, carrier, tokens) for members, _, carrier, tokens in made] == [
        ([0], False, 17), ([1], False, 15), ([2], False, 13)]
    assert any("3 branch stages keep one function per token count: neither a symbolic count"
               in line for line in logs)


def test_auto_declines_where_it_does_not_apply(plain_ir, merged_ir):
    choose = tvm_backend.choose_lowering
    assert choose(plain_ir, "auto", 0) == ("whole", "every block runs at one token count")
    mode, why = choose(merged_ir, "auto", 8)
    assert mode == "whole" and "MetaSchedule" in why
    mode, why = choose(torch.nn.Identity(), "auto", 0)
    assert mode == "whole" and "not an EncoderIR" in why
    assert choose(merged_ir, "auto", 0)[0] == "stages"
    assert choose(plain_ir, "stages", 0) == ("stages", "asked for")
    with pytest.raises(ConfigError, match="does not apply: MetaSchedule"):
        choose(merged_ir, "stages", 8)
    with pytest.raises(ConfigError, match="not an EncoderIR"):
        choose(torch.nn.Identity(), "stages", 0)
    with pytest.raises(ConfigError, match="unknown TVM lowering 'fast'"):
        choose(merged_ir, "fast", 0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU that TVM sees")
def test_cuda_fp16_stage_functions_on_gpu_match_ir(merged_ir, tmp_path):
    backend = get_backend("tvm")
    files = backend.build_module(merged_ir, images(2), tmp_path, precision="fp16", max_batch=4,
                                 device="cuda")
    assert json.loads((tmp_path / tvm_backend.RECORD).read_text())["lowering"]["mode"] == "stages"
    engine = backend.load(tmp_path, files, precision="fp16")
    for batch in (1, 4):
        x = images(batch, seed=batch)
        with torch.no_grad():
            expected = merged_ir(x).numpy()
        result = compare(engine.run(x.numpy()), expected, "fp16", "tvm")
        assert result.ok, result

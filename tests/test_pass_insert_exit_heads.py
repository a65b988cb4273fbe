"""insert_exit_heads: structure, exactness when nobody exits, segmented engines, declines, errors."""
import functools

import numpy as np
import pytest
import torch

from pass_checks import check_declines, check_lossy_pass, run_pass
from vitopt.errors import ConfigError
from vitopt.exits.calibrate import set_thresholds
from vitopt.exits.segments import all_exit_logits, plan_segments, run_with_exits
from vitopt.ir.exits import exit_stages
from vitopt.ir.stages import Mlp
from vitopt.pipeline import PassSpec, Pipeline, resolve_pipeline
from vitopt.tolerances import compare


@functools.lru_cache(maxsize=None)
def deep_tiny(pool: str = "token"):
    """A 4-block timm ViT with awkward sizes (20x20 images, 25 patches, width 36, 7 classes)."""
    import timm
    from vitopt.frontend.trace import trace
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=20, patch_size=4,
                              embed_dim=36, depth=4, num_heads=3, num_classes=7, global_pool=pool,
                              class_token=pool == "token").eval()
    images = torch.randn(8, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    return model, images, trace(model, images[:2])


def _exits_at_median(ir, images):
    """Thresholds at each exit's median confidence on `images`: about half exit at each head."""
    from vitopt.exits.rules import scores
    logits, _, _ = all_exit_logits(ir, images)
    set_thresholds(ir, "confidence", [float(np.median(scores("confidence", l.numpy()))) for l in logits])


def test_structure_and_the_ir_output_stays_exact():
    _, images, ir = deep_tiny()

    def structure(new):
        heads = exit_stages(new)
        assert [h.block for h in heads] == [0, 2] and [h.head for h in heads] == ["attn_pool", "linear"]
        for head in heads:
            before = new.stages[list(new.stages).index(head) - 1]
            assert isinstance(before, Mlp) and before.block == head.block
            assert head.rule == "confidence" and head.threshold == 1.0  # never exits yet
        names = [row["name"] for row in new.table()]
        assert "exit0" in names and "exit2" in names

    result = check_lossy_pass(ir, "insert_exit_heads", structure, images, blocks=(2, 0))
    new = result.ir
    assert result.records[0].stats["blocks"] == [0, 2]
    linear = run_pass(ir, "insert_exit_heads", blocks=(0, 2), head="linear").ir
    assert [h.head for h in exit_stages(linear)] == ["linear", "linear"]
    with torch.no_grad():
        assert torch.equal(new(images), ir(images))
        out, taken = run_with_exits(new, images)
    assert torch.equal(out, ir(images)) and (taken == 2).all()


def test_auto_blocks_and_heads_follow_the_depth():
    _, images, ir = deep_tiny()
    new = run_pass(ir, "insert_exit_heads").ir
    heads = exit_stages(new)
    assert [h.block for h in heads] == [0, 1, 2]
    assert [h.head for h in heads] == ["attn_pool", "attn_pool", "linear"]  # first third: < 4/3
    assert plan_segments(new).bounds[0][0] == 0 and len(plan_segments(new).bounds) == 4


def test_reference_executor_with_exits_matches_per_sample_decisions():
    _, images, ir = deep_tiny()
    new = run_pass(ir, "insert_exit_heads", blocks=(0, 2)).ir
    _exits_at_median(new, images)
    logits, final, _ = all_exit_logits(new, images)
    out, taken = run_with_exits(new, images)
    assert 0 < (taken < 2).sum() < len(taken)
    expected = torch.stack([(logits + [final])[k][i] for i, k in enumerate(taken)])
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.fixture(scope="module")
def merged_with_exits(tmp_path_factory):
    """merge_tokens (r=2 per block) + exits after blocks 0 (attn_pool) and 2 (linear), exported
    once as segments and built for ONNX Runtime and OpenVINO."""
    from vitopt.backends import get_backend
    from vitopt.exits.lower import build_exported, export_segments
    _, images, ir = deep_tiny()
    new = Pipeline([PassSpec("merge_tokens", {"r": 2}),
                    PassSpec("insert_exit_heads", {"blocks": (0, 2)})]).run(ir).ir
    tmp = tmp_path_factory.mktemp("segments")
    exported, plan = export_segments(new, images[:3], tmp / "onnx")
    engines = {}
    for name in ("onnxruntime", "openvino"):
        backend = get_backend(name)
        built = build_exported(exported, plan, backend, tmp / name, precision="fp32", max_batch=8)
        engines[name] = ([backend.load(tmp / name, s["files"], precision="fp32") for s in built], built)
    return new, images, plan, engines


@pytest.mark.parametrize("backend_name", ["onnxruntime", "openvino"])
def test_segmented_engines_after_merging_match_the_ir(backend_name, merged_with_exits):
    from vitopt.exits.segments import heads_config
    from vitopt.segmented import SegmentedEngine
    ir, images, plan, engines = merged_with_exits
    ir = ir.clone()
    parts, built = engines[backend_name]
    assert plan.size_in == [False, True, True] and plan.tokens_in[1] == 26 - 2
    assert built[0]["inputs"] == ["images"] and built[0]["outputs"] == ["logits", "tokens", "size"]
    assert built[1]["inputs"] == ["tokens_in", "size_in"] and built[2]["outputs"] == ["output"]
    engine = SegmentedEngine(parts, *heads_config(ir))
    with torch.no_grad():
        expected = ir(images)  # == the merged model without exits
    for batch in (1, 3, 8):  # never exiting: the model without exits, within tolerance
        assert compare(engine.run(images[:batch].numpy()), expected[:batch], "fp32", backend_name).ok
    _exits_at_median(ir, images)
    engine = SegmentedEngine(parts, *heads_config(ir))
    reference, ref_taken = run_with_exits(ir, images)
    out, taken = engine.run_with_exits(images.numpy())
    assert (taken == ref_taken).all() and 0 < (taken < 2).sum() < 8
    assert compare(out, reference, "fp32", backend_name).ok
    one_by_one = np.concatenate([engine.run(images[i:i + 1].numpy()) for i in range(8)])
    assert np.allclose(one_by_one, out, atol=1e-4)  # compaction keeps every sample's own output


def test_exits_do_not_change_the_merged_model():
    _, images, ir = deep_tiny()
    merged = Pipeline([PassSpec("merge_tokens", {"r": 2})]).run(ir).ir
    both = Pipeline([PassSpec("merge_tokens", {"r": 2}),
                     PassSpec("insert_exit_heads", {"blocks": (1, 2)})]).run(ir).ir
    with torch.no_grad():
        assert torch.equal(both(images), merged(images))
        out, taken = run_with_exits(both, images)
    assert torch.equal(out, merged(images)) and (taken == 2).all()


def test_mean_pooled_model_gets_mean_pooled_heads():
    _, images, ir = deep_tiny("avg")
    new = run_pass(ir, "insert_exit_heads", blocks=(1,), head="linear").ir
    head = exit_stages(new)[0]
    assert head.pool == "mean" and head.num_prefix_tokens == 0
    logits, _, _ = all_exit_logits(new, images)
    assert logits[0].shape == (8, 7)


def test_declines_where_exits_cannot_apply(traced_family):
    _, _, siglip = traced_family("hf_siglip_vision")  # features output, no classifier
    check_declines(siglip, "insert_exit_heads", "classifier", blocks=(0,))
    _, _, ir = deep_tiny()
    features = ir.clone()
    features.meta.output = "features"  # e.g. a CLIP image embedding: nothing to distil
    check_declines(features, "insert_exit_heads", "outputs features", blocks=(0,))
    once = run_pass(ir, "insert_exit_heads", blocks=(1,)).ir
    check_declines(once, "insert_exit_heads", "already has exit heads", blocks=(1,))


@pytest.mark.parametrize("options,match", [
    ({"blocks": (4,)}, r"cannot exit after block 4: the model has 4 blocks"),
    ({"blocks": (3,)}, r"exit after the last block"),
    ({"blocks": (-1,)}, r"cannot exit after block -1"),
    ({"blocks": (1,), "thresholds": (1.5,)}, r"confidence threshold 1.5 is outside \[0, 1\]"),
    ({"blocks": (1,), "rule": "entropy", "thresholds": (-1.0,)}, "entropy threshold -1.0"),
    ({"blocks": (1,), "rule": "patience", "thresholds": (0.5,)}, "integer >= 1"),
])
def test_bad_exit_options_are_config_errors(options, match):
    _, _, ir = deep_tiny()
    with pytest.raises(ConfigError, match=match):
        run_pass(ir, "insert_exit_heads", **options)


@pytest.mark.parametrize("option,match", [
    ("head=conv", "head 'conv'"), ("rule=max", "rule 'max'"), ("blocks=1,1", "repeat"),
    ("blocks=1,2:thresholds=0.5", "2 exit blocks"),
])
def test_bad_exit_pass_options_fail_before_running(option, match):
    with pytest.raises(ConfigError, match=match):
        resolve_pipeline("none", [f"insert_exit_heads:{option}"])


def test_training_data_whose_classes_do_not_match_the_head(tmp_path):
    from vitopt.exits.data import exit_datasets
    from vitopt.exits.train import check_labels
    _, images, ir = deep_tiny()
    new = run_pass(ir, "insert_exit_heads", blocks=(1,)).ir
    with pytest.raises(ConfigError, match=r"span 0..9 but the model has 7 classes"):
        check_labels(new, torch.arange(10))
    folder = _image_folder(tmp_path / "three", classes=3, per_class=5)
    with pytest.raises(ConfigError, match="has 3 classes .* but the model's head has 7"):
        exit_datasets(str(folder), new.meta, 7)


def _image_folder(root, classes, per_class, size=20):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            pixels[:, : 2 + 2 * c] = 255  # a class-dependent bar, so heads can learn something
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_compile_merge_exits_and_int8_into_a_segmented_artifact(tmp_path):
    import vitopt
    precision = "int8"
    model, images, _ = deep_tiny()
    folder = _image_folder(tmp_path / "data", classes=7, per_class=5)
    backend = "onnxruntime" if precision == "fp32" else "openvino"
    report = vitopt.compile(model, tmp_path / "m.vitopt", backend=backend, precision=precision,
                            passes=("merge_tokens:r=2", "insert_exit_heads:blocks=1,2"),
                            train=str(folder), calib=str(folder) if precision == "int8" else None,
                            exit_epochs=2, max_batch=8, measure=False, image_size=20)
    names = [r["name"] for r in report.manifest["passes"]]
    assert names[:2] == ["merge_tokens", "insert_exit_heads"]
    assert names[-1] == ("quantize_int8" if precision == "int8" else "insert_exit_heads")
    exits = report.manifest["exits"]
    assert len(exits["segments"]) == 3 and len(exits["thresholds"]) == 2
    assert exits["training"]["images"] == 28 and exits["calibration"]["images"] == 7
    runtime = vitopt.load(tmp_path / "m.vitopt")
    assert "exit_heads.safetensors" in runtime.manifest["files"]
    ir = report.pipeline.ir
    reference, _ = run_with_exits(ir, images)
    out = runtime(images.numpy())
    assert out.shape == (8, 7) and compare(out, reference, precision, backend).ok


def test_given_thresholds_are_kept_and_torch_backends_are_refused(tmp_path):
    from vitopt.backends import get_backend
    from vitopt.exits.calibrate import calibrate_thresholds
    from vitopt.exits.lower import build_exported
    _, images, ir = deep_tiny()
    new = run_pass(ir, "insert_exit_heads", blocks=(1,), thresholds=(0.6,)).ir
    result = calibrate_thresholds(new, images, torch.arange(8) % 7, 0.0)
    assert result["thresholds"] == [0.6] and exit_stages(new)[0].threshold == 0.6
    with pytest.raises(ConfigError, match="builds from torch modules"):
        build_exported([], None, get_backend("aotinductor"), tmp_path, precision="fp32", max_batch=2)
    from vitopt.exits.lower import build_segment_engines
    with pytest.raises(ConfigError, match="tvm backend cannot build segments.*aotinductor"):
        build_segment_engines(new, get_backend("tvm"), images[:3], tmp_path, precision="fp32",
                              max_batch=2)


def test_segments_on_aotinductor_compile_load_and_match(tmp_path):
    """AOTInductor builds each segment from its torch module (tokens and sizes in, several
    outputs), the artifact loads, and outputs follow the per-sample reference executor."""
    import vitopt
    model, images, _ = deep_tiny()
    folder = _image_folder(tmp_path / "data", classes=7, per_class=5)
    report = vitopt.compile(model, tmp_path / "m.vitopt", backend="aotinductor", precision="fp32",
                            passes=("merge_tokens:r=2", "insert_exit_heads:blocks=1"),
                            train=str(folder), exit_epochs=1, max_batch=8, measure=False,
                            image_size=20)
    # Two segments (each AOTInductor build is ~25 s of C++ here); a middle segment, tokens in
    # and out, is the same build path and runs on ONNX Runtime and OpenVINO above.
    segments = report.manifest["exits"]["segments"]
    assert [s["files"][0] for s in segments] == [f"segment{k}.model.pt2" for k in range(2)]
    assert segments[1]["inputs"] == ["tokens_in", "size_in"]
    runtime = vitopt.load(tmp_path / "m.vitopt")
    ir = report.pipeline.ir
    reference, _ = run_with_exits(ir, images)
    out = runtime(images.numpy())
    assert out.shape == (8, 7) and compare(out, reference, "fp32", "aotinductor").ok

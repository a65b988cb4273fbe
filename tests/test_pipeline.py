"""Pass registry, configs, presets, --pass parsing, invariant checks and IR dumps."""
from dataclasses import dataclass

import pytest
import torch

from vitopt.errors import ConfigError, NumericsError
from vitopt.pipeline import (PassConfig, PassResult, Pipeline, PassSpec, parse_pass_option,
                             register_pass, registry, resolve_pipeline, _REGISTRY)


def test_builtin_passes_are_registered_with_kind_and_doc():
    passes = registry()
    assert {"fuse_qkv", "fold_layer_scale"} <= set(passes)
    for info in passes.values():
        assert info.summary, f"pass {info.name} has no docstring"


def test_registry_refuses_duplicates():
    @dataclass(frozen=True)
    class Cfg(PassConfig):
        pass

    with pytest.raises(RuntimeError, match="already registered"):
        register_pass("fuse_qkv", config=Cfg, exact=True)(lambda ir, cfg: None)


def test_file_name_must_be_pass_name():
    @dataclass(frozen=True)
    class Cfg(PassConfig):
        pass

    def some_pass(ir, cfg):
        return PassResult(ir, False)

    with pytest.raises(RuntimeError, match="file name"):
        register_pass("not_this_file", config=Cfg, exact=True)(some_pass)
    assert "not_this_file" not in _REGISTRY


def test_unknown_pass_preset_and_option_are_config_errors():
    with pytest.raises(ConfigError, match="unknown pass 'nope'"):
        parse_pass_option("nope")
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_pipeline("warp-speed")
    with pytest.raises(ConfigError, match="no option 'r'"):
        resolve_pipeline("none", ["fuse_qkv:r=3"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_pass_option("fuse_qkv:r")


def test_pass_options_override_preset_entries():
    specs = resolve_pipeline("lossless", ["fuse_qkv"])
    assert [s.name for s in specs] == ["fuse_qkv", "fold_layer_scale", "trim_last_block"]
    # passes added to a preset go before its final trim_last_block, precision passes after it
    assert [s.name for s in resolve_pipeline("balanced", ["prune_tokens", "quantize_int8"])] == [
        "fuse_qkv", "fold_layer_scale", "merge_tokens", "prune_tokens", "trim_last_block",
        "quantize_int8"]
    assert [s.name for s in resolve_pipeline("none", ["fold_layer_scale", "fuse_qkv"])] == [
        "fold_layer_scale", "fuse_qkv"]


def test_pipeline_records_and_dumps(traced_family, tmp_path):
    _, _, ir = traced_family("hf_dinov2")
    result = Pipeline.from_preset("lossless").run(ir, dump_dir=str(tmp_path))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["000_input.txt", "001_fuse_qkv.txt", "002_fold_layer_scale.txt",
                     "003_trim_last_block.txt"]
    assert "attn0" in (tmp_path / "001_fuse_qkv.txt").read_text()
    record = result.records[0]
    assert record.modified and record.seconds >= 0 and record.gflops_after == record.gflops_before
    assert result.ir is not ir


def test_pipeline_names_a_pass_that_breaks_exactness(traced_family, monkeypatch):
    _, _, ir = traced_family("timm_vit")

    @dataclass(frozen=True)
    class Cfg(PassConfig):
        pass

    def bad(ir, cfg):
        with torch.no_grad():
            w = ir.mlp_stages()[0].fc2.weight
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        return PassResult(ir, True)

    bad.__module__ = "vitopt.passes.break_things"
    registry()
    monkeypatch.setitem(_REGISTRY, "break_things", type(_REGISTRY["fuse_qkv"])("break_things", bad, Cfg, True))
    with pytest.raises(NumericsError, match="break_things.*fuse_qkv"):
        Pipeline([PassSpec("fuse_qkv"), PassSpec("break_things")]).run(ir)

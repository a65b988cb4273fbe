"""vitopt.frontend.load: every spec form on tiny models, and every bad input it must refuse."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import sys
import warnings
import zipfile

import pytest
import torch
from torch import nn

from vitopt.errors import ConfigError, ModelLoadError
from vitopt.frontend.load import LoadedModel, load_model

TIMM_NAME = "vit_tiny_patch16_224"
TIMM_OPTS = "img_size=32,patch_size=8,depth=1,embed_dim=48,num_heads=3,num_classes=5"
TIMM_ARCH = f"timm:{TIMM_NAME}:{TIMM_OPTS}"
HINT_KEYS = {"image_size", "in_chans", "mean", "std", "labels", "num_classes"}


def _images(batch=2, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _tiny_timm():
    import timm
    torch.manual_seed(0)
    return timm.create_model(TIMM_NAME, pretrained=False, img_size=32, patch_size=8, depth=1,
                             embed_dim=48, num_heads=3, num_classes=5).eval()


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


class _RunsCode:
    """A pickle payload that would create a marker file if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def timm_files(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("timm")
    model = _tiny_timm()
    state = model.state_dict()
    torch.save(state, root / "sd.pt")
    torch.save({"epoch": 3, "state_dict": state}, root / "nested.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, root / "ddp.bin")
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "w.safetensors"))
    torch.save(model, root / "whole.pt")
    with warnings.catch_warnings():  # torch.jit.trace is deprecated; users still have such files
        warnings.simplefilter("ignore")
        torch.jit.trace(model, _images()).save(str(root / "ts.pt"))
    exported = torch.export.export(model, (_images(),))
    torch.export.save(exported, str(root / "m.pt2"))
    with torch.no_grad():
        expected = model(_images())
    return root, expected


def _check_loaded(loaded, expected, family):
    assert isinstance(loaded, LoadedModel)
    assert loaded.family == family
    assert set(loaded.hints) == HINT_KEYS
    module = loaded.module if loaded.module is not None else loaded.exported.module()
    if loaded.module is not None:
        assert not loaded.module.training
    with torch.no_grad():
        torch.testing.assert_close(_logits(module(_images())), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ timm

def test_timm_spec_random_init_with_hints():
    loaded = load_model(TIMM_ARCH)
    assert loaded.family == "timm" and loaded.name == TIMM_NAME
    assert loaded.exported is None and loaded.source_path is None and loaded.source_sha256 is None
    assert not loaded.module.training
    # pretrained_cfg still says 224; the hint must follow the img_size override.
    assert loaded.hints["image_size"] == (32, 32)
    assert loaded.hints["in_chans"] == 3
    assert loaded.hints["mean"] == (0.5, 0.5, 0.5) and loaded.hints["std"] == (0.5, 0.5, 0.5)
    assert loaded.hints["num_classes"] == 5 and loaded.hints["labels"] is None


def test_timm_spec_with_weights_file(timm_files):
    root, expected = timm_files
    loaded = load_model(TIMM_ARCH, weights=str(root / "w.safetensors"))
    _check_loaded(loaded, expected, "timm")
    assert loaded.source_path == str(root / "w.safetensors")
    assert loaded.source_sha256 == _sha(root / "w.safetensors")


@pytest.mark.parametrize("name", ["sd.pt", "nested.pth", "ddp.bin", "w.safetensors"])
def test_state_dict_file_with_arch(timm_files, name):
    root, expected = timm_files
    loaded = load_model(str(root / name), arch=TIMM_ARCH)
    _check_loaded(loaded, expected, "timm")
    assert loaded.source_sha256 == _sha(root / name)


def test_state_dict_with_plain_timm_name_and_options(timm_files):
    root, expected = timm_files
    loaded = load_model(str(root / "sd.pt"), arch=f"{TIMM_NAME}:{TIMM_OPTS}")
    _check_loaded(loaded, expected, "timm")


@pytest.mark.parametrize("name", ["sd.pt", "w.safetensors"])
def test_state_dict_without_arch_is_refused(timm_files, name):
    root, _ = timm_files
    with pytest.raises(ModelLoadError, match=r"holds only weights.*--arch timm:NAME"):
        load_model(str(root / name))


def test_state_dict_that_does_not_fit_arch_names_the_keys(timm_files):
    root, _ = timm_files
    with pytest.raises(ModelLoadError) as err:
        load_model(str(root / "sd.pt"), arch=f"timm:{TIMM_NAME}")
    msg = str(err.value)
    assert "pos_embed" in msg and "different shape" in msg and "missing" in msg
    assert "img_size=" in msg  # says how to give the options


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(ConfigError, match=r"unknown timm model 'deit_smal_patch16_224'.*"
                                          r"deit_small_patch16_224"):
        load_model("timm:deit_smal_patch16_224")


def test_bad_timm_option():
    with pytest.raises(ConfigError, match="key=value"):
        load_model(f"timm:{TIMM_NAME}:img_size")


# ------------------------------------------------------------------ TorchScript, .pt2

def test_torchscript_file(timm_files):
    root, expected = timm_files
    loaded = load_model(str(root / "ts.pt"))
    assert isinstance(loaded.module, torch.jit.ScriptModule)
    _check_loaded(loaded, expected, "torchscript")
    assert loaded.source_sha256 == _sha(root / "ts.pt")


def test_exported_program_file(timm_files):
    root, expected = timm_files
    loaded = load_model(str(root / "m.pt2"))
    assert loaded.module is None
    assert isinstance(loaded.exported, torch.export.ExportedProgram)
    _check_loaded(loaded, expected, "exported")
    assert loaded.hints["in_chans"] == 3 and loaded.hints["image_size"] == (32, 32)
    assert loaded.source_sha256 == _sha(root / "m.pt2")


def test_arch_with_a_whole_model_file_is_refused(timm_files):
    root, _ = timm_files
    with pytest.raises(ConfigError, match="drop --arch"):
        load_model(str(root / "ts.pt"), arch=TIMM_ARCH)


def test_weights_with_a_file_spec_is_refused(timm_files):
    root, _ = timm_files
    with pytest.raises(ConfigError, match="weights="):
        load_model(str(root / "sd.pt"), weights=str(root / "sd.pt"))


# ------------------------------------------------------------------------- pickles

def test_whole_module_pickle_needs_trust(timm_files):
    root, expected = timm_files
    with pytest.raises(ModelLoadError) as err:
        load_model(str(root / "whole.pt"))
    msg = str(err.value)
    assert "--trust-pickle" in msg and "arbitrary code" in msg
    assert "VisionTransformer" in msg and "state_dict()" in msg and "torch.export.save" in msg
    loaded = load_model(str(root / "whole.pt"), trust_pickle=True)
    _check_loaded(loaded, expected, "timm")  # a pickled timm class is still timm


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["pickle-0", "pickle-2", "pickle-5", "torch.save",
                                 "torch.save-legacy"])
def test_malicious_pickle_is_not_executed(tmp_path, how):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    payload = _RunsCode(marker)
    if how.startswith("pickle-"):
        path.write_bytes(pickle.dumps(payload, protocol=int(how.split("-")[1])))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=how == "torch.save")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path))
    assert not marker.exists()
    msg = str(err.value)
    assert "--trust-pickle" in msg and "system" in msg  # names what it would call
    with pytest.raises(ModelLoadError, match="--trust-pickle"):  # also as a weights file
        load_model(TIMM_ARCH, weights=str(path))
    with pytest.raises(ModelLoadError, match="--trust-pickle"):  # and with an arch
        load_model(str(path), arch=TIMM_ARCH)
    assert not marker.exists()


def test_malicious_member_in_pt2_is_not_executed(timm_files, tmp_path):
    root, _ = timm_files
    marker = tmp_path / "MARKER"
    evil = io.BytesIO()
    torch.save(_RunsCode(marker), evil)
    path = tmp_path / "evil.pt2"
    with zipfile.ZipFile(root / "m.pt2") as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data/sample_inputs/model.pt"):
                data = evil.getvalue()  # torch.export.load falls back to full pickle here
            dst.writestr(info, data)
    with pytest.raises(ModelLoadError, match=r"sample_inputs.*--trust-pickle"):
        load_model(str(path))
    assert not marker.exists()


def test_pickled_non_module_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)  # weights_only can read it, but it is no model
    with pytest.raises(ModelLoadError, match="neither a model nor a state dict"):
        load_model(str(path))
    import argparse
    path = tmp_path / "args.pt"
    torch.save(argparse.Namespace(lr=0.1), path)  # not allowed by weights_only
    with pytest.raises(ModelLoadError, match="argparse.Namespace.*--trust-pickle"):
        load_model(str(path))
    with pytest.raises(ModelLoadError, match="neither a model nor a state dict"):
        load_model(str(path), trust_pickle=True)


def test_trusted_pickle_of_unimportable_class(tmp_path, monkeypatch):
    pkg = tmp_path / "src"
    pkg.mkdir()
    (pkg / "my_vit_defs.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(2, 2)\n")
    monkeypatch.syspath_prepend(str(pkg))
    import my_vit_defs
    torch.save(my_vit_defs.Net(), tmp_path / "net.pt")
    loaded = load_model(str(tmp_path / "net.pt"), trust_pickle=True)
    assert loaded.family == "user" and isinstance(loaded.module, nn.Module)
    monkeypatch.delitem(sys.modules, "my_vit_defs")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(pkg)])
    with pytest.raises(ModelLoadError, match=r"'my_vit_defs'.*PYTHONPATH"):
        load_model(str(tmp_path / "net.pt"), trust_pickle=True)


# --------------------------------------------------------------------- bad inputs

def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(ModelLoadError, match=f"no such file: {path}"):
        load_model(str(path))


def test_missing_file_that_is_a_timm_name():
    with pytest.raises(ModelLoadError, match="did you mean timm:deit_small_patch16_224"):
        load_model("deit_small_patch16_224")


def _truncated(path, tmp_path):
    data = path.read_bytes()
    out = tmp_path / ("cut" + path.suffix)
    out.write_bytes(data[: len(data) // 2])
    return out


@pytest.mark.parametrize("kind", ["junk.pt", "junk.safetensors", "junk.pt2", "cut-zip",
                                  "cut-safetensors", "cut-pt2", "empty.pt"])
def test_corrupt_file(timm_files, tmp_path, kind):
    root, _ = timm_files
    if kind.startswith("junk"):
        path = tmp_path / kind
        path.write_bytes(b"this is not a model \x00\xff\x13" * 40)
    elif kind == "empty.pt":
        path = tmp_path / kind
        path.write_bytes(b"")
    else:
        source = {"cut-zip": "sd.pt", "cut-safetensors": "w.safetensors", "cut-pt2": "m.pt2"}
        path = _truncated(root / source[kind], tmp_path)
    with pytest.raises(ModelLoadError, match="not a readable PyTorch/safetensors file"):
        load_model(str(path), arch=TIMM_ARCH if "safetensors" in kind else None)


def test_zip_that_pytorch_did_not_write(tmp_path):
    path = tmp_path / "photos.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.txt", "hello")
    with pytest.raises(ModelLoadError, match="not one PyTorch wrote"):
        load_model(str(path))


def test_unknown_prefix_lists_accepted_forms():
    with pytest.raises(ConfigError) as err:
        load_model("onnx:model.onnx")
    msg = str(err.value)
    assert "'onnx'" in msg and "timm:NAME" in msg and "hf:DIR" in msg and ".pt2" in msg


def test_directory_instead_of_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="hf:"):
        load_model(str(tmp_path))


# -------------------------------------------------------------------- Hugging Face

VIT_KW = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
              image_size=30, patch_size=6)


def _save_hf(model, directory, preprocessor=None):
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    model.save_pretrained(str(directory))
    if preprocessor is not None:
        (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))


@pytest.fixture(scope="module")
def hf_vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    labels = {0: "cat", 1: "dog", 2: "eel"}
    config = ViTConfig(**VIT_KW, num_labels=3, id2label=labels,
                       label2id={v: k for k, v in labels.items()})
    model = ViTForImageClassification(config).eval()
    directory = tmp_path_factory.mktemp("hfvit")
    _save_hf(model, directory, {"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4]})
    with torch.no_grad():
        expected = model(pixel_values=_images(2, 30)).logits
    return directory, model, expected


def test_hf_image_classification_dir(hf_vit_dir):
    directory, _, expected = hf_vit_dir
    loaded = load_model(f"hf:{directory}")
    assert type(loaded.module).__name__ == "ViTForImageClassification"
    assert loaded.family == "hf" and not loaded.module.training
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(pixel_values=_images(2, 30)).logits, expected)
    assert loaded.hints == {"image_size": (30, 30), "in_chans": 3, "mean": (0.4, 0.5, 0.6),
                            "std": (0.2, 0.3, 0.4), "labels": ["cat", "dog", "eel"],
                            "num_classes": 3}
    assert loaded.source_path == str(directory) and len(loaded.source_sha256) == 64


def test_hf_generic_labels_are_not_hints(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    _save_hf(ViTForImageClassification(ViTConfig(**VIT_KW, num_labels=2)), tmp_path)
    loaded = load_model(f"hf:{tmp_path}")
    assert loaded.hints["labels"] is None and loaded.hints["num_classes"] == 2
    assert loaded.hints["mean"] is None  # no preprocessor_config.json


def test_hf_state_dict_with_hf_arch(hf_vit_dir, tmp_path):
    from safetensors.torch import save_file

    directory, model, expected = hf_vit_dir
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    for loaded in (load_model(str(weights), arch=f"hf:{directory}"),
                   load_model(f"hf:{directory}", weights=str(weights))):
        assert loaded.family == "hf" and loaded.source_sha256 == _sha(weights)
        with torch.no_grad():
            torch.testing.assert_close(loaded.module(pixel_values=_images(2, 30)).logits,
                                       expected)


def test_hf_dir_without_weights_or_config(hf_vit_dir, tmp_path):
    directory, _, _ = hf_vit_dir
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(f"hf:{tmp_path}")
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model(f"hf:{tmp_path / 'missing'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(f"hf:{empty}")


def test_hf_dir_with_malicious_bin_is_not_executed(hf_vit_dir, tmp_path):
    directory, _, _ = hf_vit_dir
    marker = tmp_path / "MARKER"
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    torch.save(_RunsCode(marker), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="--trust-pickle"):
        load_model(f"hf:{tmp_path}")
    assert not marker.exists()


def test_hf_weights_that_do_not_fit_config(hf_vit_dir, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    directory, _, _ = hf_vit_dir
    _save_hf(ViTForImageClassification(ViTConfig(**{**VIT_KW, "num_hidden_layers": 2},
                                                 num_labels=3)), tmp_path)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="unexpected in the file.*layer"):
        load_model(f"hf:{tmp_path}")


def _clip_like(kind):
    import transformers as tf

    vision = dict(VIT_KW)
    text = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    if kind == "clip-full":
        full = tf.CLIPModel(tf.CLIPConfig(vision_config=vision, text_config=text,
                                          projection_dim=8))
        return full, full.vision_model, "CLIPVisionModel"
    if kind == "clip-vision":
        tower = tf.CLIPVisionModel(tf.CLIPVisionConfig(**vision))
        return tower, tower, "CLIPVisionModel"
    full = tf.SiglipModel(tf.SiglipConfig(vision_config=vision, text_config=text))
    return full, full.vision_model, "SiglipVisionModel"


@pytest.mark.parametrize("kind", ["clip-full", "clip-vision", "siglip-full"])
def test_hf_vision_towers(tmp_path, kind):
    saved, vision, cls_name = _clip_like(kind)
    _save_hf(saved.eval(), tmp_path)
    loaded = load_model(f"hf:{tmp_path}")
    assert type(loaded.module).__name__ == cls_name and loaded.family == "hf"
    assert loaded.hints["image_size"] == (30, 30) and loaded.hints["num_classes"] is None
    with torch.no_grad():
        expected = vision.eval()(pixel_values=_images(2, 30)).last_hidden_state
        got = loaded.module(pixel_values=_images(2, 30)).last_hidden_state
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("kind", ["clip-full", "siglip-full"])
def test_full_clip_state_dict_with_hf_arch(tmp_path, kind):
    from safetensors.torch import save_file

    saved, vision, _ = _clip_like(kind)
    _save_hf(saved.eval(), tmp_path)
    weights = tmp_path / "full.safetensors"  # keys 'vision_model.*' and 'text_model.*'
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(weights))
    loaded = load_model(str(weights), arch=f"hf:{tmp_path}")
    with torch.no_grad():
        expected = vision.eval()(pixel_values=_images(2, 30)).last_hidden_state
        got = loaded.module(pixel_values=_images(2, 30)).last_hidden_state
    torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------- torchvision

def test_torchvision_spec():
    loaded = load_model("torchvision:vit_b_16:image_size=32,num_classes=4")
    assert loaded.family == "torchvision" and loaded.name == "vit_b_16"
    assert not loaded.module.training
    assert loaded.hints["image_size"] == (32, 32) and loaded.hints["num_classes"] == 4
    with pytest.raises(ConfigError, match="unknown torchvision model 'vit_b_61'"):
        load_model("torchvision:vit_b_61")


# ------------------------------------------------------------------------ builtins

def _proxy_or_skip():
    try:
        from vitopt.data import proxy
    except Exception as exc:  # written in parallel; may not import yet
        pytest.skip(f"vitopt.data.proxy does not import yet ({type(exc).__name__}: {exc})")
    return proxy


@pytest.mark.parametrize("name,builder", [("digits-vit", "build_digits_vit"),
                                          ("digits-vit-hf", "build_digits_vit_hf")])
def test_builtin_wiring(monkeypatch, name, builder):
    proxy = _proxy_or_skip()
    tiny = _tiny_timm().train()
    monkeypatch.setattr(proxy, builder, lambda: tiny)  # the real one may need training first
    loaded = load_model(f"builtin:{name}")
    assert loaded.module is tiny and not tiny.training
    assert loaded.family == "builtin" and loaded.name == name
    assert loaded.hints == {"image_size": (32, 32), "in_chans": 3, "mean": (0.5, 0.5, 0.5),
                            "std": (0.5, 0.5, 0.5), "labels": [str(i) for i in range(10)],
                            "num_classes": 10}


def test_builtin_digits_vit_real():
    proxy = _proxy_or_skip()
    if not proxy.SHIPPED_WEIGHTS.exists():
        pytest.skip(f"proxy weights {proxy.SHIPPED_WEIGHTS} are not shipped yet, and building "
                    "builtin:digits-vit without them would train it for minutes")
    loaded = load_model("builtin:digits-vit")
    with torch.no_grad():
        out = loaded.module(_images(2, 32))
    assert out.shape == (2, 10)


def test_unknown_builtin():
    with pytest.raises(ConfigError, match="builtin:digits-vit"):
        load_model("builtin:imagenet-vit")

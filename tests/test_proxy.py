"""Tests of the digits accuracy proxy: shipped weights, held-out accuracy, HF conversion."""
import json

import numpy as np
import pytest
import torch

from vitopt.data import proxy
from vitopt.data.digits import load_digits_split
from vitopt.errors import InputError, ModelLoadError


@pytest.fixture(scope="module")
def timm_model():
    return proxy.build_digits_vit()


@pytest.fixture(scope="module")
def test_split():
    return load_digits_split("test")


@pytest.fixture(scope="module")
def meta():
    return json.loads(proxy.SHIPPED_META.read_text())


def test_shipped_files(meta):
    assert proxy.SHIPPED_WEIGHTS.exists(), "run `python -m vitopt.data.proxy --train`"
    assert proxy.SHIPPED_WEIGHTS.stat().st_size < 5 * 2**20
    assert meta["config"] == json.loads(json.dumps(proxy.digits_vit_config()))
    assert meta["seed"] == proxy.DEFAULT_SEED
    assert meta["command"].startswith("python -m vitopt.data.proxy --train")
    assert meta["test_top1"] >= 0.95
    assert "not ImageNet" in meta["note"]


def test_shipped_weights_load_in_eval_mode(timm_model):
    from timm.models.vision_transformer import VisionTransformer

    assert isinstance(timm_model, VisionTransformer)
    assert not timm_model.training
    assert timm_model.patch_embed.proj.weight.dtype == torch.float32


def test_held_out_top1(timm_model, test_split, meta):
    images, labels = test_split
    accuracy = proxy.evaluate_top1(timm_model, images, labels)
    assert accuracy >= 0.95
    assert abs(accuracy - meta["test_top1"]) <= 2 / labels.numel()


def test_evaluate_top1_accepts_numpy_and_checks_input(timm_model, test_split):
    images, labels = test_split
    images, labels = images[:40], labels[:40]
    via_torch = proxy.evaluate_top1(timm_model, images, labels, batch_size=16)
    via_numpy = proxy.evaluate_top1(lambda x: timm_model(x).numpy(), images, labels)
    assert via_torch == via_numpy
    with pytest.raises(InputError, match="-1"):
        proxy.evaluate_top1(timm_model, images, torch.full((40,), -1))
    with pytest.raises(InputError, match="do not match"):
        proxy.evaluate_top1(timm_model, images, labels[:3])


def test_hf_conversion_matches_timm(timm_model, test_split):
    images = test_split[0][:64]
    hf = proxy.build_digits_vit_hf()
    assert not hf.training
    with torch.no_grad():
        ref = timm_model(images)
        out = hf(pixel_values=images).logits
    assert (out - ref).abs().max().item() <= 1e-4
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_hf_conversion_knows_the_older_layout():
    state = proxy.build_digits_vit(pretrained=False).state_dict()
    roles = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
             "attention.output.dense", "intermediate.dense", "output.dense",
             "layernorm_before", "layernorm_after")
    old_keys = {f"vit.encoder.layer.{i}.{role}.{kind}"
                for i in range(6) for role in roles for kind in ("weight", "bias")}
    mapped = proxy.timm_to_hf_state_dict(state, old_keys, 6)
    q, k, v = state["blocks.2.attn.qkv.weight"].chunk(3)
    assert torch.equal(mapped["vit.encoder.layer.2.attention.attention.key.weight"], k)
    assert torch.equal(mapped["vit.encoder.layer.2.output.dense.bias"],
                       state["blocks.2.mlp.fc2.bias"])
    with pytest.raises(ModelLoadError, match="layout"):
        proxy.timm_to_hf_state_dict(state, {"something.else"}, 6)


def test_corrupt_weights_are_reported(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="--train"):
        proxy._load_weights(proxy.build_digits_vit(pretrained=False), bad)


def test_sincos_codes_are_distinct():
    codes = proxy._sincos_2d(8, 8, 96)
    assert codes.shape == (64, 96)
    dist = torch.cdist(codes, codes) + torch.eye(64)
    assert np.all(dist.numpy() > 1e-3)


def test_missing_shipped_weights_train_into_the_cache(tmp_path, monkeypatch, capsys):
    def fake_train(out=None, **_):
        model = proxy.build_digits_vit(pretrained=False)
        proxy._save(model, out, {"name": "builtin:digits-vit", "command": "test"})
        return model, 0.0

    monkeypatch.setattr(proxy, "SHIPPED_WEIGHTS", tmp_path / "missing.safetensors")
    monkeypatch.setattr(proxy, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(proxy, "train_digits_vit", fake_train)
    model = proxy.build_digits_vit()
    assert "training the digits proxy now" in capsys.readouterr().err
    assert (tmp_path / "cache" / proxy.WEIGHTS_NAME).exists()
    assert (tmp_path / "cache" / "digits_vit.json").exists()
    assert not model.training

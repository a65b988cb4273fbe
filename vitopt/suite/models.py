"""The suite's models, built in code with random init (nothing is downloaded).

Static passes (fuse_qkv, fold_layer_scale, token merging to a fixed schedule) and the engines'
speed do not depend on trained weights, so random init is enough for latency. Accuracy comes
only from the trained digits proxy (`digits_vit`, a PROXY: scikit-learn digits at 32x32, not
ImageNet). Every builder returns a module that maps images [B, C, H, W] to one tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
from torch import nn

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass
class SuiteModel:
    name: str
    description: str
    module: nn.Module           # images -> one tensor, eval mode
    image_size: int
    in_chans: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    proxy: bool = False         # accuracy is measured (the digits proxy)
    output: str = "logits"

    def example(self, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, self.in_chans, self.image_size, self.image_size,
                           generator=torch.Generator().manual_seed(11))


def _timm(name: str, **kwargs) -> nn.Module:
    import timm
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _hf_vision(model_cls: str, config_cls: str, output: str, **config) -> nn.Module:
    import transformers
    from vitopt.frontend.trace import single_output
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()
    size = config["image_size"]
    return single_output(model, torch.randn(1, 3, size, size), output)[0].eval()


def _timm_model(name: str, timm_name: str, mean_std=IMAGENET, size: int = 224,
                **kwargs) -> Callable[[], SuiteModel]:
    def build() -> SuiteModel:
        what = f"timm {timm_name} (random init" + "".join(f", {k}={v}" for k, v in kwargs.items()) + ")"
        return SuiteModel(name, what, _timm(timm_name, **kwargs), size, 3, *mean_std,
                          output="logits" if kwargs.get("num_classes", 1) else "features")
    return build


def _hf_model(name: str, model_cls: str, config_cls: str, output: str, mean_std,
              **config) -> Callable[[], SuiteModel]:
    def build() -> SuiteModel:
        what = (f"transformers {model_cls}({config_cls}(hidden {config['hidden_size']}, "
                f"{config['num_hidden_layers']} layers, patch {config['patch_size']}, image "
                f"{config['image_size']})), random init, output {output}")
        return SuiteModel(name, what, _hf_vision(model_cls, config_cls, output, **config),
                          config["image_size"], 3, *mean_std, output=output)
    return build


def _base_config(**overrides) -> dict:
    config = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "image_size": 224, "patch_size": 16}
    config.update(overrides)
    return config


def _digits_vit() -> SuiteModel:
    from vitopt.data.digits import DIGITS_MEAN, DIGITS_STD
    from vitopt.data.proxy import build_digits_vit, digits_vit_config
    config = digits_vit_config()
    size = config["img_size"]
    return SuiteModel("digits_vit", "builtin:digits-vit, the trained digits PROXY (timm ViT, "
                      f"{size}x{size}; not ImageNet)", build_digits_vit().eval(), size,
                      config["in_chans"], tuple(DIGITS_MEAN), tuple(DIGITS_STD), proxy=True)


MODELS: Dict[str, Callable[[], SuiteModel]] = {
    "deit_ti": _timm_model("deit_ti", "deit_tiny_patch16_224"),
    "deit_s": _timm_model("deit_s", "deit_small_patch16_224"),
    "deit_b": _timm_model("deit_b", "deit_base_patch16_224"),
    "vit_b16": _timm_model("vit_b16", "vit_base_patch16_224"),
    "dinov2_s": _timm_model("dinov2_s", "vit_small_patch14_dinov2", img_size=224),
    "clip_b16": _hf_model("clip_b16", "CLIPVisionModel", "CLIPVisionConfig", "pooler_output",
                          CLIP, **_base_config()),
    "siglip_b16": _hf_model("siglip_b16", "SiglipVisionModel", "SiglipVisionConfig",
                            "pooler_output", HALF, **_base_config()),
    "digits_vit": _digits_vit,
    # tiny models for the suite's own test: odd sizes on purpose
    "tiny_vit": _timm_model("tiny_vit", "vit_tiny_patch16_224", size=40, img_size=40,
                            patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=10),
    "tiny_clip": _hf_model("tiny_clip", "CLIPVisionModel", "CLIPVisionConfig", "pooler_output",
                           CLIP, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=24, patch_size=8),
}


def build_model(name: str) -> SuiteModel:
    from vitopt.errors import ConfigError
    if name not in MODELS:
        raise ConfigError(f"unknown suite model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]()

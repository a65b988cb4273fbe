"""Hints about a model's input: image size, channels, mean/std, labels, class count.

Read from whichever convention the model follows (timm's pretrained_cfg, a Hugging Face
config and preprocessor_config.json, torchvision's attributes, an exported graph's input).
A value the source does not state is None.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from vitopt.errors import ModelLoadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HINT_KEYS = ("image_size", "in_chans", "mean", "std", "labels", "num_classes")


def _empty_hints() -> dict:
    return dict.fromkeys(_HINT_KEYS)


def _pair(size: Any) -> tuple[int, int] | None:
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2 \
            and all(isinstance(v, int) for v in size):
        return (int(size[0]), int(size[1]))
    return None


def _floats(values: Any) -> tuple | None:
    if isinstance(values, (tuple, list)) and values:
        return tuple(float(v) for v in values)
    return None


def _timm_hints(model: nn.Module) -> dict:
    hints = _empty_hints()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    input_size = cfg.get("input_size")
    # pretrained_cfg keeps the default input size even when img_size= overrode it.
    patch_embed = getattr(model, "patch_embed", None)
    hints["image_size"] = _pair(getattr(patch_embed, "img_size", None)) or \
        (_pair(tuple(input_size[1:])) if input_size else None)
    hints["in_chans"] = _first_conv_channels(model, cfg) or (input_size[0] if input_size else None)
    hints["mean"], hints["std"] = _floats(cfg.get("mean")), _floats(cfg.get("std"))
    hints["num_classes"] = getattr(model, "num_classes", None)
    return hints


def _first_conv_channels(model: nn.Module, cfg: dict) -> int | None:
    name = cfg.get("first_conv")
    try:
        conv = model.get_submodule(name) if isinstance(name, str) else None
    except AttributeError:
        conv = None
    return getattr(conv, "in_channels", None)


def _torchvision_hints(model: nn.Module) -> dict:
    hints = _empty_hints()
    hints["image_size"] = _pair(getattr(model, "image_size", None))
    hints["in_chans"] = 3
    # Every torchvision classification checkpoint is normalized with the ImageNet statistics.
    hints["mean"], hints["std"] = IMAGENET_MEAN, IMAGENET_STD
    hints["num_classes"] = getattr(model, "num_classes", None)
    return hints


def _hf_hints(model: nn.Module, directory: Path | None) -> dict:
    hints = _empty_hints()
    config = model.config
    hints["image_size"] = _pair(getattr(config, "image_size", None))
    hints["in_chans"] = getattr(config, "num_channels", None)
    if directory is not None:
        hints["mean"], hints["std"] = _preprocessor_stats(directory)
    if type(model).__name__.endswith("ForImageClassification"):
        hints["num_classes"] = config.num_labels
        hints["labels"] = _hf_labels(config)
    return hints


def _preprocessor_stats(directory: Path) -> tuple:
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return None, None
    try:
        pre = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); fix or remove it") from exc
    return _floats(pre.get("image_mean")), _floats(pre.get("image_std"))


def _hf_labels(config) -> list[str] | None:
    id2label = getattr(config, "id2label", None) or {}
    try:
        labels = [id2label[i] for i in range(config.num_labels)]
    except KeyError:
        return None
    if all(label == f"LABEL_{i}" for i, label in enumerate(labels)):
        return None  # transformers' placeholder names, not real classes
    return labels


def _module_hints(module: nn.Module) -> dict:
    """Hints for a module of unknown origin, from whichever convention it follows."""
    if getattr(module, "pretrained_cfg", None):
        return _timm_hints(module)
    if getattr(getattr(module, "config", None), "model_type", None):
        return _hf_hints(module, None)
    if hasattr(module, "image_size"):
        return _torchvision_hints(module)
    return _empty_hints()


def _family_of(module: nn.Module) -> str:
    top = type(module).__module__.split(".")[0]
    return {"timm": "timm", "transformers": "hf", "torchvision": "torchvision"}.get(top, "user")


def _exported_hints(exported) -> dict:
    """in_chans and image size from the first user input of an NCHW exported program."""
    hints = _empty_hints()
    from torch.export.graph_signature import InputKind

    user = [s.arg.name for s in exported.graph_signature.input_specs
            if s.kind == InputKind.USER_INPUT and hasattr(s.arg, "name")]
    nodes = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    val = nodes[user[0]].meta.get("val") if user and user[0] in nodes else None
    shape = getattr(val, "shape", None)
    if shape is not None and len(shape) == 4:
        dims = [d if isinstance(d, int) else None for d in shape]
        hints["in_chans"] = dims[1]
        if dims[2] is not None and dims[3] is not None:
            hints["image_size"] = (dims[2], dims[3])
    return hints


# ----------------------------------------------------------------------------- utilities

def hints_for_module(module: nn.Module) -> dict:
    """Hints (image size, channels, mean/std, labels) for a module handed to vitopt in Python."""
    hints = _empty_hints()
    hints.update({k: v for k, v in _module_hints(module).items() if v is not None})
    return hints


def family_of(module: nn.Module) -> str:
    """timm | hf | torchvision | user, from the package the module's class comes from."""
    return _family_of(module)

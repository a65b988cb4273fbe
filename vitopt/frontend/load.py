"""One job: load the model a user names into a `LoadedModel`, safely by default.

    load_model("timm:deit_small_patch16_224")            # random init, timm class
    load_model("timm:vit_tiny_patch16_224:img_size=32,depth=1", weights="w.safetensors")
    load_model("hf:/models/vit-base")                     # local HF dir (config.json + weights)
    load_model("torchvision:vit_b_16")
    load_model("builtin:digits-vit")                      # the trained accuracy proxy
    load_model("model.pt2")                               # torch.export.save -> ExportedProgram
    load_model("model.pt")                                # TorchScript, or a state dict (+ arch=)
    load_model("weights.safetensors", arch="timm:deit_small_patch16_224")

Safety rules:
  * Nothing is downloaded: timm with pretrained=False, torchvision with weights=None, and
    transformers only from a local directory with local_files_only=True.
  * Pickles are read with `torch.load(weights_only=True)`, which refuses to import anything but
    tensors and plain containers. A file that holds a pickled object (a whole nn.Module, or
    anything crafted to run code) is refused unless the caller passes trust_pickle=True.
  * `torch.export.load` itself unpickles some archive members with full pickle (sample inputs,
    pickled weights/constants, opaque objects). A .pt2 is therefore audited first: every member
    torch would unpickle must load with weights_only=True, otherwise it is refused unless
    trust_pickle=True. The archive is read once into memory, so the audited bytes are the
    loaded bytes.
  * TorchScript archives are loaded with torch.jit.load: their code is TorchScript (compiled by
    torch, not imported as Python) and their pickles are read by torch's restricted C++
    unpickler.

Options for timm / torchvision constructors go after a second colon, as for passes:
`timm:NAME:key=value,key=value` (e.g. `img_size=32,patch_size=8,depth=1,num_classes=10`;
an image size may be written `224x160`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import io
import json
import posixpath
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitopt.errors import ConfigError, ModelLoadError
from vitopt.frontend.hints import (_empty_hints, _exported_hints, _family_of, _hf_hints,
                                   _module_hints, _pair, _timm_hints, _torchvision_hints)
from vitopt.frontend.pickle_scan import _pickle_imports_of_file, _strip_root, _unsafe_names

PREFIXES = ("timm", "hf", "torchvision", "builtin")
BUILTINS = ("digits-vit", "digits-vit-hf")
ACCEPTED_FORMS = (
    "timm:NAME[:key=value,...]  (a timm architecture, random init unless weights= is given)\n"
    "  hf:DIR                      (a local Hugging Face directory with config.json and weights)\n"
    "  torchvision:NAME[:key=value,...]\n"
    "  builtin:digits-vit | builtin:digits-vit-hf\n"
    "  PATH.pt2                    (torch.export.save)\n"
    "  PATH.pt / .pth / .bin       (TorchScript, or a state dict with --arch)\n"
    "  PATH.safetensors            (a state dict, with --arch)"
)
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                   "pytorch_model.bin", "pytorch_model.bin.index.json")
_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 20


@dataclasses.dataclass
class LoadedModel:
    """What load_model found: a module (eval mode) or an ExportedProgram, plus where it came from.

    hints always has the keys image_size ((H, W)), in_chans, mean, std, labels (class names) and
    num_classes; a value is None where the source does not say.
    """

    module: nn.Module | None
    exported: Any  # torch.export.ExportedProgram | None
    family: str    # timm | hf | torchvision | torchscript | exported | user | builtin
    name: str
    source_path: str | None = None
    source_sha256: str | None = None
    hints: dict = dataclasses.field(default_factory=dict)


def load_model(spec: str, *, arch: str | None = None, trust_pickle: bool = False,
               weights: str | None = None) -> LoadedModel:
    """Load `spec` (see the module docstring for the accepted forms).

    arch: the architecture for a file that holds only weights (`timm:NAME[:k=v,...]`, a plain
    timm name, `torchvision:NAME`, or `hf:DIR`). weights: a state-dict file (.safetensors, .pt,
    .pth, .bin) for a named architecture (`timm:`, `hf:`, `torchvision:`). trust_pickle: allow
    full pickle, which can run arbitrary code from the file; only for files you trust.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"model spec must be a non-empty string, got {spec!r}; use one of:\n"
                          f"  {ACCEPTED_FORMS}")
    prefix, rest = _split_spec(spec.strip())
    if prefix is None:
        if weights is not None:
            raise ConfigError(f"weights={weights!r} applies only to a named architecture "
                              f"(timm:, hf:, torchvision:); {spec!r} is a file, use arch= for a "
                              "weights-only file")
        return _load_path(Path(rest), arch, trust_pickle)
    if arch is not None:
        raise ConfigError(f"arch={arch!r} applies only to a file that holds only weights; "
                          f"{spec!r} already names the architecture (give a weights file with "
                          "weights= instead)")
    if prefix == "builtin":
        if weights is not None:
            raise ConfigError(f"weights= cannot be combined with {spec!r}: the built-in models "
                              "bring their own weights")
        return _load_builtin(rest)
    if weights is not None:
        return _with_weights(_build_named(prefix, rest), Path(weights), trust_pickle)
    if prefix == "hf":
        return _load_hf_dir(Path(rest))
    return _build_named(prefix, rest).loaded


# ------------------------------------------------------------------------------ spec parsing

def _split_spec(spec: str) -> tuple[str | None, str]:
    """('timm', 'NAME') for a prefixed spec, (None, PATH) for a file; ConfigError if unknown."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9_+.-]*):(.*)$", spec, re.DOTALL)
    if match is None or len(match.group(1)) == 1 or Path(spec).exists():
        return None, spec  # a plain path (a one-letter "prefix" is a Windows drive)
    prefix, rest = match.group(1).lower(), match.group(2)
    if prefix not in PREFIXES:
        raise ConfigError(f"unknown model spec prefix {match.group(1)!r} in {spec!r}; accepted "
                          f"forms are:\n  {ACCEPTED_FORMS}")
    if not rest:
        raise ConfigError(f"{spec!r} names no model after '{prefix}:'; accepted forms are:\n"
                          f"  {ACCEPTED_FORMS}")
    return prefix, rest


def _split_options(text: str) -> tuple[str, dict]:
    """'NAME:k=v,k2=v2' -> ('NAME', {'k': v, 'k2': v2})."""
    name, _, opts = text.partition(":")
    options = {}
    for item in filter(None, (part.strip() for part in opts.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"bad model option {item!r} in {text!r}; write options as "
                              "NAME:key=value,key=value (e.g. img_size=32,depth=1)")
        options[key] = _parse_value(value.strip())
    return name.strip(), options


def _parse_value(text: str) -> Any:
    """An option value: int, float, bool, None, 'HxW' (a size tuple) or a string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    if re.fullmatch(r"\d+x\d+", lowered):
        return tuple(int(v) for v in lowered.split("x"))
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# ------------------------------------------------------------------------ named architectures

@dataclasses.dataclass
class _Built:
    """A freshly built named model, plus what a state dict loaded into it may carry extra."""

    loaded: LoadedModel
    ignore_prefixes: tuple = ()  # state-dict keys of a part we do not build (CLIP text tower)
    strip_prefix: str = ""       # a prefix the file's keys have and the model's do not


def _build_named(prefix: str, rest: str) -> _Built:
    if prefix == "timm":
        return _build_timm(*_split_options(rest))
    if prefix == "torchvision":
        return _build_torchvision(*_split_options(rest))
    return _build_hf(Path(rest))


def _build_arch(arch: str) -> _Built:
    """The model an `arch` names: a prefixed spec, a plain timm name, or an HF directory."""
    if not isinstance(arch, str) or not arch.strip():
        raise ConfigError(f"arch must be a non-empty string such as 'timm:deit_small_patch16_224' "
                          f"or 'hf:DIR', got {arch!r}")
    arch = arch.strip()
    head = arch.split(":", 1)[0].lower()
    if head in PREFIXES and ":" in arch and not Path(arch).exists():
        prefix, rest = _split_spec(arch)
        if prefix == "builtin":
            raise ConfigError(f"arch={arch!r}: a built-in model cannot be an architecture; use "
                              "timm:NAME, torchvision:NAME or hf:DIR")
        return _build_named(prefix, rest)
    if (Path(arch) / "config.json").is_file():
        return _build_hf(Path(arch))
    return _build_timm(*_split_options(arch))


def _build_timm(name: str, options: dict) -> _Built:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown timm model {name!r}.{hint} List names with "
                          f"timm.list_models('*{_stem_pattern(name)}*').")
    try:
        model = timm.create_model(name, pretrained=False, **options)
    except TypeError as exc:
        raise ConfigError(f"timm model {name!r} does not accept the options {options}: {exc}; "
                          "drop or rename them") from exc
    model.eval()
    hints = _timm_hints(model)
    return _Built(LoadedModel(model, None, "timm", name, hints=hints))


def _stem_pattern(name: str) -> str:
    """A short search pattern from a model name: 'deit_smal_patch16' -> 'deit'."""
    return re.split(r"[_.\-]", name, maxsplit=1)[0] or name


def _build_torchvision(name: str, options: dict) -> _Built:
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown torchvision model {name!r}.{hint} List names with "
                          "torchvision.models.list_models().")
    if "weights" in options:
        raise ConfigError("torchvision weights are never downloaded; pass a state-dict file with "
                          "weights= instead of the 'weights' option")
    try:
        model = torchvision.models.get_model(name, weights=None, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"torchvision model {name!r} does not accept the options {options}: "
                          f"{exc}") from exc
    model.eval()
    return _Built(LoadedModel(model, None, "torchvision", name, hints=_torchvision_hints(model)))


# --------------------------------------------------------------------------- Hugging Face

def _build_hf(directory: Path, *, with_weights: bool = False) -> _Built:
    """An HF model from a local directory: random init, or its own weights if with_weights."""
    config = _hf_config(directory)
    cls, ignore = _hf_class(config)
    with _quiet_transformers():
        if with_weights:
            model = _hf_from_pretrained(cls, directory, ignore)
        else:
            model = _hf_from_config(cls, config, directory)
    model.eval()
    hints = _hf_hints(model, directory)
    loaded = LoadedModel(model, None, "hf", directory.name or str(directory), hints=hints)
    # transformers 5 builds CLIP/SigLIP vision towers without the 'vision_model.' level that the
    # full model's checkpoints put on every key.
    return _Built(loaded, ignore, "vision_model." if ignore else "")


def _load_hf_dir(directory: Path) -> LoadedModel:
    _hf_config(directory)  # a missing directory or config.json is reported first
    files = _hf_weight_files(directory)
    if not files:
        raise ModelLoadError(
            f"hf:{directory} has a config.json but no weights ({' / '.join(HF_WEIGHT_FILES)}); "
            "add the weights, or pass weights=FILE (--weights) with a state-dict file")
    built = _build_hf(directory, with_weights=True)
    hashed = [directory / "config.json"] + files
    pre = directory / "preprocessor_config.json"
    hashed += [pre] if pre.is_file() else []
    built.loaded.source_path = str(directory)
    built.loaded.source_sha256 = _sha256_files(hashed, directory)
    return built.loaded


def _hf_config(directory: Path):
    if not directory.is_dir():
        raise ModelLoadError(f"no such directory: {directory} (hf: takes a local directory with "
                             "config.json; nothing is downloaded)")
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} has no config.json; hf:DIR needs a directory written "
                             "by save_pretrained (config.json plus weights)")
    from transformers import AutoConfig

    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(str(directory), local_files_only=True,
                                              trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError/ValueError/JSON errors alike
        raise ModelLoadError(f"cannot read the Hugging Face config {directory / 'config.json'}: "
                             f"{_first_line(exc)}") from exc


def _hf_class(config) -> tuple[type, tuple]:
    """The class to build for a config, and state-dict prefixes of towers it leaves out."""
    import transformers

    model_type = getattr(config, "model_type", "")
    if model_type in ("clip", "clip_vision_model"):
        return transformers.CLIPVisionModel, ("text_model.", "text_projection.",
                                              "visual_projection.", "logit_scale")
    if model_type in ("siglip", "siglip_vision_model"):
        return transformers.SiglipVisionModel, ("text_model.", "logit_scale", "logit_bias")
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForImageClassification") for a in architectures):
        return transformers.AutoModelForImageClassification, ()
    return transformers.AutoModel, ()


def _hf_from_config(cls, config, directory: Path) -> nn.Module:
    try:
        if hasattr(cls, "from_config"):  # the Auto* factories
            return cls.from_config(config).float()
        # A vision tower class: let its config class pick the tower out of a full config.
        tower_config = cls.config_class.from_pretrained(str(directory), local_files_only=True)
        return cls(tower_config).float()
    except Exception as exc:
        raise ModelLoadError(f"cannot build the Hugging Face model of {directory}: "
                             f"{_first_line(exc)}") from exc


def _hf_from_pretrained(cls, directory: Path, ignore: tuple) -> nn.Module:
    try:
        model, info = cls.from_pretrained(str(directory), local_files_only=True,
                                          trust_remote_code=False, dtype=torch.float32,
                                          output_loading_info=True)
    except Exception as exc:
        for path in _hf_weight_files(directory):  # say why a .bin was refused, if it was
            if path.suffix == ".bin":
                _read_torch_file(path, trust_pickle=False)
        raise ModelLoadError(f"cannot load the Hugging Face model in {directory}: "
                             f"{_first_line(exc)}") from exc
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(ignore)]
    mismatched = [f"{k}: file {tuple(a)} vs model {tuple(b)}"
                  for k, a, b in info.get("mismatched_keys", [])]
    _raise_on_key_problems(f"the weights in {directory}", f"hf:{directory}",
                           list(info.get("missing_keys", [])), unexpected, mismatched)
    return model


def _hf_weight_files(directory: Path) -> list[Path]:
    """The weight files of an HF dir: safetensors first; shards through their index."""
    for name in HF_WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"the shard index {path} is not valid JSON with a weight_map: "
                                 f"{exc}") from exc
        return [path] + [directory / shard for shard in shards]
    return []


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load reports and progress bars; restore them afterwards."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------- builtins

def _load_builtin(name: str) -> LoadedModel:
    if name not in BUILTINS:
        raise ConfigError(f"unknown built-in model {name!r}; built-ins are: "
                          f"{', '.join('builtin:' + b for b in BUILTINS)}")
    from vitopt.data import proxy
    from vitopt.data.digits import (DIGITS_IMAGE_SIZE, DIGITS_LABELS, DIGITS_MEAN,
                                    DIGITS_STD)

    model = proxy.build_digits_vit() if name == "digits-vit" else proxy.build_digits_vit_hf()
    model.eval()
    hints = {"image_size": _pair(DIGITS_IMAGE_SIZE), "in_chans": 3, "mean": tuple(DIGITS_MEAN),
             "std": tuple(DIGITS_STD), "labels": list(DIGITS_LABELS),
             "num_classes": len(DIGITS_LABELS)}
    return LoadedModel(model, None, "builtin", name, hints=hints)


# ---------------------------------------------------------------------------------- files

def _load_path(path: Path, arch: str | None, trust_pickle: bool) -> LoadedModel:
    _check_file(path)
    kind = _sniff(path)
    if kind == "pt2":
        _refuse_arch(arch, path, "an exported program (torch.export)")
        return _load_pt2(path, trust_pickle)
    if kind == "torchscript":
        _refuse_arch(arch, path, "a whole TorchScript model")
        return _load_torchscript(path)
    if kind == "safetensors":
        return _load_state_dict_file(path, _read_safetensors(path), arch)
    obj = _read_torch_file(path, trust_pickle)
    state = _find_state_dict(obj)
    if state is not None:
        return _load_state_dict_file(path, state, arch)
    if isinstance(obj, nn.Module):
        _refuse_arch(arch, path, "a whole pickled model")
        return _loaded_module(obj, path)
    raise ModelLoadError(f"{path} holds {_describe(obj)}, which is neither a model nor a state "
                         "dict of tensors; save the model with torch.save(model.state_dict()) "
                         "or torch.export.save")


def _check_file(path: Path) -> None:
    if path.is_dir():
        hf = " (a Hugging Face directory? write hf:" + str(path) + ")" \
            if (path / "config.json").is_file() else ""
        raise ModelLoadError(f"{path} is a directory, not a model file{hf}")
    if not path.is_file():
        raise ModelLoadError(f"no such file: {path}{_timm_name_hint(str(path))}")
    if path.stat().st_size == 0:
        raise _corrupt(path, "the file is empty")


def _timm_name_hint(text: str) -> str:
    """' (did you mean timm:NAME?)' when a missing 'file' is really a timm model name."""
    if "/" in text or "\\" in text or "." in Path(text).suffix:
        return ""
    try:
        import timm
        return f" (did you mean timm:{text}?)" if timm.is_model(text) else ""
    except ImportError:
        return ""


def _refuse_arch(arch: str | None, path: Path, what: str) -> None:
    if arch is not None:
        raise ConfigError(f"arch={arch!r} was given but {path} holds {what}, which brings its own "
                          "architecture; drop --arch")


def _sniff(path: Path) -> str:
    """The file's format from its content: pt2, torchscript, torch-zip, safetensors or pickle."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if head.startswith(_ZIP_MAGIC):
        return _sniff_zip(path)
    if _looks_like_safetensors(head, size):
        return "safetensors"
    if path.suffix == ".safetensors":
        raise _corrupt(path, "its header is not a safetensors header")
    return "pickle"


def _sniff_zip(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = {_strip_root(n) for n in zf.namelist()}
    except (zipfile.BadZipFile, OSError) as exc:
        raise _corrupt(path, f"it starts like a zip archive but cannot be read ({exc})") from exc
    if "archive_format" in names:
        return "pt2"
    if "constants.pkl" in names or any(n.startswith("code/") for n in names):
        return "torchscript"
    if "data.pkl" in names:
        return "torch-zip"
    raise ModelLoadError(f"{path} is a zip archive but not one PyTorch wrote (no data.pkl, "
                         "TorchScript code or .pt2 layout); save the model with torch.save, "
                         "torch.export.save or safetensors")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def _corrupt(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(f"{path} is not a readable PyTorch/safetensors file: {why}. Check that "
                          "the file was copied completely, or re-save it")


def _loaded_module(module: nn.Module, path: Path) -> LoadedModel:
    module.eval()
    return LoadedModel(module, None, _family_of(module), path.stem, str(path),
                       _sha256(path), _module_hints(module))


# --------------------------------------------------------------------------- torch pickles

def _read_torch_file(path: Path, trust_pickle: bool) -> Any:
    """torch.load with weights_only=True; full pickle only with trust_pickle."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for foreign globals, RuntimeError for bad zips
        safe_error = exc
    imports = _pickle_imports_of_file(path)
    if imports is None:
        raise _corrupt(path, "its bytes are neither a PyTorch zip archive, a safetensors file "
                             f"nor a pickle (torch.load said: {_torch_reason(safe_error)})"
                       ) from safe_error
    if not _unsafe_names(imports):
        raise _corrupt(path, f"torch.load said: {_torch_reason(safe_error)}") from safe_error
    if not trust_pickle:
        raise _unsafe_pickle_error(path, _unsafe_names(imports)) from None
    return _read_torch_file_trusted(path)


def _torch_reason(exc: BaseException) -> str:
    """The specific line of a torch.load error, without its generic weights_only advice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            detail = line.split("WeightsUnpickler error", 1)[1].lstrip(": ").strip()
            if not detail and index + 1 < len(lines):
                detail = lines[index + 1]
            return detail or line
    return lines[0] if lines else type(exc).__name__


def _read_torch_file_trusted(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:
        raise ModelLoadError(f"{path} holds a pickled object whose code lives in module "
                             f"{exc.name!r}, which is not importable here; put the package that "
                             "defines the model on PYTHONPATH, or save a state dict / .pt2 "
                             "instead") from exc
    except AttributeError as exc:
        raise ModelLoadError(f"{path} holds a pickled object whose class no longer exists in its "
                             f"module ({exc}); load it where it was saved and re-save it with "
                             "torch.export.save or as a state dict") from exc
    except Exception as exc:
        raise _corrupt(path, _first_line(exc)) from exc


def _unsafe_pickle_error(path: Path, names: list[str]) -> ModelLoadError:
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return ModelLoadError(
        f"{path} holds a pickled Python object (it imports {shown}), not just weights. Loading it "
        "would run arbitrary code from the file: a pickle can execute code when it is read, so "
        "vitopt refuses by default. Instead: save a state dict with "
        "torch.save(model.state_dict(), 'weights.pt') and pass --arch (e.g. --arch timm:NAME or "
        "--arch hf:DIR); or export the model with torch.export.save(torch.export.export(model, "
        "(example,)), 'model.pt2'); or, only if you trust this file and where it came from, pass "
        "--trust-pickle (trust_pickle=True)")


# Globals torch's weights_only unpickler accepts: they rebuild tensors and containers only.
def _find_state_dict(obj: Any) -> dict | None:
    """The state dict in obj: obj itself, or under 'state_dict' / 'model' / 'model_state_dict'."""
    if _is_tensor_mapping(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if _is_tensor_mapping(obj.get(key)):
                return dict(obj[key])
    return None


def _is_tensor_mapping(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError and friends
        raise _corrupt(path, _first_line(exc)) from exc


def _read_weights(path: Path, trust_pickle: bool) -> dict:
    """A state dict from a weights file (safetensors or a torch pickle)."""
    _check_file(path)
    kind = _sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind in ("pt2", "torchscript"):
        raise ModelLoadError(f"weights file {path} holds a whole {kind} model, not a state dict; "
                             "load it directly as the model spec instead")
    obj = _read_torch_file(path, trust_pickle)
    state = _find_state_dict(obj)
    if state is None and isinstance(obj, nn.Module):
        state = obj.state_dict()
    if state is None:
        raise ModelLoadError(f"weights file {path} holds {_describe(obj)}, not a state dict of "
                             "tensors; save it with torch.save(model.state_dict(), PATH)")
    return state


def _load_state_dict_file(path: Path, state: dict, arch: str | None) -> LoadedModel:
    if arch is None:
        raise ModelLoadError(f"{path}: this file holds only weights (a state dict); say which "
                             "architecture with --arch timm:NAME or --arch hf:DIR")
    built = _build_arch(arch)
    _load_strict(built, state, str(path), arch)
    loaded = built.loaded
    loaded.source_path, loaded.source_sha256 = str(path), _sha256(path)
    return loaded


def _with_weights(built: _Built, path: Path, trust_pickle: bool) -> LoadedModel:
    state = _read_weights(path, trust_pickle)
    _load_strict(built, state, str(path), built.loaded.name)
    built.loaded.source_path, built.loaded.source_sha256 = str(path), _sha256(path)
    return built.loaded


def _load_strict(built: _Built, state: dict, source: str, arch: str) -> None:
    """Copy state into the built model; every key and shape must match (named otherwise)."""
    module = built.loaded.module
    expected = module.state_dict()
    state = _strip_wrapper_prefix(state, expected, "module.")
    if built.strip_prefix:
        state = {k: v for k, v in state.items() if not k.startswith(built.ignore_prefixes)}
        state = _strip_wrapper_prefix(state, expected, built.strip_prefix)
    state = {k: v for k, v in state.items()
             if not (built.ignore_prefixes and k.startswith(built.ignore_prefixes))}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    _raise_on_key_problems(f"the weights in {source}", arch, missing, unexpected, mismatched)
    module.load_state_dict(state, strict=True)
    module.eval()


def _strip_wrapper_prefix(state: dict, expected: Mapping, prefix: str) -> dict:
    """Drop a prefix on every key that the model lacks ('module.' from DataParallel / DDP)."""
    if state and all(k.startswith(prefix) for k in state) and \
            not any(k.startswith(prefix) for k in expected):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _raise_on_key_problems(what: str, arch: str, missing: list, unexpected: list,
                           mismatched: list) -> None:
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, keys in (("missing from the file", missing), ("unexpected in the file", unexpected),
                        ("with a different shape", mismatched)):
        if keys:
            shown = "; ".join(keys[:5]) + (f"; ... ({len(keys)} in all)" if len(keys) > 5 else "")
            parts.append(f"{len(keys)} key(s) {label}: {shown}")
    raise ModelLoadError(
        f"{what} do not fit the architecture {arch!r}. " + ". ".join(parts) + ". Check that the "
        "architecture is the one that saved these weights, including its options (for timm, e.g. "
        "timm:NAME:img_size=32,patch_size=8,depth=6,num_classes=10)")


# ----------------------------------------------------------------------- TorchScript, .pt2

def _load_torchscript(path: Path) -> LoadedModel:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated",
                                    category=FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise _corrupt(path, f"torch.jit.load failed: {_first_line(exc)}") from exc
    module.eval()
    return LoadedModel(module, None, "torchscript", path.stem, str(path), _sha256(path),
                       _empty_hints())


def _load_pt2(path: Path, trust_pickle: bool) -> LoadedModel:
    data = path.read_bytes()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            risky = [] if trust_pickle else _pt2_pickled_members(zf)
    except (zipfile.BadZipFile, ValueError, KeyError) as exc:
        raise _corrupt(path, f"its .pt2 archive cannot be read ({exc})") from exc
    if risky:
        raise ModelLoadError(
            f"{path} is an exported program, but torch.export.load would unpickle these members "
            f"with full pickle, which can run arbitrary code: {', '.join(risky[:5])}. Re-export "
            "the model with torch.export.save from plain tensors, or pass --trust-pickle "
            "(trust_pickle=True) only if you trust this file")
    exported = _torch_export_load(path, data)
    return LoadedModel(None, exported, "exported", path.stem, str(path),
                       hashlib.sha256(data).hexdigest(), _exported_hints(exported))


def _torch_export_load(path: Path, data: bytes):
    try:
        return torch.export.load(io.BytesIO(data))
    except Exception as exc:
        raise _corrupt(path, f"torch.export.load failed: {_first_line(exc)}") from exc


def _pt2_pickled_members(zf: zipfile.ZipFile) -> list[str]:
    """Members torch.export.load would unpickle with weights_only=False that are not plain tensors.

    Raw tensor payloads (listed with use_pickle=false in the weights/constants configs) and JSON
    are not unpickled. Pickled payloads, sample inputs and legacy files are, so they must load
    with weights_only=True; opaque and custom objects are always full pickle.
    """
    raw = _pt2_raw_payloads(zf)
    risky = []
    for member in zf.namelist():
        rel = _strip_root(member)
        if not rel.startswith(("data/weights/", "data/constants/", "data/sample_inputs/")):
            continue
        if rel.endswith("/") or rel.endswith(".json") or rel in raw:
            continue
        base = posixpath.basename(rel)
        if base.startswith(("opaque_obj_", "custom_obj_")) or not _loads_weights_only(zf, member):
            risky.append(rel)
    return risky


def _pt2_raw_payloads(zf: zipfile.ZipFile) -> set[str]:
    raw = set()
    for member in zf.namelist():
        rel = _strip_root(member)
        if not (rel.startswith(("data/weights/", "data/constants/")) and rel.endswith(".json")):
            continue
        config = json.loads(zf.read(member)).get("config", {})
        folder = posixpath.dirname(rel)
        for entry in config.values():
            name = entry.get("path_name", "") if isinstance(entry, dict) else ""
            if entry.get("use_pickle") is False and name.startswith(("weight_", "tensor_")):
                raw.add(posixpath.join(folder, name))
    return raw


def _loads_weights_only(zf: zipfile.ZipFile, member: str) -> bool:
    try:
        torch.load(io.BytesIO(zf.read(member)), map_location="cpu", weights_only=True)
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------------- hints

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_files(paths: list[Path], root: Path) -> str:
    """One digest over several files: each file's relative name, a NUL, then its bytes."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)[:5]
        return f"a {type(obj).__name__} with keys {keys}" + (" ..." if len(obj) > 5 else "")
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

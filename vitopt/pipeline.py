"""Passes: the registry, configs, PassResult, presets and the pipeline that runs them.

A pass is `fn(ir, config) -> PassResult`, registered under the name of its file in
`passes/` with a frozen config dataclass and a declaration of whether it is exact or
lossy. Pipelines are data (lists of PassSpec); the order comes from the preset, never
from registration. The pipeline copies the IR once, runs each pass, checks invariants
after each (and numerics after exact passes), times each and records what each did.
"""
from __future__ import annotations

import dataclasses
import importlib
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from vitopt.errors import ConfigError, NumericsError
from vitopt.ir.encoder import EncoderIR
from vitopt.ir.printer import format_ir


@dataclass(frozen=True)
class PassConfig:
    """Base of pass configs: frozen; subclasses validate in `validate()` and raise ConfigError."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        pass


@dataclass
class PassResult:
    ir: EncoderIR
    modified: bool
    stats: Dict[str, object] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


@dataclass
class PassContext:
    """Data some passes need beyond the IR and their config (calibration, evaluation images).

    calib: normalized images [N, C, H, W] the IR accepts, or None (a pass that needs data then
    falls back to synthetic random images and warns). calib_source: where they came from.
    """

    calib: Optional[torch.Tensor] = None
    calib_source: str = ""
    #: labelled images for accuracy-driven decisions (quantize_int8's max_accuracy_drop).
    eval_images: Optional[torch.Tensor] = None
    eval_labels: Optional[torch.Tensor] = None
    #: the device the engine runs on ("cpu" or "cuda"): quantize_int8's overflow fix depends on it
    device: str = "cpu"


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[..., PassResult]
    config: type
    exact: bool
    uses_context: bool = False  # fn(ir, config, context) instead of fn(ir, config)

    @property
    def summary(self) -> str:
        doc = (self.fn.__module__ and importlib.import_module(self.fn.__module__).__doc__) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


_REGISTRY: Dict[str, PassInfo] = {}


def register_pass(name: str, *, config: type, exact: bool, uses_context: bool = False):
    """Decorator: register `fn` as pass `name`. The registry refuses duplicate names.
    `uses_context`: the pass takes a third argument, the run's PassContext."""

    def wrap(fn):
        if name in _REGISTRY:
            raise RuntimeError(f"a pass named {name!r} is already registered (by "
                               f"{_REGISTRY[name].fn.__module__}); pass names must be unique")
        module_name = fn.__module__.rsplit(".", 1)[-1]
        if module_name != name:
            raise RuntimeError(f"pass {name!r} lives in {fn.__module__}: file name and pass name "
                               f"must be the same")
        if not (dataclasses.is_dataclass(config) and issubclass(config, PassConfig)):
            raise RuntimeError(f"pass {name!r}: config must be a frozen PassConfig dataclass")
        _REGISTRY[name] = PassInfo(name, fn, config, exact, uses_context)
        return fn

    return wrap


def registry() -> Dict[str, PassInfo]:
    """All registered passes by name (importing vitopt.passes registers the built-in ones)."""
    importlib.import_module("vitopt.passes")
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> PassInfo:
    passes = registry()
    if name not in passes:
        raise ConfigError(f"unknown pass {name!r}; registered passes: {', '.join(passes)} "
                          f"(see `vitopt passes`)")
    return passes[name]


# --- pass specs and presets -------------------------------------------------------------
@dataclass(frozen=True)
class PassSpec:
    name: str
    options: Dict[str, object] = field(default_factory=dict)

    def config(self) -> PassConfig:
        info = get_pass(self.name)
        return build_config(info, self.options)

    def to_dict(self) -> dict:
        return {"name": self.name, "config": dataclasses.asdict(self.config())}


#: Passes that stay last in a preset: passes added with --pass go before them
#: (trim_last_block must see the final token schedule; see its docstring) ...
FINAL_PASSES = ("trim_last_block",)
#: ... except precision passes, which go after them: they keep the token schedule, the exact
#: passes before them are then checked on the float IR (a fake-quantized IR rounds the
#: trimmed block's 1-row GEMMs differently from the full ones, which can move a value across
#: a quantization step), and calibration sees the graph that runs.
PRECISION_PASSES = ("quantize_int8", "cast_fp16", "cast_bf16")

#: Named pipelines. Order matters and lives here.
PRESETS: Dict[str, List[PassSpec]] = {
    "none": [],
    "lossless": [PassSpec("fuse_qkv"), PassSpec("fold_layer_scale"), PassSpec("trim_last_block")],
    # Token merging (ToMe) to a FLOPs budget, r per block capped at a share of the patch tokens
    # (vitopt.schedule.merge_schedule); chosen with benchmarks/token_reduction.py on the digits
    # proxy (accuracy) and DeiT-S/16 on OpenVINO bf16 (speed): DeiT-S gets r = 15 / r = 16.
    "balanced": [PassSpec("fuse_qkv"), PassSpec("fold_layer_scale"),
                 PassSpec("merge_tokens", {"flops": 0.55, "max_rate": 0.1}),
                 PassSpec("trim_last_block")],
    "fast": [PassSpec("fuse_qkv"), PassSpec("fold_layer_scale"),
             PassSpec("merge_tokens", {"flops": 0.5, "max_rate": 0.15}),
             PassSpec("trim_last_block")],
}


def build_config(info: PassInfo, options: Dict[str, object]) -> PassConfig:
    fields = {f.name: f for f in dataclasses.fields(info.config)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(f"pass {info.name!r} has no option {', '.join(map(repr, unknown))}; "
                          f"its options are: {', '.join(fields) or 'none'}")
    hints = typing.get_type_hints(info.config)
    values = {k: _coerce(info.name, k, v, hints[k]) for k, v in options.items()}
    try:
        return info.config(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"pass {info.name!r}: {exc}") from exc


def _coerce(pass_name: str, key: str, value, hint):
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:
        if value.lower() in ("none", ""):
            return None
        return _coerce(pass_name, key, value, args[0])
    try:
        if hint is bool:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        if hint in (int, float, str):
            return hint(value)
        if origin is tuple:
            item = typing.get_args(hint)[0]
            return tuple(item(v) for v in value.split(",") if v.strip())
    except ValueError:
        pass
    raise ConfigError(f"pass {pass_name!r}: option {key}={value!r} is not a valid {_type_name(hint)}")


def _type_name(hint) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def parse_pass_option(text: str) -> PassSpec:
    """`name` or `name:key=value:key=value` (lists as comma-separated values)."""
    name, *pairs = text.split(":")
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"bad pass option {pair!r} in {text!r}; write name:key=value")
        key, value = pair.split("=", 1)
        options[key.strip()] = value.strip()
    get_pass(name.strip())
    return PassSpec(name.strip(), options)


def resolve_pipeline(preset: str = "none", extra: Sequence[str] = ()) -> List[PassSpec]:
    """A preset's pass list with `--pass` options applied: they override a pass already in the
    preset (same name) or are appended after it, before its FINAL_PASSES (precision passes
    after them)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    specs = list(PRESETS[preset])
    for text in extra:
        spec = parse_pass_option(text)
        for index, existing in enumerate(specs):
            if existing.name == spec.name:
                specs[index] = PassSpec(spec.name, {**existing.options, **spec.options})
                break
        else:
            final = [i for i, s in enumerate(specs) if s.name in FINAL_PASSES]
            before_final = spec.name not in FINAL_PASSES + PRECISION_PASSES
            at = final[0] if final and before_final else len(specs)
            specs.insert(at, spec)
    for spec in specs:
        spec.config()  # validate every config before anything runs
    return specs


# --- running ----------------------------------------------------------------------------
@dataclass
class PassRecord:
    name: str
    config: dict
    exact: bool
    modified: bool
    seconds: float
    stats: dict
    notes: List[str]
    gflops_before: float
    gflops_after: float
    tokens_before: List[int]
    tokens_after: List[int]


@dataclass
class PipelineResult:
    ir: EncoderIR
    records: List[PassRecord]


#: Exact passes must keep the output within this (max abs, fp32, relative to scale).
EXACT_TOLERANCE = 1e-4


class Pipeline:
    def __init__(self, specs: Sequence[PassSpec]):
        self.specs = list(specs)

    @classmethod
    def from_preset(cls, preset: str = "none", extra: Sequence[str] = ()) -> "Pipeline":
        return cls(resolve_pipeline(preset, extra))

    def run(self, ir: EncoderIR, *, dump_dir: Optional[str] = None,
            log: Optional[Callable[[str], None]] = None,
            context: Optional[PassContext] = None) -> PipelineResult:
        ir = ir.clone()
        context = context or PassContext()
        records: List[PassRecord] = []
        dump = Path(dump_dir) if dump_dir else None
        if dump:
            dump.mkdir(parents=True, exist_ok=True)
            (dump / "000_input.txt").write_text(format_ir(ir))
        probe = _probe_input(ir)
        for index, spec in enumerate(self.specs, start=1):
            info, config = get_pass(spec.name), spec.config()
            before_flops, before_tokens = ir.flops(), ir.token_counts()
            reference = _run(ir, probe) if info.exact else None
            start = time.perf_counter()
            result = info.fn(ir, config, context) if info.uses_context else info.fn(ir, config)
            seconds = time.perf_counter() - start
            done = [r.name for r in records]
            try:
                result.ir.check()
            except ValueError as exc:
                raise NumericsError(f"pass {spec.name!r} broke an IR invariant: {exc} "
                                    f"(passes before it: {done or 'none'})") from exc
            if reference is not None and result.modified:
                _check_exact(spec.name, reference, _run(result.ir, probe), done)
            ir = result.ir
            records.append(PassRecord(spec.name, dataclasses.asdict(config), info.exact,
                                      result.modified, seconds, result.stats, result.notes,
                                      before_flops / 1e9, ir.flops() / 1e9, before_tokens,
                                      ir.token_counts()))
            if log:
                state = "changed the IR" if result.modified else "declined"
                log(f"pass {spec.name}: {state} in {seconds:.2f}s" +
                    (f" ({'; '.join(result.notes)})" if result.notes else ""))
            if dump:
                (dump / f"{index:03d}_{spec.name}.txt").write_text(format_ir(ir))
        return PipelineResult(ir, records)


def run_pipeline(ir: EncoderIR, preset: str = "none", extra: Sequence[str] = (), **kwargs) -> PipelineResult:
    return Pipeline.from_preset(preset, extra).run(ir, **kwargs)


def _probe_input(ir: EncoderIR) -> torch.Tensor:
    h, w = ir.meta.image_size
    return torch.randn(2, ir.meta.in_chans, h, w, generator=torch.Generator().manual_seed(1))


def _run(ir: EncoderIR, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ir(images)


def _check_exact(name: str, expected: torch.Tensor, actual: torch.Tensor, done: List[str]) -> None:
    diff = (actual - expected).abs().max().item()
    allowed = EXACT_TOLERANCE * max(1.0, expected.abs().max().item())
    if not diff <= allowed:
        raise NumericsError(f"exact pass {name!r} changed the output by {diff:.3g} (max abs; allowed "
                            f"{allowed:.3g}); passes before it: {done or 'none'}")

"""Benchmark matrices as data: load a JSON file, check it, and expand it into cells.

A matrix file:

    {"name": "cpu-quick", "description": "...", "device": "cpu", "threads": 2,
     "timing": {"warmup": 3, "runs": 10, "rounds": 2},
     "calib_images": 32,
     "groups": [
       {"model": "deit_s", "batches": [1, 8],
        "peers": ["torch-eager-fp32", "ov-bf16", "ov-nncf-int8"],
        "vitopt": [{"preset": "none", "precision": "bf16"},
                   {"passes": ["merge_tokens"], "precision": "bf16"},
                   {"preset": "balanced", "precision": "int8"}]}]}

Each group is one model: its peers and vitopt configurations are timed side by side at each
batch. A vitopt configuration has a `preset` (default "none"), optional `passes` (pass specs
as on the command line, `name[:key=value]`), a `precision` and optionally a `backend`;
`label` names it in tables (default `preset+passes precision`).

Optional: `cell_timeout_s` (default 600), the most one cell may take when cells run isolated,
each in its own process (always on cuda, `--isolate` elsewhere: vitopt/suite/isolation.py).

Loading checks every cell against the device before anything runs, so a typo cannot cost GPU
time: models, presets and passes exist, each peer runs on the matrix's device (PEER_DEVICES),
and a vitopt configuration's backend exists, serves the device and builds its precision there.
`python benchmarks/suite.py MATRIX --check` does only that (and builds the models on the CPU).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple, Union

from vitopt.errors import ConfigError

MATRIX_KEYS = {"name", "description", "device", "threads", "timing", "calib_images", "groups",
               "cell_timeout_s"}
GROUP_KEYS = {"model", "batches", "peers", "vitopt"}
VITOPT_KEYS = {"label", "preset", "passes", "precision", "backend"}
TIMING_KEYS = {"warmup", "runs", "rounds"}
MIN_RUNS = 10
DEFAULT_CELL_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Timing:
    warmup: int = 3
    runs: int = 10
    rounds: int = 2


@dataclass(frozen=True)
class VitoptConfig:
    preset: str = "none"
    passes: Tuple[str, ...] = ()
    precision: str = "fp32"
    backend: Optional[str] = None
    label: str = ""

    @property
    def kind(self) -> str:
        """baseline (no passes), pass (passes alone, no preset) or preset."""
        if self.preset != "none":
            return "preset"
        return "pass" if self.passes else "baseline"

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        what = "+".join(([self.preset] if self.preset != "none" or not self.passes else [])
                        + [p.split(":")[0] for p in self.passes])
        return f"vitopt {what} {self.precision}"


@dataclass(frozen=True)
class Group:
    model: str
    batches: Tuple[int, ...]
    peers: Tuple[str, ...] = ()
    vitopt: Tuple[VitoptConfig, ...] = ()


@dataclass(frozen=True)
class Matrix:
    name: str
    groups: Tuple[Group, ...]
    description: str = ""
    device: str = "cpu"
    threads: Optional[int] = None
    timing: Timing = field(default_factory=Timing)
    calib_images: int = 32
    path: Optional[str] = None
    cell_timeout_s: float = DEFAULT_CELL_TIMEOUT_S

    def only(self, models: List[str]) -> "Matrix":
        """The same matrix restricted to `models` (names as in the groups)."""
        known = [g.model for g in self.groups]
        missing = [m for m in models if m not in known]
        if missing:
            raise ConfigError(f"model(s) {', '.join(missing)} are not in matrix {self.name!r}; "
                              f"it has {', '.join(known)}")
        return _replace(self, groups=tuple(g for g in self.groups if g.model in models))

    def quick(self) -> "Matrix":
        """One timing round and two warm-up calls (still >= 10 timed runs per cell)."""
        return _replace(self, timing=Timing(warmup=min(2, self.timing.warmup),
                                            runs=max(MIN_RUNS, min(self.timing.runs, MIN_RUNS)),
                                            rounds=1))

    def to_dict(self) -> dict:
        """The matrix as matrix-file data (what parse_matrix reads back): isolated cells get
        their matrix this way, with any --models / --quick narrowing already applied."""
        def config(c: VitoptConfig) -> dict:
            return {"label": c.label, "preset": c.preset, "passes": list(c.passes),
                    "precision": c.precision, "backend": c.backend}
        return {"name": self.name, "description": self.description, "device": self.device,
                "threads": self.threads, "calib_images": self.calib_images,
                "cell_timeout_s": self.cell_timeout_s,
                "timing": {"warmup": self.timing.warmup, "runs": self.timing.runs,
                           "rounds": self.timing.rounds},
                "groups": [{"model": g.model, "batches": list(g.batches), "peers": list(g.peers),
                            "vitopt": [config(c) for c in g.vitopt]} for g in self.groups]}


def _replace(matrix: Matrix, **changes) -> Matrix:
    import dataclasses
    return dataclasses.replace(matrix, **changes)


def load_matrix(path: Union[str, Path]) -> Matrix:
    """Read and check the matrix file at `path` (ConfigError names the bad entry)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"matrix file {path} does not exist; see benchmarks/matrix/ for "
                          f"examples") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"matrix file {path} is not valid JSON: {exc}") from exc
    return parse_matrix(data, str(path))


def parse_matrix(data: dict, where: str = "matrix") -> Matrix:
    from vitopt.suite.models import MODELS
    from vitopt.suite.peers import PEER_DEVICES, PEERS
    _check_keys(data, MATRIX_KEYS, where, required={"name", "groups"})
    timing = data.get("timing", {})
    _check_keys(timing, TIMING_KEYS, f"{where}: timing")
    timing = Timing(**timing)
    if timing.runs < MIN_RUNS or timing.rounds < 1 or timing.warmup < 1:
        raise ConfigError(f"{where}: timing {timing} needs runs >= {MIN_RUNS}, rounds >= 1 and "
                          f"warmup >= 1")
    device = data.get("device", "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"{where}: device {device!r} must be cpu or cuda")
    threads = data.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"{where}: threads {threads!r} must be a positive integer or null")
    cell_timeout = data.get("cell_timeout_s", DEFAULT_CELL_TIMEOUT_S)
    if (not isinstance(cell_timeout, (int, float)) or isinstance(cell_timeout, bool)
            or cell_timeout < 10):
        raise ConfigError(f"{where}: cell_timeout_s {cell_timeout!r} must be a number >= 10 "
                          f"(seconds one isolated cell may take)")
    groups = []
    if not isinstance(data["groups"], list) or not data["groups"]:
        raise ConfigError(f"{where}: groups must be a non-empty list")
    for index, raw in enumerate(data["groups"]):
        here = f"{where}: groups[{index}]"
        _check_keys(raw, GROUP_KEYS, here, required={"model", "batches"})
        if raw["model"] not in MODELS:
            raise ConfigError(f"{here}: unknown model {raw['model']!r}; known: {', '.join(MODELS)}")
        batches = raw["batches"]
        if (not isinstance(batches, list) or not batches
                or any(not isinstance(b, int) or b < 1 for b in batches)):
            raise ConfigError(f"{here}: batches {batches!r} must be a list of positive integers")
        unknown = [p for p in raw.get("peers", []) if p not in PEERS]
        if unknown:
            raise ConfigError(f"{here}: unknown peer(s) {', '.join(unknown)}; known: "
                              f"{', '.join(PEERS)}")
        elsewhere = [f"{p} ({'/'.join(PEER_DEVICES[p])} only)" for p in raw.get("peers", [])
                     if device not in PEER_DEVICES[p]]
        if elsewhere:
            raise ConfigError(f"{here}: peer(s) {', '.join(elsewhere)} do not run on {device}; "
                              f"drop them from this {device} matrix")
        configs = tuple(_vitopt_config(c, f"{here}: vitopt[{i}]", device)
                        for i, c in enumerate(raw.get("vitopt", [])))
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ConfigError(f"{here}: two vitopt configurations share a name ({names}); give "
                              f"them distinct labels")
        groups.append(Group(raw["model"], tuple(batches), tuple(raw.get("peers", [])), configs))
    return Matrix(name=str(data["name"]), groups=tuple(groups),
                  description=str(data.get("description", "")), device=device, threads=threads,
                  timing=timing, calib_images=int(data.get("calib_images", 32)), path=where,
                  cell_timeout_s=float(cell_timeout))


def _vitopt_config(raw: dict, where: str, device: str = "cpu") -> VitoptConfig:
    from vitopt.pipeline import resolve_pipeline
    _check_keys(raw, VITOPT_KEYS, where)
    passes = raw.get("passes", [])
    if not isinstance(passes, list):
        raise ConfigError(f"{where}: passes must be a list of pass specs, got {passes!r}")
    config = VitoptConfig(preset=raw.get("preset", "none"), passes=tuple(passes),
                          precision=raw.get("precision", "fp32"), backend=raw.get("backend"),
                          label=raw.get("label", ""))
    if config.precision not in ("fp32", "bf16", "fp16", "int8"):
        raise ConfigError(f"{where}: precision {config.precision!r} must be fp32, bf16, fp16 or "
                          f"int8")
    resolve_pipeline(config.preset, config.passes)  # unknown preset/pass -> ConfigError
    _check_backend(config, device, where)
    return config


def _check_backend(config: VitoptConfig, device: str, where: str) -> None:
    """The named backend (or, with none named, one of the device's target backends) builds for
    `device` and builds `config.precision` there: the class's precisions, less what its module
    refuses on the CPU (CPU_PRECISIONS); its module's DEVICES, where it has one, else the
    target's backend list, say which devices it serves. No engine library is imported."""
    import importlib
    from vitopt.backends import BACKENDS, get_backend
    from vitopt.targets import get_target

    def module_constant(name: str, constant: str):
        module = importlib.import_module(type(get_backend(name)).__module__)
        return getattr(module, constant, None)

    def serves(name: str) -> bool:
        devices = module_constant(name, "DEVICES")
        return device in devices if devices is not None else name in get_target(device).backends

    def precisions(name: str) -> tuple:
        cpu_only = module_constant(name, "CPU_PRECISIONS")
        return tuple(p for p in get_backend(name).precisions
                     if device != "cpu" or cpu_only is None or p in cpu_only)

    if config.backend is not None and not serves(config.backend):
        raise ConfigError(f"{where}: backend {config.backend!r} does not build for {device}; "
                          f"{device} backends: {', '.join(b for b in BACKENDS if serves(b))}")
    candidates = ([config.backend] if config.backend
                  else [b for b in get_target(device).backends if b in BACKENDS])
    if not any(config.precision in precisions(b) for b in candidates):
        runs = "; ".join(f"{b}: {', '.join(precisions(b))}" for b in candidates)
        raise ConfigError(f"{where}: precision {config.precision!r} is not built on {device} by "
                          f"{' or '.join(candidates)} ({runs}); pick one of those precisions or "
                          f"another backend")


def _check_keys(raw, allowed: set, where: str, required: set = frozenset()) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(sorted(allowed))}")
    missing = sorted(required - set(raw))
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")

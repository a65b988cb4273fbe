"""Import an EncoderIR into Relax stage by stage, with one function per kind of stage.

Why: TVM lowers one set of TIR functions per distinct tensor shape. Token merging gives every
block its own token count (DeiT-S `balanced`: 197, 182, ..., 32), so the whole-model import of
a merged DeiT-S lowers to 750 TIR functions against 42 without merging, and its CUDA build took
over 4 minutes on the H100 host of run 4 (180 s cross-compiled on a 2-core EPYC,
benchmarks/tvm_build_time.py). Here each stage becomes a call to a Relax function, and stages
that differ only in their weights and token count share one function with a symbolic count.

    mod, summary = import_stages(ir, example, plan, max_batch, transform=to_fp16)

Steps:
  1. run the IR once on the example to get the TokenState entering and leaving each stage;
  2. group stages by `structure_key`: the stage's type, its configuration (every plain
     attribute but its block index and expected token count), its parameter shapes and the
     TokenState fields it reads and writes. Two stages with one key compute the same function
     of (state, weights);
  3. export each group once (`StageCall`: the state's tensors, then the stage's parameters and
     buffers as inputs, through torch.func.functional_call) with a symbolic token count over
     its members' counts. A merge cannot export so: the sizes of its alternating A/B split are
     floor divisions of the count, whose sum export cannot prove for a plain symbol. It
     exports per parity instead, for counts 2 * half + parity, where the floors are exact
     (with `half` as an extra input, since TVM binds a variable only from a dimension that is
     the variable alone). What exports neither way gets one static function per count;
  4. import each program with from_exported_program (slices with symbolic bounds through
     tvm_aten_ops.symbolic_slice_converter) into one module as `stage{k}_{kind}`;
  5. precision (fp16) on the stage functions, then relax's LiftTransformParams moves their
     weight-only work (the transpose of every linear, fp16 casts, the head-averaged key
     weights) into `<name>_transform_params`, which runs here once per stage on the CPU;
  6. `main(images)` calls the stage functions in order, each with its stage's transformed
     weights as constants, so at run time no weight is transposed or cast, as in the
     whole-model import, where FoldConstant does that work.

DeiT-S `balanced`: 11 functions for its 39 stages (stem; attention of block 0, of blocks 1-10
and of the trimmed block 11; one MLP; the merge of block 0 and one per parity for the others;
norm, pool, head).
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vitopt.errors import LoweringError
from vitopt.ir.state import TokenState

#: TokenState fields, in the order a stage function takes and returns them.
FIELDS = tuple(f.name for f in dataclasses.fields(TokenState))
#: Attributes that name a stage instance rather than what it computes.
INSTANCE_ATTRIBUTES = frozenset({"block", "expected_tokens", "training"})


class StageCall(nn.Module):
    """A stage as a function of tensors: (state fields..., [half], parameters...) -> state fields.

    `half` (with `carrier`): an unused int8 tensor of length token_count // 2. A function
    exported for token counts 2 * half + parity needs it: TVM binds a symbolic variable only
    from a dimension that is that variable alone, never from 2 * half + 1.
    """

    def __init__(self, stage: nn.Module, fields_in: Sequence[str], fields_out: Sequence[str],
                 names: Sequence[str], carrier: bool = False):
        super().__init__()
        self.stage = stage
        self.fields_in, self.fields_out = tuple(fields_in), tuple(fields_out)
        self.names = tuple(names)
        self.carrier = bool(carrier)

    def forward(self, *tensors):
        count = len(self.fields_in)
        state = TokenState(**dict(zip(self.fields_in, tensors[:count])))
        weights = dict(zip(self.names, tensors[count + int(self.carrier):]))
        out = torch.func.functional_call(self.stage, weights, (state,))
        return tuple(getattr(out, name) for name in self.fields_out)


def stage_weights(stage: nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and buffers by their qualified names (what functional_call replaces)."""
    named = {name: p.detach() for name, p in stage.named_parameters()}
    named.update({name: b.detach() for name, b in stage.named_buffers()})
    return named


def structure_key(module: nn.Module, fields_in: Sequence[str] = (),
                  fields_out: Sequence[str] = ()) -> tuple:
    """What `module` computes, up to its weights' values: equal keys, same function.

    A tensor held as a plain attribute (not a parameter or buffer) is a constant the export
    bakes in, so its contents go into the key. A value the key cannot describe (a callable,
    an object) makes the key unique to this module.
    """
    plain = []
    for name, value in sorted(vars(module).items()):
        if name.startswith("_") or name in INSTANCE_ATTRIBUTES:
            continue
        plain.append((name, _describe(value, module)))
    weights = tuple((name, tuple(t.shape), str(t.dtype))
                    for name, t in list(module.named_parameters(recurse=False)) +
                    list(module.named_buffers(recurse=False)))
    children = tuple((name, structure_key(child)) for name, child in module.named_children())
    return (type(module).__qualname__, tuple(plain), weights, children,
            tuple(fields_in), tuple(fields_out))


def _describe(value, owner: nn.Module):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_describe(v, owner) for v in value)
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)  # 1-d: a 0-d tensor has no view
        return ("tensor", tuple(value.shape), str(data.dtype),
                hashlib.sha1(data.view(torch.uint8).numpy().tobytes()).hexdigest())
    if isinstance(value, torch.dtype):
        return str(value)
    return ("unique", id(owner))


# --- step 1 and 2: states and groups ------------------------------------------------------
def stage_states(ir, example: torch.Tensor) -> List[TokenState]:
    """The TokenState entering each stage, and the one leaving the last (len(stages) + 1)."""
    states = [TokenState(example)]
    with torch.no_grad():
        for stage in ir.stages:
            states.append(stage(states[-1]))
    return states


def present(state: TokenState) -> Tuple[str, ...]:
    return tuple(name for name in FIELDS if getattr(state, name) is not None)


def group_stages(ir, states: Sequence[TokenState]) -> List[List[int]]:
    """Stage indices grouped by structure_key, in order of first appearance."""
    groups: Dict[tuple, List[int]] = {}
    for index, stage in enumerate(ir.stages):
        key = structure_key(stage, present(states[index]), present(states[index + 1]))
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def token_counts(states: Sequence[TokenState], members: Sequence[int]) -> List[int]:
    """Token counts entering the members (states with a token axis: x is [B, N, D])."""
    return [n for n in (_tokens_in(states[i]) for i in members) if n is not None]


# --- step 3: export ------------------------------------------------------------------------
def export_stage(stage: nn.Module, state_in: TokenState, state_out: TokenState, *,
                 dynamic_batch: Optional[int], tokens: Optional[Tuple[int, int]] = None,
                 parity: Optional[int] = None):
    """torch.export of StageCall(stage) with a symbolic batch (1..dynamic_batch) where given
    and a symbolic token count where `tokens` = (min, max) is: any count in the range, or with
    `parity` (0 or 1) the counts 2 * half + parity, `half` then an extra input (StageCall).
    Raises what torch.export raises."""
    from torch.export import Dim

    fields_in, fields_out = present(state_in), present(state_out)
    weights = stage_weights(stage)
    carrier = tokens is not None and parity is not None
    call = StageCall(stage, fields_in, fields_out, list(weights), carrier=carrier)
    batch = Dim("batch", min=1, max=max(2, dynamic_batch)) if dynamic_batch else None
    half = token = None
    if carrier:
        half = Dim("half", min=tokens[0] // 2, max=tokens[1] // 2)
        token = 2 * half + parity if parity else 2 * half
    elif tokens is not None:
        token = Dim("tokens", min=tokens[0], max=tokens[1])
    has_tokens = state_in.x.dim() == 3
    specs = []
    for name in fields_in:
        spec = {}
        if batch is not None:
            spec[0] = batch
        if token is not None and has_tokens:
            spec[1] = token
        specs.append(spec or None)
    args = tuple(getattr(state_in, name) for name in fields_in)
    if carrier:
        specs.append({0: half})
        args += (carrier_tensor(int(state_in.x.shape[1])),)
    specs += [None] * len(weights)
    args += tuple(weights.values())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(call, args, dynamic_shapes=(tuple(specs),))


def carrier_tensor(tokens: int) -> torch.Tensor:
    return torch.zeros(tokens // 2, dtype=torch.int8)


# --- step 4: import, lift the weight work, assemble ---------------------------------------
def import_stages(ir, example: torch.Tensor, plan: Dict[str, object], max_batch: int, *,
                  transform: Optional[Callable] = None, log: Optional[Callable] = None):
    """(Relax IRModule whose `main(images)` returns (output,), summary dict); see the module
    doc. transform: IRModule -> IRModule applied to the stage functions before their weight
    work is lifted (the backend's rewrites and fp16)."""
    import copy

    from tvm import relax

    log = log or (lambda message: None)
    ir = copy.deepcopy(ir).eval().float()
    batch = 2 if plan["batch"] is None else int(plan["batch"])
    images = example[:1].float().expand(batch, -1, -1, -1).contiguous()
    dynamic_batch = max_batch if plan["batch"] is None else None
    states = stage_states(ir, images)
    imported, shared = import_groups(ir, states, dynamic_batch, log)
    mod, names = collect(ir, states, imported)
    if transform is not None:
        mod = transform(mod)
    mod = relax.transform.LiftTransformParams()(mod)
    weights = transformed_weights(mod, ir, names)
    carriers = {index: carrier for index, (_, carrier) in imported.items()}
    mod = assemble(mod, ir, states, names, weights, carriers, dynamic_batch)
    summary = {"lowering": "stage functions", "stages": len(ir.stages),
               "functions": len(set(names)), "shared": shared}
    return mod, summary


def import_groups(ir, states: Sequence[TokenState], dynamic_batch: Optional[int], log):
    """({stage index: (imported IRModule, takes the `half` input)}, shared-function notes).

    A group whose members see several token counts gets one function with a symbolic count
    when that exports. When not (a merge: the sizes of its alternating A/B split depend on the
    parity of the count, which export cannot prove for a plain symbol), one function per
    parity of the count (counts 2 * half + parity, exact for a symbol `half`), and else one
    static function per count."""
    imported: Dict[int, Tuple[object, bool]] = {}
    shared = []
    for members in group_stages(ir, states):
        kind = ir.stages[members[0]].kind
        for same, module, carrier, tokens in _group_modules(ir, states, members, dynamic_batch,
                                                            log):
            imported.update({index: (module, carrier) for index in same})
            if len(same) > 1:
                shared.append({"kind": kind, "stages": len(same), "tokens": tokens})
    return imported, shared


def _group_modules(ir, states, members: List[int], dynamic_batch: Optional[int], log):
    """(members, imported IRModule, carrier, token description) for the functions of a group:
    a symbolic count, else one per parity, else static; a symbolic function that does not
    export or import falls back to the next way."""
    def build(same, **tokens):
        head = same[0]
        program = export_stage(ir.stages[head], states[head], states[head + 1],
                               dynamic_batch=dynamic_batch, **tokens)
        return _import(program, symbolic=bool(tokens))

    counts = sorted(set(token_counts(states, members)))
    kind = ir.stages[members[0]].kind
    if len(counts) > 1:
        try:
            yield members, build(members, tokens=(counts[0], counts[-1])), False, \
                f"symbolic, {counts[0]}..{counts[-1]}"
            return
        except Exception as exc:  # noqa: BLE001 - any export/import failure: try the next way
            first_failure = type(exc).__name__
        static = []
        for parity in (0, 1):
            same = [i for i in members if _tokens_in(states[i]) % 2 == parity]
            seen = sorted({_tokens_in(states[i]) for i in same})
            if len(seen) < 2:
                static += same
                continue
            try:
                module = build(same, tokens=(seen[0], seen[-1]), parity=parity)
            except Exception as exc:  # noqa: BLE001 - any export/import failure: static
                log(f"TVM stage import: {len(same)} {kind} stages keep one function per token "
                    f"count: neither a symbolic count ({first_failure}) nor one of parity "
                    f"{parity} ({type(exc).__name__}) exported and imported")
                static += same
            else:
                yield same, module, True, f"2 * half + {parity}, {seen[0]}..{seen[-1]}"
        members = sorted(static)
    by_count: Dict[Optional[int], List[int]] = {}
    for index in members:
        by_count.setdefault(_tokens_in(states[index]), []).append(index)
    for count, same in by_count.items():
        try:
            module = build(same)
        except LoweringError:  # the importer's, already worded
            raise
        except Exception as exc:  # torch.export raises many types; report them as one
            raise LoweringError(f"torch.export could not export the {kind} stage for TVM: "
                                f"{_last_line(exc)}") from exc
        yield same, module, False, count


def _tokens_in(state: TokenState) -> Optional[int]:
    return int(state.x.shape[1]) if state.x.dim() == 3 else None


def _import(program, symbolic: bool = False):
    """The exported program as a Relax IRModule (its `main` is the stage function); with
    `symbolic`, slices take their bounds as in range (tvm_aten_ops.symbolic_slice_converter)."""
    from tvm.relax.frontend.torch import from_exported_program

    from vitopt.lower.tvm_aten_ops import symbolic_slice_converter
    from vitopt.lower.tvm_ops import custom_convert_map

    converters = custom_convert_map()
    if symbolic:
        converters["slice.Tensor"] = symbolic_slice_converter
    try:
        return from_exported_program(program, custom_convert_map=converters)
    except Exception as exc:  # the importer raises on ops it has no converter for
        raise LoweringError(f"TVM's exported-program importer could not convert a stage: "
                            f"{_last_line(exc)}; an op vitopt adds needs a converter in "
                            f"vitopt/lower/tvm_ops.py") from exc


def _last_line(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def collect(ir, states: Sequence[TokenState], imported: Dict[int, object]):
    """(IRModule of every stage function and kernel, function name per stage). Each stage
    function is marked with its count of runtime inputs (`num_input`), the rest of its
    parameters being weights, which LiftTransformParams reads."""
    from tvm import relax

    bb = relax.BlockBuilder()
    added: Dict[int, str] = {}
    names = []
    for index, stage in enumerate(ir.stages):
        module, carrier = imported[index]
        if id(module) not in added:
            inputs = len(present(states[index])) + int(carrier)
            added[id(module)] = _add_module(bb, module, f"stage{index}_{stage.kind}", inputs)
        names.append(added[id(module)])
    return bb.get(), names


def _add_module(bb, module, name: str, inputs: int) -> str:
    """Add `module`'s kernels (deduplicated by add_func) and its main, as `name`, with main's
    references to the kernels renamed to what bb called them."""
    renamed = {}
    for gvar, func in module.functions_items():
        if gvar.name_hint != "main":
            renamed[gvar.name_hint] = bb.add_func(func, gvar.name_hint)
    main = module["main"]
    if renamed:
        main = _rename_globals(main, renamed)
    gvar = bb.add_func(main.with_attrs({"global_symbol": name, "num_input": inputs}), name)
    return gvar.name_hint


def _rename_globals(func, renamed: Dict[str, object]):
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rename(relax.PyExprMutator):
        def visit_global_var_(self, gvar):
            return renamed.get(gvar.name_hint, gvar)

    return _Rename().visit_expr(func)


def transformed_weights(mod, ir, names: Sequence[str]) -> List[list]:
    """Each stage's weights after its function's lifted weight work (`<name>_transform_params`:
    the transposes of linears, fp16 casts, slices of the qkv weight), run here on the CPU
    once per stage: numpy arrays in the order the lifted function takes them."""
    import tvm
    from tvm import relax

    transforms = {name: mod[f"{name}_transform_params"] for name in set(names)}
    library = tvm.compile(tvm.IRModule({f"{name}_transform_params": func.with_attr(
        "global_symbol", f"{name}_transform_params") for name, func in transforms.items()}),
        target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(library, tvm.cpu())
    device = tvm.cpu()
    out = []
    for stage, name in zip(ir.stages, names):
        params = [tvm.runtime.tensor(w.cpu().contiguous().numpy(), device)
                  for w in stage_weights(stage).values()]
        result = vm[f"{name}_transform_params"](params)
        out.append([result[i].numpy() for i in range(len(result))])
    return out


def assemble(mod, ir, states: Sequence[TokenState], names: Sequence[str],
             weights: Sequence[list], carriers: Dict[int, bool], dynamic_batch: Optional[int]):
    """`main(images)`: the stage functions called in order, each with its stage's
    transformed weights as constants; the weight-transform functions are dropped."""
    from tvm import relax, tirx

    # A fresh builder with fresh GlobalVars: LiftTransformParams changed the stage functions'
    # signatures but not the types recorded on their old GlobalVars.
    bb = relax.BlockBuilder()
    kernels = {gvar.name_hint: bb.add_func(func, gvar.name_hint)
               for gvar, func in mod.functions_items() if not isinstance(func, relax.Function)}
    stage_vars = {gvar.name_hint: bb.add_func(_rename_globals(func, kernels), gvar.name_hint)
                  for gvar, func in mod.functions_items()
                  if isinstance(func, relax.Function)
                  and not gvar.name_hint.endswith("_transform_params")}
    shape = list(states[0].x.shape)
    attrs = None
    if dynamic_batch:
        shape[0] = tirx.Var("batch", "int64")
        # the range the whole-model import also gives its batch (static memory planning)
        attrs = {"tir_var_lower_bound": {"batch": 1},
                 "tir_var_upper_bound": {"batch": max(2, dynamic_batch)}}
    images = relax.Var("images", relax.TensorType(shape, "float32"))
    with bb.function("main", [images], attrs=attrs):
        with bb.dataflow():
            values = {"x": images}
            for index, name in enumerate(names):
                fields_in, fields_out = present(states[index]), present(states[index + 1])
                args = [values[field] for field in fields_in]
                if carriers[index]:
                    args.append(relax.const(carrier_tensor(int(states[index].x.shape[1])).numpy()))
                args += [relax.const(array) for array in weights[index]]
                out = bb.emit(relax.Call(stage_vars[name], args))
                values = {field: bb.emit(relax.TupleGetItem(out, i))
                          for i, field in enumerate(fields_out)}
            result = bb.emit_output(relax.Tuple([values["x"]]))
        bb.emit_func_output(result)
    return bb.get()

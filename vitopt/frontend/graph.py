"""Helpers for reading a torch.export ATen graph: parameters, dataflow, slicing, evaluation.

The lifter uses these to find the encoder's structure; nothing here knows about ViTs.
"""
from __future__ import annotations

import operator
from typing import Callable, Dict, Iterable, List, Optional, Set

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

aten = torch.ops.aten

#: Ops that pass their first argument through unchanged in an inference graph.
IDENTITY_OPS = {
    aten.dropout.default, aten.alias.default, aten.clone.default, aten.contiguous.default,
    aten.detach.default, aten.feature_dropout.default, aten.alpha_dropout.default,
}


def is_op(node: fx.Node, *targets) -> bool:
    return node.op == "call_function" and node.target in targets


def is_identity(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in IDENTITY_OPS:
        return True
    if node.target in (aten.to.dtype, aten._to_copy.default):
        val, src = node.meta.get("val"), node.args[0]
        src_val = src.meta.get("val") if isinstance(src, fx.Node) else None
        return src_val is not None and val is not None and val.dtype == src_val.dtype
    return False


def resolve(node):
    """Follow identity ops back to the node that really produced the value."""
    while isinstance(node, fx.Node) and is_identity(node):
        node = node.args[0]
    return node


def effective_users(node: fx.Node) -> List[fx.Node]:
    """The consumers of `node`, looking through identity ops."""
    out, todo = [], list(node.users)
    while todo:
        user = todo.pop(0)
        if is_identity(user) and resolve(user) is resolve(node):
            todo.extend(user.users)
        elif user not in out:
            out.append(user)
    return out


def value_shape(node) -> Optional[tuple]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


class GraphView:
    """An exported program's graph with its parameters resolved and an order index."""

    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        self.graph = ep.graph
        self.order: Dict[fx.Node, int] = {n: i for i, n in enumerate(self.graph.nodes)}
        self.tensors: Dict[str, torch.Tensor] = {}
        self.is_parameter: Dict[str, bool] = {}
        self.targets: Dict[str, str] = {}
        user_inputs = []
        for spec in ep.graph_signature.input_specs:
            name = spec.arg.name
            if spec.kind == InputKind.USER_INPUT:
                user_inputs.append(name)
                continue
            target = spec.target
            tensor = ep.state_dict.get(target)
            if tensor is None:
                tensor = ep.constants.get(target)
            if isinstance(tensor, torch.Tensor):
                self.tensors[name] = tensor.detach()
                self.is_parameter[name] = spec.kind == InputKind.PARAMETER
                self.targets[name] = target
        placeholders = {n.name: n for n in self.graph.nodes if n.op == "placeholder"}
        tensor_inputs = [placeholders[n] for n in user_inputs if isinstance(
            placeholders[n].meta.get("val"), torch.Tensor)]
        if len(tensor_inputs) != 1:
            raise ValueError(f"expected one image input, the graph has {len(tensor_inputs)}")
        self.input = tensor_inputs[0]
        self.output = resolve(self._single_output())

    def _single_output(self) -> fx.Node:
        out = next(n for n in self.graph.nodes if n.op == "output")
        values = [a for a in out.args[0] if isinstance(a, fx.Node)]
        if len(values) != 1:
            raise ValueError(f"expected one output tensor, the graph returns {len(values)}")
        return values[0]

    # --- parameters ---------------------------------------------------------------------
    def tensor(self, node) -> Optional[torch.Tensor]:
        """The parameter/buffer/constant a placeholder node stands for (None if it is not one)."""
        node = resolve(node)
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.tensors.get(node.name)
        return None

    def source_name(self, node) -> str:
        node = resolve(node)
        return self.targets.get(node.name, node.name) if isinstance(node, fx.Node) else str(node)

    # --- dataflow -----------------------------------------------------------------------
    def descendants(self, start: fx.Node, limit: Optional[fx.Node] = None) -> Set[fx.Node]:
        stop = self.order[limit] if limit is not None else len(self.order)
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for user in node.users:
                if user not in seen and self.order[user] <= stop:
                    seen.add(user)
                    todo.append(user)
        return seen

    def ancestors(self, node: fx.Node, stop: Iterable[fx.Node] = ()) -> Set[fx.Node]:
        stop = set(stop)
        seen, todo = set(), [node]
        while todo:
            current = todo.pop()
            if current in stop:
                continue
            for arg in current.all_input_nodes:
                if arg not in seen:
                    seen.add(arg)
                    todo.append(arg)
        return seen

    def between(self, start: fx.Node, end: fx.Node) -> List[fx.Node]:
        """Nodes on some path from start to end (both included), in graph order."""
        nodes = (self.descendants(start, limit=end) | {start}) & (self.ancestors(end) | {end})
        return sorted(nodes, key=self.order.__getitem__)

    # --- slicing ------------------------------------------------------------------------
    def extract(self, inputs: List[fx.Node], output: fx.Node) -> fx.GraphModule:
        """A GraphModule computing `output` from `inputs`; parameters become its attributes.

        The batch size read from the original image input (sym_size) is re-read from the
        slice's first input, so the slice keeps a dynamic batch.
        """
        root = nn.Module()
        graph = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        for index, node in enumerate(inputs):
            env[node] = graph.placeholder(f"x{index}" if index else "x")
        needed = self.ancestors(output, stop=inputs) | {output}
        for node in sorted(needed - set(inputs), key=self.order.__getitem__):
            if node is self.input:
                continue  # only its batch size may be read: remapped below
            if node.op == "placeholder":
                tensor = self.tensors.get(node.name)
                if tensor is None:
                    raise ValueError(f"the slice ending at {output.name!r} reads the model input "
                                     f"{node.name!r} directly")
                attr = self._register(root, node.name, tensor)
                env[node] = graph.get_attr(attr)
            elif (is_op(node, aten.sym_size.int) and node.args[0] is self.input
                  and self.input not in inputs):
                env[node] = graph.call_function(aten.sym_size.int, (env[inputs[0]], node.args[1]))
            elif node.op == "call_function":
                if self.input in node.all_input_nodes and self.input not in inputs:
                    raise ValueError(f"the slice ending at {output.name!r} reads the model input "
                                     f"in {node.name!r}")
                env[node] = graph.node_copy(node, lambda n: env[n])
            else:
                raise ValueError(f"cannot slice a graph holding a {node.op!r} node ({node.name})")
        graph.output(env[output])
        graph.eliminate_dead_code()
        return fx.GraphModule(root, graph)

    def _register(self, root: nn.Module, name: str, tensor: torch.Tensor) -> str:
        attr = self.source_name_for(name)
        if self.is_parameter.get(name):
            root.register_parameter(attr, nn.Parameter(tensor.clone(), requires_grad=False))
        else:
            root.register_buffer(attr, tensor.clone())
        return attr

    def source_name_for(self, placeholder_name: str) -> str:
        return self.targets.get(placeholder_name, placeholder_name).replace(".", "_")

    # --- evaluation ---------------------------------------------------------------------
    def evaluate(self, image: torch.Tensor, keep: Iterable[fx.Node]) -> Dict[fx.Node, torch.Tensor]:
        """Run the graph on real tensors and return the values of the nodes in `keep`."""
        keep = set(keep)
        last_use = {}
        for node in self.graph.nodes:
            for arg in node.all_input_nodes:
                last_use[arg] = node
        env: Dict[fx.Node, object] = {}
        kept: Dict[fx.Node, torch.Tensor] = {}

        def load(arg):
            return fx.node.map_arg(arg, lambda n: env[n])

        with torch.no_grad():
            for node in self.graph.nodes:
                if node.op == "placeholder":
                    env[node] = image if node is self.input else self.tensors.get(node.name)
                elif node.op == "call_function":
                    env[node] = node.target(*load(node.args), **load(node.kwargs))
                elif node.op == "output":
                    break
                else:
                    raise ValueError(f"cannot evaluate a {node.op!r} node ({node.name})")
                if node in keep:
                    kept[node] = env[node]
                for arg in node.all_input_nodes:  # free memory as we go
                    if last_use.get(arg) is node and arg not in keep:
                        env.pop(arg, None)
        return kept


def scalar_arg(node: fx.Node) -> Optional[float]:
    """For mul/div by a Python number, that number."""
    for arg in node.args[1:2]:
        if isinstance(arg, (int, float)):
            return float(arg)
    if isinstance(node.args[0], (int, float)):
        return float(node.args[0])
    return None


GETITEM = operator.getitem
Predicate = Callable[[fx.Node], bool]

"""Lift a torch.export ATen graph into the encoder IR and prove the lift exact.

The residual stream is found from dataflow alone: a node x whose users include a
LayerNorm L and an add x + f(L(x)) starts a branch. Following the adds gives the blocks;
what comes before the first is the stem (kept as a graph slice), what comes after the
last is the final norm, pooling and head. Every typed stage is then checked against the
graph's own values for the same input, and the first stage that differs is named.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import fx, nn

from vitopt.errors import NumericsError, UnsupportedModelError
from vitopt.frontend.graph import GraphView, aten, effective_users, is_op, resolve, value_shape
from vitopt.frontend.lift_blocks import Branch, lift_attention, lift_mlp
from vitopt.frontend.lift_pool import NotAttentionPool, lift_attention_pool
from vitopt.ir.encoder import EncoderIR, EncoderMeta
from vitopt.ir.stages import Head, Norm, Pool, Stem, TracedTail, layer_norm_from, linear_from
from vitopt.ir.state import TokenState
from vitopt.tolerances import tolerance

#: A lifted stage may differ from the graph by the fp32/torch bound, relative to the value's scale.
STAGE_TOLERANCE = tolerance("fp32", "torch").atol


class Lifter:
    def __init__(self, view: GraphView):
        self.view = view
        #: why the tail stayed a traced graph (None when it was typed)
        self.tail_note: Optional[str] = None

    # --- the residual stream ------------------------------------------------------------
    def branch_from(self, stream: fx.Node) -> Optional[Tuple[fx.Node, fx.Node, fx.Node]]:
        """(norm, residual add, branch output) when `stream` starts a pre-norm residual branch."""
        shape = value_shape(stream)
        if shape is None or len(shape) != 3:
            return None
        users = effective_users(stream)
        norms = [u for u in users if is_op(u, aten.layer_norm.default) and resolve(u.args[0]) is stream]
        adds = [u for u in users if is_op(u, aten.add.Tensor)]
        for norm in norms:
            reach = self.view.descendants(norm)
            for add in adds:
                others = [a for a in add.args if isinstance(a, fx.Node) and resolve(a) is not stream]
                if len(others) == 1 and (others[0] in reach):
                    return norm, add, others[0]
        return None

    def find_stream_start(self) -> fx.Node:
        for node in self.view.graph.nodes:
            if node.op == "call_function" and self.branch_from(node) is not None:
                return node
        ops = {}
        for node in self.view.graph.nodes:
            if node.op == "call_function":
                name = str(node.target).replace("aten.", "").replace(".default", "")
                ops[name] = ops.get(name, 0) + 1
        common = ", ".join(f"{k} x{v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:8])
        raise UnsupportedModelError(
            "this model is not a Vision Transformer encoder vitopt can lift: no pre-norm residual "
            f"block x + f(LayerNorm(x)) was found in its traced graph (most common ops: {common})")

    # --- the whole chain ----------------------------------------------------------------
    def lift(self, meta: EncoderMeta) -> Tuple[EncoderIR, List[fx.Node]]:
        """The IR, and for each of its stages the graph node that holds that stage's output."""
        start = self.find_stream_start()
        stages, streams = [self.lift_stem(start)], [start]
        stream = start
        while (found := self.branch_from(stream)) is not None:
            norm, add, out = found
            block = (len(stages) - 1) // 2
            branch = Branch(self.view, norm, out, block)
            expect_attention = len(stages) % 2 == 1
            if branch.is_attention() != expect_attention:
                kind = "an attention" if expect_attention else "an MLP"
                raise branch.refuse(f"expected {kind} branch here (blocks must alternate attention "
                                    f"and MLP; parallel or MLP-first blocks are not supported)")
            stages.append(lift_attention(branch) if expect_attention else lift_mlp(branch))
            streams.append(add)
            stream = add
        if len(stages) < 3 or len(stages) % 2 == 0:
            raise UnsupportedModelError(f"found {len(stages) - 1} residual branches after the stem; "
                                        f"expected attention/MLP pairs")
        tail, tail_outputs = self.lift_tail(stream, stages[0].num_prefix_tokens)
        stages.extend(tail)
        streams.extend(tail_outputs)
        if self.tail_note:
            meta.notes.append(self.tail_note)
        return EncoderIR(stages, meta), streams

    # --- stem ---------------------------------------------------------------------------
    def lift_stem(self, start: fx.Node) -> Stem:
        view = self.view
        convs = [n for n in view.ancestors(start) if is_op(n, aten.conv2d.default, aten.conv2d.padding,
                                                           aten.convolution.default)]
        if len(convs) != 1:
            raise UnsupportedModelError(f"expected one patch-embedding convolution before the first "
                                        f"block, found {len(convs)}")
        weight = view.tensor(convs[0].args[1])
        if weight is None:
            raise UnsupportedModelError("the patch-embedding convolution weight is not a stored parameter")
        image = value_shape(view.input)
        tokens = value_shape(start)
        patch = tuple(weight.shape[-2:])
        patches = (image[2] // patch[0]) * (image[3] // patch[1])
        prefix = tokens[1] - patches
        if prefix < 0:
            raise UnsupportedModelError(f"the stem makes {tokens[1]} tokens from {patches} patches")
        body = view.extract([view.input], start)
        return Stem(body, image_size=image[2:], patch_size=patch, in_chans=image[1],
                    embed_dim=tokens[2], num_prefix_tokens=prefix, num_tokens=tokens[1])

    # --- final norm, pooling, head ------------------------------------------------------
    def lift_tail(self, stream: fx.Node, prefix: int):
        """Stages after the last block, and the graph node holding each one's output."""
        view, output = self.view, self.view.output
        stages, outputs = [], []
        users = effective_users(stream)
        if len(users) == 1 and is_op(users[0], aten.layer_norm.default) and self._token_norm(users[0]):
            stream = users[0]
            stages.append(Norm(self._layer_norm(stream)))
            outputs.append(stream)
            users = effective_users(stream)
        if stream is output:
            return stages + [Pool("none"), Head()], outputs + [stream, stream]
        pooled, pool = self._pooling(stream, users, prefix)
        if pool is None:
            try:
                pooled, pool = lift_attention_pool(self, stream, STAGE_TOLERANCE)
            except NotAttentionPool as why:
                self.tail_note = (f"the layers after the last block are kept as a traced graph "
                                  f"(not typed as attention pooling: {why})")
                return stages + [TracedTail(view.extract([stream], output))], outputs + [output]
        return stages + [pool, self._head(pooled)], outputs + [pooled, output]

    def _token_norm(self, node: fx.Node) -> bool:
        return value_shape(node) is not None and len(value_shape(node)) == 3

    def _layer_norm(self, node: fx.Node) -> nn.LayerNorm:
        args = list(node.args) + [None] * (5 - len(node.args))
        eps = args[4] if args[4] is not None else 1e-5
        return layer_norm_from(self.view.tensor(args[2]), self.view.tensor(args[3]), float(eps),
                               tuple(args[1]))

    def _pooling(self, stream, users, prefix):
        if len(users) != 1:
            return None, None
        user = users[0]
        while _full_slice(user) and len(effective_users(user)) == 1:
            user = effective_users(user)[0]
        if is_op(user, aten.select.int) and user.args[1] == 1 and user.args[2] == 0 and prefix >= 1:
            return user, Pool("cls", prefix)
        start = 0
        if is_op(user, aten.slice.Tensor) and user.args[1] == 1 and len(effective_users(user)) == 1:
            start = user.args[2] if len(user.args) > 2 and user.args[2] is not None else 0
            end = user.args[3] if len(user.args) > 3 else None
            if end is not None and end < value_shape(stream)[1]:
                return None, None
            user = effective_users(user)[0]
        if is_op(user, aten.mean.dim) and list(user.args[1]) in ([1], [-2]) and not (
                len(user.args) > 2 and user.args[2]) and not user.kwargs.get("keepdim"):
            return user, Pool("mean", start)
        return None, None

    def _head(self, pooled: fx.Node) -> Head:
        view, output = self.view, self.view.output
        if pooled is output:
            return Head()
        users = effective_users(pooled)
        if len(users) == 1 and users[0] is output and is_op(output, aten.linear.default):
            weight = view.tensor(output.args[1])
            bias = view.tensor(output.args[2]) if len(output.args) > 2 and output.args[2] is not None else None
            if weight is not None:
                return Head(linear_from(weight, bias))
        return Head(view.extract([pooled], output))


def _full_slice(node: fx.Node) -> bool:
    """x[:, ...] on the batch dimension: a no-op view."""
    return (is_op(node, aten.slice.Tensor) and len(node.args) > 1 and node.args[1] == 0
            and (len(node.args) < 3 or node.args[2] in (0, None))
            and (len(node.args) < 4 or node.args[3] is None or node.args[3] >= 2 ** 62))


def verify_stages(ir: EncoderIR, view: GraphView, outputs: List[fx.Node], image: torch.Tensor) -> None:
    """Compare every lifted stage with the graph's value at the same point; name the first mismatch.

    `outputs[i]` is the graph node holding stage i's output. Each stage is fed the graph's
    own value for its input, so one misread stage cannot hide behind another.
    """
    values = view.evaluate(image, outputs)
    with torch.no_grad():
        for index, stage in enumerate(ir.stages):
            given = image if index == 0 else values[outputs[index - 1]]
            actual = stage(TokenState(given)).x
            _check_close(actual, values[outputs[index]], index, stage)


def _check_close(actual: torch.Tensor, expected: torch.Tensor, index: int, stage) -> None:
    name = f"stage {index} ({stage.kind}{getattr(stage, 'block', '')})"
    if actual.shape != expected.shape:
        raise NumericsError(f"lifting failed at {name}: shape {tuple(actual.shape)}, the traced "
                            f"graph has {tuple(expected.shape)}")
    diff = (actual - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    if not diff <= STAGE_TOLERANCE * scale:
        raise NumericsError(f"lifting failed at {name}: max abs diff {diff:.3g} from the traced graph "
                            f"(allowed {STAGE_TOLERANCE * scale:.3g}); vitopt misread this stage "
                            f"({stage.describe()})")

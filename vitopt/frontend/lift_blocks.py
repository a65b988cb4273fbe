"""Recognise one residual branch of the traced graph as a typed Attention or Mlp stage.

A branch is the set of nodes between the block's LayerNorm and the residual add. We read
parameters from the ops that use them (linear, layer_norm, mul) and the head count and
scale from the attention op, so the names the source model used do not matter.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import fx

from vitopt.errors import UnsupportedModelError
from vitopt.frontend.graph import (GraphView, aten, is_identity, is_op, resolve, scalar_arg,
                                   value_shape)
from vitopt.ir.stages import Attention, Mlp, layer_norm_from, linear_from

MATMULS = (aten.matmul.default, aten.bmm.default)
SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
SDPA = (aten.scaled_dot_product_attention.default,)


class Branch:
    """The nodes of one residual branch: norm -> ... -> out, where x + out is the residual add."""

    def __init__(self, view: GraphView, norm: fx.Node, out: fx.Node, block: int):
        self.view, self.norm, self.out, self.block = view, norm, out, block
        self.nodes = view.between(norm, out)

    def where(self) -> str:
        return f"block {self.block}"

    def ops(self, *targets) -> List[fx.Node]:
        return [n for n in self.nodes if is_op(n, *targets)]

    def op_summary(self) -> str:
        names = [str(n.target).replace("aten.", "") for n in self.nodes if n.op == "call_function"]
        return ", ".join(dict.fromkeys(names))

    def refuse(self, what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{self.where()}: {what} (ops in this branch: {self.op_summary()})")

    def is_attention(self) -> bool:
        return bool(self.ops(*SDPA) or self.ops(*SOFTMAX))

    # --- parameters ---------------------------------------------------------------------
    def layer_norm(self):
        norms = self.ops(aten.layer_norm.default)
        if len(norms) != 1:
            raise self.refuse(f"expected one LayerNorm, found {len(norms)} (qk-norm or "
                              f"sandwich norms are not supported yet)")
        node = norms[0]
        args = list(node.args) + [None] * (5 - len(node.args))
        weight, bias = self.view.tensor(args[2]), self.view.tensor(args[3])
        if (args[2] is not None and weight is None) or (args[3] is not None and bias is None):
            raise self.refuse("LayerNorm affine parameters are computed, not stored")
        eps = args[4] if args[4] is not None else 1e-5
        return layer_norm_from(weight, bias, float(eps), tuple(args[1]))

    def linear(self, node: fx.Node):
        weight, bias = self.view.tensor(node.args[1]), None
        if weight is None:
            raise self.refuse(f"the weight of {node.name} is computed, not a stored parameter")
        if len(node.args) > 2 and node.args[2] is not None:
            bias = self.view.tensor(node.args[2])
            if bias is None:
                raise self.refuse(f"the bias of {node.name} is computed, not a stored parameter")
        return linear_from(weight, bias)

    def layer_scale(self, after: fx.Node) -> Optional[torch.Tensor]:
        """A per-channel gamma multiplying the branch output (LayerScale), if any."""
        scales = [n for n in self.nodes if is_op(n, aten.mul.Tensor)
                  and self.view.order[n] > self.view.order[after]]
        if not scales:
            return None
        if len(scales) > 1:
            raise self.refuse("more than one multiplication after the output projection")
        node = scales[0]
        gamma = next((self.view.tensor(a) for a in node.args if self.view.tensor(a) is not None), None)
        if gamma is None:
            raise self.refuse("the output is scaled by something other than a stored LayerScale")
        return gamma.reshape(-1)


def lift_attention(branch: Branch) -> Attention:
    view = branch.view
    norm = branch.layer_norm()
    core = (branch.ops(*SDPA) or branch.ops(*SOFTMAX))
    if len(core) != 1:
        raise branch.refuse(f"expected one attention op, found {len(core)}")
    core = core[0]
    after_core = view.descendants(core)
    linears = branch.ops(aten.linear.default)
    proj_nodes = [n for n in linears if n in after_core]
    in_nodes = [n for n in linears if n not in after_core]
    if len(proj_nodes) != 1:
        raise branch.refuse(f"expected one output projection after attention, found {len(proj_nodes)}")
    proj = branch.linear(proj_nodes[0])

    if is_op(core, *SDPA):
        q_in, k_in, v_in = core.args[:3]
        if len(core.args) > 5 and core.args[5] or core.kwargs.get("is_causal"):
            raise branch.refuse("causal attention is not an image encoder")
        scale = core.kwargs.get("scale")
        head_dim = value_shape(q_in)[-1]
        if scale is None:
            scale = head_dim ** -0.5
    else:
        q_in, k_in, v_in, scale = _eager_attention_inputs(branch, core)
        head_dim = value_shape(q_in)[-1]
    num_heads = proj.in_features // head_dim
    if num_heads * head_dim != proj.in_features:
        raise branch.refuse(f"head dim {head_dim} does not divide the projection width {proj.in_features}")

    if len(in_nodes) == 1:
        qkv = branch.linear(in_nodes[0])
        if qkv.out_features != 3 * proj.in_features:
            raise branch.refuse(f"fused projection has {qkv.out_features} outputs, expected "
                                f"3 x {proj.in_features}")
        projections = {"qkv": qkv}
    elif len(in_nodes) == 3:
        projections = {}
        for role, value in (("q", q_in), ("k", k_in), ("v", v_in)):
            sources = [n for n in in_nodes if n in view.ancestors(value) | {value}]
            if len(sources) != 1:
                raise branch.refuse(f"cannot tell which projection feeds {role}")
            projections[role] = branch.linear(sources[0])
    else:
        raise branch.refuse(f"expected a fused qkv projection or separate q, k, v; found "
                            f"{len(in_nodes)} input projections")
    gamma = branch.layer_scale(proj_nodes[0])
    return Attention(norm=norm, num_heads=num_heads, proj=proj, scale=scale, layer_scale=gamma,
                     block=branch.block, **projections)


def _eager_attention_inputs(branch: Branch, softmax: fx.Node):
    """(q, k, v, scale) of attention written as matmul -> scale -> softmax -> matmul."""
    view = branch.view
    before = view.ancestors(softmax)
    scores = [n for n in branch.nodes if is_op(n, *MATMULS) and n in before]
    if not scores:
        raise branch.refuse("softmax without a q.K^T product before it")
    scores = max(scores, key=view.order.__getitem__)
    after = view.descendants(softmax)
    outs = [n for n in branch.nodes if is_op(n, *MATMULS) and n in after]
    if not outs:
        raise branch.refuse("softmax without an attention.V product after it")
    out = min(outs, key=view.order.__getitem__)
    scale = 1.0
    path = view.between(scores, softmax)
    q_side = view.ancestors(scores.args[0]) | {scores.args[0]}
    for node in branch.nodes:
        if not is_op(node, aten.mul.Tensor, aten.div.Tensor) or view.tensor(node.args[1]) is not None:
            continue
        if node in path or (node in q_side and node in before):
            value = scalar_arg(node)
            if value is None:
                raise branch.refuse(f"attention logits scaled by a tensor ({node.name})")
            scale *= value if is_op(node, aten.mul.Tensor) else 1.0 / value
    k_in = resolve(scores.args[1])
    if is_op(k_in, aten.transpose.int, aten.permute.default):
        k_in = k_in.args[0]
    return scores.args[0], k_in, out.args[1], scale


def lift_mlp(branch: Branch) -> Mlp:
    norm = branch.layer_norm()
    linears = branch.ops(aten.linear.default)
    if len(linears) != 2:
        raise branch.refuse(f"expected an MLP with two linear layers, found {len(linears)} "
                            f"(gated MLPs such as SwiGLU are not supported yet)")
    fc1, fc2 = linears
    act = _activation(branch, branch.view.between(fc1, fc2)[1:-1])
    gamma = branch.layer_scale(fc2)
    return Mlp(norm=norm, fc1=branch.linear(fc1), fc2=branch.linear(fc2), act=act,
               layer_scale=gamma, block=branch.block)


def _activation(branch: Branch, nodes: List[fx.Node]) -> str:
    ops = [n for n in nodes if n.op == "call_function" and not _is_passthrough(n)]
    if len(ops) == 1 and is_op(ops[0], aten.gelu.default):
        approx = ops[0].kwargs.get("approximate", ops[0].args[1] if len(ops[0].args) > 1 else "none")
        return "gelu_tanh" if approx == "tanh" else "gelu"
    if len(ops) == 1 and is_op(ops[0], aten.relu.default):
        return "relu"
    if len(ops) == 1 and is_op(ops[0], aten.silu.default):
        return "silu"
    sigmoid = [n for n in ops if is_op(n, aten.sigmoid.default)]
    if sigmoid and len(ops) == 3:
        factors = [scalar_arg(n) for n in ops if is_op(n, aten.mul.Tensor)]
        if any(f is not None and abs(f - 1.702) < 1e-6 for f in factors):
            return "quick_gelu"
    names = ", ".join(str(n.target) for n in ops) or "nothing"
    raise branch.refuse(f"unrecognised MLP activation ({names})")


def _is_passthrough(node: fx.Node) -> bool:
    return is_identity(node)

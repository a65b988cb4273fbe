"""Recognise attention pooling (MAP) after the last block as a typed AttentionPool stage.

Found by dataflow, like the blocks: one attention op after the last block whose query side
comes from a stored parameter (the latent queries) through one linear, whose key/value side
comes from the tokens through one fused kv linear (SigLIP's form in Hugging Face and timm), an
output projection, a pre-norm residual MLP on the pooled rows, and a select of latent 0 (or a mean over the
latents). The stage is then run against the traced graph's own values; anything that does not
read back exactly stays a traced tail, with the reason in the IR's notes.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import fx

from vitopt.errors import UnsupportedModelError
from vitopt.frontend.graph import aten, effective_users, is_op, scalar_arg, value_shape
from vitopt.frontend.lift_blocks import MATMULS, SDPA, SOFTMAX, Branch, lift_mlp
from vitopt.ir.attention_pool import AttentionPool
from vitopt.ir.stages import linear_from
from vitopt.ir.state import TokenState

#: Ops that only move values around between the pooling's linears.
LAYOUT_OPS = (aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default,
              aten.unsqueeze.default, aten.squeeze.dim, aten.unflatten.int, aten.expand.default,
              aten.repeat.default, aten._unsafe_view.default)


class NotAttentionPool(Exception):
    """The tail is not attention pooling vitopt can type; the message says why."""


def lift_attention_pool(lifter, stream: fx.Node, tolerance: float) -> Tuple[fx.Node, AttentionPool]:
    """(graph node holding the pooled features, the stage) for the tail after `stream`.

    Raises NotAttentionPool when the tail is something else or does not read back exactly.
    """
    view = lifter.view
    region = view.descendants(stream) & (view.ancestors(view.output) | {view.output})
    cores = [n for n in region if is_op(n, *SDPA, *SOFTMAX)]
    if len(cores) != 1:
        raise NotAttentionPool(f"expected one attention op after the last block, found {len(cores)}")
    core = cores[0]
    before = view.ancestors(core) - view.ancestors(stream)  # the pooling's own nodes
    linears = sorted((n for n in before if is_op(n, aten.linear.default)), key=view.order.get)
    q_nodes = [n for n in linears if n not in region]
    kv_nodes = [n for n in linears if n in region]
    if len(q_nodes) != 1 or len(kv_nodes) != 1:
        raise NotAttentionPool(f"expected one query projection from stored latents and one fused "
                               f"kv projection of the tokens, found {len(q_nodes)} and "
                               f"{len(kv_nodes)}")
    q_node = q_nodes[0]
    latent_node = _latent(view, q_node)
    after = view.descendants(core)
    proj_nodes = sorted((n for n in region & after if is_op(n, aten.linear.default)),
                        key=view.order.get)
    if not proj_nodes:
        raise NotAttentionPool("no output projection after the pooling attention")
    proj_node = proj_nodes[0]
    rows, found = _residual_start(lifter, proj_node)
    norm, add, out = found
    try:
        mlp = lift_mlp(Branch(view, norm, out, block=-1))
    except UnsupportedModelError as exc:
        raise NotAttentionPool(f"the pooled rows' MLP: {exc}") from exc
    pooled, reduce = _latent_reduction(add)
    head_dim, scale = _attention_shape(view, core, q_node)

    weights = [n for node in [q_node, proj_node] + kv_nodes for n in node.args[1:3]
               if isinstance(n, fx.Node)]
    image = torch.randn((2,) + tuple(value_shape(view.input)[1:]),
                        generator=torch.Generator().manual_seed(0))
    values = view.evaluate(image, [stream, pooled, latent_node] + weights)

    def linear(node):
        bias = node.args[2] if len(node.args) > 2 and isinstance(node.args[2], fx.Node) else None
        return linear_from(values[node.args[1]], values[bias] if bias is not None else None)

    q, proj = linear(q_node), linear(proj_node)
    kv = linear(kv_nodes[0])
    dim = proj.out_features
    latent = values[latent_node].reshape(-1, dim) if values[latent_node].numel() % dim == 0 else None
    if latent is None or dim % head_dim:
        raise NotAttentionPool(f"latents {list(values[latent_node].shape)} or head dim {head_dim} "
                               f"do not fit the width {dim}")
    try:
        stage = AttentionPool(latent=latent, q=q, kv=kv, proj=proj, num_heads=dim // head_dim,
                              scale=scale, mlp=mlp, reduce=reduce)
    except ValueError as exc:
        raise NotAttentionPool(str(exc)) from exc
    _check_reads_back(stage, values[stream], values[pooled], tolerance)
    return pooled, stage


def _latent(view, q_node: fx.Node) -> fx.Node:
    """The stored parameter the query projection reads (through layout ops only)."""
    node = q_node.args[0]
    while isinstance(node, fx.Node) and is_op(node, *LAYOUT_OPS):
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "placeholder" and view.tensor(node) is not None):
        raise NotAttentionPool("the pooling query is not a stored latent parameter")
    return node


def _residual_start(lifter, proj_node: fx.Node):
    """(node, (norm, add, out)): the first node after the output projection (through layout
    ops) that starts a pre-norm residual branch x + mlp(norm(x))."""
    node = proj_node
    while (found := lifter.branch_from(node)) is None:
        users = effective_users(node)
        if len(users) != 1 or not is_op(users[0], *LAYOUT_OPS):
            raise NotAttentionPool("no residual MLP on the pooled rows after the output projection")
        node = users[0]
    return node, found


def _latent_reduction(add: fx.Node) -> Tuple[fx.Node, str]:
    users = effective_users(add)
    if len(users) == 1 and is_op(users[0], aten.select.int) and users[0].args[1:3] == (1, 0):
        return users[0], "first"
    if len(users) == 1 and is_op(users[0], aten.mean.dim) and list(users[0].args[1]) in ([1], [-2]) \
            and not (len(users[0].args) > 2 and users[0].args[2]):
        return users[0], "mean"
    raise NotAttentionPool("the pooled rows are not reduced by taking latent 0 or their mean")


def _attention_shape(view, core: fx.Node, q_node: fx.Node) -> Tuple[int, float]:
    """(head dim, logit scale) of the pooling attention."""
    if is_op(core, *SDPA):
        if core.kwargs.get("is_causal") or core.kwargs.get("attn_mask") is not None or \
                any(isinstance(a, fx.Node) for a in core.args[3:4]):
            raise NotAttentionPool("the pooling attention has a mask or is causal")
        head_dim = value_shape(core.args[0])[-1]
        scale = core.kwargs.get("scale") or head_dim ** -0.5
        return head_dim, float(scale)
    before = view.ancestors(core)
    scores = max((n for n in before if is_op(n, *MATMULS)), key=view.order.get, default=None)
    if scores is None:
        raise NotAttentionPool("softmax without a q.K^T product before it")
    head_dim = value_shape(scores.args[0])[-1]
    from_q = view.descendants(q_node)
    path = set(view.between(scores, core))
    scale = 1.0
    for node in (before & from_q) | path:
        if not is_op(node, aten.mul.Tensor, aten.div.Tensor):
            continue
        value = scalar_arg(node)
        if value is None:
            raise NotAttentionPool(f"attention logits scaled by a tensor ({node.name})")
        scale *= value if is_op(node, aten.mul.Tensor) else 1.0 / value
    return head_dim, scale


def _check_reads_back(stage: AttentionPool, tokens: torch.Tensor, expected: torch.Tensor,
                      tolerance: float) -> None:
    with torch.no_grad():
        actual = stage(TokenState(tokens)).x
    if actual.shape != expected.shape:
        raise NotAttentionPool(f"typed attention pooling gives shape {list(actual.shape)}, the "
                               f"traced graph {list(expected.shape)}")
    diff = (actual - expected).abs().max().item()
    allowed = tolerance * max(1.0, expected.abs().max().item())
    if not diff <= allowed:
        raise NotAttentionPool(f"typed attention pooling differs from the traced graph by "
                               f"{diff:.3g} (allowed {allowed:.3g})")

"""trace(): torch.export a model with a dynamic batch, lift it into the encoder IR, verify it.

After lifting, the IR must reproduce the source model in fp32 (max abs diff within the
tolerance table's ("fp32", "torch") bound) or trace() refuses, naming the first stage that differs.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from vitopt.errors import NumericsError, UnsupportedModelError
from vitopt.frontend.graph import GraphView
from vitopt.frontend.lift import Lifter, verify_stages
from vitopt.ir.encoder import EncoderIR, EncoderMeta
from vitopt.ir.stages import Pool
from vitopt.tolerances import tolerance

#: Output fields of Hugging Face model outputs, in the order vitopt prefers them.
OUTPUT_KEYS = ("logits", "image_embeds", "pooler_output", "last_hidden_state")
OUTPUT_KINDS = {"logits": "logits", "image_embeds": "features", "pooler_output": "features",
                "last_hidden_state": "tokens"}
MAX_BATCH = 4096


class OutputSelector(nn.Module):
    """Wraps a model whose forward returns a ModelOutput / dict / tuple and returns one tensor."""

    def __init__(self, model: nn.Module, key: Optional[str]):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        if self.key is None:
            return out
        if isinstance(out, (tuple, list)):
            return out[int(self.key)]
        return out[self.key] if isinstance(out, dict) else getattr(out, self.key)


def choose_output(model: nn.Module, example: torch.Tensor, output: Optional[str]) -> Tuple[Optional[str], str]:
    """Which field of the model's output to compile, and what kind of output it is."""
    with torch.no_grad():
        out = model(example)
    if isinstance(out, torch.Tensor):
        return None, "logits" if out.dim() == 2 else "tokens"
    if isinstance(out, (tuple, list)):
        return (output or "0"), "features"
    fields = {k: v for k, v in (out.items() if isinstance(out, dict) else vars(out).items())
              if isinstance(v, torch.Tensor)}
    if output is not None:
        if output not in fields:
            raise UnsupportedModelError(f"the model has no output {output!r}; it returns {sorted(fields)}")
        return output, OUTPUT_KINDS.get(output, "features")
    for key in OUTPUT_KEYS:
        if key in fields:
            return key, OUTPUT_KINDS[key]
    raise UnsupportedModelError(f"cannot tell which output to compile from {sorted(fields)}; "
                                f"name one with output=...")


def single_output(model: nn.Module, example: torch.Tensor, output: Optional[str] = None):
    """(model returning one tensor, output kind, chosen field or None)."""
    key, kind = choose_output(model, example, output)
    return (OutputSelector(model, key) if key is not None else model), kind, key


def export(model: nn.Module, example: torch.Tensor, max_batch: int = MAX_BATCH) -> ExportedProgram:
    """torch.export with the batch dimension dynamic (everything else static)."""
    batch = Dim("batch", min=1, max=max_batch)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # torch.export raises many types; report them as one
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"torch.export could not trace the model with a dynamic batch: "
                                    f"{type(exc).__name__}: {first}") from exc


def trace(model, example: Optional[torch.Tensor] = None, *, meta: Optional[EncoderMeta] = None,
          output: Optional[str] = None, check: bool = True) -> EncoderIR:
    """Export `model`, lift it into the encoder IR and check the IR reproduces it.

    model: an nn.Module (timm, Hugging Face, torchvision or your own), or an ExportedProgram.
    example: an image batch [B, C, H, W]; its size fixes the compiled image size.
    output: for models returning several outputs (Hugging Face), which one to compile.
    """
    meta = meta or EncoderMeta()
    if isinstance(model, ExportedProgram):
        ep, reference = model, model.module()
        if example is None:
            shape = [d if isinstance(d, int) else 2 for d in
                     next(n for n in ep.graph.nodes if n.op == "placeholder"
                          and n.name in ep.graph_signature.user_inputs).meta["val"].shape]
            example = torch.randn(*shape)
    else:
        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(f"expected an nn.Module or ExportedProgram, got {type(model).__name__}")
        if example is None:
            size = meta.image_size
            example = torch.randn(2, meta.in_chans, size[0], size[1])
        reference, kind, key = single_output(model.eval(), example, output)
        meta.output = kind
        if key is not None:
            meta.notes.append(f"compiled output: {key}")
        ep = export(reference, example)
    meta.image_size = tuple(example.shape[2:])
    meta.in_chans = int(example.shape[1])
    view = GraphView(ep)
    ir, outputs = Lifter(view).lift(meta)
    _settle_output_kind(ir)
    if check:
        verify_stages(ir, view, outputs, example)
        check_matches(ir, reference, example)
    return ir


def _settle_output_kind(ir: EncoderIR) -> None:
    pool = ir.pool()
    if pool is not None and pool.pool == "none":
        ir.meta.output = "tokens"
    elif ir.meta.output == "tokens":
        ir.meta.output = "features"


def check_matches(ir: EncoderIR, reference: nn.Module, example: torch.Tensor,
                  atol: Optional[float] = None) -> float:
    """Max abs diff between the IR and the source model on `example` (and on a batch of 1)."""
    atol = tolerance("fp32", "torch").atol if atol is None else atol
    worst = 0.0
    for images in (example, example[:1]):
        with torch.no_grad():
            expected = reference(images)
            actual = ir(images)
        if actual.shape != expected.shape:
            raise NumericsError(f"the lifted IR returns shape {tuple(actual.shape)}, the model "
                                f"{tuple(expected.shape)}")
        worst = max(worst, (actual - expected).abs().max().item())
    if not worst <= atol:
        raise NumericsError(f"the lifted IR differs from the model by {worst:.3g} (max abs, fp32; "
                            f"allowed {atol}); please report this model")
    return worst


def stage_names(ir: EncoderIR) -> Sequence[str]:
    return [row["name"] for row in ir.table()]


__all__ = ["trace", "export", "check_matches", "OutputSelector", "Pool"]

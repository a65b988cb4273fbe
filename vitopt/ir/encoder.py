"""The encoder IR: a chain of typed stages plus the metadata passes and backends need.

`EncoderIR` is itself an nn.Module: calling it runs the reference executor (plain
PyTorch), and exporting it gives the graph that the backends lower.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import nn

from vitopt.ir.stages import (Attention, Head, Mlp, Norm, Pool, Stage, Stem, TracedTail,
                              count_params)
from vitopt.ir.state import TokenState


@dataclass
class EncoderMeta:
    """Facts about the source model that travel with the IR into the artifact."""

    family: str = "unknown"
    source: str = ""
    image_size: Tuple[int, int] = (224, 224)
    in_chans: int = 3
    mean: Tuple[float, ...] = (0.485, 0.456, 0.406)
    std: Tuple[float, ...] = (0.229, 0.224, 0.225)
    output: str = "logits"  # logits | features | tokens
    labels: Optional[List[str]] = None
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EncoderMeta":
        data = dict(data)
        data["image_size"] = tuple(data["image_size"])
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        return cls(**data)


class EncoderIR(nn.Module):
    """stem -> (attn_i, mlp_i, [passes' stages])* -> [norm] -> pool -> head, or stem -> ... -> tail."""

    def __init__(self, stages: List[Stage], meta: EncoderMeta):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.meta = meta
        self.check()

    # --- execution -----------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        state = TokenState(images)
        for stage in self.stages:
            state = stage(state)
        return state.x

    def run_range(self, state: TokenState, start: int, stop: int) -> TokenState:
        for stage in self.stages[start:stop]:
            state = stage(state)
        return state

    # --- structure -----------------------------------------------------------------------
    @property
    def stem(self) -> Stem:
        return self.stages[0]

    def blocks(self) -> List[Stage]:
        return [s for s in self.stages if isinstance(s, (Attention, Mlp))]

    def attention_stages(self) -> List[Attention]:
        return [s for s in self.stages if isinstance(s, Attention)]

    def mlp_stages(self) -> List[Mlp]:
        return [s for s in self.stages if isinstance(s, Mlp)]

    @property
    def num_blocks(self) -> int:
        return len(self.attention_stages())

    @property
    def num_prefix_tokens(self) -> int:
        return self.stem.num_prefix_tokens

    def pool(self) -> Optional[Pool]:
        return next((s for s in self.stages if isinstance(s, Pool)), None)

    def token_counts(self) -> List[int]:
        """Tokens entering each stage (per image), stem first."""
        counts, tokens = [], 0
        for stage in self.stages:
            counts.append(tokens)
            tokens = stage.tokens_out(tokens)
        return counts

    def flops(self) -> int:
        return sum(s.flops(n) for s, n in zip(self.stages, self.token_counts()))

    def table(self) -> List[dict]:
        """One row per stage: name, kind, tokens in/out, GFLOPs, params, precision, detail."""
        rows = []
        for index, (stage, tokens) in enumerate(zip(self.stages, self.token_counts())):
            name = stage.kind if not hasattr(stage, "block") else f"{stage.kind}{stage.block}"
            rows.append({
                "index": index, "name": name, "kind": stage.kind,
                "tokens_in": tokens, "tokens_out": stage.tokens_out(tokens),
                "gflops": stage.flops(tokens) / 1e9, "params": count_params(stage),
                "precision": getattr(stage, "precision", "fp32"), "detail": stage.describe(),
            })
        return rows

    def clone(self) -> "EncoderIR":
        return copy.deepcopy(self)

    # --- invariants ----------------------------------------------------------------------
    def check(self) -> None:
        """Raise ValueError when the chain is not a well-formed encoder."""
        stages = list(self.stages)
        if not stages or not isinstance(stages[0], Stem):
            raise ValueError("the chain must start with a Stem stage")
        if any(isinstance(s, Stem) for s in stages[1:]):
            raise ValueError("only the first stage may be a Stem")
        ends = [i for i, s in enumerate(stages) if isinstance(s, (Pool, TracedTail))]
        if len(ends) != 1:
            raise ValueError(f"the chain needs exactly one Pool or TracedTail stage, found {len(ends)}")
        end = ends[0]
        for stage in stages[end + 1:]:
            if not isinstance(stage, (Head, TracedTail)) and stage.kind not in ("exit",):
                raise ValueError(f"stage {stage.kind!r} after pooling is not allowed")
        for stage in stages[1:end]:
            if isinstance(stage, (Head,)):
                raise ValueError("a Head stage must come after pooling")
        counts = self.token_counts()
        for stage, tokens in zip(stages[1:end], counts[1:end]):
            if tokens <= self.num_prefix_tokens and isinstance(stage, Attention):
                raise ValueError(f"stage {stage.kind}{getattr(stage, 'block', '')} gets {tokens} "
                                 f"tokens, no more than the {self.num_prefix_tokens} prefix tokens")
        self._check_side_inputs(stages, counts)
        dims = {s.embed_dim for s in stages if isinstance(s, Attention)}
        if len(dims) > 1:
            raise ValueError(f"attention stages disagree on the embedding width: {sorted(dims)}")

    @staticmethod
    def _check_side_inputs(stages, counts) -> None:
        """Token-reduction stages get the token count they were built for, and the side
        information they read comes from an attention stage over the same tokens."""
        fresh = set()
        for stage, tokens in zip(stages, counts):
            name = f"{stage.kind}{getattr(stage, 'block', '')}"
            if stage.expected_tokens is not None and stage.expected_tokens != tokens:
                raise ValueError(f"stage {name} was built for {stage.expected_tokens} tokens but "
                                 f"gets {tokens}")
            missing = sorted(set(stage.reads) - fresh)
            if missing:
                raise ValueError(f"stage {name} reads {', '.join(missing)}, which no attention "
                                 f"stage over the same tokens records before it")
            if isinstance(stage, Attention):
                fresh |= stage.records()
            elif stage.reads or stage.tokens_out(tokens) != tokens:
                fresh = set()


def final_norm_index(ir: EncoderIR) -> Optional[int]:
    return next((i for i, s in enumerate(ir.stages) if isinstance(s, Norm)), None)

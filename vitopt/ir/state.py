"""The token state passed along the encoder chain.

Stages read and write explicit fields instead of using hooks or globals, so side
information (class-token attention for pruning, mean keys for merging, token sizes for
proportional attention) flows through the graph that torch.export sees.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch


@dataclass
class TokenState:
    """What flows between stages.

    x: images [B, C, H, W] before the stem, tokens [B, N, D] inside the encoder,
       pooled features [B, D] after pooling, model output after the head.
    size: tokens each row stands for ([B, N, 1]); None means every row is one token.
    cls_attn: class-token attention over the tokens ([B, N]), set by an attention stage
       that was asked for it (`Attention.record_cls_attn`).
    keys: head-averaged keys ([B, N, Dh]), set when `Attention.record_keys` is on.
    """

    x: torch.Tensor
    size: Optional[torch.Tensor] = None
    cls_attn: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None

    def with_x(self, x: torch.Tensor) -> "TokenState":
        return replace(self, x=x)

"""The encoder IR: typed stages in a chain, plus metadata."""
from vitopt.ir.encoder import EncoderIR, EncoderMeta
from vitopt.ir.stages import (Attention, GraphStage, Head, Mlp, Norm, Pool, Stage, Stem,
                              TracedTail)
from vitopt.ir.state import TokenState

__all__ = ["EncoderIR", "EncoderMeta", "Attention", "GraphStage", "Head", "Mlp", "Norm", "Pool",
           "Stage", "Stem", "TracedTail", "TokenState"]

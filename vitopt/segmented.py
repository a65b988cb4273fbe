"""The segmented runtime engine: early exits deployed as one static engine per segment.

    engine = SegmentedEngine(engines, rule="confidence", thresholds=[0.78, 0.66])
    logits = engine.run(images)                       # like any Engine
    logits, taken = engine.run_with_exits(images)     # and the exit each image took

Segment 0 runs on the whole batch and returns its exit's logits and the token state. The
rule (vitopt.exits.rules) decides per sample; the samples that go on are gathered into a
smaller batch (batch compaction) for the next segment, and every output is written back at
its sample's original position. When every sample goes on, nothing is gathered (the state
arrays pass straight through), so a batch that never exits pays only the extra engine calls.
Needs numpy and the engines only (no torch), like vitopt.runtime.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from vitopt.backends.base import Engine
from vitopt.exits.rules import Carry, check_rule, decide, never_threshold


class SegmentedEngine(Engine):
    """Engines of segments 0..K (K exit segments, then the rest of the model) with exit rules."""

    def __init__(self, engines: Sequence[Engine], rule: str, thresholds: Sequence[float]):
        if len(engines) != len(thresholds) + 1:
            raise ValueError(f"{len(engines)} segment engines need {len(engines) - 1} thresholds, "
                             f"got {len(thresholds)}")
        self.engines = list(engines)
        self.rule = check_rule(rule)
        self.thresholds = [float(t) for t in thresholds]
        self.backend = self.engines[0].backend
        self.precision = self.engines[0].precision

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.run_with_exits(images)[0]

    def run_with_exits(self, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(outputs [B, ...] in input order, exit per sample: k < K a head, K the full model)."""
        batch = images.shape[0]
        last = len(self.engines) - 1
        taken = np.full(batch, last, dtype=np.int64)
        alive = None  # None: every sample of the batch is still running, in order
        inputs, carry, out = [images], Carry(), None
        for k, engine in enumerate(self.engines):
            results = engine.run_all(inputs)
            logits = results[0]
            if k == last:
                if out is None:  # nobody exited: the last segment's output is the answer
                    return logits, taken
                out[alive] = logits
                break
            stop, carry = decide(self.rule, logits, self.thresholds[k], carry)
            if not stop.any():
                inputs = results[1:]
                continue
            if out is None:
                out = np.empty((batch,) + logits.shape[1:], dtype=logits.dtype)
            rows = np.flatnonzero(stop) if alive is None else alive[stop]
            out[rows] = logits[stop]
            taken[rows] = k
            keep = ~stop
            if not keep.any():
                break
            alive = np.flatnonzero(keep) if alive is None else alive[keep]
            carry = carry.take(keep)
            inputs = [state[keep] for state in results[1:]]
        return out, taken

    def run_all_exits(self, images: np.ndarray) -> List[np.ndarray]:
        """Every exit's logits and the final output for every sample (nobody stops): checks."""
        outputs, inputs = [], [images]
        for engine in self.engines:
            results = engine.run_all(inputs)
            outputs.append(results[0])
            inputs = results[1:]
        return outputs

    def never_exiting(self) -> "SegmentedEngine":
        """The same engines with thresholds that never exit (the model without exits)."""
        count = len(self.thresholds)
        return SegmentedEngine(self.engines, self.rule, [never_threshold(self.rule, count)] * count)


def load_segmented(backend, root, manifest: dict, *, threads=None) -> SegmentedEngine:
    """Load the segment engines an artifact lists under manifest["exits"]["segments"]."""
    exits = manifest["exits"]
    engines = [backend.load(root, sorted(segment["files"]), precision=manifest["precision"],
                            threads=threads) for segment in exits["segments"]]
    return SegmentedEngine(engines, exits["rule"], exits["thresholds"])

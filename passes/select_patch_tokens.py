"""Return only the k most informative patch tokens of a patch-token output, with positions (lossy).

What: for an encoder whose output is its token sequence (pooling "none", output kind "tokens",
e.g. a VLM's vision tower), a SelectTokens stage after the last block (after the final norm)
keeps the prefix tokens and the `keep` (or ceil(keep_rate * patches)) patch tokens that receive
the most attention in block `block` (default: the last), in image order. The ranking row is
q_cls . K^T (class-token models) or q_mean . K^T (no class token, e.g. SigLIP): one row per
head, averaged over heads. The language model then gets fewer visual tokens: the idea of FastV
(Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2") and FoPru (2024, pruning visual
tokens by the encoder's attention), applied inside the encoder.
Output format (one tensor, so every engine and the runtime take it unchanged):
  [B, prefix + k, D + 2] with `positions=true` (default): channels 0..D-1 are the token, channel
  D its patch row and D+1 its patch column in the image grid (row-major; -1, -1 for prefix
  tokens). Row and column rather than a flat index because integers up to 256 are exact in
  bf16 and fp16 engines; a flat index over more than 256 patches would not be. The pass
  declines positions when the grid has more than 256 patches on a side.
  [B, prefix + k, D] with `positions=false`.
Preconditions: output kind "tokens" with a Pool("none") (other encoders decline with a note).
Order: last among the token passes; before quantization.
Cost: lossy by construction (the consumer sees k tokens); the encoder itself runs unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

from vitopt.errors import ConfigError
from vitopt.ir.reduce import (SelectTokens, attention_signal, has_stage, keep_count,
                              record_signal, signal_name)
from vitopt.pipeline import PassConfig, PassResult, register_pass

MAX_EXACT_GRID = 256  # integers up to 256 are exact in bf16 (8-bit significand)


@dataclass(frozen=True)
class SelectPatchTokensConfig(PassConfig):
    keep: int = 0
    keep_rate: float = 1.0
    block: int = -1
    positions: bool = True

    def validate(self) -> None:
        if not isinstance(self.keep, int) or self.keep < 0:
            raise ConfigError(f"select_patch_tokens: keep is a token count >= 1 (0: use keep_rate), "
                              f"got {self.keep!r}")
        if not isinstance(self.keep_rate, (int, float)) or not 0 < self.keep_rate <= 1:
            raise ConfigError(f"select_patch_tokens: keep_rate must be in (0, 1], got "
                              f"{self.keep_rate!r}")
        if self.keep and self.keep_rate != 1.0:
            raise ConfigError("select_patch_tokens: give keep or keep_rate, not both")


@register_pass("select_patch_tokens", config=SelectPatchTokensConfig, exact=False)
def select_patch_tokens(ir, config: SelectPatchTokensConfig) -> PassResult:
    block = config.block if config.block >= 0 else ir.num_blocks + config.block
    if not 0 <= block < ir.num_blocks:
        raise ConfigError(f"select_patch_tokens: block {config.block} is out of range; this model "
                          f"has blocks 0..{ir.num_blocks - 1} (or -1..-{ir.num_blocks})")
    pool = ir.pool()
    if pool is None or pool.pool != "none":
        return PassResult(ir, False, {}, ["the output is not the patch-token sequence (pooling "
                                          f"{pool.pool if pool else 'in a traced tail'}); "
                                          "select_patch_tokens is for token outputs"])
    if has_stage(ir, SelectTokens):
        return PassResult(ir, False, {}, ["the IR already selects tokens; select_patch_tokens runs once"])
    pool_index = list(ir.stages).index(pool)
    tokens, prefix = ir.token_counts()[pool_index], ir.num_prefix_tokens
    patches = tokens - prefix
    if tokens != ir.token_counts()[1]:
        return PassResult(ir, False, {}, ["the token count changes inside the encoder; positions "
                                          "would not map to the image grid"])
    if config.keep > patches:
        raise ConfigError(f"select_patch_tokens: keep={config.keep} is more than the {patches} "
                          f"patch tokens")
    keep = config.keep or keep_count(config.keep_rate, patches)
    if keep >= patches:
        return PassResult(ir, False, {}, [f"keeping {keep} of {patches} patch tokens keeps every "
                                          "token (identity)"])
    grid_h = ir.stem.image_size[0] // ir.stem.patch_size[0]
    grid_w = ir.stem.image_size[1] // ir.stem.patch_size[1]
    if grid_h * grid_w != patches:
        return PassResult(ir, False, {}, [f"{patches} patch tokens do not form the {grid_h}x{grid_w} "
                                          "patch grid; positions are unknown"])
    if config.positions and max(grid_h, grid_w) > MAX_EXACT_GRID:
        return PassResult(ir, False, {}, [f"the {grid_h}x{grid_w} patch grid is larger than "
                                          f"{MAX_EXACT_GRID} a side: positions would not be exact "
                                          "in bf16/fp16; use positions=false"])
    signal = attention_signal(ir)
    record_signal(ir.attention_stages()[block], signal)
    ir.stages.insert(pool_index, SelectTokens(
        tokens_in=tokens, keep=keep, num_prefix_tokens=prefix, grid_width=grid_w,
        positions=config.positions, block=block, signal=signal[0]))
    prefix_note = f"; -1 for the {prefix} prefix tokens" if prefix else ""
    layout = (f"[B, {prefix + keep}, D+2]: channels D, D+1 = patch row, column ({grid_h}x{grid_w} "
              f"grid{prefix_note})" if config.positions else f"[B, {prefix + keep}, D]")
    ir.meta.notes.append(f"select_patch_tokens: output {layout}")
    note = (f"kept {keep} of {patches} patch tokens (+{prefix} prefix) by {signal_name(signal)} "
            f"in block {block}; output {layout}")
    return PassResult(ir, True, {"keep": keep, "block": block, "signal": signal[0],
                                 "positions": config.positions}, [note])


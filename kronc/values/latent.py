"""Fake quantization with a straight-through estimator: the training view of a quantized tensor's latent weights.

EfficientQAT's block phase (Block-AP, 2407.11062) and OmniQuant (2308.13137) recover a quantized block by
training continuous *latent* weights through the quantizer together with the group scales and minima:
forward, each latent value is rounded onto the grid of its group's trainable scale and minimum and clamped
to the level range, ``w = u * s + m``; at the end the latent weights are rounded once more with the trained
scales and minima into the same packed codes (`QuantizedTensor.commit_latent`): same precision, same bytes.

Gradients. The rounding and the clamp pass the latent weights' gradient straight through (STE), so a
clipped value that the loss wants back inside the range can come back (with a clamp that blocks it, such a
value is stuck for good; on a toy target one grid step away, Adam then stalls at a nonzero loss). The level
``u`` is computed from the detached scale and minimum, so the scale's gradient is ``u`` times the output
gradient, the frozen-code gradient of `QuantizedTensor.train_scales`, and not LSQ's rounding residual
``u - (x - m) / s``: on SmolLM2-135M's first block at 10x (32 steps of 512 tokens, the steps a CPU can give a
block) the LSQ gradient left the block loss at 0.048 where frozen-code scale gradients reach 0.029.
Learnable clipping is the scale (and minimum) moving under that gradient: the clipped values are ``u = hi``
or ``lo`` times the scale.

The latent weight is held in units of the grid step it started from (``x = v * s0 + m0`` with ``s0``,
``m0`` the group's scale and minimum when training began, ``v`` initialised to the stored levels), so one
learning rate, in grid steps per optimizer step, fits every tensor however small its scales.
"""

from __future__ import annotations

import torch
from torch import Tensor


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward, the identity backward."""
    return x + (torch.round(x) - x).detach()


def latent_values(v: Tensor, s0: Tensor, m0: Tensor | None) -> Tensor:
    """The latent float weights ``(rows, groups, group)`` of latent levels ``v`` on the starting grid."""
    x = v * s0[..., None]
    return x if m0 is None else x + m0[..., None]


def fake_levels(x: Tensor, scale: Tensor, minimum: Tensor | None, lo: int, hi: int) -> Tensor:
    """The grid levels (as floats) of latent weights ``x`` ``(rows, groups, group)`` for per-group
    ``scale``/``minimum`` ``(rows, groups)``; a zero scale divides by one, as `grid.levels` does. Differentiable
    in ``x`` only (rounding and clamp straight through); the grid is taken as fixed (see the module docstring)."""
    scale = scale.detach()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)[..., None]
    shifted = x if minimum is None else x - minimum.detach()[..., None]
    r = round_ste(shifted / safe)
    return r + (torch.clamp(r, lo, hi) - r).detach()


def fake_quantize(x: Tensor, scale: Tensor, minimum: Tensor | None, lo: int, hi: int) -> Tensor:
    """``x`` quantized and dequantized on the grid of ``scale``/``minimum``: ``u * s (+ m)``, float32, with the
    straight-through gradient to ``x`` and the frozen-level gradients ``u`` and 1 to the scale and minimum."""
    w = fake_levels(x, scale, minimum, lo, hi) * scale[..., None]
    return w if minimum is None else w + minimum[..., None]

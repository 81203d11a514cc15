"""Quantization scales that train during recovery: the integer codes stay, the per-group scales move.

`scales_trained` makes every integer-quantized tensor's fp16 scales (and zero points of asymmetric
grids) trainable fp32 parameters for the length of a recovery call (`QuantizedTensor.train_scales`;
their role is ``scale``, selected by the ``trainable`` settings that name factors or scales), and at
the end stores them back as fp16 in the same buffers (`QuantizedTensor.commit_scales`): the stored
bytes keep their size and layout, and save/load stays bit-exact. The forward pass sees the scales
rounded to fp16 throughout, so the trained model is the stored one. Nested calls (the block-wise
method's end-to-end pass) reuse the outer call's parameters; only the outer call stores them.

`latent_trained` goes one step further for one block of block-wise reconstruction (``blockwise.quantized =
"latent"``, EfficientQAT's Block-AP): the weights themselves train through fake quantization beside the
scales, and at the block's end they are rounded into the same packed codes with the trained scales.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..values import QuantizedTensor


@contextmanager
def scales_trained(model: nn.Module) -> Iterator[None]:
    """Scales (and minima) of ``model``'s quantized tensors as parameters inside the block, fp16 buffers after."""
    added = [q for q in model.modules() if isinstance(q, QuantizedTensor) and q.train_scales()]
    try:
        yield
    except BaseException:
        for q in added:
            with contextlib.suppress(Exception):  # a student a failed sharded run left sharded: report the failure
                q.commit_scales()
        raise
    for q in added:
        q.commit_scales()


@contextmanager
def latent_trained(model: nn.Module, part: nn.Module, chosen: dict[str, nn.Parameter]) -> Iterator[dict[str, nn.Parameter]]:
    """The latent weights (`QuantizedTensor.train_latent`) of ``part``'s quantized tensors whose scales are in
    ``chosen``, by their names in ``model``; on a normal exit they are re-encoded into the stored codes with
    the trained scales (`QuantizedTensor.commit_latent`), on an exception dropped with the codes untouched."""
    ids = {id(p) for p in chosen.values()}
    inside = {id(m) for m in part.modules()}
    found = {name: q for name, q in model.named_modules() if id(q) in inside and isinstance(q, QuantizedTensor)
             and q.trains_scales and id(q.scales_train) in ids}
    new = {f"{name}.latent_train": p for name, q in found.items() for p in q.train_latent() if id(p) not in ids}
    try:
        yield new
    except BaseException:
        for q in found.values():
            q.discard_latent()
        raise
    for q in found.values():
        q.commit_latent()

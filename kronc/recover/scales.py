"""Quantization scales that train during recovery: the integer codes stay, the per-group scales move.

`scales_trained` makes every integer-quantized tensor's fp16 scales (and zero points of asymmetric
grids) trainable fp32 parameters for the length of a recovery call (`QuantizedTensor.train_scales`;
their role is ``scale``, selected by the ``trainable`` settings that name factors or scales), and at
the end stores them back as fp16 in the same buffers (`QuantizedTensor.commit_scales`): the stored
bytes keep their size and layout, and save/load stays bit-exact. The forward pass sees the scales
rounded to fp16 throughout, so the trained model is the stored one. Nested calls (the block-wise
method's end-to-end pass) reuse the outer call's parameters; only the outer call stores them.
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

"""How a ``kronc::`` op is defined: ``torch.library.triton_op`` when triton is installed, else ``custom_op``.

``triton_op`` lets inductor trace into the op's implementation (and see the Triton kernels it
launches on CUDA) while ``torch.export`` keeps it as one ``torch.ops.kronc.*`` node; without triton
the op is a plain opaque custom op. Either way each op gets an explicit fake implementation and an
autograd formula from its module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._library.custom_ops import CustomOpDef

from ..backend import triton_installed


def kronc_op(fn: Callable[..., Any]) -> CustomOpDef:
    """Define ``kronc::<fn name>`` with ``fn`` as its (device-dispatching) implementation."""
    name = f"kronc::{fn.__name__}"
    if triton_installed():
        # torch annotates triton_op as returning a plain Callable; it returns the CustomOpDef custom_op does
        return torch.library.triton_op(name, fn, mutates_args=())  # type: ignore[return-value]
    return torch.library.custom_op(name, fn, mutates_args=())

"""Lowering: the ``kronc::`` custom ops (torch on CPU, Triton kernels on CUDA) and their selection.

``kronc.codegen.ops`` registers ``torch.ops.kronc.*``; ``use_kernels("auto"|"triton"|"torch")`` picks
the implementation they run; ``kronc.codegen.triton`` holds one file per Triton kernel.
"""

from __future__ import annotations

from . import ops
from .backend import KernelMode, KernelUnavailable, kernel_mode, use_kernels
from .ops import OpInputError

__all__ = ["KernelMode", "KernelUnavailable", "OpInputError", "kernel_mode", "ops", "use_kernels"]

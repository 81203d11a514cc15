"""Which implementation the ``kronc::`` ops run: Triton kernels or plain torch.

``use_kernels(mode)`` picks, globally or for a ``with`` block:

* ``"auto"`` (default): Triton kernels for CUDA tensors of a dtype the kernels take (float32,
  float16, bfloat16) when ``triton`` imports; the torch implementation otherwise (CPU tensors,
  float64, no triton).
* ``"triton"``: always the Triton kernels, also on CPU tensors, which works only under the Triton
  interpreter (``TRITON_INTERPRET=1`` set before the kernels are first imported); anything the
  kernels cannot run raises `KernelUnavailable` with the reason instead of falling back.
* ``"torch"``: always the torch implementation.

The environment variable ``KRONC_KERNELS`` sets the starting mode. The choice is read when an op
runs, and under ``torch.compile``/``torch.export`` when the op is traced, so a compiled graph
keeps the implementation that was selected while it was compiled.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import TracebackType
from typing import Literal, get_args

import torch

from .checks.common import KernelUnavailable

KernelMode = Literal["auto", "triton", "torch"]
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)




def _parse(mode: str) -> KernelMode:
    if mode not in get_args(KernelMode):
        raise ValueError(f"kronc kernel mode must be one of {get_args(KernelMode)}, got {mode!r}")
    return mode  # type: ignore[return-value]


_mode: KernelMode = _parse(os.environ.get("KRONC_KERNELS", "auto"))


def kernel_mode() -> KernelMode:
    """The current selection (``"auto"``, ``"triton"`` or ``"torch"``)."""
    return _mode


class use_kernels:  # noqa: N801 (used like a function, as torch.set_grad_enabled)
    """Select the op implementation: ``use_kernels("torch")`` sets it from now on;
    ``with use_kernels("triton"): ...`` sets it for the block and restores the previous one."""

    def __init__(self, mode: KernelMode) -> None:
        global _mode
        self.previous: KernelMode = _mode
        _mode = _parse(mode)

    def __enter__(self) -> use_kernels:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        global _mode
        _mode = self.previous


@functools.cache
def triton_installed() -> bool:
    """Whether ``triton`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def triton_importable() -> str | None:
    """``None`` when ``import triton`` works, else the reason it does not."""
    if not triton_installed():
        return "triton is not installed (pip install 'kronc[triton]')"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # broken installs raise more than ImportError
        return f"import triton failed: {exc}"
    return None


def kernels_interpreted() -> bool:
    """Whether the kronc Triton kernels were built for the Triton interpreter (run on CPU tensors)."""
    from .triton._common import INTERPRETED  # imports triton: only when a kernel may run

    return INTERPRETED


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """Whether ``op`` on these tensors runs its Triton kernel under the current mode.

    In ``"triton"`` mode, raises `KernelUnavailable` naming ``op`` and the reason when the kernel
    cannot run the inputs (no triton, a dtype the kernels do not take, CPU tensors without the
    interpreter).
    """
    if _mode == "torch":
        return False
    x = tensors[0]
    dtype_ok = x.dtype in TRITON_DTYPES
    if _mode == "auto":
        return x.device.type == "cuda" and dtype_ok and triton_importable() is None
    reason = triton_importable()
    if reason is None and not dtype_ok:
        reason = f"the Triton kernels take float32, float16 or bfloat16, not {x.dtype}"
    if reason is None and x.device.type not in ("cuda", "cpu"):
        reason = f"the Triton kernels run on CUDA (or CPU under TRITON_INTERPRET=1), not {x.device.type}"
    if reason is None and x.device.type == "cpu" and not kernels_interpreted():
        reason = (
            "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before "
            "kronc.codegen.triton is first imported"
        )
    if reason is not None:
        raise KernelUnavailable(f"kronc::{op}: use_kernels('triton') is set but {reason}")
    return True

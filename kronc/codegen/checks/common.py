"""Input checks shared by the ``kronc::`` ops and the Triton wrappers.

Shape, dtype and device checks run everywhere (also on fake tensors, so ``torch.compile`` and
``torch.export`` report the same errors). Checks of index *contents* (bounds, sorted rows) need the
data; they run on real tensors only and are remembered per index tensor (and its version counter),
so a format's fixed index costs one check, not one per call.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.utils.weak import WeakIdKeyDictionary

INDEX_DTYPES = (torch.int32, torch.int64)


class OpInputError(ValueError):
    """Bad input to a ``kronc::`` op: wrong shapes, mismatched dtypes/devices, invalid indices."""


def fail(op: str, message: str) -> OpInputError:
    return OpInputError(f"kronc::{op}: {message}")


def shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def is_traced(*tensors: Tensor | None) -> bool:
    """True while tracing (fake/functional/meta tensors, a dispatch mode, dynamo): data checks are skipped."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    return any(
        t is not None and (isinstance(t, (FakeTensor, FunctionalTensor)) or t.is_meta) for t in tensors
    )


def check_input(op: str, x: Tensor) -> None:
    if x.dim() < 1:
        raise fail(op, "x must have a feature dimension, got a 0-d tensor")
    if not x.is_floating_point():
        raise fail(op, f"x must be floating point, got {x.dtype}")


def check_like(op: str, x: Tensor, **others: Tensor | None) -> None:
    """Every named tensor is floating point with ``x``'s dtype and on ``x``'s device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise fail(op, f"{name} has dtype {t.dtype} but x has {x.dtype}; cast one to match")
        if t.device != x.device:
            raise fail(op, f"{name} is on {t.device} but x is on {x.device}")


def check_index(op: str, name: str, t: Tensor, device: torch.device, dim: int | None = 1) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise fail(op, f"{name} must be int32 or int64, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise fail(op, f"{name} must be {dim}-D, got shape {shape(t)}")
    if t.device != device:
        raise fail(op, f"{name} is on {t.device} but x is on {device}")


def check_bias(op: str, bias: Tensor | None, out_features: int) -> None:
    if bias is not None and shape(bias) != (out_features,):
        raise fail(op, f"bias must have shape ({out_features},) for {out_features} outputs, got {shape(bias)}")


def check_features(op: str, x: Tensor, in_features: int, what: str) -> None:
    if x.shape[-1] != in_features:
        raise fail(op, f"x of shape {shape(x)} has {x.shape[-1]} features on its last dim but {what} takes {in_features}")


class OpCtx(Protocol):
    """The ``ctx`` a custom op's ``setup_context`` and ``backward`` get. torch types it as ``FunctionCtx``,
    whose stub lacks ``saved_tensors``, ``needs_input_grad`` and the values an op keeps on it."""

    saved_tensors: tuple[Tensor, ...]
    needs_input_grad: tuple[bool, ...]

    def save_for_backward(self, *tensors: Tensor | None) -> None: ...

    def __getattr__(self, name: str) -> Any: ...  # what setup_context kept (ctx.out_features = ...)

    def __setattr__(self, name: str, value: Any) -> None: ...


def needs_grad(ctx: OpCtx, n_args: int) -> tuple[bool, ...]:
    """``ctx.needs_input_grad`` padded to the schema's ``n_args`` (trailing defaults are not passed on)."""
    need = tuple(ctx.needs_input_grad)
    return need + (False,) * (n_args - len(need))


# ---- index contents -------------------------------------------------------------------------

_checked: WeakIdKeyDictionary = WeakIdKeyDictionary()


def tensor_version(t: Tensor) -> int:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors keep no version counter
        return -1


def _remembered(t: Tensor, bound: int, need_sorted: bool) -> bool:
    seen = _checked.get(t)
    return seen is not None and seen[0] == tensor_version(t) and seen[1] == bound and (seen[2] or not need_sorted)


def mark_checked(t: Tensor, bound: int, is_sorted: bool) -> None:
    """Record that ``t`` holds values in ``[0, bound)`` (sorted when ``is_sorted``)."""
    if not is_traced(t):
        _checked[t] = (tensor_version(t), bound, is_sorted)


def check_index_values(op: str, name: str, t: Tensor, bound: int, need_sorted: bool = False) -> None:
    """Values of ``t`` lie in ``[0, bound)`` (and are non-decreasing when ``need_sorted``)."""
    if t.numel() == 0 or _remembered(t, bound, need_sorted) or is_traced(t):
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= bound:
        raise fail(op, f"{name} holds values in [{lo}, {hi}] but must lie in [0, {bound})")
    is_sorted = bool((t[1:] >= t[:-1]).all()) if t.numel() > 1 else True
    if need_sorted and not is_sorted:
        raise fail(op, f"{name} must be sorted ascending (row-major entry order, as SparseIndex.decode gives)")
    mark_checked(t, bound, is_sorted)


_transposed: WeakIdKeyDictionary = WeakIdKeyDictionary()


def transpose_order(rows: Tensor, cols: Tensor) -> Tensor:
    """Permutation listing entries ``(rows, cols)`` sorted by column (stable), cached per ``cols``."""
    traced = is_traced(rows, cols)
    if not traced:
        seen = _transposed.get(cols)
        if seen is not None and seen[0] == tensor_version(cols) and seen[1] == cols.numel():
            return seen[2]
    perm = torch.argsort(cols, stable=True)
    if not traced:
        _transposed[cols] = (tensor_version(cols), cols.numel(), perm)
    return perm


class KernelUnavailable(RuntimeError):
    """``use_kernels("triton")`` was asked for but the Triton kernel cannot run these inputs."""

"""The training path of a compressed weight: its factored product, or a transient dense weight built once.

In training (gradients on, the weight's values or its input needing them) a step runs the product
forward and twice backward (input gradient, value gradients). The factored ops pay for their small
FLOP counts with permute copies, scatters and per-op dispatch; a dense GEMM runs near the machine's
peak. So every format's training path takes the cheaper of the two, by FLOPs for the batch's token
count (as `kronc::sparse_linear` does on CPU, `kronc.codegen.ops.sparse.densify_pays`):

* factored: ``tokens * flops_per_token * (2 + need_values) * factored_overhead``;
* dense: ``build_flops * (1 + need_values)`` (build ``W`` from the stored values with autograd, and its
  backward into them) plus ``tokens * 2 * out * in * (2 + need_values)`` (``F.linear`` and its GEMMs).

``factored_overhead`` (a class attribute of each format) is what a factored FLOP costs in GEMM FLOPs,
measured with one thread on SmolLM2-135M's 576x576, 576x1536 and 1536x576 sites at 10x and 512
tokens, forward and backward: 3-7 for Kronecker sums and doped Kronecker (4 is used), 6-13 for 16x16
block-sparse at 10% (8), 2-3 for low rank (2); a doped weight adds its overlay's sparse product at ~30
(`kronc.formats.doped.OVERLAY_OVERHEAD`, measured on an LSTM gate matrix) to its base's cost
(`Factorized.factored_cost`). At 10x a uniform Kronecker sum has 0.9-2.4x the dense
FLOPs, so it trains dense at any token count worth a step; low rank keeps its factors.
Without gradients (inference, evaluation, the teacher) and while tracing (``torch.export``,
``torch.compile`` must see the ``kronc::`` ops) the factored ops run as before, and so does a weight
whose ``forward`` a training scheme has wrapped (`kronc.recover.schemes.CoMatrixDropout`). `dense_training`
("auto", "never", "always") switches the choice off or forces it (tests, ``benchmarks/train_speed.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from ..codegen.checks.common import is_traced

if TYPE_CHECKING:
    from .base import Factorized

Mode = Literal["auto", "never", "always"]
MODES: tuple[Mode, ...] = ("auto", "never", "always")

_mode: list[Mode] = ["auto"]


def set_dense_training(mode: Mode | bool) -> None:
    """Choose the training path for every weight: "auto" (the cheaper), "never" (factored ops only, as
    before the dense path existed) or "always" (a transient dense weight whenever training). True/False
    mean "auto"/"never"."""
    if isinstance(mode, bool):
        mode = "auto" if mode else "never"
    if mode not in MODES:
        raise ValueError(f"dense training mode must be one of {', '.join(MODES)}, got {mode!r}")
    _mode[0] = mode


def dense_training_mode() -> Mode:
    return _mode[0]


@contextmanager
def dense_training(mode: Mode | bool) -> Iterator[None]:
    """`set_dense_training` for the duration of a ``with`` block."""
    before = _mode[0]
    set_dense_training(mode)
    try:
        yield
    finally:
        _mode[0] = before


def dense_pays(fmt: Factorized, tokens: int, need_values: bool) -> bool:
    """Whether building ``W`` and running GEMMs costs fewer FLOPs than the factored ops on ``tokens`` rows."""
    out_f, in_f = fmt.shape
    factored = tokens * fmt.factored_cost() * (2 + need_values)
    dense = fmt.build_flops() * (1 + need_values) + tokens * 2 * out_f * in_f * (2 + need_values)
    return dense < factored


def training_weight(fmt: Factorized, x: Tensor, tokens: int | None = None) -> Tensor | None:
    """The transient dense ``(out, in)`` weight to multiply ``x`` by in this training step, or None when
    the factored product is the one to run (no gradients, tracing, a forward wrapped by a recovery scheme,
    or it costs less).

    ``tokens`` is the number of rows the weight will multiply (default: ``x``'s rows; an LSTM's
    recurrent weight multiplies every time step's rows with one weight built once per sequence)."""
    mode = _mode[0]
    if mode == "never" or not torch.is_grad_enabled() or is_traced(x):
        return None
    if "forward" in vars(fmt):  # a training scheme wraps this weight's forward (co-matrix dropout): run it
        return None
    need_values = any(p.requires_grad for p in fmt.parameters())
    if not need_values and not x.requires_grad:
        return None
    rows = tokens if tokens is not None else x.numel() // max(1, x.shape[-1])
    if mode == "auto" and not dense_pays(fmt, rows, need_values):
        return None
    return fmt.dense_weight(x.dtype)

"""Doping: a structured base plus an extremely sparse overlay ``S`` holding the residual's largest entries.

``W ≈ base + S``. The base is a Kronecker sum (doped Kronecker, Thakker et al.), a low-rank pair
(the follow-up's variant), or nothing at all, which makes the format plain unstructured magnitude
pruning. ``S`` keeps ``round(density * out * in)`` entries of ``W - base`` with the largest
magnitude; its positions are stored as a bitmap or compressed rows, whichever is smaller.

The spec's ``precision`` applies to the base's factors; the overlay's values (the residual's
outliers, scattered) keep it when it is a float and are fp16 under an integer precision.

With a base the overlay is ranked over the whole matrix (it holds the residual's outliers, wherever
they are). Without one the entries are ranked **per output row** and every row keeps the same count
(give or take one; see `row_balanced_order`), as Wanda does: a matrix-wide ranking has the smaller
layer output error but empties some output features, and the model's perplexity suffers (the
measurement: ``benchmarks/results/design_measurements.md``, "row-balanced pruning").
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from ..values import FLOAT_DTYPES
from .base import Factorized, FormatError, FormatSpec, Shape, check_matrix
from .kronecker import Kronecker, KroneckerSpec
from .lowrank import LowRank, LowRankSpec
from .registry import register_format
from .sparse_index import count_kept, index_bytes, placeholder_index
from .sparse_overlay import SparseOverlay

BaseSpec = Annotated[KroneckerSpec | LowRankSpec, Field(discriminator="kind")]


class DopedSpec(FormatSpec):
    """A structured ``base`` (or none) plus a sparse overlay at ``density``."""

    kind: Literal["doped"] = "doped"
    base: BaseSpec | None = Field(default=None, description="Structured part; None means unstructured pruning.")
    density: float = Field(ge=0.0, le=1.0, description="Fraction of the weight's entries kept in the overlay.")

    @property
    def overlay_density(self) -> float | None:
        return self.density

    def with_overlay_density(self, density: float) -> DopedSpec:
        return type(self).model_validate({**dict(self), "density": density})  # validated; keeps the precision

    @property
    def base_spec(self) -> KroneckerSpec | LowRankSpec | None:
        """The base with this spec's precision (the base's own ``precision`` field is not used)."""
        return None if self.base is None else self.base.model_copy(update={"precision": self.precision})

    def overlay_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The overlay values' dtype for a weight of ``dtype``."""
        if self.precision is None:
            return dtype
        return FLOAT_DTYPES[self.precision.dtype] if self.precision.is_float else torch.float16

    def check(self, shape: Shape) -> None:
        if self.base_spec is not None:
            self.base_spec.check(shape)
        elif self.density == 0.0:
            raise FormatError(
                f"doped density={self.density} with no base stores nothing on a {shape[0]}x{shape[1]} weight "
                "(needs density > 0 or a base)"
            )

    def nnz(self, shape: Shape) -> int:
        return count_kept(self.density, shape[0] * shape[1])

    def nparams(self, shape: Shape) -> int:
        return (self.base.nparams(shape) if self.base else 0) + self.nnz(shape)

    def nbytes(self, shape: Shape, itemsize: int) -> int:
        base = self.base_spec.nbytes(shape, itemsize) if self.base_spec else 0
        nnz = self.nnz(shape)
        value = itemsize if self.precision is None else self.overlay_dtype(torch.float32).itemsize
        return base + nnz * value + index_bytes(shape, nnz)[1]

    def flops_per_token(self, shape: Shape) -> int:
        return (self.base.flops_per_token(shape) if self.base else 0) + 2 * self.nnz(shape)

    def describe(self) -> str:
        base = self.base.describe() if self.base else "none"
        return f"doped({base}+{self.density:.4g}){self.precision_tag()}"


OVERLAY_OVERHEAD = 30.0
"""What one FLOP of the overlay's sparse product costs in GEMM FLOPs, forward and backward (`kronc::sparse_linear`,
CSR forward and gather/scatter gradients): measured with one thread on a 1024x256 LSTM gate matrix with a 2.9%
overlay at 1120 tokens (76 ms against 88 ms for the dense GEMM of 35x the FLOPs;
``benchmarks/results/lstm_word_lm.md``). A doped weight's factored cost is its base's plus its overlay's, so a
dense overlay (the LSTM policy's 1-5%) tips it to the transient dense weight where a 0.5% one does not."""


class Doped(Factorized):
    spec_type = DopedSpec
    factored_overhead = 4.0  # measured: kronc.formats.training (the whole op; `factored_cost` splits it)

    def __init__(self, base: Kronecker | LowRank | None, overlay: SparseOverlay, spec: DopedSpec) -> None:
        super().__init__(spec, overlay.shape)
        self.base = base
        self.overlay = overlay

    @classmethod
    def fit(cls, weight: Tensor, spec: FormatSpec, column_scale: Tensor | None = None) -> Doped:
        """Fit the base, then keep the residual's largest entries.

        With no base the entries are kept row-balanced (`row_balanced_mask`). With ``column_scale``
        (one factor per input column, e.g. ``sqrt(diag E[x xᵀ])``), entries are
        ranked by ``|residual| * column_scale`` instead: the data-aware ranking of Wanda, which keeps
        the entries that move the layer's output most.
        """
        assert isinstance(spec, DopedSpec)
        check_matrix(weight)
        shape: Shape = tuple(weight.shape)  # type: ignore[assignment]
        spec.check(shape)
        base: Kronecker | LowRank | None = None
        residual = weight.detach()
        if spec.base_spec is not None:
            base = (Kronecker if isinstance(spec.base, KroneckerSpec) else LowRank).fit(weight, spec.base_spec)
            residual = residual - base.to_dense().detach().to(residual.dtype)
        scores = residual if column_scale is None else residual.to(torch.float64) * column_scale.to(residual.device)
        if spec.base is None:
            mask = row_balanced_mask(scores, spec.nnz(shape))
        else:
            mask = top_magnitude_mask(scores, spec.nnz(shape))
        out = cls(base, SparseOverlay.from_dense(residual.to(spec.overlay_dtype(weight.dtype)), mask), spec)
        out.compute_dtype = weight.dtype
        return out

    @classmethod
    def empty(cls, spec: FormatSpec, shape: Shape, dtype: torch.dtype) -> Doped:
        assert isinstance(spec, DopedSpec)
        kind = Kronecker if isinstance(spec.base, KroneckerSpec) else LowRank
        base = None if spec.base_spec is None else kind.empty(spec.base_spec, shape, dtype)
        nnz = spec.nnz(shape)
        values = torch.zeros(nnz, dtype=spec.overlay_dtype(dtype))
        out = cls(base, SparseOverlay(placeholder_index(shape, nnz), values), spec)
        out.compute_dtype = dtype
        return out

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        rows, cols = self.overlay.index.decode()
        values: Tensor = self.overlay.values
        out_features = self.shape[0]
        values = values if values.dtype == x.dtype else values.to(x.dtype)
        if isinstance(self.base, Kronecker):  # one fused op: the overlay joins the Kronecker output tile
            a, b = self.base.value("a", x.dtype), self.base.value("b", x.dtype)
            return torch.ops.kronc.doped_kron_linear(x, a, b, rows, cols, values, bias)
        if self.base is None:
            return torch.ops.kronc.sparse_linear(x, rows, cols, values, out_features, bias)
        return self.base(x, bias) + torch.ops.kronc.sparse_linear(x, rows, cols, values, out_features)

    def rows(self, index: Tensor) -> Tensor:
        out = self.overlay.rows(index).to(self.dtype)
        return out if self.base is None else self.base.rows(index) + out

    def to_dense(self) -> Tensor:
        out = self.overlay.to_dense().to(self.dtype)
        return out if self.base is None else self.base.to_dense() + out

    def build_flops(self) -> int:
        return self.shape[0] * self.shape[1] + (self.base.build_flops() if self.base is not None else 0)

    def factored_cost(self) -> float:
        """The base's factored cost plus the overlay's (``2 nnz`` FLOPs at `OVERLAY_OVERHEAD`)."""
        base = self.base.factored_cost() if self.base is not None else 0.0
        return base + 2 * self.overlay.values.numel() * OVERLAY_OVERHEAD

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        overlay = self.overlay.to_dense()
        overlay = overlay if overlay.dtype == dtype else overlay.to(dtype)
        return overlay if self.base is None else self.base.dense_weight(dtype) + overlay

    @property
    def dtype(self) -> torch.dtype:
        found = getattr(self, "compute_dtype", None)
        return found if found is not None else (self.base.dtype if self.base is not None else self.overlay.values.dtype)


def top_magnitude_mask(matrix: Tensor, keep: int) -> Tensor:
    """Boolean mask of the ``keep`` largest-magnitude entries (ties broken by position)."""
    order = torch.argsort(matrix.abs().flatten(), descending=True, stable=True)
    mask = torch.zeros(matrix.numel(), dtype=torch.bool, device=matrix.device)
    mask[order[:keep]] = True
    return mask.reshape(matrix.shape)



def row_balanced_order(scores: Tensor, keep: int) -> Tensor:
    """Flat positions of the ``keep`` entries row-balanced pruning keeps, in an order whose every
    prefix is what it keeps for a smaller ``keep``.

    Rank by rank: every row's largest ``|score|`` (ties by column), then every row's second
    largest, and so on; within a rank, larger scores first (ties by row). Zero scores come after
    all others, so a row with fewer non-zero entries than its share yields the rest to the other
    rows and a matrix with at most ``keep`` non-zeros is kept exactly.
    """
    m, n = scores.shape
    keep = min(max(int(keep), 0), m * n)
    if keep == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    mags = scores.abs()
    order = torch.argsort(mags, dim=1, descending=True, stable=True)
    nonzero = (mags > 0).sum(1)
    per_rank = (nonzero[None, :] > torch.arange(n, device=scores.device)[:, None]).sum(1)
    cum = per_rank.cumsum(0)
    ranks = int(torch.searchsorted(cum, torch.tensor(keep, device=cum.device))) + 1 if int(cum[-1]) >= keep else n
    sel = order[:, :ranks]
    vals = mags.gather(1, sel).T  # (ranks, m)
    rows = torch.argsort(vals, dim=1, descending=True, stable=True)
    flat = rows * n + sel.T.gather(1, rows)
    live = vals.gather(1, rows) > 0
    return torch.cat([flat[live], flat[~live]])[:keep]


def row_balanced_mask(scores: Tensor, keep: int) -> Tensor:
    """Boolean mask of the ``keep`` entries of `row_balanced_order`: each row's largest ``|score|``,
    every row equally full (up to one entry, or fewer where a row runs out of non-zeros)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[row_balanced_order(scores, keep)] = True
    return mask.reshape(scores.shape)


register_format(Doped)

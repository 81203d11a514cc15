"""Cheap error estimates for every candidate of one site at once: the shared decompositions of one weight
(`SiteAnalysis`); each format's estimate lives in its planning family (`kronc.planning.families`).

The error of a candidate is relative: ``||W - W'|| / ||W||`` in the weight metric, or
``||(W - W') S|| / ||W S||`` in the data-aware metric (``S S^T = H + damping``, see `whiten`), where
``W'`` is the fit `fit.fit_site` produces. One decomposition serves a whole family of candidates:

* **low rank**: the eigenvalues of the smaller Gram matrix (``W W^T`` or ``W^T W``; ``W H W^T`` or
  ``S^T W^T W S`` data-aware) are the squared singular values, and the error of rank ``r`` is the
  tail sum past ``r``. Exact for the truncated (whitened) SVD fit.
* **Kronecker**: the same for the Van Loan–Pitsianis rearrangement of ``W``, one per factor shape;
  exact for `Kronecker.fit`. Data-aware, the weight-space fit's error
  ``||W S||² - 2 Σ <W H, K_i> + Σ <K_i H, K_j>`` is evaluated exactly; each ``<K_i H, K_j>`` is
  ``Σ H[(c,d),(e,f)] (A_i^T A_j)[c,e] (B_i^T B_j)[d,f]``, one pass over ``H``.
* **doped**: the residual of the base (materialised once per base) sorted by magnitude; the error of
  keeping the ``k`` largest entries is the residual energy minus a cumulative sum. Data-aware the
  entries are ranked by ``|R_ij| sqrt(H_jj)`` (Wanda's score, as `fit_site` fits them) and the
  error is ``||R S||² - 2 <S_k, R H> + <S_k H, S_k>`` with the first inner product a cumulative sum
  and the second one sparse product per density. Exact for `Doped.fit`.
* **block sparse**: sorted block norms, cumulatively summed. Data-aware: blocks ranked by the norms of
  ``W diag(sqrt(H_jj))`` (as `fit_site` fits them) and a per-block-row quadratic
  form over the dropped blocks, from one pass over ``W H`` (a coarser block grid sums a finer
  grid's form). Exact for `BlockSparse.fit`.
* **dense**: zero; at a precision, the error of the quantization (round to nearest, or the data-free
  fit's clip search, all clip ratios at once, on ~32k sampled values of whole rows scaled by their
  share of the energy, exact per row with the full ``H``: `SiteAnalysis.dense_quant_error`; the
  diagonal of ``H`` alone misjudges layers with a massive-activation channel). A ``gptq`` precision
  is the GPTQ fit of the sampled rows (rows are independent in GPTQ), held out across the two halves
  of the calibration data when their moments are given; weight metric only: its data-free fit's error.
* **quantized factors** (any other format at a precision): the exact error of the quantized fit,
  recomputed (fit, rebuild, measure); only searched when a policy asks for it.

So every estimate equals the error of the fit it describes up to floating point: weight-space
decompositions run in float32 and are redone in float64 when an error under 5% is read (float32
Gram rounding is ~1e-3 of ``||W||``); data-aware products are float64 except the overlay's sparse
products and the block-sparse Gram (float32, ~1e-6 relative); sums are float64. Overlay entries
are picked in the order `Doped.fit` uses (magnitude, ties by position); the fit itself rounds its
residual to the weight's dtype, the estimate does not. It is an *estimate* only of what matters
downstream: the layer's output error stands in for the model's loss.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
from torch import Tensor

from ..formats import FormatSpec
from ..formats import fit as fit_format
from ..formats.base import check_matrix
from ..formats.doped import row_balanced_order
from ..reference.kronecker import rearrange
from ..values import Precision, clip_search_residual, encode
from ..values.fits import CLIP_RATIOS, gptq_hinv, gptq_residuals
from ..values.rotation import rotate, rotate_gram, unrotate
from .families.base import family
from .shared import PerInput
from .whiten import column_scale, damped, whitener

F64 = torch.float64
_CHUNK = 1 << 22  # elements of the largest temporary in the block-sparse data-aware pass
_SPARSE_SHARE = 0.08  # overlays keeping at most this share of entries: sparse products, else dense
_QUANT_SAMPLE = 32768  # values (whole rows) a dense quantization estimate is measured on
_QUANT_MIN_ROWS = 16
_QUANT_TOP_ROWS = 8  # the rows with the most energy, always measured
SCREEN_MARGIN = 2.0
"""A screened candidate is dropped when its rough error is this many times a cheaper candidate's."""


def tail_sums(lam: Tensor) -> Tensor:
    """``tails[r] = sum(lam[r:])`` for ``r = 0..len(lam)``, with ``lam`` in descending order."""
    out = torch.zeros(lam.numel() + 1, dtype=F64)
    out[:-1] = lam.flip(0).cumsum(0).flip(0)
    return out


def eig_desc(gram: Tensor, vectors: bool) -> tuple[Tensor, Tensor | None]:
    if vectors:
        lam, vec = torch.linalg.eigh(gram)
        return lam.flip(0).clamp_min(0), vec.flip(1)
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0), None


def _threshold(values: Tensor, k: int, stride: int) -> Tensor | None:
    """A value a little below the ``k``-th largest, from a strided sample (None: too few to sample)."""
    sample = values[::stride]
    per = k / stride
    rank = math.ceil(per + 4 * per**0.5 + 8)  # ~4 standard deviations more than the expected count
    if rank >= sample.numel() // 2:
        return None
    return torch.topk(sample, rank, sorted=False).values.min()


def top_entries(values: Tensor, k: int, stride: int = 16) -> tuple[Tensor, Tensor]:
    """The ``k`` largest of 1-D ``values`` and their positions, descending, ties by position.

    The same entries ``torch.argsort(values, descending=True, stable=True)[:k]`` picks (the order
    `Doped.fit` keeps entries in), but faster for large ``k``: a strided sample gives a threshold a
    little below the ``k``-th largest value; if at least ``k`` values pass it, the top ``k`` are all
    among them and sorting those suffices. Otherwise (an unlucky sample) everything is sorted.
    """
    if k <= 0:
        return values[:0], torch.zeros(0, dtype=torch.long)
    thr = _threshold(values, k, stride)
    where = None if thr is None else torch.nonzero(values >= thr).squeeze(1)
    if where is None or where.numel() < k:
        where = torch.arange(values.numel())
    vals, pos = torch.sort(values[where], descending=True, stable=True)
    return vals[:k], where[pos[:k]]


def _overlay_quadratic(rows: Tensor, cols: Tensor, vals: Tensor, h: Tensor, kept: Sequence[int]) -> dict[int, float]:
    """``tr(S_k H S_k^T)`` for every ``k`` in ``kept``, ``S_k`` holding the first ``k`` entries given.

    One sparse (CSR) times dense product per ``k``, in float32 (MKL's fast path; the planner's
    errors need ~1e-6 relative precision, not more).
    """
    m = int(rows.max()) + 1 if rows.numel() else 1
    n = h.shape[0]
    h32 = h if h.dtype == torch.float32 else h.float()
    out = {}
    for k in kept:
        if k == 0:
            out[k] = 0.0
            continue
        r, c, v = rows[:k], cols[:k], vals[:k].float()
        order = torch.argsort(r * n + c)
        crow = torch.zeros(m + 1, dtype=torch.long)
        crow[1:] = torch.cumsum(torch.bincount(r, minlength=m), 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            sparse = torch.sparse_csr_tensor(crow, c[order], v[order], (m, n), check_invariants=False)
        out[k] = float(((sparse @ h32)[r, c] * v).sum(dtype=F64))
    return out


class SiteAnalysis:
    """Decompositions of one weight, cached, and the errors they give for any set of candidates.

    Build one per site (``weight`` of logical shape ``(out, in)``; ``moments`` the ``(in, in)`` input
    second moment for the data-aware metric) and call `errors`.

    ``shared``: work per input Gram matrix kept across the analyses of sites that read the same input
    (`PerInput`; by default this analysis's own).

    ``folds``: the moments of two disjoint halves of the calibration data. With them the data-aware
    low-rank errors are **held out**: the mean over the two halves of the error, measured on one,
    of the whitened fit to the other (`heldout_lowrank_tails`). The whitened SVD is the one fit
    that uses all of ``H``, and with a few thousand calibration tokens it fits their noise (the
    measurement: ``benchmarks/results/design_measurements.md``, "held-out low rank"). Every other estimate is the
    error on all of the calibration data.
    """

    def __init__(
        self,
        weight: Tensor,
        moments: Tensor | None = None,
        damping: float = 0.01,
        refine_below: float = 0.05,
        folds: tuple[Tensor, Tensor] | None = None,
        shared: PerInput | None = None,
    ) -> None:
        check_matrix(weight)
        self.shape: tuple[int, int] = (int(weight.shape[0]), int(weight.shape[1]))
        self.data = moments is not None
        # Weight-space decompositions run in float32 and are redone in float64 when an error is small
        # enough (below ``refine_below``) for float32 rounding (~1e-3 relative) to matter; the
        # data-aware metric's products and the whitened spectrum are float64.
        self.w32 = weight.detach().to(device="cpu", dtype=torch.float32)
        self.w = self.w32.to(F64) if self.data else self.w32
        self.energy = float(self.w32.square().sum(dtype=F64))  # ||W||^2
        self.refine_below = refine_below
        self.shared = shared if shared is not None else PerInput()
        self.h: Tensor | None = None
        self.h32: Tensor | None = None
        self.p: Tensor | None = None  # W H (data-aware)
        if moments is not None:
            if tuple(moments.shape) != (self.shape[1], self.shape[1]):
                raise ValueError(f"moments of shape {tuple(moments.shape)} do not match a weight with {self.shape[1]} inputs")
            self.h = self.shared.get(("damped", damping), moments, lambda: damped(moments, damping))
            self.p = self.w @ self.h
            self.total = float((self.p * self.w).sum())
        else:
            self.total = self.energy
        self._gram: dict[bool, tuple[Tensor, Tensor | None, bool]] = {}  # whitened? -> (eigenvalues, vectors, f64?)
        self._kron: dict[tuple[int, int], tuple[Tensor, Tensor | None, bool]] = {}
        self.grams: dict[tuple[int, int], Tensor] = {}  # block shape -> block Gram (data-aware)
        self.damping = damping
        self.folds = folds if moments is not None else None
        self._gptq: dict[bool, tuple[Tensor, list[tuple[Tensor, Tensor]]]] = {}  # rotated? -> (rows, [(H, hinv)])

    # ---------------------------------------------------------------- decompositions
    def _decompose(self, matrix: Tensor, vectors: bool, upto: int) -> tuple[Tensor, Tensor | None, bool]:
        """Eigen-decomposition of the smaller Gram matrix of ``matrix`` (eigenvalues descending, in
        float64), redone in float64 when the tail past ``upto`` is small enough to need it. The flag
        says whether it was computed in float64."""
        gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
        lam, vec = eig_desc(gram, vectors)
        if matrix.dtype != F64 and self._coarse(lam, upto):
            return self._decompose(matrix.to(F64), vectors, upto)
        return lam.to(F64), vec, matrix.dtype == F64

    def _coarse(self, lam: Tensor, upto: int) -> bool:
        return float(lam[upto:].sum()) < self.refine_below**2 * self.energy

    def _cached(
        self, cache: dict, key: object, vectors: bool, upto: int, compute: Callable[[], tuple[Tensor, Tensor | None, bool]]
    ) -> tuple[Tensor, Tensor | None]:
        hit = cache.get(key)
        if hit is None or (vectors and hit[1] is None) or (not hit[2] and self._coarse(hit[0], upto)):
            hit = cache[key] = compute()
        return hit[0], hit[1]

    def spectrum(self, whitened: bool | None = None, vectors: bool = False, upto: int = 0) -> tuple[Tensor, Tensor | None]:
        """Squared singular values (descending) of ``W`` (or ``W S``), and the smaller side's vectors.

        ``upto``: the largest rank whose error will be read (decides whether float32 is enough).
        """
        whitened = self.data if whitened is None else whitened
        m, n = self.shape

        def compute() -> tuple[Tensor, Tensor | None, bool]:
            if not whitened:  # weight space: float32 unless the tail needs float64
                return self._decompose(self.w32, vectors, upto)
            if m <= n:  # eigenvalues of W H W^T, no Cholesky needed (float64)
                assert self.p is not None
                return (*eig_desc(self.p @ self.w.T, vectors), True)
            assert self.h is not None
            ws = self.w @ self.whitened_input()
            return (*eig_desc(ws.T @ ws, vectors), True)

        return self._cached(self._gram, whitened, vectors, upto, compute)

    def kron_spectrum(self, a_shape: tuple[int, int], vectors: bool = False, upto: int = 0) -> tuple[Tensor, Tensor | None]:
        """Squared singular values (descending) of the rearranged ``W``, and the smaller side's vectors."""
        return self._cached(
            self._kron, a_shape, vectors, upto, lambda: self._decompose(rearrange(self.w32, a_shape), vectors, upto)
        )

    def kron_factors(self, a_shape: tuple[int, int], terms: int) -> tuple[Tensor, Tensor, Tensor]:
        """Unit-norm ``vec(A_i)`` (p, T), ``vec(B_i)`` (q, T) and weights ``s_i`` of the best ``terms``."""
        lam, vec = self.kron_spectrum(a_shape, vectors=True, upto=terms)
        assert vec is not None
        r = rearrange(self.w32.to(vec.dtype), a_shape)
        s = lam[:terms].sqrt().to(vec.dtype)
        live = s > s[0] * 1e-12 if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
        inv = torch.where(live, 1.0 / torch.where(live, s, torch.ones_like(s)), torch.zeros_like(s))
        if r.shape[0] <= r.shape[1]:
            a = vec[:, :terms]
            b = (r.T @ a) * inv
        else:
            b = vec[:, :terms]
            a = (r @ b) * inv
        return a * live, b, s * live







    # ---------------------------------------------------------------- helpers
    def whitened_input(self) -> Tensor:
        """``S`` with ``S Sᵀ = H`` (damped), cached."""
        assert self.h is not None
        if getattr(self, "_whitener", None) is None:
            h = self.h
            self._whitener = self.shared.get("whitener", h, lambda: whitener(h))
        return self._whitener

    def input_scale(self) -> Tensor:
        assert self.h is not None
        return column_scale(self.h)

    def rel(self, err2: float | Tensor) -> float:
        return float(np.sqrt(max(float(err2), 0.0) / self.total)) if self.total > 0 else 0.0

    def overlay_errors(
        self, resid: Tensor, q: Tensor | None, kept: Sequence[int], balanced: bool = False
    ) -> dict[int, float]:
        """Errors of ``resid`` minus its ``k`` largest-magnitude entries, for each ``k`` in ``kept``
        (``balanced``: the row-balanced selection of `row_balanced_mask`, as for pruning)."""
        flat = resid.reshape(-1)
        top = max(kept, default=0)
        # data-aware ranking as `fit_site` does it: |R_ij| * sqrt(H_jj)
        scores = resid.abs() if q is None else resid.to(F64).abs() * self.input_scale()
        idx = row_balanced_order(scores, top) if balanced else top_entries(scores.reshape(-1), top)[1]
        if q is None:
            cum = torch.cat([torch.zeros(1, dtype=F64), flat[idx].to(F64).square().cumsum(0)])
            energy = float(flat.square().sum(dtype=F64))
            return {k: self.rel(energy - float(cum[k])) for k in kept}
        assert self.h is not None
        m, n = resid.shape
        if self.h32 is None:
            self.h32 = self.h.float()
        out: dict[int, float] = {}
        few = [k for k in kept if k <= _SPARSE_SHARE * m * n]
        if few:  # few kept entries: energy - 2 <S, R H> + <S H, S>, one sparse product per k
            qf = q.reshape(-1)
            energy = float((flat * qf).sum())
            lin = torch.cat([torch.zeros(1, dtype=F64), (flat[idx] * qf[idx]).cumsum(0)])
            quad = _overlay_quadratic(idx // n, idx % n, flat[idx], self.h32, sorted(few))
            out.update({k: self.rel(energy - 2 * float(lin[k]) + quad[k]) for k in few})
        r32 = resid.float()
        for k in kept:  # many: the dropped part E directly, <E H, E> in one float32 matmul
            if k not in out:
                e = r32.clone().reshape(-1)
                e[idx[:k]] = 0
                e = e.reshape(m, n)
                out[k] = self.rel(float(((e @ self.h32) * e).sum(dtype=F64)))
        return out

    def quant_error(self, spec: FormatSpec) -> float:
        """Relative error of ``spec`` at its precision (see the module docstring)."""
        p = spec.precision
        assert p is not None
        if spec.identity is False and spec.kind == "dense":
            return self.dense_quant_error(p)
        e = fit_format(self.w32, spec).to_dense().detach().to(F64) - self.w32.to(F64)
        if self.h is None:
            return self.rel(float(e.square().sum()))
        return self.rel(float(((e @ self.h) * e).sum()))

    def _quant_rows(self) -> tuple[Tensor, int, float]:
        """The rows the dense quantization estimates are measured on: the `_QUANT_TOP_ROWS` rows with
        the most energy (``w_i H w_iᵀ`` data-aware, ``|w_i|²`` else), counted as they are, then rows
        spread evenly over the rest, scaled by the rest's share of the energy. Returns the rows, how
        many of them are the top ones, and that scale (a stratified estimate: one row holding a massive
        weight on a massive-activation channel can carry most of a layer's output energy, and a plain
        sample that misses it, scaled by energy, overstates the error tenfold)."""
        if getattr(self, "_qrows", None) is None:
            m, n = self.shape
            k = min(m, max(_QUANT_MIN_ROWS, math.ceil(_QUANT_SAMPLE / n)))
            if k + _QUANT_TOP_ROWS >= m:
                self._qrows = (self.w32, m, 1.0)
            else:
                energy = (self.p * self.w).sum(1) if self.p is not None else self.w32.square().sum(1, dtype=F64)
                top = torch.topk(energy, _QUANT_TOP_ROWS).indices
                rest = torch.ones(m, dtype=torch.bool)
                rest[top] = False
                others = torch.nonzero(rest).squeeze(1)
                pick = others[torch.linspace(0, others.numel() - 1, k).round().long().unique()]
                part = float(energy[pick].sum())
                scale = float(energy[others].sum()) / part if part > 0 else 1.0
                self._qrows = (self.w32[torch.cat([top, pick])], _QUANT_TOP_ROWS, scale)
        return self._qrows

    def _quadratic(self, e: Tensor) -> float:
        """``Σ_i e_i H e_iᵀ`` (data-aware) or ``Σ e²`` over the rows of ``e``, float64."""
        if self.h is None:
            return float(e.square().sum(dtype=F64))
        e64 = e.to(F64)
        return float(((e64 @ self.h) * e64).sum())

    def dense_quant_error(self, p: Precision) -> float:
        """The dense weight at ``p``, measured on `_quant_rows` and scaled to the whole weight by their
        share of its energy: a float cast by the cast itself; an integer grid by `clip_search_residual`
        (the clip search of the data-free fit, all ratios at once; ``rtn``: the full range only). The
        error of each sampled row is exact, ``e_i H e_iᵀ`` with the full ``H`` (the diagonal of ``H``
        alone overstates it up to tenfold on layers with a massive-activation channel, SmolLM2's
        ``layers.11.mlp.down_proj`` among them, and ranks symmetric and asymmetric grids wrongly there).
        Relative rounding error varies little between rows, so ~32k sampled values estimate it to a few
        percent (``tests/test_precision.py``) for a fraction of the cost of fitting each precision. A
        ``gptq`` precision is GPTQ run on the sampled rows (`_gptq_per_row`, held out when there are
        folds; weight metric: its data-free fit, an upper bound), an ``hqq`` one by its clip search (HQQ's zero-point step only lowers the error further); a rotated
        one by the same search on the rotated rows, its residual rotated back."""
        return self.dense_quant_errors([p])[0]

    def dense_quant_errors(self, precisions: Sequence[Precision]) -> list[float]:
        """`dense_quant_error` of each precision, the quadratic forms of all of them in one float32 product."""
        rows, top, scale = self._quant_rows()
        resid = []
        rotated: Tensor | None = None
        gptq = {i: p for i, p in enumerate(precisions) if p.fit == "gptq" and not p.is_float and self.h is not None}
        for i, p in enumerate(precisions):
            if i in gptq:
                resid.append(torch.zeros_like(rows))  # measured apart (`_gptq_per_row`)
            elif p.is_float:
                resid.append(encode(rows, p).codes.float() - rows)
            elif p.rotate:  # the residual of W R, rotated back: e Rᵀ (R orthogonal, so e_i H e_iᵀ stays exact)
                rotated = rotate(rows) if rotated is None else rotated
                resid.append(unrotate(clip_search_residual(rotated, p, ratios=(1.0,) if p.fit == "rtn" else CLIP_RATIOS)))
            else:
                resid.append(clip_search_residual(rows, p, ratios=(1.0,) if p.fit == "rtn" else CLIP_RATIOS))
        e = torch.stack(resid)  # (precisions, rows, in)
        if self.h is None:
            per_row = e.square().sum(-1, dtype=F64)
        else:
            if self.h32 is None:
                self.h32 = self.h.float()
            per_row = ((e.reshape(-1, e.shape[-1]) @ self.h32).reshape(e.shape) * e).sum(-1, dtype=F64)
        for kind in {(p.rotate, p.dtype, p.symmetric) for p in gptq.values()}:
            at = [i for i, p in gptq.items() if (p.rotate, p.dtype, p.symmetric) == kind]
            per_row[at] = self._gptq_per_row(rows, [gptq[i] for i in at])
        err2 = per_row[:, :top].sum(-1) + per_row[:, top:].sum(-1) * scale
        return [self.rel(float(x)) for x in err2]

    def _gptq_per_row(self, rows: Tensor, ps: list[Precision]) -> Tensor:
        """Squared output error per sampled row ``(len(ps), rows)`` of the GPTQ fit of each precision
        (one bit width, symmetry and rotation), run on those rows (GPTQ treats rows independently), all
        in one batched column loop (`gptq_residuals`). With ``folds`` it is held out: fitted with one
        half's ``H``, measured with the other's, averaged over both ways (GPTQ fits its calibration
        tokens closely, and in-sample errors flatter it); without, in sample with the full ``H``.
        Rotated precisions fit ``W R`` with ``Rᵀ H R``; the error is the same in either basis."""
        assert self.h is not None
        key = bool(ps[0].rotate)
        if key not in self._gptq:
            sources = list(self.folds) if self.folds is not None else [self.h]
            self._gptq[key] = (rotate(rows) if key else rows,
                               [self.shared.get(("gptq", key, self.damping), f, partial(self._gptq_gram, f, key))
                                for f in sources])
        base, fitted = self._gptq[key]
        pairs = [(0, 1), (1, 0)] if len(fitted) == 2 else [(0, 0)]
        e = gptq_residuals(base, [(p, fitted[fit_i][1]) for p in ps for fit_i, _ in pairs])
        e = e.reshape(len(ps), len(pairs), *base.shape)
        out = torch.zeros(len(ps), rows.shape[0], dtype=F64)
        for k, (_, eval_i) in enumerate(pairs):
            out += ((e[:, k] @ fitted[eval_i][0]) * e[:, k]).sum(-1)
        return out / len(pairs)

    def _gptq_gram(self, source: Tensor, rotated: bool) -> tuple[Tensor, Tensor]:
        """The Gram matrix GPTQ is measured with (damped when ``source`` is a fold's moments; rotated) and
        its `gptq_hinv`."""
        h = source if source is self.h else self.shared.get(("damped", self.damping), source,
                                                            lambda: damped(source, self.damping))
        h = rotate_gram(h.to(F64)) if rotated else h.to(F64)
        return h, gptq_hinv(h)

    def row_sample(self) -> tuple[Tensor, Tensor | None, float]:
        """Sampled rows (`_quant_rows`), the diagonal of ``H`` (data-aware) and the factor from the
        rows' diagonal-weighted energy to the whole weight's (for rough screens)."""
        rows, _, _ = self._quant_rows()
        cw = None if self.h is None else self.h.diagonal().float()
        sq = rows.square() if cw is None else rows.square() * cw
        full = self.w32.square() if cw is None else self.w32.square() * cw
        part = float(sq.sum(dtype=F64))
        return rows, cw, float(full.sum(dtype=F64)) / part if part > 0 else 1.0

    def errors(self, specs: Sequence[FormatSpec], nbytes: Sequence[int] | None = None) -> np.ndarray:
        """Relative error of every spec, in order: each format's family estimates its own specs at once
        (sharing this analysis's decompositions); specs at a precision by `quant_error`.

        With ``nbytes`` (each spec's stored bytes), candidates that are clearly dominated are not
        estimated and come back as NaN: a family with a `Family.screen` gives a rough error first, and a
        spec whose rough error exceeds `SCREEN_MARGIN` times the error of some other spec storing no
        more bytes (among those estimated exactly without a screen) is dropped. The solver would never
        pick it, and the exact estimate (for pruning: a sort of every entry and sparse products) is the
        slowest part of the analysis."""
        out = np.zeros(len(specs))
        groups: dict[str, list[int]] = defaultdict(list)
        dense_at: list[int] = []
        for i, spec in enumerate(specs):
            spec.check(self.shape)
            if spec.precision is not None and spec.kind == "dense":
                dense_at.append(i)
            elif spec.precision is not None:
                out[i] = self.quant_error(spec)
            else:
                groups[spec.kind].append(i)
        if dense_at:
            out[dense_at] = self.dense_quant_errors([specs[i].precision for i in dense_at])  # type: ignore[misc]
        screened = {k: w for k, w in groups.items() if nbytes is not None and family(k).screens}
        for kind, where in groups.items():
            if kind not in screened:
                out[where] = np.asarray(family(kind).errors(self, [specs[i] for i in where]), dtype=np.float64)
        if screened:
            assert nbytes is not None
            exact = sorted({i for i in range(len(specs))} - {i for w in screened.values() for i in w}, key=lambda i: nbytes[i])
            for kind, where in screened.items():
                rough = family(kind).screen(self, [specs[i] for i in where])
                keep = []
                for i, r in zip(where, rough, strict=True):
                    best = min((out[j] for j in exact if nbytes[j] <= nbytes[i]), default=math.inf)
                    if r > SCREEN_MARGIN * best:
                        out[i] = math.nan
                    else:
                        keep.append(i)
                if keep:
                    out[keep] = np.asarray(family(kind).errors(self, [specs[i] for i in keep]), dtype=np.float64)
        return out


def estimate_errors(
    weight: Tensor, specs: Sequence[FormatSpec], moments: Tensor | None = None, damping: float = 0.01
) -> np.ndarray:
    """Relative error of each spec's fit to ``weight`` (data-aware when ``moments`` is given)."""
    return SiteAnalysis(weight, moments, damping).errors(specs)

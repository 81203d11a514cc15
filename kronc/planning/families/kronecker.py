"""Kronecker sums on the planning side: factor shapes x term counts, every term count's error from one
SVD of the rearranged weight (exact data-aware error too), and the shared residuals doped bases use."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ...formats import FormatSpec, KroneckerSpec, Shape
from ...reference.kronecker import kron_times, rearrange, unrearrange
from ..estimate import SiteAnalysis, tail_sums
from ..options import SearchOptions
from ..shapes import factor_shapes
from .base import Choice, Family

FactorShapes = Literal["auto"] | list[tuple[int, int]]


def describe_shapes(shapes: FactorShapes) -> str:
    return "auto" if shapes == "auto" else ",".join(f"{a}x{b}" for a, b in shapes)


class KroneckerChoice(Choice):
    """Sums of Kronecker products ``Σ A_r ⊗ B_r``."""

    kind: Literal["kronecker"] = "kronecker"
    """Format tag: ``kronecker``."""
    a_shapes: FactorShapes = "auto"
    """Shapes ``(m1, n1)`` of the first factor, or ``auto`` for every divisor pair of the weight's
    shape whose two factors are both at least ``min_factor`` on each side."""
    min_factor: int = Field(default=2, ge=1)
    """With ``a_shapes: auto``, the smallest side either factor may have."""
    terms_max: int = Field(default=4, ge=1)
    """Largest number of Kronecker terms summed; every count from 1 to this is considered."""

    def describe(self) -> str:
        return f"kronecker({describe_shapes(self.a_shapes)}, terms<={self.terms_max})" + self.precision_note()


def kron_shapes(shape: Shape, a_shapes: object, min_factor: int, limit: int) -> list[tuple[int, int]]:
    if a_shapes == "auto":
        return factor_shapes(shape, min_factor, limit)
    out = []
    for m1, n1 in a_shapes:  # type: ignore[attr-defined]
        if m1 >= 1 and n1 >= 1 and shape[0] % m1 == 0 and shape[1] % n1 == 0:
            out.append((int(m1), int(n1)))
    return out


def kron_specs(shape: Shape, pairs: Sequence[tuple[int, int]], terms_max: int) -> list[KroneckerSpec]:
    m, n = shape
    specs = []
    for m1, n1 in pairs:
        bound = min(m1 * n1, (m // m1) * (n // n1))
        specs += [KroneckerSpec(a_shape=(m1, n1), terms=t) for t in range(1, min(terms_max, bound) + 1)]
    return specs


def kron_errors(an: SiteAnalysis, a_shape: tuple[int, int], terms: Sequence[int], doped: dict[int, Sequence[int]] | None = None
) -> tuple[dict[int, float], dict[tuple[int, int], float]]:
    """Errors of ``terms``-term sums, and of doped bases ``{terms: [kept entries]}``, for one shape."""
    doped = doped or {}
    top = max([*terms, *doped, 0])
    if not an.data and not doped:
        lam, _ = an.kron_spectrum(a_shape, upto=top)
        tails = tail_sums(lam)
        return {t: an.rel(tails[min(t, lam.numel())]) for t in terms}, {}
    a, b, s = an.kron_factors(a_shape, top)
    dt = torch.promote_types(a.dtype, an.w.dtype)  # float64 data-aware or when refined
    a, b, s = a.to(dt), b.to(dt), s.to(dt)
    (m, n), (m1, n1) = an.shape, a_shape
    m2, n2 = m // m1, n // n1
    kron_out: dict[int, float] = {}
    zs: list[Tensor] = []
    if an.data:
        assert an.h is not None and an.p is not None
        lin = s * ((rearrange(an.p, a_shape) @ b) * a).sum(0)  # <W H, K_i>
        # <K_i H, K_j> = sum H[(c,d),(e,f)] (A_i^T A_j)[c,e] (B_i^T B_j)[d,f]: per pair i <= j,
        # two small Gram products and one pass over H
        fa, fb = a.T.reshape(top, m1, n1), b.T.reshape(top, m2, n2)
        h4 = an.h.reshape(n1, n2, n1, n2).permute(0, 2, 1, 3).reshape(n1 * n1, n2 * n2)
        quad = torch.zeros(top, top, dtype=dt)
        for i in range(top):
            for j in range(i, top):
                x, y = (fa[i].T @ fa[j]).reshape(-1), (fb[i].T @ fb[j]).reshape(-1)
                quad[i, j] = quad[j, i] = s[i] * s[j] * (x @ h4 @ y)
        for t in terms:
            err2 = an.total - 2 * float(lin[:t].sum()) + float(quad[:t, :t].sum())
            kron_out[t] = an.rel(err2)
        for i in range(max(doped, default=0)):  # K_i H, for the doped residuals' R H
            zs.append(kron_times(s[i] * a[:, i].reshape(m1, n1), b[:, i].reshape(m2, n2), an.h))
    else:
        lam, _ = an.kron_spectrum(a_shape, upto=top)
        tails = tail_sums(lam)
        kron_out = {t: an.rel(tails[min(t, lam.numel())]) for t in terms}
    doped_out: dict[tuple[int, int], float] = {}
    if doped:
        # residuals for increasing term counts, one term subtracted at a time; in the weight
        # metric only the multiset of residual entries matters, so it stays rearranged
        resid = rearrange(an.w.to(dt), a_shape)
        q = an.p
        done = 0
        for t in sorted(doped):
            resid = resid - (a[:, done:t] * s[done:t]) @ b[:, done:t].T
            if an.data:
                assert q is not None  # a data-aware analysis has p = W H
                q = q - sum(zs[done:t])
                errs = an.overlay_errors(unrearrange(resid, an.shape, a_shape), q, doped[t])
            else:
                errs = an.overlay_errors(resid, None, doped[t])
            done = t
            doped_out.update({(t, k): e for k, e in errs.items()})
    return kron_out, doped_out


class KroneckerFamily(Family):
    kind = "kronecker"
    choice = KroneckerChoice

    def structures(self, shape: Shape, choice: Choice, options: SearchOptions) -> Iterable[FormatSpec]:
        assert isinstance(choice, KroneckerChoice)
        return kron_specs(shape, kron_shapes(shape, choice.a_shapes, choice.min_factor, options.kron_shapes), choice.terms_max)

    def errors(self, analysis: SiteAnalysis, specs: Sequence[FormatSpec]) -> list[float]:
        by_shape: dict[tuple[int, int], set[int]] = {}
        for s in specs:
            assert isinstance(s, KroneckerSpec)
            by_shape.setdefault(s.a_shape, set()).add(s.terms)
        found = {a: kron_errors(analysis, a, sorted(t))[0] for a, t in sorted(by_shape.items())}
        return [found[s.a_shape][s.terms] for s in specs]  # type: ignore[attr-defined]

    def uniform(self, shape: Shape, itemsize: int, cap: float, options: SearchOptions) -> list[FormatSpec]:
        m, n = shape
        specs: list[FormatSpec] = []
        for m1, n1 in factor_shapes(shape, 2, options.kron_shapes):
            per_term = (m1 * n1 + (m // m1) * (n // n1)) * itemsize
            t = min(int(cap // per_term), m1 * n1, (m // m1) * (n // n1))
            if t >= 1:
                specs.append(KroneckerSpec(a_shape=(m1, n1), terms=t))
        return specs


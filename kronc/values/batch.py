"""`encode_many`: `encode` of many tensors, the GPTQ ones fitted together (the fit stage of `kronc.compile`).

A GPTQ fit costs a column loop, a Gram matrix rotation and a damped inverse Cholesky factor, and sites that
read the same input (q/k/v, gate/up) have the same Gram matrix. So the items at a ``gptq`` precision are
grouped by equal Gram matrix and rotation: the rotation ``Rᵀ H R`` and `gptq_hinv` are computed once per
group, the rows of the group's items at one precision are stacked into one fit (GPTQ treats rows
independently given ``H``), and fits of the same shape run in one `gptq_batch` column loop. Each item's
levels are exactly those `encode` gives it alone (`gptq_batch` keeps one block product per item).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor

from .codec import Encoded, encode, encode_levels
from .gptq import gptq_batch, gptq_hinv
from .grid import Levels
from .precision import Precision
from .rotation import rotate, rotate_gram
from .threads import single_threaded

BATCH_ELEMENTS = 1 << 25
"""At most this many weight values (float64) in one `gptq_batch` call (a few hundred MB of work space)."""

Item = tuple[Tensor, Precision, "Tensor | None"]
T = TypeVar("T")
R = TypeVar("R")


def _same_gram(groups: list[tuple[Tensor, list[int]]], h: Tensor) -> list[int] | None:
    """The index list of the group whose Gram matrix equals ``h`` (values, not identity), or None. The same
    object first (calibration gives sites reading one input one tensor), then equal diagonals, then all."""
    for g, members in groups:
        if g is h:
            return members
    for g, members in groups:
        if g.shape == h.shape and g.dtype == h.dtype and torch.equal(g.diagonal(), h.diagonal()) and torch.equal(g, h):
            return members
    return None


def encode_many(items: Sequence[Item], done: Callable[[int], None] | None = None,
                workers: int | None = None) -> list[Encoded]:
    """``[encode(w, p, h) for w, p, h in items]``, with the GPTQ fits grouped and batched (module docstring).

    ``done(i)`` is called as item ``i`` is encoded (progress). ``workers``: threads the work is spread
    over, torch single-threaded meanwhile (default: torch's thread count). The results do not depend on
    it: the column loops, Gram rotations and inverses are independent per group, and on one thread the
    loops' small ops and LAPACK's inverse run faster side by side than split (the inverse is
    single-threaded anyway, `gptq_hinv`)."""
    out: dict[int, Encoded] = {}
    plain: list[int] = []
    grams: list[tuple[Tensor, list[int]]] = []  # distinct Gram matrices -> the gptq items using them
    for i, (w, p, h) in enumerate(items):
        if p.is_float or p.fit != "gptq" or h is None:
            plain.append(i)
            continue
        p.check_shape(tuple(w.shape))
        found = _same_gram(grams, h)
        if found is None:
            grams.append((h, [i]))
        else:
            found.append(i)

    def prepare(group: tuple[Tensor, list[int]]) -> list[tuple[Tensor, Precision, Tensor, list[int]]]:
        """One fit per precision of the group: the stacked (rotated) rows of its items and `gptq_hinv`."""
        h, members = group
        hinvs: dict[bool, Tensor] = {}
        by_p: dict[Precision, list[int]] = {}
        for i in members:
            by_p.setdefault(items[i][1], []).append(i)
        fits = []
        for p, idx in by_p.items():
            if p.rotate not in hinvs:
                hd = h.double()
                hinvs[p.rotate] = gptq_hinv(rotate_gram(hd) if p.rotate else hd)
            ws = [items[i][0].detach().reshape(-1, items[i][0].shape[-1]) for i in idx]
            rows = torch.cat([(rotate(w.float()) if p.rotate else w).double() for w in ws])
            fits.append((rows, p, hinvs[p.rotate], idx))
        return fits

    def run(chunk: list[int]) -> list[Levels]:
        splits = [[items[i][1].check_shape(tuple(items[i][0].shape))[0] for i in fits[k][3]] for k in chunk]
        return gptq_batch(torch.stack([fits[k][0] for k in chunk]), [(fits[k][1], fits[k][2]) for k in chunk],
                          splits=splits)

    workers = max(1, torch.get_num_threads() if workers is None else workers)
    with _threads(workers) as pmap:
        for i, e in zip(plain, pmap(lambda i: encode(*items[i]), plain), strict=True):
            out[i] = e
            if done:
                done(i)
        fits = [f for group in pmap(prepare, grams) for f in group]
        # fits of one shape share a column loop, in batches of at most BATCH_ELEMENTS values
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for k, (rows, _, _, _) in enumerate(fits):
            by_shape.setdefault(tuple(rows.shape), []).append(k)
        calls: list[list[int]] = []
        for shape, ks in by_shape.items():
            per = min(max(1, BATCH_ELEMENTS // (shape[0] * shape[1])), math.ceil(len(ks) / workers))
            calls += [ks[s:s + per] for s in range(0, len(ks), per)]
        for chunk, levels in zip(calls, pmap(run, calls), strict=True):
            for k, lv in zip(chunk, levels, strict=True):
                _split(lv, fits[k][1], fits[k][3], items, out, done)
    return [out[i] for i in range(len(items))]


@contextmanager
def _threads(workers: int) -> Iterator[Callable[[Callable[[T], R], Sequence[T]], list[R]]]:
    """A ``map`` onto ``workers`` threads with torch single-threaded (restored afterwards); plain with one."""
    if workers <= 1:
        yield lambda fn, xs: [fn(x) for x in xs]
        return
    with single_threaded(), ThreadPoolExecutor(workers) as pool:
        yield lambda fn, xs: list(pool.map(fn, xs))


def _split(lv: Levels, p: Precision, idx: list[int], items: Sequence[Item], out: dict[int, Encoded],
           done: Callable[[int], None] | None) -> None:
    """The stacked fit's rows back to the items they came from, encoded."""
    start = 0
    for i in idx:
        shape = tuple(items[i][0].shape)
        rows = p.check_shape(shape)[0]
        part = Levels(lv.q[start:start + rows], lv.scale[start:start + rows],
                      None if lv.minimum is None else lv.minimum[start:start + rows])
        out[i] = encode_levels(part, p, shape)
        start += rows
        if done:
            done(i)

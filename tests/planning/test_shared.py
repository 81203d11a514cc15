"""Work per input Gram matrix shared across the sites that read one input (`kronc.planning.shared`): computed
once per moments object, also when sites are analysed on several threads, with the same estimates as
analyses that compute it each on their own."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from kronc.planning import SiteAnalysis
from kronc.planning.shared import PerInput
from kronc.values import Precision


def test_per_input_computes_once_per_source_object() -> None:
    shared = PerInput()
    a, b = torch.ones(3), torch.ones(3)  # equal values, different objects: not shared
    calls: list[int] = []
    lock = threading.Lock()

    def compute() -> int:
        with lock:
            calls.append(1)
        return len(calls)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: shared.get("k", a, compute), range(16)))
    assert got == [1] * 16 and len(calls) == 1
    assert shared.get("k", b, compute) == 2 and shared.get("other", a, compute) == 3


def test_gptq_estimates_with_shared_inverses_equal_separate_ones() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) @ (torch.eye(64) + 0.2 * torch.randn(64, 64, generator=g))
    folds = ((x[:128].T @ x[:128] / 128).float(), (x[128:].T @ x[128:] / 128).float())
    moments = (x.T @ x / 256).double()
    ps = [Precision(dtype="int3", group_size=g, symmetric=False, fit="gptq", rotate=True) for g in (32, 64)]
    ws = [torch.randn(24, 64, generator=g), torch.randn(8, 64, generator=g)]
    shared = PerInput()
    together = [SiteAnalysis(w, moments, folds=folds, shared=shared).dense_quant_errors(ps) for w in ws]
    alone = [SiteAnalysis(w, moments, folds=folds).dense_quant_errors(ps) for w in ws]
    assert together == alone and all(e > 0 for errs in alone for e in errs)
    gptq = [kind for kind, _ in shared._items if isinstance(kind, tuple) and kind[0] == "gptq"]
    assert len(gptq) == 2  # one inverse per fold, not per site

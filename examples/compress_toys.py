"""Compress every small built-in model at a few budgets; print compile time and output error.

    python examples/compress_toys.py

Models are random-initialised from configs, with trained-like (power-law) spectra so that
compression has something to keep; errors are relative Frobenius errors of the outputs on random
inputs, against the dense model.
"""

from __future__ import annotations

import time

import torch

import kronc
from kronc.policies import Policy
from kronc.tools.toy import TOY_MODELS, toy_inputs, with_decaying_spectra


def output(out: object) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out if isinstance(out, torch.Tensor) else out[0]  # type: ignore[index]


def main() -> None:
    torch.manual_seed(0)
    print(f"{'model':6s} {'budget':>6s} {'achieved':>8s} {'compile s':>9s} {'rel. error':>10s}  formats")
    for name, build in TOY_MODELS.items():
        model = with_decaying_spectra(build())
        x = toy_inputs(name)
        with torch.no_grad():
            ref = output(model(x))
        for budget in ("2x", "4x", "10x"):
            t = time.perf_counter()
            small, report = kronc.compile(model, policy=Policy(budget=budget), report=True)
            seconds = time.perf_counter() - t
            with torch.no_grad():
                err = float((output(small(x)) - ref).norm() / ref.norm())
            kinds: dict[str, int] = {}
            for d in report.plan.decisions:
                kinds[d.spec.kind] = kinds.get(d.spec.kind, 0) + 1
            print(f"{name:6s} {budget:>6s} {report.plan.ratio:7.2f}x {seconds:9.2f} {err:10.4f}  "
                  + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))


if __name__ == "__main__":
    main()

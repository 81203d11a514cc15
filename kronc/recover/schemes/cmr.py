"""Co-matrix dropout regularisation (CMR) for doped weights (doped Kronecker, Thakker et al.).

*Co-matrix adaptation* (CMA) is the doped papers' name for what happens when a structured base and a
sparse overlay are trained together: the overlay's few free entries learn fastest, the network
leans on them, and the structured part stops adapting, so the model degrades when the overlay is
later thinned (see `OverlayAnnealing`). CMR regularises the overlay's contribution with dropout.

The scheme implemented here, exactly: while a wrapped `Doped` module is in training mode its
forward computes ::

    y = base(x) + bias + m ⊙ (x Sᵀ) / (1 - p)          target="overlay" (default, the paper's CMR)
    y = m ⊙ (x Wbaseᵀ) / (1 - p) + x Sᵀ + bias          target="base"    (the ablation: drop the base)

where ``m`` is a fresh Bernoulli(1 - p) mask of the shape of the dropped term's *output* (one draw
per token and output feature; inverted-dropout scaling keeps its expectation), drawn from the
scheme's own generator (seeded, saved in `state_dict`, so a resumed run draws the same masks).
In expectation the output is unchanged; the variance penalises relying on the overlay: for
squared error, ``E||y* - y||² = ||y* - Kx - Sx||² + p/(1-p) ||Sx||²``. The bias is never dropped.

In eval mode (``module.eval()``) the wrapped forward is the original one (the fused kernel, full
overlay, deterministic). `finish` removes the wrappers. Only doped weights with a structured base
are wrapped (without a base, "the overlay" is the whole weight and CMR would be plain dropout);
only their linear use (``forward``) is regularised, not embedding lookups (``rows``).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...formats import Doped
from ._common import census, check_fraction, check_steps, compressed_formats
from .base import Scheme

Target = Literal["overlay", "base"]


class CoMatrixDropout(Scheme):
    """Dropout on the doped overlay's output (``target="overlay"``) or the base's (``"base"``) in training."""

    name = "co_matrix_dropout"

    def __init__(self, p: float = 0.5, target: Target = "overlay", seed: int = 0, enabled: bool = True) -> None:
        scheme = type(self).__name__
        self.p = check_fraction(scheme, "p", p, low_open=False, high_open=True)
        if target not in ("overlay", "base"):
            raise ValueError(f"{scheme}: target must be 'overlay' or 'base', got {target!r}")
        self.target: Target = target
        self.seed = int(seed)
        self.enabled = bool(enabled)
        self.wrapped: list[tuple[str, Doped]] = []
        self._generators: dict[str, torch.Generator] = {}
        self._pending: dict[str, Any] | None = None

    def attach(self, model: nn.Module, total_steps: int) -> None:
        if not self.enabled:
            return
        scheme = type(self).__name__
        check_steps(scheme, total_steps)
        doped = [(n, f) for n, f in compressed_formats(model) if isinstance(f, Doped)]
        with_base = [(n, f) for n, f in doped if f.base is not None]
        if not with_base:
            found = census(model) + (f" ({len(doped)} doped without a base)" if doped else "")
            raise ValueError(f"{scheme}: no doped weights with a structured base in the model (found formats: {found})")
        for name, fmt in with_base:
            if "forward" in vars(fmt):
                raise ValueError(f"{scheme}: the forward of {name} is already wrapped (by another CoMatrixDropout?)")
        self.wrapped = with_base
        for _, fmt in with_base:
            fmt.forward = functools.partial(self._forward, fmt)  # type: ignore[method-assign]
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)

    def finish(self, model: nn.Module) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the original forwards back (also what `finish` does)."""
        for _, fmt in self.wrapped:
            vars(fmt).pop("forward", None)
        self.wrapped = []

    # ----------------------------------------------------------------- the wrapped forward

    def _forward(self, fmt: Doped, x: Tensor, bias: Tensor | None = None) -> Tensor:
        if not fmt.training or self.p == 0.0:
            return Doped.forward(fmt, x, bias)
        assert fmt.base is not None
        rows, cols = fmt.overlay.index.decode()
        overlay = torch.ops.kronc.sparse_linear(x, rows, cols, fmt.overlay.values, fmt.shape[0])
        if self.target == "overlay":
            return fmt.base(x, bias) + self._drop(overlay)
        y = self._drop(fmt.base(x)) + overlay
        return y if bias is None else y + bias

    def _drop(self, t: Tensor) -> Tensor:
        keep = torch.rand(t.shape, generator=self._generator(t.device), device=t.device) >= self.p
        return t * keep.to(t.dtype) / (1.0 - self.p)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return gen

    # ----------------------------------------------------------------- reporting and state

    def metrics(self) -> dict[str, float]:
        return {"cmr_p": self.p} if self.enabled and self.wrapped else {}

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            return dict(self._pending)
        return {"generators": {k: g.get_state() for k, g in self._generators.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.wrapped:
            self._pending = dict(state)
            return
        for key, gen_state in state.get("generators", {}).items():
            self._generator(torch.device(key)).set_state(gen_state)

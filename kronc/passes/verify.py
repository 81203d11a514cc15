"""Pass plumbing: a pass maps a GraphModule to a `PassResult`; `run_passes` chains and checks them.

Invariants every pass keeps (checked by `verify` after each pass when example inputs are given):
the graph lints, the module recompiles, and the outputs keep their structure, shapes and dtypes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_flatten


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


Pass = Callable[[fx.GraphModule], PassResult]


class PassError(RuntimeError):
    """A pass left the graph invalid or changed what it returns."""


def signature(outputs: Any) -> list[tuple[str, tuple[int, ...] | None, torch.dtype | None]]:
    """Structure, shapes and dtypes of a (nested) output, for before/after comparison."""
    leaves, spec = tree_flatten(outputs)
    return [(str(spec), tuple(x.shape) if isinstance(x, torch.Tensor) else None,
             x.dtype if isinstance(x, torch.Tensor) else None) for x in leaves]


def verify(gm: fx.GraphModule, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
           expected: Any = None) -> Any:
    """Lint and recompile ``gm``; if inputs are given, run it and compare the output signature."""
    try:
        gm.graph.lint()
        gm.recompile()
    except Exception as e:
        raise PassError(f"pass {name!r} left an invalid graph: {e}") from e
    if not args and not kwargs:
        return None
    with torch.no_grad():
        try:
            out = gm(*args, **(kwargs or {}))
        except Exception as e:
            raise PassError(f"graph no longer runs after pass {name!r}: {type(e).__name__}: {e}") from e
    if expected is not None and signature(out) != expected:
        raise PassError(f"pass {name!r} changed the outputs from {expected} to {signature(out)}")
    return out


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass], args: Sequence[Any] = (),
               kwargs: dict[str, Any] | None = None) -> PassResult:
    """Run ``passes`` in order, verifying the graph after each one and naming the pass that broke it."""
    expected = None
    if args or kwargs:
        with torch.no_grad():
            expected = signature(gm(*args, **(kwargs or {})))
    modified = False
    for p in passes:
        result = p(gm)
        gm, modified = result.graph_module, modified or result.modified
        verify(gm, getattr(p, "__name__", repr(p)), args, kwargs, expected)
    return PassResult(gm, modified)

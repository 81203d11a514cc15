"""The checks a graph rewrite must pass: the graph lints, the module recompiles, and the outputs keep
their structure, shapes and dtypes.

kronc rewrites a graph in one step (`kronc.passes.rewrite.compress_sites`), so there is no pass
pipeline: `materialize` takes the output `signature` before the rewrite and `verify`s after it,
naming the rewrite that broke the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

Signature = list[tuple[str, tuple[int, ...] | None, torch.dtype | None]]


class PassError(RuntimeError):
    """A graph rewrite left the graph invalid or changed what it returns."""


def signature(outputs: Any) -> Signature:
    """Structure, shapes and dtypes of a (nested) output, for before/after comparison."""
    leaves, spec = tree_flatten(outputs)
    return [(str(spec), tuple(x.shape) if isinstance(x, torch.Tensor) else None,
             x.dtype if isinstance(x, torch.Tensor) else None) for x in leaves]


def output_signature(gm: fx.GraphModule, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> Signature | None:
    """The `signature` of ``gm``'s outputs on the example inputs; None without inputs (nothing to compare)."""
    if not args and not kwargs:
        return None
    with torch.no_grad():
        return signature(gm(*args, **(kwargs or {})))


def verify(gm: fx.GraphModule, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
           expected: Signature | None = None) -> Any:
    """Lint and recompile ``gm`` after the rewrite ``name``; with inputs, run it and compare the output
    signature with ``expected``. Returns the outputs (None without inputs)."""
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

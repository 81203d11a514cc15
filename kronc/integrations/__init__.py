"""Integrations with other tools: ``torch.compile`` (the ``"kronc"`` dynamo backend).

Importing `kronc` imports this package, which registers the backend, so
``torch.compile(model, backend="kronc", options={"budget": "4x"})`` works after ``import kronc``.
"""

from __future__ import annotations

from .torch_compile import BACKEND_NAME, compress_graph, kronc_backend, register

__all__ = ["BACKEND_NAME", "compress_graph", "kronc_backend", "register"]

"""Integrations with other tools: ``torch.compile`` (the ``"kronc"`` dynamo backend).

``kronc.register_backend()`` makes ``torch.compile(model, backend="kronc", options={"budget": "4x"})``
work; an installed kronc also declares the backend as a ``torch_dynamo_backends`` entry point, which
dynamo loads on first use. ``import kronc`` itself registers nothing with dynamo.
"""

from __future__ import annotations

from .torch_compile import BACKEND_NAME, compress_graph, kronc_backend, register

__all__ = ["BACKEND_NAME", "compress_graph", "kronc_backend", "register"]
